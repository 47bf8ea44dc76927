"""Huge or hostile gRPC input against a real `pysoci serve`: a prompt answer for it, and no
delay for the calls of everybody else (issue 15: a 64 KB key froze every call for minutes).

The daemon logs at debug, so every call formats its key under the logging lock, as the
frozen daemon did; the filters run containerd's syntax, with a regular expression that makes a
backtracking engine run for ever.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from snapshotter._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter._proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.lifecycle import unmount_stale_fuse
from tests.fixtures.containerd import Pysoci
from tests.fixtures.pysoci_config import pysoci_config

pytestmark = [pytest.mark.integration]

HANG_GUARD = 120.0
"""Seconds a call may take before the test calls it hung (quadratic redaction of a 1 MB key
took hours; a backtracking regex, for ever)."""
EVIL_LABEL = "a" * 4000 + "!"


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[pb_grpc.SnapshotsStub]:
    config = tmp_path / "pysoci.toml"
    config.write_text(pysoci_config("[background_fetch]\ndisable = true\n"))
    daemon = Pysoci(tmp_path / "root", tmp_path / "pysoci.sock", tmp_path / "pysoci.log", config)
    daemon.start()
    channel = grpc.insecure_channel(f"unix:{daemon.socket}")
    try:
        yield pb_grpc.SnapshotsStub(channel)
    finally:
        channel.close()
        daemon.stop_all()  # SIGTERM, then SIGKILL after 30 s (a daemon stuck in a loop)
        unmount_stale_fuse(daemon.root / "fuse")


def _outcome(fn: Callable[[], object]) -> str:
    try:
        fn()
    except grpc.RpcError as e:
        return e.code().name  # type: ignore[no-any-return]
    return "OK"


def test_huge_keys_and_filters_get_prompt_answers_and_delay_nobody(
    stub: pb_grpc.SnapshotsStub,
) -> None:
    ns = (("containerd-namespace", "default"),)
    stub.Prepare(
        pb.PrepareSnapshotRequest(key="default/1/evil", labels={"a": EVIL_LABEL}), metadata=ns
    )
    mb_key = "k" + "a1" * (1 << 19)
    huge: dict[str, Callable[[], object]] = {
        "prepare 1 MB key": lambda: stub.Prepare(
            pb.PrepareSnapshotRequest(key=mb_key), metadata=ns, timeout=HANG_GUARD
        ),
        "stat 64 KB key": lambda: stub.Stat(
            pb.StatSnapshotRequest(key="s" * 65536), metadata=ns, timeout=HANG_GUARD
        ),
        "remove 64 KB key": lambda: stub.Remove(
            pb.RemoveSnapshotRequest(key="r1" * 32768), metadata=ns, timeout=HANG_GUARD
        ),
        "list 100 KB filter": lambda: list(
            stub.List(
                pb.ListSnapshotsRequest(filters=["name==" + "f0" * 51200]),
                metadata=ns,
                timeout=HANG_GUARD,
            )
        ),
        "list 100 KB malformed filter": lambda: list(
            stub.List(
                pb.ListSnapshotsRequest(filters=["name" + "x" * 102400 + "=!=!"]),
                metadata=ns,
                timeout=HANG_GUARD,
            )
        ),
        "list backtracking regex": lambda: list(
            stub.List(
                pb.ListSnapshotsRequest(filters=["labels.a~=(a+)+$"]),
                metadata=ns,
                timeout=HANG_GUARD,
            )
        ),
    }
    results: dict[str, str] = {}
    took: dict[str, float] = {}
    done: list[str] = []
    lock = threading.Lock()

    def run(name: str, fn: Callable[[], object]) -> None:
        t0 = time.monotonic()
        outcome = _outcome(fn)
        with lock:
            results[name] = outcome
            took[name] = time.monotonic() - t0
            done.append(name)

    threads = [threading.Thread(target=run, args=item) for item in huge.items()]
    for t in threads:
        t.start()
    time.sleep(0.5)  # a head start, so the huge calls are being served (not an assertion)
    normal: list[tuple[str, Callable[[], object]]] = []
    for i in range(5):
        key = f"default/{10 + i}/normal"
        normal.append(
            (
                f"normal prepare {i}",
                lambda key=key: stub.Prepare(  # type: ignore[misc]
                    pb.PrepareSnapshotRequest(key=key), metadata=ns, timeout=HANG_GUARD
                ),
            )
        )
        normal.append(
            (
                f"normal stat {i}",
                lambda key=key: stub.Stat(  # type: ignore[misc]
                    pb.StatSnapshotRequest(key=key), metadata=ns, timeout=HANG_GUARD
                ),
            )
        )
    for name, fn in normal:
        run(name, fn)
    for t in threads:
        t.join(HANG_GUARD + 10)
    print("outcomes:", results)
    print("seconds:", {k: round(v, 3) for k, v in took.items()})
    print("completion order:", done)
    assert all(results[name] == "OK" for name, _ in normal), results
    assert results["prepare 1 MB key"] == "INVALID_ARGUMENT"  # containerd: bbolt's key bound
    assert results["stat 64 KB key"] == "NOT_FOUND"
    assert results["remove 64 KB key"] == "NOT_FOUND"
    assert results["list 100 KB filter"] == "OK"
    assert results["list 100 KB malformed filter"] == "INVALID_ARGUMENT"
    assert results["list backtracking regex"] == "OK"
    # The daemon answered everything, and is still whole.
    names = [i.name for r in stub.List(pb.ListSnapshotsRequest(), metadata=ns) for i in r.info]
    assert sorted(names) == sorted(
        ["default/1/evil", *(f"default/{10 + i}/normal" for i in range(5))]
    )
