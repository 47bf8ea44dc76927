"""The inode table of one layer, built from its zTOC, as overlayfs expects a lower layer.

Pure: no FUSE here. Tar semantics apply while building (entries in archive order, the last entry
of a name wins, missing parent directories are created, an entry under a non-directory
replaces it with a directory), then the overlay view is applied: `.wh.<x>` becomes a 0:0
character device `x` (a whiteout hides its name whatever the order of entries),
`.wh..wh..opq` is hidden and marks its directory opaque through an xattr, other `.wh..wh.*`
meta files are hidden. Directories that have no entry of their own (and the root, without a
`./` entry) are 0755 root:root with the newest mtime of the layer's entries.

Memory: nothing is kept per entry or inode but a few numbers in arrays (numpy) and the names
in one byte string, about 100 bytes per entry plus its name. A directory's children are a
contiguous range of the link arrays, sorted by name the first time the directory is looked
into (binary search from then on).

Entries that have no data to check when read but change what a container may do or see —
setuid/setgid entries, devices, symlinks, hardlinks, whiteouts, opaque markers, file
capabilities — are *gated*: `gates` lists the entries whose tar headers must be checked
before a name or inode is shown.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from snapshotter.soci.rfc3339 import format_rfc3339_nano
from snapshotter.soci.tarheader import BLOCK_SIZE
from snapshotter.soci.ztoc import TYPE_CODES, EntryColumns, FileMetadata, Ztoc, entry_columns

log = logging.getLogger(__name__)

BLOCK_UNIT = 512
BLKSIZE = 4096
WHITEOUT_PREFIX = b".wh."
WHITEOUT_META_PREFIX = b".wh..wh."
OPAQUE_WHITEOUT = b".wh..wh..opq"
DEFAULT_OPAQUE_XATTR = "trusted.overlay.opaque"
DEFAULT_DIR_MODE = stat.S_IFDIR | 0o755
CAPABILITY_XATTR = "security.capability"
SMALL_DIR = 8
"""Directories up to this many children are searched linearly (no sort needed)."""

REG, DIR, SYMLINK, HARDLINK, CHAR, BLOCK, FIFO = range(7)
WHITEOUT = 7
IMPLICIT = 8
_TYPE_BITS = {
    REG: stat.S_IFREG,
    DIR: stat.S_IFDIR,
    SYMLINK: stat.S_IFLNK,
    CHAR: stat.S_IFCHR,
    BLOCK: stat.S_IFBLK,
    FIFO: stat.S_IFIFO,
}
assert TYPE_CODES[:7] == ("reg", "dir", "symlink", "hardlink", "char", "block", "fifo")

_PAIRS = re.compile(rb"/[/.]")
"""Where a name may hold "//" or a "." component (rare: hidden files, sloppy names)."""
_UNSIMPLE = re.compile(rb"(?:^|/)\.\.?(?:/|$)|//|^/|/$|\0")
"""Keys that a stripped raw name cannot be used as: clean them with posixpath."""


@dataclass(frozen=True, slots=True)
class Inode:
    """What the filesystem shows of one inode (a snapshot, made per request)."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    rdev: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def blocks(self) -> int:
        """Allocated size in 512-byte units (whole 4 KiB blocks)."""
        return -(-self.size // BLKSIZE) * (BLKSIZE // BLOCK_UNIT)


class LayerTree:
    """The inodes of one layer, numbered from `first_ino` (the root) on. Not thread-safe
    (the FUSE thread only), except that `sort_dir` may run in a worker thread while nobody
    else looks into that directory."""

    def __init__(
        self,
        first_ino: int,
        total_size: int,
        entries: EntryColumns,
        header_start: npt.NDArray[np.int64],
        node_entry: npt.NDArray[np.int32],
        node_kind: npt.NDArray[np.uint8],
        nlink: npt.NDArray[np.uint32],
        child_start: npt.NDArray[np.int64],
        link_child: npt.NDArray[np.int32],
        link_name: npt.NDArray[np.int64],
        link_name_len: npt.NDArray[np.int32],
        link_entry: npt.NDArray[np.int32],
        opaque: dict[int, int],
        xattrs: dict[int, dict[bytes, bytes]],
        dir_mtime_ns: int,
        special: npt.NDArray[np.bool_],
    ) -> None:
        self.first_ino = first_ino
        self.total_size = total_size
        """Bytes of the uncompressed archive (for statfs)."""
        self.entries = entries
        self.header_start = header_start
        """Where each entry's tar header chain starts."""
        self._entry = node_entry
        self._kind = node_kind
        self._nlink = nlink
        self._child_start = child_start
        self._link_child = link_child
        self._link_name = link_name
        self._link_name_len = link_name_len
        self._link_entry = link_entry
        self._opaque = opaque
        self._xattrs = xattrs
        self._dir_mtime = dir_mtime_ns
        self._special = special
        self._sorted = bytearray(len(node_entry))
        self._bad_mtime_set = frozenset(entries.bad_mtimes)

    @property
    def root_ino(self) -> int:
        return self.first_ino

    def __len__(self) -> int:
        return len(self._entry)

    def __contains__(self, ino: int) -> bool:
        return 0 <= ino - self.first_ino < len(self._entry)

    def _index(self, ino: int) -> int:
        i = ino - self.first_ino
        if not 0 <= i < len(self._entry):
            raise KeyError(ino)
        return i

    # -- attributes ------------------------------------------------------------------------

    def stat(self, ino: int) -> Inode:
        """The attributes of inode `ino`; KeyError if it is not in this layer."""
        i = self._index(ino)
        kind = int(self._kind[i])
        e = int(self._entry[i])
        nlink = int(self._nlink[i])
        if e < 0:  # the root without an entry, or an implicit directory
            return Inode(ino, DEFAULT_DIR_MODE, nlink, 0, 0, 0, self._dir_mtime)
        c = self.entries
        mtime = int(c.mtime_ns[e])
        if kind == WHITEOUT:
            return Inode(ino, stat.S_IFCHR, nlink, 0, 0, 0, mtime)
        uid, gid = int(c.uid[e]), int(c.gid[e])
        if kind == SYMLINK:  # Linux symlinks are 0777 whatever the tar says
            return Inode(ino, stat.S_IFLNK | 0o777, nlink, uid, gid, int(c.link_len[e]), mtime)
        mode = _TYPE_BITS[kind] | (int(c.mode[e]) & 0o7777)
        size = int(c.size[e]) if kind == REG else 0
        rdev = 0
        if kind in (CHAR, BLOCK):
            rdev = os.makedev(*c.devices.get(e, (0, 0)))
        return Inode(ino, mode, nlink, uid, gid, size, mtime, rdev)

    def is_dir(self, ino: int) -> bool:
        return int(self._kind[self._index(ino)]) in (DIR, IMPLICIT)

    def data(self, ino: int) -> tuple[int, int, int] | None:
        """(entry, data offset, size) of a regular file, else None."""
        i = self._index(ino)
        if int(self._kind[i]) != REG:
            return None
        e = int(self._entry[i])
        return e, int(self.entries.offset[e]), int(self.entries.size[e])

    def readlink(self, ino: int) -> bytes | None:
        i = self._index(ino)
        if int(self._kind[i]) != SYMLINK:
            return None
        return self.entries.linkname(int(self._entry[i]))

    def xattrs(self, ino: int) -> dict[bytes, bytes] | None:
        return self._xattrs.get(self._index(ino))

    def entry_of(self, ino: int) -> int:
        """The zTOC entry an inode's attributes come from (-1: none)."""
        return int(self._entry[self._index(ino)])

    def inode_gates(self, ino: int) -> list[int]:
        """Entries whose headers must be checked before the inode's attributes are shown."""
        i = self._index(ino)
        gates = []
        e = int(self._entry[i])
        if e >= 0 and self._special[e]:
            gates.append(e)
        marker = self._opaque.get(i)
        if marker is not None:
            gates.append(marker)
        return gates

    # -- directories -----------------------------------------------------------------------

    def dir_size(self, ino: int) -> int:
        i = self._index(ino)
        return int(self._child_start[i + 1] - self._child_start[i])

    def needs_sort(self, ino: int) -> bool:
        """Whether `sort_dir` has yet to run for this directory."""
        i = self._index(ino)
        return not self._sorted[i] and self.dir_size(ino) > SMALL_DIR

    def sort_dir(self, ino: int) -> None:
        """Order the directory's children by name, once (lookups then bisect)."""
        i = self._index(ino)
        if self._sorted[i]:
            return
        lo, hi = int(self._child_start[i]), int(self._child_start[i + 1])
        if hi - lo > 1:
            blob = self.entries.blob
            starts = self._link_name[lo:hi].tolist()
            lens = self._link_name_len[lo:hi].tolist()
            keys = [blob[s : s + n] for s, n in zip(starts, lens, strict=True)]
            order = np.array(sorted(range(hi - lo), key=keys.__getitem__), np.int64)
            for arr in (self._link_child, self._link_name, self._link_name_len, self._link_entry):
                arr[lo:hi] = arr[lo:hi][order]
        self._sorted[i] = 1

    def _name(self, link: int) -> bytes:
        s = int(self._link_name[link])
        return self.entries.blob[s : s + int(self._link_name_len[link])]

    def lookup_child(self, ino: int, name: bytes) -> tuple[int, list[int]] | None:
        """(child ino, gates of the name) of `name` in directory `ino`, or None.

        Call `sort_dir` first for directories that `needs_sort`."""
        i = self._index(ino)
        lo, hi = int(self._child_start[i]), int(self._child_start[i + 1])
        if hi - lo <= SMALL_DIR or not self._sorted[i]:
            for link in range(lo, hi):
                if self._name(link) == name:
                    return self._found(link)
            return None
        while lo < hi:
            mid = (lo + hi) // 2
            if self._name(mid) < name:
                lo = mid + 1
            else:
                hi = mid
        if lo < int(self._child_start[i + 1]) and self._name(lo) == name:
            return self._found(lo)
        return None

    def _found(self, link: int) -> tuple[int, list[int]]:
        child = self.first_ino + int(self._link_child[link])
        gates = self.inode_gates(child)
        e = int(self._link_entry[link])
        if e >= 0 and self._special[e] and e not in gates:
            gates.append(e)
        return child, gates

    def children(self, ino: int) -> list[tuple[bytes, int, list[int]]]:
        """(name, child ino, gates) of every entry of directory `ino`, in lookup order."""
        i = self._index(ino)
        lo, hi = int(self._child_start[i]), int(self._child_start[i + 1])
        out = []
        for link in range(lo, hi):
            child, gates = self._found(link)
            out.append((self._name(link), child, gates))
        return out

    def lookup(self, path: str) -> int:
        """The inode at a path inside the layer (`/a/b`, `a/b`); KeyError if absent (tests,
        tools: gates are not checked)."""
        ino = self.root_ino
        for part in posixpath.normpath("/" + path).split("/"):
            if not part:
                continue
            if not self.is_dir(ino):
                raise KeyError(path)
            self.sort_dir(ino)
            found = self.lookup_child(ino, os.fsencode(part))
            if found is None:
                raise KeyError(path)
            ino = found[0]
        return ino

    def expected(self, entry: int) -> FileMetadata:
        """The zTOC's view of an entry, as a header check compares it."""
        c = self.entries
        xattrs = c.xattrs.get(entry, {})
        dev = c.devices.get(entry, (0, 0))
        ns = int(c.mtime_ns[entry])
        bad = entry in self._bad_mtime_set
        mod_time = "malformed" if bad else format_rfc3339_nano(*divmod(ns, 10**9))
        return FileMetadata(
            name=c.name(entry).decode("utf-8", "surrogateescape"),
            type=TYPE_CODES[int(c.kind[entry])],
            uncompressed_offset=int(c.offset[entry]),
            uncompressed_size=int(c.size[entry]),
            linkname=c.linkname(entry).decode("utf-8", "surrogateescape"),
            mode=int(c.mode[entry]),
            uid=int(c.uid[entry]),
            gid=int(c.gid[entry]),
            mod_time=mod_time,
            devmajor=dev[0],
            devminor=dev[1],
            pax_records={"SCHILY.xattr." + k: v for k, v in xattrs.items()},
        )


def header_starts(c: EntryColumns) -> npt.NDArray[np.int64]:
    """Where each entry's tar header chain starts: the previous entry's end (in offset
    order), block-aligned."""
    n = len(c)
    order = np.argsort(c.offset, kind="stable")
    data_end = c.offset + np.where(c.kind == REG, c.size, 0)
    ends = np.maximum.accumulate(data_end[order]) if n else data_end
    starts = np.zeros(n, np.int64)
    if n > 1:
        prev = ends[:-1]
        starts[order[1:]] = -(-prev // BLOCK_SIZE) * BLOCK_SIZE
    return starts


def _special_entries(c: EntryColumns) -> npt.NDArray[np.bool_]:
    """Entries that must be checked before they are shown (see the module docstring)."""
    kind = c.kind
    special = (
        ((c.mode & 0o6000) != 0)
        | (kind == SYMLINK)
        | (kind == HARDLINK)
        | (kind == CHAR)
        | (kind == BLOCK)
    )
    for e, xattrs in c.xattrs.items():
        if CAPABILITY_XATTR in xattrs:
            special[e] = True
    return np.asarray(special, np.bool_)


def _clean(raw: bytes) -> bytes:
    """The key of a raw tar name: its cleaned path without the leading slash."""
    return posixpath.normpath(b"/" + raw).lstrip(b"/")


class _Build:
    """The builder's state: path ids, nodes, and which node each path holds now."""

    def __init__(self, c: EntryColumns) -> None:
        self.c = c
        n = len(c)
        blob = c.blob
        u8 = np.frombuffer(blob, np.uint8)
        # The stripped raw name [s, e) of each entry: no leading "./" or "/", no trailing "/".
        s = c.name_start.copy()
        e = s + c.name_len
        m = (e - s >= 2) & (u8[s] == 0x2E) & (u8[np.minimum(s + 1, len(u8) - 1)] == 0x2F)
        s[m] += 2
        m = (e > s) & (u8[np.minimum(s, len(u8) - 1)] == 0x2F)
        s[m] += 1
        m = (e > s) & (u8[np.maximum(e - 1, 0)] == 0x2F)
        e[m] -= 1
        m = (e - s == 1) & (u8[np.minimum(s, len(u8) - 1)] == 0x2E)
        e[m] = s[m]
        keys = [blob[a:z] for a, z in zip(s.tolist(), e.tolist(), strict=True)]
        # The name inside its directory: after the last "/" of the stripped name.
        slashes = np.concatenate([[-1], np.flatnonzero(u8 == 0x2F)])
        last = np.searchsorted(slashes, e) - 1
        last_slash = np.where(last >= 0, slashes[np.maximum(last, 0)], -1)
        self.base_start = np.where(last_slash >= s, last_slash + 1, s)
        self.base_len = e - self.base_start
        # Names that stripping alone does not clean ("//", "." or ".." components, a NUL):
        # found on the whole blob at once, then cleaned one by one.
        pairs = np.fromiter((m.start() for m in _PAIRS.finditer(blob)), np.int64)
        marks = np.concatenate([pairs, np.flatnonzero(u8 == 0)])
        marks.sort()
        count = np.searchsorted(marks, e) - np.searchsorted(marks, s)
        clip = len(u8) - 1
        first = u8[np.minimum(s, clip)]
        suspect = (count > 0) | ((e > s) & ((first == 0x2E) | (first == 0x2F)))
        suspect |= (e > s) & (u8[np.maximum(e - 1, 0)] == 0x2F)
        search = _UNSIMPLE.search
        self.unsimple: set[int] = set()
        for i in np.flatnonzero(suspect).tolist():
            if search(keys[i]) is not None:
                keys[i] = _clean(blob[int(c.name_start[i]) : int(c.name_start[i] + c.name_len[i])])
                self.unsimple.add(i)
        base4 = np.zeros(n, np.uint32)
        for j in range(4):
            idx = np.minimum(self.base_start + j, len(u8) - 1)
            byte = np.where(self.base_len > j, u8[idx], 0).astype(np.uint32)
            base4 |= byte << np.uint32(8 * j)
        wh = base4 == np.uint32(int.from_bytes(WHITEOUT_PREFIX, "little"))
        for i in self.unsimple:
            key = keys[i]
            wh[i] = key[key.rfind(b"/") + 1 :].startswith(WHITEOUT_PREFIX)
        self.whiteout = wh
        self.keys = keys
        # Path ids: entries' paths first (the id of a path is its last entry), then
        # implicit directories and whiteout targets; the root is b"".
        ids: dict[bytes, int] = dict(zip(keys, range(n), strict=True))
        self.distinct = len(ids)
        self.pid: Sequence[int] = (
            range(n) if self.distinct == n else list(map(ids.__getitem__, keys))
        )
        self.ids = ids
        self.path_keys: dict[int, bytes] = {}
        """Keys of paths that are no entry's."""
        self.cur: list[int] = [-1] * n
        self.under: list[int] = [-1] * n
        self.placed_by: list[int] = [-1] * n
        parent_end = np.where(self.base_start > s, self.base_start - 1, s)
        parent_keys = [blob[a:z] for a, z in zip(s.tolist(), parent_end.tolist(), strict=True)]
        for i in self.unsimple:
            k = keys[i]
            parent_keys[i] = k[: max(k.rfind(b"/"), 0)]
        parent: list[int | None] = list(map(ids.get, parent_keys))
        self.parent: list[int] = parent  # type: ignore[assignment]  # Nones fixed below
        for i in [i for i, q in enumerate(parent) if q is None]:
            parent[i] = self.path_id(parent_keys[i])
        self.root_pid = self.path_id(b"")
        self.parent[self.root_pid] = -1

    def path_id(self, key: bytes) -> int:
        """The id of a path, made (with its missing ancestors) when new."""
        pid = self.ids.get(key)
        if pid is not None:
            return pid
        missing = [key]
        while True:  # iterative: a tar path can be thousands of levels deep
            head = missing[-1].rpartition(b"/")[0]
            if head in self.ids or not missing[-1]:
                break
            missing.append(head)
        for k in reversed(missing):
            pid = self.ids[k] = len(self.parent)
            self.path_keys[pid] = k
            self.parent.append(self.ids[k.rpartition(b"/")[0]] if k else -1)
            self.cur.append(-1)
            self.under.append(-1)
            self.placed_by.append(-1)
        return self.ids[key]

    def key_of(self, pid: int) -> bytes:
        key = self.path_keys.get(pid)
        return self.keys[pid] if key is None else key

    def parent_of(self, pid: int) -> int:
        return self.parent[pid]


def build_tree(
    ztoc: Ztoc, first_ino: int, *, opaque_xattr: str = DEFAULT_OPAQUE_XATTR
) -> LayerTree:
    """Build the inode table of a layer from its zTOC, numbering inodes from `first_ino`."""
    c = entry_columns(ztoc.files)
    n = len(c)
    b = _Build(c)
    simple = _simple_layer(b, c)
    if simple is not None:
        return _finish(b, c, ztoc, first_ino, opaque_xattr, *simple, {}, [])
    keys, pid, root_pid = b.keys, b.pid, b.root_pid
    cur, under, placed_by = b.cur, b.under, b.placed_by
    kind = c.kind.tolist()
    whiteout = b.whiteout.tolist()

    # Nodes: 0 is the root. node_entry: the entry giving its attributes (-1: none).
    node_entry: list[int] = [-1]
    node_kind: list[int] = [IMPLICIT]
    opaque: dict[int, int] = {}
    whiteout_entries: list[int] = []
    cur[root_pid] = 0
    # Directories reachable from the root, by path id; cleared when a directory is replaced.
    dirs: dict[int, int] = {root_pid: 0}

    def child(parent: int, p: int) -> int:
        node = cur[p]
        return node if node >= 0 and under[p] == parent else -1

    def is_dir(node: int) -> bool:
        return node_kind[node] in (DIR, IMPLICIT)

    def new_node(k: int, e: int) -> int:
        node_entry.append(e)
        node_kind.append(k)
        return len(node_kind) - 1

    def place(parent: int, p: int, node: int, e: int) -> None:
        existing = child(parent, p)
        if existing >= 0:
            if node_kind[existing] == WHITEOUT and node_kind[node] != WHITEOUT:
                return  # a whiteout in a layer hides the name whatever the order
            if is_dir(existing):
                dirs.clear()  # its subtree is gone: reachability is found again
                dirs[root_pid] = 0
        cur[p] = node
        under[p] = parent
        placed_by[p] = e
        if is_dir(node):
            dirs[p] = node

    def dir_at(p: int) -> int:
        """The directory at path p, made (with its ancestors) when missing."""
        node = dirs.get(p)
        chain = []
        while node is None:  # iterative: a tar path can be thousands of levels deep
            chain.append(p)
            p = b.parent_of(p)
            node = dirs.get(p)
        for q in reversed(chain):
            existing = child(node, q)
            if existing >= 0 and is_dir(existing):
                node = existing
            else:
                if existing >= 0:
                    log.warning(
                        "tar entry under %r, which is not a directory: replacing it",
                        b.key_of(q).decode("utf-8", "surrogateescape"),
                    )
                new = new_node(IMPLICIT, -1)
                cur[q], under[q], placed_by[q] = new, node, -1
                node = new
            dirs[q] = node
        return node

    ppid = b.parent
    get_dir = dirs.get
    for e in range(n):
        p = pid[e]
        k = kind[e]
        if p == root_pid:
            if k == DIR:
                node_entry[0] = e
                node_kind[0] = DIR
            continue
        parent = get_dir(ppid[p])
        if parent is None:
            parent = dir_at(ppid[p])
        if whiteout[e]:
            whiteout_entries.append(e)
            key = keys[e]
            base = key[key.rfind(b"/") + 1 :]
            if base == OPAQUE_WHITEOUT:
                opaque.setdefault(parent, e)
                continue
            hidden = base[len(WHITEOUT_PREFIX) :]
            if base.startswith(WHITEOUT_META_PREFIX) or not hidden:
                continue
            head = key[: len(key) - len(base)]
            place(parent, b.path_id(head + hidden), new_node(WHITEOUT, e), e)
            continue
        if k == HARDLINK:
            target = _find(b, dirs, c.linkname(e))
            if target < 0 or is_dir(target):
                log.warning(
                    "hardlink %r to %r: target missing or a directory; dropped",
                    c.name(e).decode("utf-8", "surrogateescape"),
                    c.linkname(e).decode("utf-8", "surrogateescape"),
                )
                continue
            if child(parent, p) != target:
                place(parent, p, target, e)
            continue
        existing = cur[p]
        if existing >= 0 and under[p] == parent:
            if k == DIR and is_dir(existing):
                # A repeated directory entry updates its attributes and keeps its contents.
                node_entry[existing] = e
                node_kind[existing] = DIR
                continue
            place(parent, p, new_node(k, e), e)
            continue
        # The common case: a new name.
        node_entry.append(e)
        node_kind.append(k)
        node = len(node_kind) - 1
        cur[p] = node
        under[p] = parent
        placed_by[p] = e
        if k == DIR:
            dirs[p] = node

    return _finish(
        b,
        c,
        ztoc,
        first_ino,
        opaque_xattr,
        np.array(node_entry, np.int64),
        np.array(node_kind, np.uint8),
        (np.array(cur, np.int64), np.array(under, np.int64), np.array(placed_by, np.int64)),
        opaque,
        whiteout_entries,
    )


_Placement = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]


def _simple_layer(
    b: _Build, c: EntryColumns
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8], _Placement] | None:
    """The placement of a layer whose result does not depend on the order of its entries
    (no repeated path, no whiteout, every entry's parent a directory or implicit), computed
    with arrays; None for any other layer (the general builder takes it)."""
    n = len(c)
    kind = c.kind
    root = b.root_pid
    if n == 0 or b.distinct != n or b.whiteout.any():
        return None
    parent = np.array(b.parent, np.int64)
    entry_parent = (parent >= 0) & (parent < n)  # of every path, implicit ones included
    if (entry_parent & (kind[np.where(entry_parent, parent, 0)] != DIR)).any():
        return None
    if root < n and kind[root] != DIR:
        return None
    paths = len(parent)
    index = np.arange(n)
    placed = np.flatnonzero((kind != HARDLINK) & (index != root))
    implicit = np.arange(n, paths)
    implicit = implicit[implicit != root]
    node_of_path = np.full(paths, -1, np.int64)
    node_of_path[root] = 0
    node_of_path[placed] = 1 + np.arange(len(placed))
    node_of_path[implicit] = 1 + len(placed) + np.arange(len(implicit))
    node_entry = np.concatenate([[root if root < n else -1], placed, np.full(len(implicit), -1)])
    node_kind = np.concatenate(
        [[DIR if root < n else IMPLICIT], kind[placed], np.full(len(implicit), IMPLICIT)]
    ).astype(np.uint8)
    for e in np.flatnonzero(kind == HARDLINK).tolist():
        key = _clean(c.linkname(e))
        t = b.ids.get(key)
        if t is not None and key and t < e and kind[t] != DIR and node_of_path[t] >= 0:
            node_of_path[e] = node_of_path[t]
        else:
            log.warning(
                "hardlink %r to %r: target missing or a directory; dropped",
                c.name(e).decode("utf-8", "surrogateescape"),
                c.linkname(e).decode("utf-8", "surrogateescape"),
            )
    under = np.where(parent >= 0, node_of_path[np.maximum(parent, 0)], -1)
    placed_by = np.concatenate([index, np.full(paths - n, -1)])
    node_of_path[root] = 0
    return node_entry, node_kind, (node_of_path, under, placed_by)


