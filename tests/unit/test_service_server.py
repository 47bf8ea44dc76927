"""The gRPC translation layer, through the real server on a unix socket, with client stubs
generated from proto/ (as containerd's proxy snapshotter would call it)."""

from __future__ import annotations

import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from snapshotter._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter._proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.labels import TARGET as SNAPSHOT_REF_LABEL
from snapshotter.service import UnavailableError
from snapshotter.service.server import serve
from snapshotter.service.snapshots import LayerRecord, RemoteLayer, Snapshotter
from snapshotter.service.store import Store

NS = (("containerd-namespace", "default"),)


class Hook:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.bad: set[str] = set()

    def prepare_remote(
        self,
        key: str,
        parent: str | None,
        labels: Mapping[str, str],
        parent_layers: Sequence[LayerRecord],
        commit: Callable[[RemoteLayer], None],
    ) -> RemoteLayer | None:
        d = self.base / labels[SNAPSHOT_REF_LABEL].replace(":", "_")
        d.mkdir(parents=True)
        layer = RemoteLayer(str(d), True)
        commit(layer)
        return layer

    def check(self, records: Sequence[LayerRecord]) -> None:
        if self.bad & {r.layer_dir for r in records}:
            raise UnavailableError("layer is not mounted")

    def release(self, record: LayerRecord) -> None:
        pass


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[pb_grpc.SnapshotsStub, Snapshotter, Hook, Path]]:
    hook = Hook(tmp_path / "layers")
    sn = Snapshotter(tmp_path / "root", Store(tmp_path / "root"), remote=hook)
    sock = tmp_path / "run" / "pysoci.sock"
    server = serve(sn, str(sock), max_workers=4)
    channel = grpc.insecure_channel(f"unix:{sock}")
    try:
        yield pb_grpc.SnapshotsStub(channel), sn, hook, sock
    finally:
        channel.close()
        server.stop(None).wait()
        sn.close()


def code_of(fn, *args, **kwargs) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, **kwargs)
    return e.value.code()  # type: ignore[no-any-return]


def test_socket_mode_and_stale_socket(tmp_path: Path) -> None:
    sn = Snapshotter(tmp_path / "root", Store(tmp_path / "root"))
    sock = tmp_path / "a" / "b" / "s.sock"
    sock.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()  # a socket file nobody serves
    server = serve(sn, f"unix://{sock}")
    try:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        with pytest.raises(OSError, match="another process"):
            serve(sn, str(sock))
    finally:
        server.stop(None).wait()
        sn.close()


def test_every_rpc(env: tuple[pb_grpc.SnapshotsStub, Snapshotter, Hook, Path]) -> None:
    stub, sn, _, _ = env
    r = stub.Prepare(
        pb.PrepareSnapshotRequest(snapshotter="soci", key="default/1/a", labels={"x": "1"}),
        metadata=NS,
    )
    assert [m.type for m in r.mounts] == ["bind"]
    assert list(r.mounts[0].options) == ["rw", "rbind"]
    assert list(stub.Mounts(pb.MountsRequest(key="default/1/a")).mounts) == list(r.mounts)
    st = stub.Stat(pb.StatSnapshotRequest(key="default/1/a")).info
    assert (st.name, st.kind, st.parent, dict(st.labels)) == (
        "default/1/a",
        pb.ACTIVE,
        "",
        {"x": "1"},
    )
    assert st.created_at == st.updated_at and st.created_at.seconds > 0
    info = sn.stat("default/1/a")
    assert st.created_at.seconds * 10**9 + st.created_at.nanos == info.created_at

    stub.Commit(pb.CommitSnapshotRequest(name="default/2/c", key="default/1/a", labels={"y": "2"}))
    st = stub.Stat(pb.StatSnapshotRequest(key="default/2/c")).info
    assert (st.kind, dict(st.labels)) == (pb.COMMITTED, {"y": "2"})

    v = stub.View(pb.ViewSnapshotRequest(key="default/3/v", parent="default/2/c")).mounts
    assert [(m.type, list(m.options)) for m in v] == [("bind", ["ro", "rbind"])]
    p = stub.Prepare(pb.PrepareSnapshotRequest(key="default/4/p", parent="default/2/c")).mounts
    assert p[0].type == "overlay" and p[0].source == "overlay"
    assert any(o.startswith("upperdir=") for o in p[0].options)

    u = stub.Usage(pb.UsageRequest(key="default/4/p"))
    assert u.inodes == 1 and u.size >= 0

    listed = [i for resp in stub.List(pb.ListSnapshotsRequest()) for i in resp.info]
    assert sorted(i.name for i in listed) == ["default/2/c", "default/3/v", "default/4/p"]
    listed = [
        i.name
        for resp in stub.List(pb.ListSnapshotsRequest(filters=["kind==view", "name==default/4/p"]))
        for i in resp.info
    ]
    assert sorted(listed) == ["default/3/v", "default/4/p"]

    stub.Remove(pb.RemoveSnapshotRequest(key="default/3/v"))
    (sn.snapshots_dir / "12345").mkdir()
    stub.Cleanup(pb.CleanupRequest())
    assert not (sn.snapshots_dir / "12345").exists()


