"""containerd's snapshot semantics (ported from containerd's snapshots/testsuite and its
metastore), without mounting: the mount-dependent cases are in
tests/integration/test_service_overlay.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from snapshotter.labels import REMOTE as REMOTE_LABEL
from snapshotter.labels import TARGET as SNAPSHOT_REF_LABEL
from snapshotter.service import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from snapshotter.service.mounts import Mount
from snapshotter.service.snapshots import (
    Info,
    LayerRecord,
    RemoteLayer,
    Snapshotter,
    disk_usage,
)
from snapshotter.service.store import Kind, Store

GC = {"containerd.io/gc.root": "2024-01-01T00:00:00Z"}


def make(root: Path, remote: object = None) -> Snapshotter:
    return Snapshotter(root, Store(root), remote=remote)  # type: ignore[arg-type]


@pytest.fixture
def sn(tmp_path: Path) -> Iterator[Snapshotter]:
    s = make(tmp_path / "root")
    yield s
    s.close()


def commit_new(
    sn: Snapshotter, name: str, parent: str = "", labels: Mapping[str, str] = GC
) -> None:
    sn.prepare(name + "-a", parent, labels)
    sn.commit(name, name + "-a", labels)


def upper(sn: Snapshotter, key: str) -> Path:
    with sn.store.read() as tx:
        return sn.upper_path(tx.require(key).id)


# -- testsuite: Basic, StatActive, StatCommitted, Transitivity -----------------------------


def test_basic_prepare_commit_stat_walk_view_remove(sn: Snapshotter) -> None:
    mounts = sn.prepare("preparing", "", GC)
    assert len(mounts) == 1 and mounts[0].type == "bind"
    (upper(sn, "preparing") / "foo").write_text("foo\n")
    sn.commit("committed", "preparing", GC)
    si = sn.stat("committed")
    assert (si.parent, si.kind) == ("", Kind.COMMITTED)
    with pytest.raises(NotFoundError):
        sn.stat("preparing")

    sn.prepare("next", "committed", GC)
    ni = sn.stat("next")
    assert (ni.parent, ni.kind) == ("committed", Kind.ACTIVE)
    sn.commit("committed-next", "next", GC)
    si2 = sn.stat("committed-next")
    assert (si2.parent, si2.kind) == ("committed", Kind.COMMITTED)
    with pytest.raises(NotFoundError):
        sn.stat("next")
    walked = {i.name: i for i in sn.list()}
    assert walked == {"committed": si, "committed-next": si2}

    sn.view("nextnext", "committed-next", GC)
    sn.remove("nextnext")
    with pytest.raises(FailedPreconditionError, match="remove"):
        sn.remove("committed")
    sn.remove("committed-next")
    sn.remove("committed")
    assert sn.list() == []


def test_stat_active_and_committed(sn: Snapshotter) -> None:
    sn.prepare("preparing", "", GC)
    si = sn.stat("preparing")
    assert (si.name, si.kind, si.parent) == ("preparing", Kind.ACTIVE, "")
    assert si.labels == GC
    sn.commit("committed", "preparing", GC)
    si = sn.stat("committed")
    assert (si.name, si.kind, si.parent) == ("committed", Kind.COMMITTED, "")


def test_transitivity(sn: Snapshotter) -> None:
    commit_new(sn, "snapA")
    commit_new(sn, "snapB", "snapA")
    b = sn.stat("snapB")
    assert b.parent == "snapA"
    assert sn.stat(b.parent).parent == ""


def test_prepare_and_view_with_the_same_key_fail(sn: Snapshotter) -> None:
    commit_new(sn, "snapA")
    sn.prepare("newlayer", "snapA", GC)
    with pytest.raises(AlreadyExistsError):
        sn.view("newlayer", "snapA", GC)
    sn.prepare("prepLayer", "snapA", GC)
    with pytest.raises(AlreadyExistsError):
        sn.prepare("prepLayer", "snapA", GC)
    sn.view("viewLayer", "snapA", GC)
    with pytest.raises(AlreadyExistsError):
        sn.view("viewLayer", "snapA", GC)
    # nothing half-made: one directory per snapshot, no temporary ones
    names = sorted(os.listdir(sn.snapshots_dir))
    with sn.store.read() as tx:
        assert names == sorted(str(i) for i in tx.ids() if i != 0)


# -- testsuite: Update --------------------------------------------------------------------


def base_snapshots(sn: Snapshotter) -> None:
    commit_new(sn, "c1")
    commit_new(sn, "c2", "c1")
    sn.prepare("a1", "c2", GC)
    sn.prepare("a2", "", GC)
    sn.view("v1", "c2", GC)
    sn.view("v2", "", GC)


@pytest.mark.parametrize(
    ("name", "kind", "parent"),
    [
        ("c1", Kind.COMMITTED, ""),
        ("c2", Kind.COMMITTED, "c1"),
        ("a1", Kind.ACTIVE, "c2"),
        ("a2", Kind.ACTIVE, ""),
        ("v1", Kind.VIEW, "c2"),
        ("v2", Kind.VIEW, ""),
    ],
)
def test_update(sn: Snapshotter, name: str, kind: Kind, parent: str) -> None:
    t1 = time.time_ns()
    base_snapshots(sn)
    t2 = time.time_ns()
    st = sn.stat(name)
    assert t1 <= st.created_at <= t2
    assert st.created_at == st.updated_at
    assert (st.kind, st.parent, st.name) == (kind, parent, name)

    root = {"containerd.io/gc.root": "x"}
    expected = {"l1": "v1", "l2": "v2", "l3": "v3", **root}
    u1 = time.time_ns()
    st = sn.update(replace(st, parent="doesnotexist", labels=expected))
    u2 = time.time_ns()
    assert st.created_at == sn.stat(name).created_at
    assert u1 <= st.updated_at <= u2
    assert (st.kind, st.parent, st.name) == (kind, parent, name)
    assert st.labels == expected

    st = sn.update(replace(st, labels={"l1": "updated", "l4": "v4"}), ["labels.l1", "labels.l2"])
    assert st.labels == {"l1": "updated", "l3": "v3", **root}

    st = sn.update(replace(st, labels={"l4": "v4", **root}), ["labels"])
    assert st.labels == {"l4": "v4", **root}
    assert sn.stat(name) == st

    with pytest.raises(InvalidArgumentError):
        sn.update(replace(st, parent="doesnotexist"), ["parent"])
    with pytest.raises(NotFoundError):
        sn.update(replace(st, name="nope"))


# -- testsuite: Remove, RemoveIntermediateSnapshot, Walk, StatInWalk, CloseTwice ------------


def test_remove_and_reuse_keys(sn: Snapshotter) -> None:
    sn.prepare("committed-a", "", GC)
    sn.commit("committed-1", "committed-a", GC)
    sn.prepare("reuse-1", "committed-1", GC)
    sn.remove("reuse-1")
    sn.view("reuse-1", "committed-1", GC)
    sn.remove("reuse-1")
    sn.prepare("reuse-1", "", GC)
    sn.remove("committed-1")
    sn.commit("committed-1", "reuse-1", GC)
    with pytest.raises(NotFoundError):
        sn.remove("reuse-1")


def test_remove_intermediate_snapshot_is_refused(sn: Snapshotter) -> None:
    commit_new(sn, "base")
    commit_new(sn, "inter", "base")
    sn.prepare("top", "inter", GC)
    with pytest.raises(FailedPreconditionError, match="child"):
        sn.remove("inter")
    with pytest.raises(FailedPreconditionError):
        sn.remove("base")
    sn.remove("top")
    sn.remove("inter")
    sn.remove("base")
    assert os.listdir(sn.snapshots_dir) == []


def walk_setup(sn: Snapshotter) -> None:
    gc = {"containerd.io/gc.root": "check-walk"}
    sn.prepare("a-np", "", gc)
    sn.prepare("p-tmp", "", gc)
    sn.commit("p", "p-tmp", gc)
    sn.prepare("a", "p", gc)
    sn.view("v", "p", gc)
    sn.prepare("p-wl-tmp", "", gc)
    sn.commit("p-wl", "p-wl-tmp", {"l": "1", **gc})
    sn.prepare("a-wl", "p-wl", {"l": "2", **gc})
    sn.view("v-wl", "p-wl", {"l": "3", **gc})
    sn.prepare("a-np-wl", "", {"l": "2", **gc})


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (['labels."containerd.io/gc.root"==check-walk'],
         ["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"]),
        (['kind==active,labels."containerd.io/gc.root"==check-walk'],
         ["a-np", "a", "a-wl", "a-np-wl"]),
        (['kind==view,labels."containerd.io/gc.root"==check-walk'], ["v", "v-wl"]),
        (['kind==committed,labels."containerd.io/gc.root"==check-walk'], ["p", "p-wl"]),
        (["name==p", "name==a-np-wl"], ["p", "a-np-wl"]),
        (["name==a-wl,labels.l"], ["a-wl"]),
        (["parent==p"], ["a", "v"]),
        (['parent!="",labels."containerd.io/gc.root"==check-walk'], ["a", "v", "a-wl", "v-wl"]),
        (["labels.l"], ["p-wl", "a-wl", "v-wl", "a-np-wl"]),
        (["labels.l==2"], ["a-wl", "a-np-wl"]),
        (["name~=^a-np"], ["a-np", "a-np-wl"]),
        ([], ["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"]),
    ],
)  # fmt: skip
def test_walk_filters(sn: Snapshotter, filters: Sequence[str], expected: list[str]) -> None:
    walk_setup(sn)
    assert sorted(i.name for i in sn.list(filters)) == sorted(expected)


def test_walk_bad_filter_is_invalid_argument(sn: Snapshotter) -> None:
    with pytest.raises(InvalidArgumentError):
        sn.list(["name=="])


def test_stat_in_walk(sn: Snapshotter) -> None:
    commit_new(sn, "s-c1")
    commit_new(sn, "s-c2", "s-c1")
    sn.prepare("s-a1", "s-c2", GC)
    sn.view("s-v1", "s-c2", GC)
    for info in sn.list():
        assert sn.stat(info.name) == info


def test_close_twice(sn: Snapshotter) -> None:
    commit_new(sn, "n")
    sn.remove("n")
    sn.close()
    sn.close()


def test_root_permission(sn: Snapshotter) -> None:
    old = os.umask(0o077)
    try:
        sn.prepare("preparing", "", GC)
    finally:
        os.umask(old)
    assert (upper(sn, "preparing").stat().st_mode & 0o777) == 0o755


# -- errors ---------------------------------------------------------------------------------


def test_error_cases(sn: Snapshotter) -> None:
    with pytest.raises(NotFoundError):
        sn.prepare("k", "missing-parent")
    sn.prepare("active", "")
    with pytest.raises(InvalidArgumentError, match="not a committed"):
        sn.prepare("k", "active")
    sn.view("view", "")
    with pytest.raises(FailedPreconditionError):
        sn.commit("c", "view")
    with pytest.raises(NotFoundError):
        sn.commit("c", "missing")
    commit_new(sn, "c")
    with pytest.raises(FailedPreconditionError):
        sn.commit("c2", "c")  # committed, not active
    with pytest.raises(AlreadyExistsError):
        sn.commit("c", "active")
    with pytest.raises(FailedPreconditionError):
        sn.mounts("c")
    with pytest.raises(NotFoundError):
        sn.mounts("missing")
    with pytest.raises(NotFoundError):
        sn.usage("missing")
    with pytest.raises(NotFoundError):
        sn.remove("missing")
    with pytest.raises(InvalidArgumentError):
        sn.prepare("", "")
    assert sn.stat("active").kind == Kind.ACTIVE  # a failed commit changed nothing


def test_label_size_limit(sn: Snapshotter) -> None:
    ok = {"k": "v" * 4095}
    big = {"k": "v" * 4096}
    sn.prepare("a", "", ok)
    with pytest.raises(InvalidArgumentError, match="4096"):
        sn.prepare("b", "", big)
    with pytest.raises(InvalidArgumentError):
        sn.view("b", "", big)
    with pytest.raises(InvalidArgumentError):
        sn.commit("c", "a", big)
    with pytest.raises(InvalidArgumentError):
        sn.update(replace(sn.stat("a"), labels=big))
    # multi-byte characters count in bytes
    with pytest.raises(InvalidArgumentError):
        sn.prepare("b", "", {"k": "é" * 2048})
    with pytest.raises(NotFoundError):
        sn.stat("b")


def test_commit_resets_times_and_replaces_labels(sn: Snapshotter) -> None:
    sn.prepare("a", "", {"x": "1"})
    before = sn.stat("a")
    sn.commit("c", "a", {"y": "2"})
    after = sn.stat("c")
    assert after.labels == {"y": "2"}
    assert after.created_at == after.updated_at >= before.created_at


# -- mounts ---------------------------------------------------------------------------------


def test_mount_shapes(sn: Snapshotter) -> None:
    def fs(name: str) -> str:
        return str(upper(sn, name))

    m = sn.prepare("a", "")
    assert m == [Mount("bind", fs("a"), ("rw", "rbind"))]
    assert sn.mounts("a") == m
    sn.commit("l1", "a")
    assert sn.view("v0", "") == [Mount("bind", fs("v0"), ("ro", "rbind"))]
    # a view of one layer: read-only bind of that layer
    assert sn.view("v1", "l1") == [Mount("bind", fs("l1"), ("ro", "rbind"))]
    m = sn.prepare("b", "l1")
    with sn.store.read() as tx:
        bid = tx.require("b").id
    idx = ("index=off",) if sn.index_off else ()
    assert m == [
        Mount(
            "overlay",
            "overlay",
            (
                *idx,
                f"workdir={sn.work_path(bid)}",
                f"upperdir={sn.upper_path(bid)}",
                f"lowerdir={fs('l1')}",
            ),
        )
    ]
    sn.commit("l2", "b")
    commit_new(sn, "l3", "l2")
    # a view of several layers: overlay of lower directories only, nearest first
    v = sn.view("v3", "l3")
    assert v == [Mount("overlay", "overlay", (*idx, f"lowerdir={fs('l3')}:{fs('l2')}:{fs('l1')}"))]
    assert sn.mounts("v3") == v
    assert (sn.work_path(bid).stat().st_mode & 0o777) == 0o711


def test_128_layer_chain(sn: Snapshotter) -> None:
    parent = ""
    for i in range(128):
        commit_new(sn, f"l{i}", parent, {})
        parent = f"l{i}"
    (m,) = sn.view("full", parent)
    lower = next(o for o in m.options if o.startswith("lowerdir="))[len("lowerdir=") :]
    assert len(lower.split(":")) == 128
    assert lower.split(":")[0] == str(upper(sn, "l127"))
    assert lower.split(":")[-1] == str(upper(sn, "l0"))


# -- usage ----------------------------------------------------------------------------------


def test_usage_of_active_and_committed(sn: Snapshotter) -> None:
    sn.prepare("a", "")
    up = upper(sn, "a")
    empty = sn.usage("a")
    assert empty.inodes == 1  # the upper directory itself
    (up / "f").write_bytes(b"x" * 10000)
    os.link(up / "f", up / "hard")
    (up / "d").mkdir()
    (up / "d" / "s").symlink_to("f")
    u = sn.usage("a")
    assert u.inodes == 4  # root, f (twice linked, once counted), d, s
    assert u.size == disk_usage(up).size >= empty.size + 8192
    sn.commit("c", "a")
    assert sn.usage("c") == u  # recorded at commit
    sn.view("v", "c")
    assert sn.usage("v").inodes == 0


# -- cleanup, persistence, concurrency ------------------------------------------------------


def test_cleanup_removes_unowned_directories(sn: Snapshotter) -> None:
    commit_new(sn, "c")
    sn.prepare("a", "c")
    (sn.snapshots_dir / "999").mkdir()
    (sn.snapshots_dir / "new-123").mkdir()
    (sn.snapshots_dir / "stray-file").write_text("x")
    sn.cleanup()
    with sn.store.read() as tx:
        assert sorted(os.listdir(sn.snapshots_dir)) == sorted(str(i) for i in tx.ids())


def test_reopen_keeps_everything(tmp_path: Path) -> None:
    root = tmp_path / "root"
    sn = make(root)
    walk_setup(sn)
    before = {i.name: i for i in sn.list()}
    usage = sn.usage("p")
    sn.close()
    with pytest.raises(Exception, match="closed"):
        sn.stat("p")
    sn2 = make(root)
    try:
        assert {i.name: i for i in sn2.list()} == before
        assert sn2.usage("p") == usage
        # ids are never reused: a new snapshot gets a fresh directory
        with sn2.store.read() as tx:
            top = max(tx.ids())
        sn2.remove("a-np-wl")
        sn2.prepare("fresh", "")
        with sn2.store.read() as tx:
            assert tx.require("fresh").id > top
    finally:
        sn2.close()


def test_concurrent_prepare_of_one_key(sn: Snapshotter) -> None:
    commit_new(sn, "base")
    results: list[str] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        try:
            sn.prepare("same", "base")
            results.append("ok")
        except AlreadyExistsError:
            results.append("exists")

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["exists"] * 7 + ["ok"]
    with sn.store.read() as tx:
        assert sorted(os.listdir(sn.snapshots_dir)) == sorted(str(i) for i in tx.ids())


def test_many_threads_mixed_operations(sn: Snapshotter) -> None:
    commit_new(sn, "base")
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(10):
                k = f"t{n}-{i}"
                sn.prepare(k + "-a", "base", {"n": str(n)})
                sn.commit(k, k + "-a")
                sn.list([f"labels.n=={n}"])
                sn.view(k + "-v", k)
                sn.remove(k + "-v")
                sn.remove(k)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [i.name for i in sn.list()] == ["base"]


# -- the remote-snapshot hook ---------------------------------------------------------------


class FakeHook:
    """Stands for the data plane: hands out layer directories, records calls."""

    def __init__(self, base: Path, *, remote: bool = True) -> None:
        self.base = base
        self.remote = remote
        self.prepared: list[tuple[str, str | None, dict[str, str], list[str]]] = []
        self.checked: list[list[str]] = []
        self.released: list[str] = []
        self.unavailable: set[str] = set()
        self.fail = False
        self.decline = False
        self.own_labels: dict[str, str] = {}

    def prepare_remote(
        self,
        key: str,
        parent: str | None,
        labels: Mapping[str, str],
        parent_layers: Sequence[LayerRecord],
        commit: Callable[[RemoteLayer], None],
    ) -> RemoteLayer | None:
        self.prepared.append((key, parent, dict(labels), [r.layer_dir for r in parent_layers]))
        if self.fail:
            raise RuntimeError("registry exploded")
        if self.decline:
            return None
        d = self.base / labels[SNAPSHOT_REF_LABEL].replace(":", "_")
        d.mkdir(parents=True)
        (d / "file").write_text(labels[SNAPSHOT_REF_LABEL])
        layer = RemoteLayer(str(d), self.remote, labels=self.own_labels)
        commit(layer)
        return layer

    def check(self, records: Sequence[LayerRecord]) -> None:
        layer_dirs = [r.layer_dir for r in records]
        self.checked.append(layer_dirs)
        bad = [d for d in layer_dirs if d in self.unavailable]
        if bad:
            raise UnavailableError(f"layer {bad[0]} is gone")

    def release(self, record: LayerRecord) -> None:
        self.released.append(record.layer_dir)


def unpack_like_containerd(sn: Snapshotter, chain: Sequence[str], ns: str = "default") -> None:
    """containerd's unpacker per layer: Prepare(extract key, parent, ref label) → AlreadyExists
    → the metadata layer walks for the target; else commit."""
    parent = ""
    for n, target in enumerate(chain):
        labels = {SNAPSHOT_REF_LABEL: target, "containerd.io/snapshot/cri.layer-digest": "x"}
        key = f"{ns}/{n}/extract-{n} {target}"
        try:
            sn.prepare(key, parent, labels)
        except AlreadyExistsError:
            found = sn.list([f'labels."containerd.io/snapshot.ref"=={target},parent=="{parent}"'])
            assert [i.kind for i in found] == [Kind.COMMITTED]
            parent = found[0].name
            continue
        sn.commit(f"{ns}/{n + 100}/{target}", key, labels)
        parent = f"{ns}/{n + 100}/{target}"


def test_remote_prepare_commits_target_and_answers_already_exists(tmp_path: Path) -> None:
    hook = FakeHook(tmp_path / "layers")
    sn = make(tmp_path / "root", hook)
    try:
        labels = {SNAPSHOT_REF_LABEL: "sha256:l1", "containerd.io/snapshot/x": "y"}
        with pytest.raises(AlreadyExistsError, match="sha256:l1"):
            sn.prepare("default/1/extract-1 sha256:l1", "", labels)
        with pytest.raises(NotFoundError):
            sn.stat("default/1/extract-1 sha256:l1")  # the active key was never created
        t = sn.stat("sha256:l1")
        assert t.kind == Kind.COMMITTED and t.parent == ""
        assert t.labels == {**labels, REMOTE_LABEL: "remote snapshot"}
        assert hook.prepared == [("default/1/extract-1 sha256:l1", None, labels, [])]

        # again (another namespace): AlreadyExists right away, the hook is not asked
        with pytest.raises(AlreadyExistsError):
            sn.prepare("other/7/extract-7 sha256:l1", "", labels)
        assert len(hook.prepared) == 1

        # the second layer gets the parent chain's directories
        with pytest.raises(AlreadyExistsError):
            sn.prepare(
                "default/2/extract-2 sha256:l2", "sha256:l1", {SNAPSHOT_REF_LABEL: "sha256:l2"}
            )
        l1_dir = str(tmp_path / "layers" / "sha256_l1")
        l2_dir = str(tmp_path / "layers" / "sha256_l2")
        assert hook.prepared[-1][1:] == ("sha256:l1", {SNAPSHOT_REF_LABEL: "sha256:l2"}, [l1_dir])
        assert sn.stat("sha256:l2").parent == "sha256:l1"

        # a container on top: overlay over the layer directories, after checking them
        hook.checked.clear()
        (m,) = sn.prepare("default/3/container", "sha256:l2")
        assert f"lowerdir={l2_dir}:{l1_dir}" in m.options
        assert hook.checked == [[l2_dir, l1_dir]]
        # a view of one remote layer binds its directory
        assert sn.view("v", "sha256:l1") == [Mount("bind", l1_dir, ("ro", "rbind"))]

        # a remote layer that went away: Unavailable, and nothing is created
        hook.unavailable.add(l1_dir)
        with pytest.raises(UnavailableError, match="gone"):
            sn.mounts("default/3/container")
        with pytest.raises(UnavailableError):
            sn.prepare("default/4/container", "sha256:l2")
        with pytest.raises(NotFoundError):
            sn.stat("default/4/container")
        hook.unavailable.clear()

        # removing releases the layer
        sn.remove("default/3/container")
        sn.remove("v")
        sn.remove("sha256:l2")
        assert hook.released == [l2_dir]
        assert sn.usage("sha256:l1").size == 0
        assert [(r.name, r.layer_dir, r.remote) for r in sn.layers()] == [
            ("sha256:l1", l1_dir, True)
        ]
    finally:
        sn.close()


def test_containerd_unpacker_flow_finds_remote_targets(tmp_path: Path) -> None:
    hook = FakeHook(tmp_path / "layers")
    sn = make(tmp_path / "root", hook)
    try:
        unpack_like_containerd(sn, ["sha256:a", "sha256:b", "sha256:c"])
        unpack_like_containerd(sn, ["sha256:a", "sha256:b", "sha256:c"], ns="k8s.io")
        assert len(hook.prepared) == 3
        assert {i.name for i in sn.list()} == {"sha256:a", "sha256:b", "sha256:c"}
    finally:
        sn.close()


def test_local_layer_from_hook_has_no_remote_label_and_usage(tmp_path: Path) -> None:
    hook = FakeHook(tmp_path / "layers", remote=False)
    sn = make(tmp_path / "root", hook)
    try:
        with pytest.raises(AlreadyExistsError):
            sn.prepare("k", "", {SNAPSHOT_REF_LABEL: "sha256:l"})
        t = sn.stat("sha256:l")
        assert REMOTE_LABEL not in t.labels
        assert sn.usage("sha256:l").inodes == 2
        hook.checked.clear()
        sn.prepare("c", "sha256:l")
        assert hook.checked == []  # only remote layers are checked
    finally:
        sn.close()


@pytest.mark.parametrize("mode", ["fail", "decline"])
def test_hook_failure_or_decline_falls_back_to_ordinary_prepare(
    tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    hook = FakeHook(tmp_path / "layers")
    setattr(hook, mode, True)
    sn = make(tmp_path / "root", hook)
    try:
        labels = {SNAPSHOT_REF_LABEL: "sha256:l"}
        (m,) = sn.prepare("k", "", labels)
        assert m.type == "bind"
        assert sn.stat("k").kind == Kind.ACTIVE
        with pytest.raises(NotFoundError):
            sn.stat("sha256:l")
        if mode == "fail":
            assert "REMOTE SNAPSHOT FAILED" in caplog.text
        # containerd then commits the target itself: unpacking works as without the hook
        sn.commit("default/9/sha256:l", "k", labels)
    finally:
        sn.close()


def test_without_hook_ref_label_is_an_ordinary_prepare_unless_target_exists(
    sn: Snapshotter,
) -> None:
    labels = {SNAPSHOT_REF_LABEL: "t"}
    sn.prepare("k", "", labels)
    sn.commit("t", "k", labels)
    with pytest.raises(AlreadyExistsError):
        sn.prepare("k2", "", labels)
    sn.view("v", "", labels)  # views never take the remote path


def test_remote_prepare_validates_parent_and_labels(tmp_path: Path) -> None:
    hook = FakeHook(tmp_path / "layers")
    sn = make(tmp_path / "root", hook)
    try:
        with pytest.raises(NotFoundError):
            sn.prepare("k", "missing", {SNAPSHOT_REF_LABEL: "t"})
        with pytest.raises(InvalidArgumentError):
            sn.prepare("k", "", {SNAPSHOT_REF_LABEL: "t", "big": "x" * 5000})
        assert hook.prepared == []
    finally:
        sn.close()


def test_concurrent_remote_prepare_of_one_target_asks_the_hook_once(tmp_path: Path) -> None:
    hook = FakeHook(tmp_path / "layers")
    sn = make(tmp_path / "root", hook)
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def worker(n: int) -> None:
        barrier.wait()
        try:
            sn.prepare(f"ns/{n}/extract sha256:x", "", {SNAPSHOT_REF_LABEL: "sha256:x"})
            outcomes.append("mounts")
        except AlreadyExistsError:
            outcomes.append("exists")

    try:
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outcomes == ["exists"] * 6
        assert len(hook.prepared) == 1
    finally:
        sn.close()


_CHURN = """
import sys
from pathlib import Path
from snapshotter.service.snapshots import Snapshotter
from snapshotter.service.store import Store
root = Path(sys.argv[1])
sn = Snapshotter(root, Store(root))
parent = ""
for i in range(100000):
    sn.prepare(f"a{i}", parent, {"i": str(i)})
    sn.commit(f"c{i}", f"a{i}")
    sn.view(f"v{i}", f"c{i}")
    if i % 3 == 0:
        sn.remove(f"v{i}")
    parent = f"c{i}"
    if i == 5:
        print("ready", flush=True)
