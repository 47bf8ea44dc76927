"""containerd's snapshotter conformance cases that need real mounts (bind and overlayfs),
ported from containerd's snapshots/testsuite: each layer is applied through the snapshot's
mounts, committed, and checked through a view against the same changes applied to one plain
directory."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from snapshotter.labels import TARGET as SNAPSHOT_REF_LABEL
from snapshotter.service import AlreadyExistsError
from snapshotter.service.mounts import Mount
from snapshotter.service.snapshots import LayerRecord, RemoteLayer, Snapshotter
from snapshotter.service.store import Store

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount, overlayfs, chown)")

Applier = Callable[[Path], None]
GC = {"containerd.io/gc.root": "overlay-test"}


# -- a small fstest -------------------------------------------------------------------------


def create_file(p: str, data: bytes, mode: int) -> Applier:
    def apply(root: Path) -> None:
        f = root / p.lstrip("/")
        f.write_bytes(data)
        os.chmod(f, mode)

    return apply


def create_dir(p: str, mode: int) -> Applier:
    def apply(root: Path) -> None:
        d = root / p.lstrip("/")
        d.mkdir()
        os.chmod(d, mode)

    return apply


def remove_all(p: str) -> Applier:
    def apply(root: Path) -> None:
        t = root / p.lstrip("/")
        if t.is_dir() and not t.is_symlink():
            shutil.rmtree(t)
        elif t.exists() or t.is_symlink():
            t.unlink()

    return apply


def chown(p: str, uid: int, gid: int) -> Applier:
    return lambda root: os.lchown(root / p.lstrip("/"), uid, gid)


def link(old: str, new: str) -> Applier:
    return lambda root: os.link(root / old.lstrip("/"), root / new.lstrip("/"))


def apply_all(*appliers: Applier) -> Applier:
    def apply(root: Path) -> None:
        for a in appliers:
            a(root)

    return apply


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISREG(st.st_mode):
                extra: object = p.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            else:
                extra = None
            out[rel] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                extra,
            )
    st = os.lstat(root)
    out["."] = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    return out


def assert_same_tree(expected: Path, actual: Path) -> None:
    e, a = tree(expected), tree(actual)
    e.pop(".")
    a.pop(".")
    assert a == e


# -- mounting as containerd does ------------------------------------------------------------


def _compact(options: Sequence[str]) -> tuple[list[str], str | None]:
    """containerd's trick for long lowerdir lists: mount from their common parent."""
    opts = list(options)
    joined = ",".join(opts)
    if len(joined) < os.sysconf("SC_PAGESIZE") - 512:
        return opts, None
    i = next(n for n, o in enumerate(opts) if o.startswith("lowerdir="))
    dirs = opts[i][len("lowerdir=") :].split(":")
    common = os.path.commonpath(dirs)
    opts[i] = "lowerdir=" + ":".join(os.path.relpath(d, common) for d in dirs)
    return opts, common


def mount_all(mounts: Sequence[Mount], target: Path) -> None:
    for m in mounts:
        opts, cwd = _compact(m.options)
        if m.type == "bind":
            ro = "ro" in opts
            subprocess.run(["mount", "--rbind", m.source, str(target)], check=True)
            if ro:
                subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
        else:
            subprocess.run(
                ["mount", "-t", m.type, "-o", ",".join(opts), m.source, str(target)],
                check=True,
                cwd=cwd,
            )


def unmount(target: Path) -> None:
    subprocess.run(["umount", "-R", "-l", str(target)], check=False, capture_output=True)