def test_error_codes(env: tuple[pb_grpc.SnapshotsStub, Snapshotter, Hook, Path]) -> None:
    stub, _, hook, _ = env
    S = grpc.StatusCode
    assert code_of(stub.Stat, pb.StatSnapshotRequest(key="nope")) == S.NOT_FOUND
    assert code_of(stub.Prepare, pb.PrepareSnapshotRequest(key="k", parent="nope")) == S.NOT_FOUND
    stub.Prepare(pb.PrepareSnapshotRequest(key="a"))
    assert code_of(stub.Prepare, pb.PrepareSnapshotRequest(key="a")) == S.ALREADY_EXISTS
    assert code_of(stub.Mounts, pb.MountsRequest(key="nope")) == S.NOT_FOUND
    stub.Commit(pb.CommitSnapshotRequest(name="c", key="a"))
    assert (
        code_of(stub.Commit, pb.CommitSnapshotRequest(name="d", key="c")) == S.FAILED_PRECONDITION
    )
    assert code_of(stub.Mounts, pb.MountsRequest(key="c")) == S.FAILED_PRECONDITION
    stub.Prepare(pb.PrepareSnapshotRequest(key="child", parent="c"))
    with pytest.raises(grpc.RpcError) as e:
        stub.Remove(pb.RemoveSnapshotRequest(key="c"))
    assert e.value.code() == S.FAILED_PRECONDITION and "child" in e.value.details()
    assert code_of(stub.Prepare, pb.PrepareSnapshotRequest(key="x", parent="child")) == (
        S.INVALID_ARGUMENT
    )
    assert code_of(stub.List(pb.ListSnapshotsRequest(filters=["name=="])).next) == (
        S.INVALID_ARGUMENT
    )
    assert code_of(stub.Usage, pb.UsageRequest(key="nope")) == S.NOT_FOUND
    assert code_of(stub.Remove, pb.RemoveSnapshotRequest(key="nope")) == S.NOT_FOUND

    # remote: the target is committed and Prepare answers AlreadyExists
    labels = {SNAPSHOT_REF_LABEL: "sha256:r"}
    req = pb.PrepareSnapshotRequest(key="default/9/extract sha256:r", labels=labels)
    assert code_of(stub.Prepare, req) == S.ALREADY_EXISTS
    assert stub.Stat(pb.StatSnapshotRequest(key="sha256:r")).info.kind == pb.COMMITTED
    stub.Prepare(pb.PrepareSnapshotRequest(key="ctr", parent="sha256:r"))
    hook.bad.add(str(hook.base / "sha256_r"))
    with pytest.raises(grpc.RpcError) as e:
        stub.Mounts(pb.MountsRequest(key="ctr"))
    assert e.value.code() == S.UNAVAILABLE and "not mounted" in e.value.details()


