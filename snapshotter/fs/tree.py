"""The inode table of one layer, built from its zTOC, as overlayfs expects a lower layer.

Pure: no FUSE here. Tar semantics apply while building (entries in archive order, the last entry
of a name wins, missing parent directories are created), then the overlay view is applied:
`.wh.<x>` becomes a 0:0 character device `x`, `.wh..wh..opq` is hidden and marks its directory
opaque through an xattr, other `.wh..wh.*` meta files are hidden.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator

from snapshotter.errors import TimestampError
from snapshotter.soci.reader import clean_path
from snapshotter.soci.rfc3339 import parse_rfc3339_nano
from snapshotter.soci.tarheader import header_starts
from snapshotter.soci.ztoc import FileMetadata, Ztoc

log = logging.getLogger(__name__)

BLOCK_UNIT = 512
BLKSIZE = 4096
WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
DEFAULT_OPAQUE_XATTR = "trusted.overlay.opaque"
DEFAULT_DIR_MODE = stat.S_IFDIR | 0o755

_TYPE_BITS = {
    "reg": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}


class Node:
    """One inode. Directories have `children`; hardlinked names share one Node."""

    __slots__ = (
        "children",
        "entry",
        "gid",
        "header_start",
        "ino",
        "meta",
        "mode",
        "mtime_ns",
        "nlink",
        "offset",
        "rdev",
        "size",
        "target",
        "uid",
        "xattrs",
    )

    def __init__(self, mode: int, uid: int = 0, gid: int = 0, mtime_ns: int = 0) -> None:
        self.ino = 0
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime_ns = mtime_ns
        self.size = 0
        self.rdev = 0
        self.nlink = 1
        self.offset = 0
        """Offset of a regular file's data in the uncompressed tar."""
        self.header_start = 0
        """Offset of the first block of a regular file's tar header chain."""
        self.entry = -1
        """Index of a regular file's zTOC entry."""
        self.meta: FileMetadata | None = None
        """The zTOC entry of a regular file (checked against its tar header on first read)."""
        self.target: bytes | None = None
        self.xattrs: dict[bytes, bytes] | None = None
        self.children: dict[bytes, Node] | None = None

    @property
    def is_dir(self) -> bool:
        return self.children is not None

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def blocks(self) -> int:
        """Allocated size in 512-byte units (whole 4 KiB blocks)."""
        return -(-self.size // BLKSIZE) * (BLKSIZE // BLOCK_UNIT)

    def __repr__(self) -> str:
        return f"Node(ino={self.ino}, mode={self.mode:o}, size={self.size})"


class LayerTree:
    """The inodes of one layer, numbered from `first_ino` (the root) on."""

    __slots__ = ("_nodes", "files", "first_ino", "header_starts", "root", "total_size")

    def __init__(
        self,
        root: Node,
        nodes: list[Node],
        first_ino: int,
        total_size: int,
        files: list[FileMetadata],
        header_starts: list[int],
    ) -> None:
        self.files = files
        """The zTOC entries (what header checks compare)."""
        self.header_starts = header_starts
        """Where each entry's tar header chain starts."""
        self.root = root
        self._nodes = nodes
        self.first_ino = first_ino
        self.total_size = total_size
        """Bytes of the uncompressed archive (for statfs)."""

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, ino: int) -> bool:
        return 0 <= ino - self.first_ino < len(self._nodes)

    def node(self, ino: int) -> Node:
        """The node numbered `ino`; KeyError if it is not in this layer."""
        i = ino - self.first_ino
        if not 0 <= i < len(self._nodes):
            raise KeyError(ino)
        return self._nodes[i]

    def nodes(self) -> Iterator[Node]:
        return iter(self._nodes)

    def lookup(self, path: str) -> Node:
        """The node at a path inside the layer (`/a/b`, `a/b`); KeyError if absent."""
        node = self.root
        for part in clean_path(path).split("/")[1:]:
            if not part:
                continue
            if node.children is None:
                raise KeyError(path)
            node = node.children[os.fsencode(part)]
        return node