@contextmanager
def mounted(mounts: Sequence[Mount], work: Path, name: str) -> Iterator[Path]:
    target = work / name
    target.mkdir(parents=True, exist_ok=True)
    mount_all(mounts, target)
    try:
        yield target
    finally:
        unmount(target)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Snapshotter, Path]]:
    old = os.umask(0)
    sn = Snapshotter(tmp_path / "root", Store(tmp_path / "root"))
    work = tmp_path / "work"
    work.mkdir()
    try:
        yield sn, work
    finally:
        subprocess.run(
            f"grep -o ' {work}[^ ]*' /proc/self/mounts | sort -r | xargs -r -n1 umount -l",
            shell=True,
            check=False,
        )
        sn.close()
        os.umask(old)


_counter = iter(range(1_000_000))


def create_snapshot(sn: Snapshotter, parent: str, work: Path, a: Applier) -> str:
    n = f"layer-{next(_counter)}"
    mounts = sn.prepare(n + "-prepare", parent, GC)
    with mounted(mounts, work, f"apply-{n}") as target:
        a(target)
    sn.commit(n, n + "-prepare", GC)
    return n


def check_snapshot(sn: Snapshotter, work: Path, name: str, flat: Path) -> None:
    view = name + "-view"
    mounts = sn.view(view, name, GC)
    try:
        with mounted(mounts, work, f"check-{name}") as target:
            assert_same_tree(flat, target)
    finally:
        sn.remove(view)


def check_snapshots(sn: Snapshotter, work: Path, *appliers: Applier) -> None:
    flat = work / f"flat-{next(_counter)}"
    flat.mkdir()
    parent = ""
    for a in appliers:
        s = create_snapshot(sn, parent, work, a)
        a(flat)
        check_snapshot(sn, work, s, flat)
        parent = s


# -- the conformance cases ------------------------------------------------------------------


def test_basic(env: tuple[Snapshotter, Path]) -> None:
    sn, work = env
    initial = apply_all(
        create_file("/foo", b"foo\n", 0o777),
        create_dir("/a", 0o755),
        create_dir("/a/b", 0o755),
        create_dir("/a/b/c", 0o755),
    )
    diff = apply_all(
        create_file("/bar", b"bar\n", 0o777),
        create_file("/foo", b"bar\n", 0o777),
        remove_all("/a/b"),
    )
    flat = work / "flat"
    flat.mkdir()
    with mounted(sn.prepare("preparing", "", GC), work, "preparing") as t:
        initial(t)
    sn.commit("committed", "preparing", GC)
    initial(flat)
    with mounted(sn.prepare("next", "committed", GC), work, "next") as t:
        assert_same_tree(flat, t)
        diff(t)
    sn.commit("committed-next", "next", GC)
    diff(flat)
    with mounted(sn.view("nextnext", "committed-next", GC), work, "nextnext") as t:
        assert_same_tree(flat, t)
    sn.remove("nextnext")
    sn.remove("committed-next")
    sn.remove("committed")


def test_layer_file_update(env: tuple[Snapshotter, Path]) -> None:
    sn, work = env
    check_snapshots(
        sn,
        work,
        apply_all(
            create_dir("/etc", 0o700),
            create_file("/etc/hosts", b"mydomain 10.0.0.1", 0o644),
            create_file("/etc/profile", b"PATH=/usr/bin", 0o644),
        ),
        apply_all(
            create_file("/etc/hosts", b"mydomain 10.0.0.2", 0o644),
            create_file("/etc/profile", b"PATH=/usr/bin", 0o666),
            create_dir("/root", 0o700),
            create_file("/root/.bashrc", b"PATH=/usr/sbin:/usr/bin", 0o644),
        ),
    )


def test_remove_directory_in_lower_layer(env: tuple[Snapshotter, Path]) -> None:
    sn, work = env
    check_snapshots(
        sn,
        work,
        apply_all(create_dir("/lib", 0o700), create_file("/lib/hidden", b"", 0o644)),
        apply_all(
            remove_all("/lib"),
            create_dir("/lib", 0o700),
            create_file("/lib/not-hidden", b"", 0o644),
        ),
        apply_all(create_file("/lib/newfile", b"", 0o644)),
    )


