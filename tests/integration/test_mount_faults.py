"""The lazy filesystem against registry faults, end to end: `pysoci mount` through the fault
proxy in front of a real registry. Reads fail cleanly (EIO) or return correct bytes — never
wrong bytes — and other layers keep being served; the layer works again once the registry
is back. Also: random reads while the background fetcher fills the layers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.fault_proxy import Fault, FaultKind, FaultProxy, blob_get
from tests.fixtures.images import Layer, write_image
from tests.fixtures.pysoci_config import pysoci_config
from tests.fixtures.registry import Registry, start_registry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE, overlayfs)")
PYSOCI = str(Path(sys.executable).with_name("pysoci"))


def _layer(prefix: str, seed: int) -> tuple[bytes, dict[str, bytes]]:
    rng = random.Random(seed)
    files = {f"{prefix}/f{i}": rng.randbytes(rng.randrange(50_000, 400_000)) for i in range(24)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue(), files


@dataclass(frozen=True)
class Image:
    registry: Registry
    files: dict[str, bytes]
    """Every file of the image: `a/*` in layer a, `b/*` in layer b."""
    digests: dict[str, str]
    """The blob digest of layer "a" and of layer "b"."""


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    tmp = tmp_path_factory.mktemp("faults")
    reg = start_registry(tmp / "registry")
    tar_a, files_a = _layer("a", 1)
    tar_b, files_b = _layer("b", 2)
    layers = {"a": Layer.from_tar(tar_a), "b": Layer.from_tar(tar_b)}
    write_image(tmp / "src", "v1", list(layers.values()))
    ref = f"{reg.host}/faults:v1"
    subprocess.run(
        ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{tmp}/src:v1", f"docker://{ref}"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    subprocess.run(
        [
            PYSOCI,
            "convert",
            ref,
            f"{reg.host}/faults:soci",
            "--plain-http",
            "--root",
            str(tmp / "build"),
            "--min-layer-size",
            "1KiB",
            "--span-size",
            "64KiB",
            "-q",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    digests = {k: "sha256:" + hashlib.sha256(v.blob).hexdigest() for k, v in layers.items()}
    yield Image(reg, {**files_a, **files_b}, digests)
    reg.stop()


@pytest.fixture
def mount(tmp_path: Path, image: Image) -> Iterator[tuple[FaultProxy, Path, Path]]:
    """The image mounted through a fresh proxy; background fetching per the test's config."""
    proxy = FaultProxy.start(image.registry.url)
    target = tmp_path / "rootfs"
    root = tmp_path / "root"
    try:
        yield proxy, target, root
    finally:
        subprocess.run([PYSOCI, "unmount", str(target), "--root", str(root)], capture_output=True)
        proxy.stop()