def _mtime_ns(meta: FileMetadata) -> int:
    try:
        seconds, nanos = parse_rfc3339_nano(meta.mod_time)
    except TimestampError:
        log.warning("entry %r has a malformed mtime %r; using 0", meta.name, meta.mod_time)
        return 0
    return seconds * 1_000_000_000 + nanos


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


class _Builder:
    def __init__(self, opaque_xattr: bytes) -> None:
        self.opaque_xattr = opaque_xattr
        self.root = Node(DEFAULT_DIR_MODE)
        self.root.nlink = 1
        self.root.children = {}
        # Directories by cleaned path, only while building.
        self.dirs: dict[str, Node] = {"/": self.root}
        # Keyed by id(); holding the nodes keeps an id from being reused by another node.
        self.whiteouts: dict[int, Node] = {}
        # Layers share few distinct mtimes: one int object per distinct value saves ~32 B/file.
        self.mtimes: dict[str, int] = {}

    def parent_dir(self, path: str) -> Node:
        """The directory `path`, created (with its ancestors) when missing."""
        node = self.dirs.get(path)
        if node is not None:
            return node
        missing: list[str] = []
        while node is None:  # iterative: a tar path can be thousands of levels deep
            missing.append(path)
            path = path.rpartition("/")[0] or "/"
            node = self.dirs.get(path)
        for child_path in reversed(missing):
            node = self._ensure_dir(node, child_path)
        return node

    def _ensure_dir(self, parent: Node, path: str) -> Node:
        assert parent.children is not None
        key = os.fsencode(path.rpartition("/")[2])
        existing = parent.children.get(key)
        if existing is not None and existing.children is not None:
            node = existing
        else:
            if existing is not None:
                log.warning("tar entry under %r, which is not a directory: replacing it", path)
                self.unlink(existing)
            node = Node(DEFAULT_DIR_MODE)
            node.children = {}
            parent.children[key] = node
        self.dirs[path] = node
        return node

    def unlink(self, node: Node) -> None:
        node.nlink -= 1
        if node.children is not None:
            self.forget_dirs(node)

    def forget_dirs(self, node: Node) -> None:
        """Drop a replaced directory subtree from the path index."""
        stale = [p for p, d in self.dirs.items() if d is node]
        for p in stale:
            prefix = p.rstrip("/") + "/"
            for q in [q for q in self.dirs if q == p or q.startswith(prefix)]:
                del self.dirs[q]

    def place(self, parent: Node, key: bytes, node: Node, path: str) -> bool:
        """Put `node` at `parent/key`, replacing what is there; False if a whiteout keeps it."""
        assert parent.children is not None
        existing = parent.children.get(key)
        if (
            existing is not None
            and id(existing) in self.whiteouts
            and id(node) not in self.whiteouts
        ):
            # A whiteout in a layer hides the name whatever the order of entries.
            return False
        if existing is not None:
            self.unlink(existing)
        parent.children[key] = node
        if node.children is not None:
            self.dirs[path] = node
        return True

    def add(self, meta: FileMetadata, header_start: int, entry: int) -> None:
        path = clean_path(meta.name)
        if path == "/":
            if meta.type == "dir":
                self.set_attrs(self.root, meta)
            return
        head, _, name = path.rpartition("/")
        parent = self.parent_dir(head or "/")
        assert parent.children is not None
        if name.startswith(WHITEOUT_PREFIX):
            self.add_whiteout(parent, name, meta, head or "/")
            return
        key = os.fsencode(name)
        if meta.type == "hardlink":
            target = self.find(clean_path(meta.linkname))
            if target is None or target.children is not None:
                log.warning(
                    "hardlink %r to %r: target missing or a directory; dropped",
                    meta.name,
                    meta.linkname,
                )
                return
            if parent.children.get(key) is not target and self.place(parent, key, target, path):
                target.nlink += 1
            return
        existing = parent.children.get(key)
        if meta.type == "dir" and existing is not None and existing.children is not None:
            # A repeated directory entry updates its attributes and keeps its contents.
            self.set_attrs(existing, meta)
            return
        node = Node(0)
        self.set_attrs(node, meta)
        if meta.type == "dir":
            node.children = {}
        elif meta.type == "reg":
            node.size = meta.uncompressed_size
            node.offset = meta.uncompressed_offset
            node.header_start = header_start
            node.meta = meta
            node.entry = entry
        elif meta.type == "symlink":
            node.target = _encode(meta.linkname)
            node.size = len(node.target)
        elif meta.type in ("char", "block"):
            node.rdev = os.makedev(meta.devmajor, meta.devminor)
        self.place(parent, key, node, path)

    def add_whiteout(self, parent: Node, name: str, meta: FileMetadata, dir_path: str) -> None:
        assert parent.children is not None
        if name == OPAQUE_WHITEOUT:
            if parent.xattrs is None:
                parent.xattrs = {}
            parent.xattrs[self.opaque_xattr] = b"y"
            return
        if name.startswith(WHITEOUT_META_PREFIX):
            return
        hidden = name[len(WHITEOUT_PREFIX) :]
        if not hidden:
            return
        node = Node(stat.S_IFCHR, 0, 0, self.mtime_ns(meta))
        self.whiteouts[id(node)] = node
        path = dir_path.rstrip("/") + "/" + hidden
        self.place(parent, os.fsencode(hidden), node, path)

    def find(self, path: str) -> Node | None:
        head, _, name = path.rpartition("/")
        parent = self.dirs.get(head or "/")
        if parent is None or parent.children is None or not name:
            return None
        return parent.children.get(os.fsencode(name))

    def mtime_ns(self, meta: FileMetadata) -> int:
        value = self.mtimes.get(meta.mod_time)
        if value is None:
            value = self.mtimes[meta.mod_time] = _mtime_ns(meta)
        return value

    def set_attrs(self, node: Node, meta: FileMetadata) -> None:
        # Linux symlinks are always 0777 whatever the tar says (as extraction shows them).
        perms = 0o777 if meta.type == "symlink" else meta.mode & 0o7777
        node.mode = _TYPE_BITS[meta.type] | perms
        node.uid = meta.uid
        node.gid = meta.gid
        node.mtime_ns = self.mtime_ns(meta)
        xattrs = meta.xattrs
        opaque = node.xattrs
        node.xattrs = {_encode(k): _encode(v) for k, v in xattrs.items()} if xattrs else None
        if opaque is not None and node.children is not None:
            # Keep an opaque marker set by an earlier `.wh..wh..opq` of this directory.
            for k, v in opaque.items():
                if node.xattrs is None:
                    node.xattrs = {}
                node.xattrs.setdefault(k, v)


def build_tree(
    ztoc: Ztoc, first_ino: int, *, opaque_xattr: str = DEFAULT_OPAQUE_XATTR
) -> LayerTree:
    """Build the inode table of a layer from its zTOC, numbering inodes from `first_ino`."""
    b = _Builder(_encode(opaque_xattr))
    starts = header_starts(ztoc.files)
    for i, (meta, start) in enumerate(zip(ztoc.files, starts, strict=True)):
        b.add(meta, start, i)
    nodes: list[Node] = []
    seen: set[int] = set()
    stack = [b.root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        node.ino = first_ino + len(nodes)
        nodes.append(node)
        if node.children is not None:
            subdirs = 0
            for child in reversed(node.children.values()):
                if child.children is not None:
                    subdirs += 1
                stack.append(child)
            node.nlink = 2 + subdirs
    return LayerTree(
        b.root, nodes, first_ino, ztoc.uncompressed_archive_size, list(ztoc.files), starts
    )
