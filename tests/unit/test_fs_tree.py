"""The inode table built from a zTOC: tar semantics, the overlay view, sizes and memory."""

from __future__ import annotations

import dataclasses
import gc
import io
import logging
import os
import stat
import tarfile
import tracemalloc
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapshotter.compression.detect import Compression
from snapshotter.fs.tree import Inode, LayerTree, build_tree
from snapshotter.soci.build import build_ztoc
from snapshotter.soci.tarheader import header_matches, header_starts
from snapshotter.soci.ztoc import CompressionAlgorithm, FileMetadata, Ztoc, decode_ztoc, encode_ztoc

T0 = "2021-03-04T05:06:07.123456789Z"
T0_NS = 1614834367_123456789


def fm(name: str, type_: str = "reg", **kw: object) -> FileMetadata:
    kw.setdefault("mod_time", T0)
    kw.setdefault("mode", 0o644)
    return FileMetadata(
        name=name,
        type=type_,
        uncompressed_offset=int(kw.pop("offset", 0)),  # type: ignore[call-overload]
        uncompressed_size=int(kw.pop("size", 0)),  # type: ignore[call-overload]
        **kw,  # type: ignore[arg-type]
    )


def ztoc(files: list[FileMetadata], size: int = 1 << 30) -> Ztoc:
    digests = ["sha256:" + "0" * 64]
    return Ztoc("0.9", "test", 0, size, files, CompressionAlgorithm.GZIP, 0, digests, b"")


def tree(*files: FileMetadata, **kw: str) -> LayerTree:
    return build_tree(ztoc(list(files)), 100, **kw)


@dataclasses.dataclass
class View:
    """What the filesystem shows at one path (for the assertions below)."""

    stat: Inode
    children: dict[bytes, int] | None
    target: bytes | None
    xattrs: dict[bytes, bytes] | None
    offset: int

    def __getattr__(self, name: str) -> object:
        return getattr(self.stat, name)


def at(t: LayerTree, path: str) -> View:
    ino = t.lookup(path)
    data = t.data(ino)
    children = {n: c for n, c, _ in t.children(ino)} if t.is_dir(ino) else None
    return View(t.stat(ino), children, t.readlink(ino), t.xattrs(ino), data[1] if data else 0)


def test_implicit_parents_and_root_attrs() -> None:
    t = tree(fm("./", "dir", mode=0o700, uid=5), fm("a/b/c", size=10, offset=512))
    assert t.root_ino == 100
    root = at(t, "/")
    assert root.mode == stat.S_IFDIR | 0o700 and root.uid == 5
    a = at(t, "/a")
    assert a.mode == stat.S_IFDIR | 0o755 and a.uid == 0 and a.nlink == 3
    c = at(t, "a/b/c")
    assert c.size == 10 and c.offset == 512 and c.blocks == 8
    assert c.mtime_ns == T0_NS
    assert root.nlink == 3
    inos = [t.lookup(p) for p in ("/", "a", "a/b", "a/b/c")]
    assert sorted(inos) == list(range(100, 100 + len(t)))
    assert t.stat(c.ino) == c.stat and c.ino in t and 100 + len(t) not in t


def test_implicit_dirs_take_the_newest_mtime() -> None:
    later = "2022-01-01T00:00:00Z"
    t = tree(fm("x/y", size=1, offset=512), fm("z", size=1, offset=1536, mod_time=later))
    newest = at(t, "z").mtime_ns
    assert newest > T0_NS
    assert at(t, "x").mtime_ns == newest and at(t, "/").mtime_ns == newest
    assert at(t, "x").uid == 0 and at(t, "x").gid == 0


def test_implicit_dirs_rule_counts_every_entry_and_spares_explicit_dirs() -> None:
    """The rule (README, PLAN) in the cases the interop trees meet: the newest mtime among
    all of the layer's entries (here a whiteout's, which no other entry has), 0755 root:root,
    for every directory without an entry of its own; a directory whose entry comes after its
    children keeps that entry's attributes."""
    older, newest = "2020-01-01T00:00:00Z", "2024-05-06T07:08:09.5Z"
    t = tree(
        fm("a/b/file", size=1, offset=512, mod_time=older, uid=7),
        fm("a/b/.wh.gone", mod_time=newest),
        fm("c/explicit/f", size=1, offset=1536, mod_time=older),
        fm("c/explicit", "dir", mode=0o700, uid=3, mod_time=older),
    )
    for path in ("/", "a", "a/b", "c"):
        node = at(t, path)
        assert (node.mode, node.uid, node.gid) == (stat.S_IFDIR | 0o755, 0, 0), path
        assert node.mtime_ns == 1714979289_500000000, path
    explicit = at(t, "c/explicit")
    assert (explicit.mode, explicit.uid) == (stat.S_IFDIR | 0o700, 3)
    assert explicit.mtime_ns == 1577836800_000000000