"""


def test_survives_sigkill(tmp_path: Path) -> None:
    root = tmp_path / "root"
    proc = subprocess.Popen([sys.executable, "-c", _CHURN, str(root)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    sn = make(root)
    try:
        with sn.store.read() as tx:
            conn = tx._c
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            recs = tx.all()
            for r in recs:  # every parent chain is whole and made of committed snapshots
                assert all(p.kind == Kind.COMMITTED for p in tx.parents(r))
        assert len(recs) > 6
        sn.cleanup()  # a directory made just before the kill is gone; every record has its own
        ids = {str(r.id) for r in recs}
        assert set(os.listdir(sn.snapshots_dir)) == ids
        top = max((r for r in recs if r.kind == Kind.COMMITTED), key=lambda r: r.id)
        sn.prepare("after-restart", top.name)
    finally:
        sn.close()


def test_keys_are_bounded_like_containerds(tmp_path: Path) -> None:
    """bbolt's MaxKeySize (32 KiB) bounds containerd's keys; messages quote a bounded part."""
    sn = Snapshotter(tmp_path, Store(tmp_path))
    sn.prepare("k" * 32768)
    with pytest.raises(InvalidArgumentError, match="more than 32768") as e:
        sn.prepare("k" * 32769)
    assert len(str(e.value)) < 1000
    with pytest.raises(NotFoundError) as missing:
        sn.stat("m" * (1 << 20))
    assert len(str(missing.value)) < 1000
    assert [i.name for i in sn.list()] == ["k" * 32768]


def test_remote_snapshot_keeps_pysoci_labels_that_prepare_cannot_forge(tmp_path: Path) -> None:
    """The hook's `pysoci.io/` labels are the snapshot's record: a Prepare's own labels under
    that prefix are dropped, and an Update can neither change nor remove them."""
    hook = FakeHook(tmp_path / "layers")
    hook.own_labels = {"pysoci.io/ztoc.digest": "sha256:" + "1" * 64}
    sn = make(tmp_path / "root", hook)
    try:
        forged = {
            SNAPSHOT_REF_LABEL: "sha256:l1",
            "pysoci.io/ztoc.digest": "sha256:" + "f" * 64,
            "pysoci.io/image.ref": "evil.example/x:y",
        }
        with pytest.raises(AlreadyExistsError):
            sn.prepare("k", "", forged)
        t = sn.stat("sha256:l1")
        assert t.labels["pysoci.io/ztoc.digest"] == "sha256:" + "1" * 64
        assert "pysoci.io/image.ref" not in t.labels
        info = Info(name="sha256:l1", labels={"pysoci.io/ztoc.digest": "", "x": "y"})
        sn.update(info, ["labels.pysoci.io/ztoc.digest", "labels.x"])
        sn.update(Info(name="sha256:l1", labels={"only": "this"}))
        t = sn.stat("sha256:l1")
        assert t.labels["pysoci.io/ztoc.digest"] == "sha256:" + "1" * 64
        assert t.labels["only"] == "this" and "x" not in t.labels
    finally:
        sn.close()


def test_layer_users_counts_snapshots_per_layer_directory(tmp_path: Path) -> None:
    hook = FakeHook(tmp_path / "layers")
    sn = make(tmp_path / "root", hook)
    try:
        unpack_like_containerd(sn, ["sha256:a", "sha256:b"])
        a_dir = str(tmp_path / "layers" / "sha256_a")
        assert sn.layer_users(a_dir) == 1
        assert sn.layer_users("/nowhere") == 0
        sn.remove("sha256:b")
        sn.remove("sha256:a")
        assert sn.layer_users(a_dir) == 0
        assert hook.released == [str(tmp_path / "layers" / "sha256_b"), a_dir]
    finally:
        sn.close()


def test_records_of_an_older_pysoci_move_into_the_labels(tmp_path: Path) -> None:
    """ROOT/lazy/<id>.json and ROOT/lazy/ztocs (before the metastore was the one record)."""
    import json

    from snapshotter.legacy import migrate_lazy_records

    root = tmp_path / "root"
    sn = make(root)
    try:
        lid = "a" * 24
        layer_dir = str(root / "fuse" / lid)
        with sn.store.write() as tx:
            tx.insert("sha256:chain", Kind.COMMITTED, None, {"k": "v"}, 1, remote=True,
                      layer_dir=layer_dir)  # fmt: skip
        ztoc = "sha256:" + "c" * 64
        record = {"ref": "r.test/img:v1", "layer_digest": "sha256:" + "a" * 64,
                  "layer_size": 100, "ztoc_digest": ztoc, "ztoc_size": 10,
                  "ztoc_media_type": "application/octet-stream"}  # fmt: skip
        (root / "lazy").mkdir()
        (root / "lazy" / f"{lid}.json").write_text(json.dumps(record))
        blobs = root / "lazy" / "ztocs" / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        (blobs / ("c" * 64)).write_bytes(b"ztoc")
        assert migrate_lazy_records(root, sn) == 1
        labels = sn.stat("sha256:chain").labels
        assert labels["k"] == "v" and labels["pysoci.io/ztoc.digest"] == ztoc
        assert labels["pysoci.io/image.ref"] == "r.test/img:v1"
        assert (root / "ztocs" / "blobs" / "sha256" / ("c" * 64)).read_bytes() == b"ztoc"
        assert not (root / "lazy").exists()
        assert migrate_lazy_records(root, sn) == 0
    finally:
        sn.close()