def test_label_limit(env: tuple[pb_grpc.SnapshotsStub, Snapshotter, Hook, Path]) -> None:
    stub, _, _, _ = env
    key = "k" * 96
    fits = {key: "v" * (4096 - len(key))}
    stub.Prepare(pb.PrepareSnapshotRequest(key="a", labels=fits))
    too_big = {key: "v" * (4097 - len(key))}
    with pytest.raises(grpc.RpcError) as e:
        stub.Prepare(pb.PrepareSnapshotRequest(key="b", labels=too_big))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "4096" in e.value.details()
    info = stub.Stat(pb.StatSnapshotRequest(key="a")).info
    info.labels.clear()
    info.labels.update(too_big)
    assert code_of(stub.Update, pb.UpdateSnapshotRequest(info=info)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert code_of(stub.Commit, pb.CommitSnapshotRequest(name="c", key="a", labels=too_big)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


def test_update_field_masks(env: tuple[pb_grpc.SnapshotsStub, Snapshotter, Hook, Path]) -> None:
    stub, _, _, _ = env
    stub.Prepare(pb.PrepareSnapshotRequest(key="a", labels={"l1": "v1", "l2": "v2", "l3": "v3"}))

    def update(labels: dict[str, str], *paths: str, parent: str = "") -> pb.Info:
        info = pb.Info(name="a", parent=parent, labels=labels)
        mask = field_mask_pb2.FieldMask(paths=list(paths)) if paths else None
        return stub.Update(pb.UpdateSnapshotRequest(info=info, update_mask=mask)).info

    out = update({"l1": "updated", "l4": "v4"}, "labels.l1", "labels.l2")
    assert dict(out.labels) == {"l1": "updated", "l3": "v3"}
    assert out.updated_at.ToNanoseconds() > out.created_at.ToNanoseconds()
    out = update({"l4": "v4"}, "labels")
    assert dict(out.labels) == {"l4": "v4"}
    out = update({"l5": "v5"}, parent="ignored")  # no mask: all mutable fields (the labels)
    assert (dict(out.labels), out.parent, out.kind) == ({"l5": "v5"}, "", pb.ACTIVE)
    for bad in ("parent", "name", "kind", "created_at", "labels_x"):
        assert code_of(update, {"a": "b"}, bad) == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(stub.Stat(pb.StatSnapshotRequest(key="a")).info.labels) == {"l5": "v5"}
    with pytest.raises(grpc.RpcError) as e:
        stub.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="nope")))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_namespaced_keys_are_one_keyspace(
    env: tuple[pb_grpc.SnapshotsStub, Snapshotter, Hook, Path],
) -> None:
    stub, _, _, _ = env
    key = "default/1/extract-604259158-uHty sha256:" + "ab" * 32
    stub.Prepare(pb.PrepareSnapshotRequest(key=key), metadata=NS)
    # garbage collection may come without the namespace metadata, or with another one
    assert stub.Stat(pb.StatSnapshotRequest(key=key)).info.name == key
    other_ns = (("containerd-namespace", "k8s.io"),)
    names = [
        i.name for r in stub.List(pb.ListSnapshotsRequest(), metadata=other_ns) for i in r.info
    ]
    assert names == [key]
    stub.Remove(pb.RemoveSnapshotRequest(key=key))
    assert code_of(stub.Stat, pb.StatSnapshotRequest(key=key), metadata=NS) == (
        grpc.StatusCode.NOT_FOUND
    )


def test_list_streams_in_batches(
    env: tuple[pb_grpc.SnapshotsStub, Snapshotter, Hook, Path],
) -> None:
    stub, sn, _, _ = env
    for i in range(250):
        sn.view(f"v{i}", "")
    responses = list(stub.List(pb.ListSnapshotsRequest()))
    assert [len(r.info) for r in responses] == [100, 100, 50]
    assert len({i.name for r in responses for i in r.info}) == 250


def test_fd_address_relays_an_inherited_listening_socket(tmp_path: Path) -> None:
    sn = Snapshotter(tmp_path / "root", Store(tmp_path / "root"))
    path = str(tmp_path / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    fd = os.dup(listener.fileno())  # as systemd would hand it over
    listener.close()
    server = serve(sn, f"fd://{fd}")
    try:
        channels = [grpc.insecure_channel(f"unix:{path}") for _ in range(3)]
        stubs = [pb_grpc.SnapshotsStub(c) for c in channels]
        errors: list[BaseException] = []

        def work(n: int) -> None:
            try:
                for i in range(20):
                    stubs[n].Prepare(pb.PrepareSnapshotRequest(key=f"k{n}-{i}"))
                    stubs[n].Stat(pb.StatSnapshotRequest(key=f"k{n}-{i}"))
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert code_of(stubs[0].Stat, pb.StatSnapshotRequest(key="nope")) == (
            grpc.StatusCode.NOT_FOUND
        )
        assert len(next(iter(stubs[0].List(pb.ListSnapshotsRequest()))).info) == 60
        for c in channels:
            c.close()
    finally:
        server.stop(None).wait()
        sn.close()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        fd = os.dup(s.fileno())
        with pytest.raises(ValueError, match="not a listening socket"):
            serve(sn, f"fd://{fd}")
        os.close(fd)