def test_last_entry_wins_and_dirs_merge() -> None:
    t = tree(
        fm("d", "dir", mode=0o700),
        fm("d/x", size=1, offset=512),
        fm("d", "dir", mode=0o750),
        fm("f", size=1, offset=1536),
        fm("f", "symlink", linkname="target"),
    )
    d = at(t, "d")
    assert d.mode == stat.S_IFDIR | 0o750
    assert d.children is not None and b"x" in d.children
    f = at(t, "f")
    assert stat.S_ISLNK(f.mode) and f.target == b"target" and f.size == 6
    assert len(t) == 4


def test_replacing_a_directory_drops_its_subtree() -> None:
    t = tree(fm("d", "dir"), fm("d/x", size=1, offset=512), fm("d", size=2, offset=1536))
    assert at(t, "d").is_reg
    assert at(t, "/").nlink == 2 and len(t) == 2


def test_an_entry_under_a_file_makes_it_a_directory_again() -> None:
    t = tree(
        fm("d", "dir"),
        fm("d/x", size=1, offset=512),
        fm("d", size=2, offset=1536),
        fm("d/y", size=1, offset=4096),
    )
    d = at(t, "d")
    assert d.is_dir and d.children is not None and list(d.children) == [b"y"]
    assert len(t) == 3


def test_whiteouts_and_opaque() -> None:
    t = tree(
        fm("a", size=1, offset=512),
        fm(".wh.a", mode=0o600, uid=7),
        fm("o", "dir"),
        fm("o/.wh..wh..opq"),
        fm("o/.wh..wh.plnk"),
        fm("o/.wh.gone"),
        fm("o/.wh.gone"),
        opaque_xattr="user.overlay.opaque",
    )
    a = at(t, "a")
    assert stat.S_ISCHR(a.mode) and a.rdev == 0 and a.uid == 0 and a.gid == 0 and a.size == 0
    o = at(t, "o")
    assert o.xattrs == {b"user.overlay.opaque": b"y"}
    assert o.children is not None and list(o.children) == [b"gone"]
    assert stat.S_ISCHR(t.stat(o.children[b"gone"]).mode)


def test_whiteout_hides_a_name_whatever_the_order() -> None:
    t = tree(fm(".wh.a"), fm("a", size=1, offset=512))
    assert stat.S_ISCHR(at(t, "a").mode)


def test_opaque_marker_survives_a_repeated_dir_entry() -> None:
    t = tree(fm("o/.wh..wh..opq"), fm("o", "dir", pax_records={"SCHILY.xattr.user.k": "v"}))
    assert at(t, "o").xattrs == {b"user.k": b"v", b"trusted.overlay.opaque": b"y"}


def test_hardlinks_share_inodes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    t = tree(
        fm("f", size=3, offset=512),
        fm("g", "hardlink", linkname="./f"),
        fm("d/h", "hardlink", linkname="/f"),
        fm("m", "hardlink", linkname="missing"),
        fm("f", size=1, offset=2048),
    )
    g, h, f = at(t, "g"), at(t, "d/h"), at(t, "f")
    assert g.ino == h.ino and g.ino != f.ino
    assert g.nlink == 2 and g.size == 3 and f.nlink == 1
    with pytest.raises(KeyError):
        t.lookup("m")
    assert "missing" in caplog.text
    assert len(t) == 4


def test_types_modes_devices_xattrs() -> None:
    t = tree(
        fm("c", "char", devmajor=4, devminor=64, mode=0o620),
        fm("b", "block", devmajor=8, devminor=1),
        fm("p", "fifo"),
        fm(
            "s",
            mode=0o4755 | 0o100000,
            pax_records={"SCHILY.xattr.user.\udcff": "\udcfe", "x": "y"},
        ),
        fm("t", "dir", mode=0o1777),
        fm("\udcffname", size=0, offset=512),
    )
    assert at(t, "c").mode == stat.S_IFCHR | 0o620 and at(t, "c").rdev == os.makedev(4, 64)
    assert at(t, "b").rdev == os.makedev(8, 1) and stat.S_ISBLK(at(t, "b").mode)
    assert stat.S_ISFIFO(at(t, "p").mode)
    s = at(t, "s")
    assert s.mode == stat.S_IFREG | 0o4755
    assert s.xattrs == {b"user.\xff": b"\xfe"}
    assert at(t, "t").mode == stat.S_IFDIR | 0o1777
    root = at(t, "/")
    assert root.children is not None and b"\xffname" in root.children


def test_bad_mtime_is_zero(caplog: pytest.LogCaptureFixture) -> None:
    assert at(tree(fm("f", mod_time="yesterday")), "f").mtime_ns == 0


def test_path_cleaning() -> None:
    t = tree(
        fm("./a//b/./c", size=1, offset=512),
        fm("/x/../y/", "dir"),
        fm("a/b/../b/d", size=1, offset=1536),
    )
    assert sorted(at(t, "a/b").children or {}) == [b"c", b"d"]
    assert at(t, "y").is_dir
    with pytest.raises(KeyError):
        t.lookup("x")