def test_chown(env: tuple[Snapshotter, Path]) -> None:
    sn, work = env
    check_snapshots(
        sn,
        work,
        apply_all(
            create_dir("/opt", 0o700),
            create_dir("/opt/a", 0o700),
            create_dir("/opt/a/b", 0o700),
            create_file("/opt/a/b/file.txt", b"hello", 0o644),
        ),
        apply_all(
            chown("/opt", 1, 1),
            chown("/opt/a", 1, 1),
            chown("/opt/a/b", 1, 1),
            chown("/opt/a/b/file.txt", 1, 1),
        ),
    )


def test_directory_permission_on_commit(env: tuple[Snapshotter, Path]) -> None:
    sn, work = env
    check_snapshots(
        sn,
        work,
        apply_all(
            *(create_dir(f"/dir{i}", 0o700) for i in range(1, 6)),
            create_file("/dir4/f1", b"...", 0o644),
            create_file("/dir5/f1", b"...", 0o644),
            chown("/dir1", 1, 1),
            chown("/dir2", 1, 1),
            chown("/dir3", 1, 1),
            chown("/dir5", 1, 1),
            chown("/dir5/f1", 1, 1),
        ),
        apply_all(
            chown("/dir2", 0, 0),
            remove_all("/dir3"),
            chown("/dir4", 1, 1),
            chown("/dir4/f1", 1, 1),
        ),
        apply_all(
            create_dir("/dir3", 0o700),
            chown("/dir3", 1, 1),
            remove_all("/dir5"),
            create_dir("/dir5", 0o700),
            chown("/dir5", 1, 1),
        ),
    )


def test_deleted_files_in_child_snapshot(env: tuple[Snapshotter, Path]) -> None:
    sn, work = env
    check_snapshots(
        sn,
        work,
        apply_all(
            create_file("/foo", b"foo\n", 0o777),
            create_file("/foobar", b"foobar\n", 0o777),
        ),
        apply_all(remove_all("/foobar")),
        apply_all(),
    )


def test_move_file_from_lower_layer(env: tuple[Snapshotter, Path]) -> None:
    sn, work = env
    check_snapshots(
        sn,
        work,
        apply_all(
            create_dir("/dir1", 0o700),
            create_file("/dir1/f1", b"Hello", 0o644),
            create_dir("/dir2", 0o700),
            create_file("/dir2/f2", b"...", 0o644),
        ),
        apply_all(
            create_dir("/dir3", 0o700),
            create_file("/dir3/f1", b"Hello", 0o644),
            remove_all("/dir1"),
            link("/dir2/f2", "/dir3/f2"),
            remove_all("/dir2/f2"),
        ),
    )


def test_view_is_read_only(env: tuple[Snapshotter, Path]) -> None:
    sn, work = env
    sn.prepare("preparing", "", GC)
    sn.commit("committed", "preparing", GC)
    with mounted(sn.view("view", "committed", GC), work, "view") as t, pytest.raises(OSError):
        (t / "testfile").write_text("testcontent")
    sn.remove("view")
    # a view of several layers is an overlay without upper directory: read-only too
    commit_new = create_snapshot(sn, "committed", work, create_file("/x", b"x", 0o644))
    with mounted(sn.view("view2", commit_new, GC), work, "view2") as t:
        assert (t / "x").read_bytes() == b"x"
        with pytest.raises(OSError):
            (t / "testfile").write_text("testcontent")


def test_root_permission(env: tuple[Snapshotter, Path]) -> None:
    sn, work = env
    with mounted(sn.prepare("preparing", "", GC), work, "preparing") as t:
        assert stat.S_IMODE(os.stat(t).st_mode) == 0o755