def _find(b: _Build, dirs: dict[int, int], linkname: bytes) -> int:
    """The node a hardlink's target path names now, or -1."""
    key = _clean(linkname)
    p = b.ids.get(key)
    if p is None or not key:
        return -1
    parent = dirs.get(b.parent_of(p))
    node = b.cur[p]
    if parent is None or node < 0 or b.under[p] != parent:
        return -1
    return node


def _finish(
    b: _Build,
    c: EntryColumns,
    ztoc: Ztoc,
    first_ino: int,
    opaque_xattr: str,
    node_entry: npt.NDArray[np.int64],
    node_kind: npt.NDArray[np.uint8],
    placement: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]],
    opaque: dict[int, int],
    whiteout_entries: list[int],
) -> LayerTree:
    # A name is live if the node it was placed under is the live directory of its parent
    # path, all the way up. Path ids are placed parents first, except that entries' ids are
    # fixed by their index: go by depth for those that are not in order.
    cur, under, placed_by = placement
    parent_path = np.array(b.parent, np.int64)
    root_pid = b.root_pid
    placed = np.flatnonzero(cur >= 0)
    placed = placed[placed != root_pid]
    # Decide paths whose parent path is decided, one level per round (parents first).
    live_node = np.full(len(cur), -1, np.int64)  # the node a path holds, if it is live
    live_node[root_pid] = 0
    decided = cur < 0
    decided[root_pid] = True
    todo = placed
    while len(todo):
        pp = parent_path[todo]
        ready = decided[pp]
        if not ready.any():
            break  # cannot happen: every placed path's parent was placed before it
        now = todo[ready]
        parent_node = live_node[pp[ready]]
        ok = (parent_node >= 0) & (under[now] == parent_node)
        live_node[now[ok]] = cur[now[ok]]
        decided[now] = True
        todo = todo[~ready]
    live_paths = np.flatnonzero(live_node >= 0)
    live_paths = live_paths[live_paths != root_pid]
    children = live_node[live_paths]
    mark = np.zeros(len(node_kind), np.bool_)
    mark[0] = True
    mark[children] = True
    live = np.flatnonzero(mark)
    rank = np.full(len(node_kind), -1, np.int64)
    rank[live] = np.arange(len(live))
    n_nodes = len(live)
    link_parent = rank[under[live_paths]]
    link_child = rank[children].astype(np.int32)
    link_entry = placed_by[live_paths].astype(np.int32)
    kinds = node_kind[live]
    # Names: a suffix of the placing entry's raw name where possible, else added to the blob.
    link_name = np.zeros(len(live_paths), np.int64)
    link_name_len = np.zeros(len(live_paths), np.int32)
    simple = (link_entry >= 0) & (kinds[link_child] != WHITEOUT)
    cleaned = np.zeros(len(c) + 1, np.bool_)
    cleaned[list(b.unsimple)] = True
    simple &= ~cleaned[link_entry]
    e_simple = link_entry[simple]
    link_name[simple] = b.base_start[e_simple]
    link_name_len[simple] = b.base_len[e_simple]
    extra: list[bytes] = []
    extra_pos = len(c.blob)
    names: dict[bytes, int] = {}
    for j in np.flatnonzero(~simple).tolist():
        key = b.key_of(int(live_paths[j]))
        base = key[key.rfind(b"/") + 1 :]
        pos = names.get(base)
        if pos is None:
            pos = names[base] = extra_pos
            extra.append(base + b"\0")
            extra_pos += len(base) + 1
        link_name[j] = pos
        link_name_len[j] = len(base)
    link_entry[kinds[link_child] == IMPLICIT] = -1
    if extra:
        c.blob = c.blob + b"".join(extra)
    order = np.argsort(link_parent, kind="stable")
    link_parent = link_parent[order]
    link_child, link_name = link_child[order], link_name[order]
    link_name_len, link_entry = link_name_len[order], link_entry[order]
    child_start = np.zeros(n_nodes + 1, np.int64)
    np.cumsum(np.bincount(link_parent, minlength=n_nodes), out=child_start[1:])
    is_dir = (kinds == DIR) | (kinds == IMPLICIT)
    nlink = np.bincount(link_child, minlength=n_nodes).astype(np.uint32)
    subdirs = np.bincount(link_parent[is_dir[link_child]], minlength=n_nodes).astype(np.uint32)
    nlink[is_dir] = 2 + subdirs[is_dir]
    entries = node_entry[live].astype(np.int32)
    xattrs: dict[int, dict[bytes, bytes]] = {}
    if c.xattrs:
        has = np.zeros(len(c) + 1, np.bool_)
        has[list(c.xattrs)] = True
        for r in np.flatnonzero(has[entries] & (kinds != WHITEOUT)).tolist():
            xattrs[r] = {
                k.encode("utf-8", "surrogateescape"): v.encode("utf-8", "surrogateescape")
                for k, v in c.xattrs[int(entries[r])].items()
            }
    opaque_ranked: dict[int, int] = {}
    opaque_xattr_b = opaque_xattr.encode()
    for node, marker in opaque.items():
        r = int(rank[node])
        if r >= 0 and is_dir[r]:
            opaque_ranked[r] = marker
            xattrs.setdefault(r, {})[opaque_xattr_b] = b"y"
    if c.bad_mtimes:
        log.warning(
            "%d entries have a malformed mtime (first %r); using 0",
            len(c.bad_mtimes),
            c.name(c.bad_mtimes[0]).decode("utf-8", "surrogateescape"),
        )
    special = _special_entries(c)
    special[whiteout_entries] = True
    starts = header_starts(c)
    return LayerTree(
        first_ino=first_ino,
        total_size=ztoc.uncompressed_archive_size,
        entries=c.compact(),
        header_start=starts,
        node_entry=entries,
        node_kind=kinds,
        nlink=nlink,
        child_start=child_start,
        link_child=link_child,
        link_name=link_name,
        link_name_len=link_name_len,
        link_entry=link_entry,
        opaque=opaque_ranked,
        xattrs=xattrs,
        dir_mtime_ns=int(c.mtime_ns.max()) if len(c) else 0,
        special=special,
    )