def do_mount(
    proxy: FaultProxy, target: Path, root: Path, config: str, *, read_timeout_msec: int = 3000
) -> None:
    cfg = root.parent / "config.toml"
    retries = "MaxRetries = 2\nMinWaitMsec = 1\nMaxWaitMsec = 20"
    cfg.write_text(
        pysoci_config(
            config, f"[http]\n{retries}\nResponseHeaderTimeoutMsec = {read_timeout_msec}\n"
        )
    )
    res = subprocess.run(
        [
            PYSOCI,
            "mount",
            f"{proxy.host}/faults:soci",
            str(target),
            "--plain-http",
            "--root",
            str(root),
            "--config",
            str(cfg),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr


def read_or_eio(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as e:
        assert e.errno == 5, e  # EIO, nothing else
        return None


def test_corruption_never_reaches_a_reader(
    mount: tuple[FaultProxy, Path, Path], image: Image
) -> None:
    proxy, target, root = mount
    files = image.files
    do_mount(proxy, target, root, "[background_fetch]\ndisable = true")
    # Every ranged blob GET corrupted: reads fail, none returns wrong bytes.
    handle = proxy.add_fault(Fault(kind="corrupt", match=blob_get(ranged=True)))
    for name in ["a/f3", "b/f5"]:
        assert read_or_eio(target / name) is None
    handle.remove()
    # Corrupted once: the span is refetched and the bytes are right.
    proxy.add_fault(Fault(kind="corrupt", match=blob_get(ranged=True), times=1))
    for name in ["a/f3", "b/f5", "a/f10"]:
        assert (target / name).read_bytes() == files[name]


def test_registry_down_slow_and_truncating(
    mount: tuple[FaultProxy, Path, Path], image: Image
) -> None:
    proxy, target, root = mount
    files = image.files
    do_mount(proxy, target, root, "[background_fetch]\ndisable = true")
    assert (target / "a/f0").read_bytes() == files["a/f0"]  # cached from here on
    proxy.down(True)
    assert read_or_eio(target / "b/f20") is None  # not cached: EIO
    Path("/proc/sys/vm/drop_caches").write_text("3")  # so the next read reaches pysoci
    assert (target / "a/f0").read_bytes() == files["a/f0"]  # cached spans: still served
    proxy.down(False)
    assert (target / "b/f20").read_bytes() == files["b/f20"]  # back: works again
    proxy.set_latency(0.2)
    assert (target / "a/f15").read_bytes() == files["a/f15"]
    proxy.set_latency(0)
    proxy.add_fault(Fault(kind="truncate", match=blob_get(ranged=True), after=1000, times=2))
    got = read_or_eio(target / "b/f12")
    assert got is None or got == files["b/f12"]
    assert (target / "b/f12").read_bytes() == files["b/f12"]


def statuses(root: Path) -> dict[str, dict[str, object]]:
    """The status JSON of every lazy layer of the mount, by layer digest."""
    out = {}
    for path in root.glob("mounts/*/fuse/.status/*.json"):
        status = json.loads(path.read_text())
        out[str(status["digest"])] = status
    return out


def test_random_reads_while_the_background_fetcher_runs(
    mount: tuple[FaultProxy, Path, Path], image: Image
) -> None:
    proxy, target, root = mount
    files = image.files
    # Capped from the start (about 2.5 s for both layers), so the fill overlaps the reads.
    proxy.set_bandwidth(4_000_000)
    # A memory cache of four spans: most reads load their spans from the disk cache.
    config = "[background_fetch]\nsilence_period_msec = 0\n[cache]\nmemory_bytes = 262144"
    do_mount(proxy, target, root, config)
    names = sorted(files)
    before = statuses(root)
    assert set(before) == set(image.digests.values())
    assert any(s["state"] != "complete" for s in before.values()), before

    def reader(seed: int) -> int:
        rng = random.Random(seed)
        for _ in range(20):
            name = rng.choice(names)
            off = rng.randrange(len(files[name]))
            n = rng.randrange(1, 200_000)
            with open(target / name, "rb") as f:
                f.seek(off)
                assert f.read(n) == files[name][off : off + n], (name, off, n)
        return seed

    with ThreadPoolExecutor(4) as pool:
        assert sorted(pool.map(reader, range(4))) == [0, 1, 2, 3]  # re-raises a reader's failure
    proxy.set_bandwidth(None)
    # The background fetcher completes both layers and verifies each whole-layer digest.
    deadline = time.monotonic() + 120
    while not all(s["state"] == "complete" for s in statuses(root).values()):
        assert time.monotonic() < deadline, f"background fill did not complete: {statuses(root)}"
        time.sleep(0.2)
    for digest, status in statuses(root).items():
        assert status["fetchedSize"] == status["size"] > 0, status
        assert status["spansFetched"] == status["spansTotal"], status
        assert status["error"] == "", (digest, status)
    # Everything is now served without the registry.
    proxy.down(True)
    Path("/proc/sys/vm/drop_caches").write_text("3")
    for name in names:
        assert (target / name).read_bytes() == files[name], name
    # Then the background keeps both layers decompressed on disk ([cache] keep_inflated): with
    # their compressed bytes wiped, and no registry, every file still reads back right.
    while not all(s["spansInflated"] == s["spansTotal"] for s in statuses(root).values()):
        assert time.monotonic() < deadline, f"layers not kept inflated: {statuses(root)}"
        time.sleep(0.2)
    blobs = sorted(root.glob("cache/sha256-*/blob"))
    assert len(blobs) == 2 and len(list(root.glob("cache/sha256-*/inflated"))) == 2
    for blob in blobs:
        with open(blob, "r+b") as f:
            f.write(bytes(blob.stat().st_size))
    Path("/proc/sys/vm/drop_caches").write_text("3")
    for name in names:
        assert (target / name).read_bytes() == files[name], name


@pytest.mark.parametrize("kind", ["status", "reset", "corrupt", "truncate"])
def test_a_failing_layer_leaves_the_other_served(
    mount: tuple[FaultProxy, Path, Path], image: Image, kind: FaultKind
) -> None:
    """Every blob GET of layer a fails: its reads are EIO, layer b is served as if nothing
    happened, and layer a works again once its blob does."""
    proxy, target, root = mount
    files = image.files
    do_mount(proxy, target, root, "[background_fetch]\ndisable = true")
    handle = proxy.add_fault(Fault(kind=kind, match=blob_get(image.digests["a"]), after=1000))
    assert read_or_eio(target / "a/f3") is None
    for name in sorted(files):
        if name.startswith("b/"):
            assert (target / name).read_bytes() == files[name], name
    assert handle.hits > 0
    assert all(r.faults == () for r in proxy.stats.log if image.digests["b"] in r.path)
    status = statuses(root)
    assert status[image.digests["a"]]["error"] != "" and status[image.digests["b"]]["error"] == ""
    handle.remove()
    for name in ["a/f3", "a/f7"]:
        assert (target / name).read_bytes() == files[name], name


def test_a_stalled_layer_does_not_hold_up_the_other(
    mount: tuple[FaultProxy, Path, Path], image: Image
) -> None:
    """While a read of layer a waits for its registry, every file of layer b is read."""
    proxy, target, root = mount
    files = image.files
    do_mount(proxy, target, root, "[background_fetch]\ndisable = true", read_timeout_msec=30_000)
    stall = Fault(kind="stall", match=blob_get(image.digests["a"]), after=1000, seconds=10)
    handle = proxy.add_fault(stall)
    with ThreadPoolExecutor(1) as pool:
        stalled = pool.submit((target / "a/f3").read_bytes)
        deadline = time.monotonic() + 5
        while handle.hits == 0:  # the read of a is waiting on its stalled response
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for name in sorted(files):
            if name.startswith("b/"):
                assert (target / name).read_bytes() == files[name], name
        assert not stalled.done(), "layer b was read only after the stall of layer a"
        handle.remove()
        assert stalled.result(timeout=60) == files["a/f3"]