def test_gates_name_entries_that_must_be_checked_first() -> None:
    files = [
        fm("plain", size=1, offset=512),
        fm("suid", mode=0o4755),
        fm("sgid-dir", "dir", mode=0o2775),
        fm("sym", "symlink", linkname="plain"),
        fm("hard", "hardlink", linkname="plain"),
        fm("dev", "block", devmajor=8),
        fm(".wh.gone"),
        fm("o/.wh..wh..opq"),
        fm("cap", pax_records={"SCHILY.xattr.security.capability": "x"}),
    ]
    t = tree(*files)
    gates = {name.decode(): g for name, _, g in t.children(t.root_ino)}
    assert gates == {
        "plain": [],
        "suid": [1],
        "sgid-dir": [2],
        "sym": [3],
        "hard": [4],  # the name; the inode's own entry is plain
        "dev": [5],
        "gone": [6],
        "o": [7],
        "cap": [8],
    }
    assert t.inode_gates(t.lookup("hard")) == []


def test_header_starts_match_the_real_archive() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, size in enumerate([0, 1, 511, 512, 513, 5000]):
            info = tarfile.TarInfo(f"dir/{'long' * 40}{i}")
            info.size = size
            info.pax_headers = {"SCHILY.xattr.user.a": "b" * i}
            tar.addfile(info, io.BytesIO(b"x" * size))
        link = tarfile.TarInfo("sym")
        link.type = tarfile.SYMTYPE
        link.linkname = "l" * 200
        tar.addfile(link)
    data = buf.getvalue()
    z = decode_ztoc(encode_ztoc(build_ztoc([data], Compression.UNCOMPRESSED, 1 << 20)))
    files = list(z.files)
    starts = header_starts(files)
    assert starts[0] == 0
    for meta, start in zip(files, starts, strict=True):
        assert header_matches(meta, data[start : meta.uncompressed_offset], 0, base=start)
    t = build_tree(z, 1)
    assert t.header_start.tolist() == starts
    for e in range(len(files)):
        assert header_matches(t.expected(e), data, starts[e])  # what the verifier compares
    node = t.lookup("dir/" + "long" * 40 + "5")
    assert t.entry_of(node) == 5


def test_memory_per_file_of_a_large_layer() -> None:
    files = []
    offset = 512
    for d in range(100):
        files.append(fm(f"usr/lib/pkg{d}/", "dir", mode=0o755))
        for i in range(1000):
            files.append(fm(f"usr/lib/pkg{d}/file-{i}.py", size=1000, offset=offset))
            offset += 2048
    z = decode_ztoc(encode_ztoc(ztoc(files, offset)))
    gc.collect()
    tracemalloc.start()
    try:
        t = build_tree(z, 1)
        del z
        gc.collect()
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    per_file = current / len(files)
    print(f"tree memory: {per_file:.0f} bytes per file over {len(files)} files")
    assert len(t) == len(files) + 3
    assert per_file < 150
    # The tree still answers what the entries said.
    f = at(t, "usr/lib/pkg7/file-3.py")
    assert f.offset == 512 + 2048 * (7 * 1000 + 3) and f.size == 1000


def test_very_deep_paths_and_non_directory_parents() -> None:
    deep = "/".join(["a"] * 3000)
    t = tree(fm("x", size=1, offset=512), fm("x/y", size=1, offset=1536), fm(deep + "/f"))
    assert at(t, "x").is_dir and at(t, "x/y").is_reg
    assert at(t, deep + "/f").is_reg


def listing(t: LayerTree) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    stack = [("", t.root_ino)]
    while stack:
        path, ino = stack.pop()
        s = t.stat(ino)
        out[path or "/"] = (s.mode, s.nlink, s.uid, s.size, s.mtime_ns, t.readlink(ino))
        if t.is_dir(ino):
            for name, child, _ in t.children(ino):
                stack.append((f"{path}/{name.decode('utf-8', 'surrogateescape')}", child))
    return out


_names = st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=3).map("/".join)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(_names, st.sampled_from(["reg", "dir", "symlink", "hardlink"]), _names),
        max_size=12,
    ),
    st.booleans(),
)
def test_the_array_builder_agrees_with_the_general_one(
    specs: list[tuple[str, str, str]], dot: bool
) -> None:
    """Layers without repeated paths or whiteouts take a faster path: same tree."""
    files = []
    offset = 512
    for name, kind, link in specs:
        files.append(fm(("./" if dot else "") + name, kind, linkname=link, size=3, offset=offset))
        offset += 1024
    t_fast = build_tree(ztoc(files), 100)
    with mock.patch("snapshotter.fs.tree._simple_layer", return_value=None):
        t_general = build_tree(ztoc(files), 100)
    assert listing(t_fast) == listing(t_general)