def test_128_layers_mount(env: tuple[Snapshotter, Path]) -> None:
    sn, work = env
    appliers = [
        apply_all(
            create_file("/bottom", b"way at the bottom\n", 0o777),
            create_file("/overwriteme", b"FIRST!\n", 0o777),
            create_dir("/ADDHERE", 0o755),
            create_dir("/ONLYME", 0o755),
            create_file("/ONLYME/bottom", b"bye!\n", 0o777),
        )
    ]
    for i in range(1, 128):
        appliers.append(
            apply_all(
                create_file("/overwriteme", f"{i} WAS HERE!\n".encode(), 0o777),
                create_file(f"/ADDHERE/file-{i}", b"same\n", 0o755),
                remove_all("/ONLYME"),
                create_dir("/ONLYME", 0o755),
                create_file(f"/ONLYME/file-{i}", b"only me!\n", 0o777),
            )
        )
    flat = work / "flat"
    flat.mkdir()
    parent = ""
    for i, a in enumerate(appliers):
        with mounted(sn.prepare(f"prepare-{i}", parent, GC), work, f"prepare-{i}") as t:
            assert_same_tree(flat, t)
            a(flat)
            a(t)
            assert_same_tree(flat, t)
        parent = f"committed-{i}"
        sn.commit(parent, f"prepare-{i}", GC)
    with mounted(sn.view("fullview", parent, GC), work, "fullview") as t:
        assert_same_tree(flat, t)


# -- a layer directory from the remote hook as an overlay lower layer ------------------------


class DirHook:
    """Stands for the data plane: a prepared directory per layer (a FUSE layer in pysoci)."""

    def __init__(self, base: Path, contents: Mapping[str, Applier]) -> None:
        self.base = base
        self.contents = contents
        self.checked: list[list[str]] = []

    def prepare_remote(
        self,
        key: str,
        parent: str | None,
        labels: Mapping[str, str],
        parent_layers: Sequence[LayerRecord],
        commit: Callable[[RemoteLayer], None],
    ) -> RemoteLayer | None:
        target = labels[SNAPSHOT_REF_LABEL]
        d = self.base / target.replace(":", "_")
        d.mkdir(parents=True)
        self.contents[target](d)
        layer = RemoteLayer(str(d), True)
        commit(layer)
        return layer

    def check(self, records: Sequence[LayerRecord]) -> None:
        self.checked.append([r.layer_dir for r in records])

    def release(self, record: LayerRecord) -> None:
        shutil.rmtree(record.layer_dir)


def test_remote_layers_under_a_container(tmp_path: Path) -> None:
    l1 = apply_all(create_file("/a", b"1", 0o644), create_dir("/d", 0o755))
    l2 = apply_all(create_file("/d/b", b"2", 0o600), create_file("/a", b"one", 0o644))
    l2_dir = apply_all(create_dir("/d", 0o755), l2)  # the layer holds its parent directory
    hook = DirHook(tmp_path / "layers", {"sha256:1": l1, "sha256:2": l2_dir})
    sn = Snapshotter(tmp_path / "root", Store(tmp_path / "root"), remote=hook)
    work = tmp_path / "work"
    try:
        for n, (target, parent) in enumerate([("sha256:1", ""), ("sha256:2", "sha256:1")]):
            with pytest.raises(AlreadyExistsError):
                sn.prepare(f"default/{n}/extract {target}", parent, {SNAPSHOT_REF_LABEL: target})
        flat = tmp_path / "flat"
        flat.mkdir()
        l1(flat)
        l2(flat)
        with mounted(sn.prepare("ctr", "sha256:2", GC), work, "rootfs") as t:
            assert_same_tree(flat, t)
            (t / "new").write_text("container writes go to the upper directory")
        layers = tmp_path / "layers"
        assert hook.checked[-1] == [str(layers / "sha256_2"), str(layers / "sha256_1")]
        sn.remove("ctr")
        sn.remove("sha256:2")
        assert not (tmp_path / "layers" / "sha256_2").exists()
    finally:
        subprocess.run(["umount", "-l", str(work / "rootfs")], check=False, capture_output=True)
        sn.close()
