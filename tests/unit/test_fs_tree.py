"""The inode table built from a zTOC: tar semantics, the overlay view, sizes and memory."""

from __future__ import annotations

import gc
import io
import logging
import os
import stat
import tarfile
import tracemalloc

import pytest

from snapshotter.compression.detect import Compression
from snapshotter.fs.tree import LayerTree, Node, build_tree
from snapshotter.soci.build import build_ztoc
from snapshotter.soci.tarheader import header_matches, header_starts
from snapshotter.soci.ztoc import FileMetadata, Ztoc

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
    return Ztoc("0.9", "test", 0, size, files, Compression.GZIP, 0, [], b"")  # type: ignore[arg-type]


def tree(*files: FileMetadata, **kw: str) -> LayerTree:
    return build_tree(ztoc(list(files)), 100, **kw)


def test_implicit_parents_and_root_attrs() -> None:
    t = tree(fm("./", "dir", mode=0o700, uid=5), fm("a/b/c", size=10, offset=512))
    assert t.root.ino == 100
    assert t.root.mode == stat.S_IFDIR | 0o700 and t.root.uid == 5
    a = t.lookup("/a")
    assert a.mode == stat.S_IFDIR | 0o755 and a.uid == 0 and a.nlink == 3
    c = t.lookup("a/b/c")
    assert c.size == 10 and c.offset == 512 and c.blocks == 8
    assert c.mtime_ns == T0_NS
    assert t.root.nlink == 3
    assert sorted(n.ino for n in t.nodes()) == list(range(100, 100 + len(t)))
    assert t.node(c.ino) is c and c.ino in t and 100 + len(t) not in t


def test_last_entry_wins_and_dirs_merge() -> None:
    t = tree(
        fm("d", "dir", mode=0o700),
        fm("d/x", size=1, offset=512),
        fm("d", "dir", mode=0o750),
        fm("f", size=1, offset=1536),
        fm("f", "symlink", linkname="target"),
    )
    d = t.lookup("d")
    assert d.mode == stat.S_IFDIR | 0o750
    assert d.children is not None and b"x" in d.children
    f = t.lookup("f")
    assert stat.S_ISLNK(f.mode) and f.target == b"target" and f.size == 6
    assert len(t) == 4


def test_replacing_a_directory_drops_its_subtree() -> None:
    t = tree(fm("d", "dir"), fm("d/x", size=1, offset=512), fm("d", size=2, offset=1536))
    assert t.lookup("d").is_reg
    assert t.root.nlink == 2 and len(t) == 2


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
    a = t.lookup("a")
    assert stat.S_ISCHR(a.mode) and a.rdev == 0 and a.uid == 0 and a.gid == 0 and a.size == 0
    o = t.lookup("o")
    assert o.xattrs == {b"user.overlay.opaque": b"y"}
    assert o.children is not None and list(o.children) == [b"gone"]
    assert stat.S_ISCHR(o.children[b"gone"].mode)


def test_whiteout_hides_a_name_whatever_the_order() -> None:
    t = tree(fm(".wh.a"), fm("a", size=1, offset=512))
    assert stat.S_ISCHR(t.lookup("a").mode)


def test_opaque_marker_survives_a_repeated_dir_entry() -> None:
    t = tree(fm("o/.wh..wh..opq"), fm("o", "dir", pax_records={"SCHILY.xattr.user.k": "v"}))
    assert t.lookup("o").xattrs == {b"user.k": b"v", b"trusted.overlay.opaque": b"y"}


def test_hardlinks_share_inodes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    t = tree(
        fm("f", size=3, offset=512),
        fm("g", "hardlink", linkname="./f"),
        fm("d/h", "hardlink", linkname="/f"),
        fm("m", "hardlink", linkname="missing"),
        fm("f", size=1, offset=2048),
    )
    g, h, f = t.lookup("g"), t.lookup("d/h"), t.lookup("f")
    assert g is h and g is not f
    assert g.nlink == 2 and g.size == 3 and f.nlink == 1
    with pytest.raises(KeyError):
        t.lookup("m")
    assert "missing" in caplog.text
    assert len({n.ino for n in t.nodes()}) == len(t) == 4


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
    assert t.lookup("c").mode == stat.S_IFCHR | 0o620 and t.lookup("c").rdev == os.makedev(4, 64)
    assert t.lookup("b").rdev == os.makedev(8, 1) and stat.S_ISBLK(t.lookup("b").mode)
    assert stat.S_ISFIFO(t.lookup("p").mode)
    s = t.lookup("s")
    assert s.mode == stat.S_IFREG | 0o4755
    assert s.xattrs == {b"user.\xff": b"\xfe"}
    assert t.lookup("t").mode == stat.S_IFDIR | 0o1777
    assert t.root.children is not None and b"\xffname" in t.root.children


def test_bad_mtime_is_zero(caplog: pytest.LogCaptureFixture) -> None:
    assert tree(fm("f", mod_time="yesterday")).lookup("f").mtime_ns == 0


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
    z = build_ztoc([data], Compression.UNCOMPRESSED, 1 << 20)
    starts = header_starts(z.files)
    assert starts[0] == 0
    for meta, start in zip(z.files, starts, strict=True):
        assert header_matches(meta, data[start : meta.uncompressed_offset], 0, base=start)
    t = build_tree(z, 1)
    node = t.lookup("dir/" + "long" * 40 + "5")
    assert node.header_start == starts[5] and node.meta is z.files[5]


def test_memory_per_file_of_a_large_layer() -> None:
    files = []
    offset = 512
    for d in range(100):
        files.append(fm(f"usr/lib/pkg{d}/", "dir", mode=0o755))
        for i in range(1000):
            files.append(fm(f"usr/lib/pkg{d}/file-{i}.py", size=1000, offset=offset))
            offset += 2048
    z = ztoc(files, offset)
    gc.collect()
    tracemalloc.start()
    try:
        t = build_tree(z, 1)
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    per_file = current / len(files)
    print(f"tree memory: {per_file:.0f} bytes per file over {len(files)} files")
    assert len(t) == len(files) + 3
    assert per_file < 400
    assert isinstance(t.root, Node)


def test_very_deep_paths_and_non_directory_parents() -> None:
    deep = "/".join(["a"] * 3000)
    t = tree(fm("x", size=1, offset=512), fm("x/y", size=1, offset=1536), fm(deep + "/f"))
    assert t.lookup("x").is_dir and t.lookup("x/y").is_reg
    assert t.lookup(deep + "/f").is_reg
