"""The state of the one FUSE mount: mounted layers, their inodes, open handles, header checks.

The mount root holds one directory per layer (the root of its `LayerTree`) and a hidden
`.status` directory with one `<layer-id>.json` per layer. Inode numbers are never reused within
a process, so a kernel reference to an unmounted layer's inode can only miss, never alias.
Failures are raised as `FsOpError(errno)`; the FUSE operations only translate them.
"""

from __future__ import annotations

import bisect
import errno
import json
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from snapshotter.errors import PysociError
from snapshotter.fs.headers import HeaderVerifier
from snapshotter.fs.tree import DEFAULT_DIR_MODE, DEFAULT_OPAQUE_XATTR, LayerTree, Node, build_tree
from snapshotter.soci.ztoc import Ztoc

log = logging.getLogger(__name__)

ROOT_INO = 1
STATUS_DIR_INO = 2
STATUS_DIR_NAME = b".status"
STATUS_SUFFIX = ".json"
NAME_MAX = 255


class LayerData(Protocol):
    """The uncompressed, verified tar bytes of one layer (implemented by the fetch layer)."""

    async def read(
        self, offset: int, length: int, *, readahead_until: int | None = None
    ) -> bytes: ...

    def status(self) -> dict[str, object]: ...

    def set_span_observer(self, observer: Callable[[int, bytes], None] | None) -> None:
        """Call `observer(offset, data)` with each span's decompressed bytes, in the worker
        thread that has them (the layer's header verifier checks the headers inside)."""
        ...


class FsError(PysociError):
    """The filesystem cannot do what the service asked."""


class LayerNotMountedError(FsError, LookupError):
    """No layer with that id is mounted."""


class LayerUnavailableError(FsError):
    """The layer (or the whole FUSE session) cannot serve reads."""


class FsOpError(Exception):
    """A filesystem request fails with `errno`."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or os.strerror(code))
        self.errno = code


@dataclass(eq=False)
class MountedLayer:
    """One layer directory of the mount, with the per-file state of its reads."""

    layer_id: str
    tree: LayerTree
    data: LayerData
    status_node: Node
    verifier: HeaderVerifier
    closed: bool = False
    read_errors: int = 0
    last_error: str = ""

    @property
    def name(self) -> bytes:
        return os.fsencode(self.layer_id)

    def status(self) -> dict[str, object]:
        """The fetch layer's status plus what the filesystem saw."""
        try:
            base = dict(self.data.status())
        except Exception as e:  # a status page must never take the mount down
            base = {"state": "unknown", "error": f"status unavailable: {e}"}
        base.update(
            layerId=self.layer_id,
            files=len(self.tree),
            readErrors=self.read_errors,
            lastReadError=self.last_error,
            **self.verifier.status(),
        )
        return base

    def fail(self, node: Node, message: str) -> FsOpError:
        """Record a failed read and return the EIO to raise."""
        self.read_errors += 1
        self.last_error = message
        name = node.meta.name if node.meta is not None else f"inode {node.ino}"
        log.error("layer %s, %r: %s", self.layer_id, name, message)
        return FsOpError(errno.EIO, message)

    async def check_header(self, node: Node) -> None:
        """Before a file's data is served, its tar header must match the zTOC; EIO if not."""
        file_end = node.offset + node.size

        async def read_chain(offset: int, length: int) -> bytes:
            # The data is read next: read ahead up to the file's end, not past it.
            return await self.data.read(offset, length, readahead_until=file_end)

        try:
            ok = await self.verifier.check(node.entry, read_chain)
        except PysociError as e:
            name = node.meta.name if node.meta is not None else node.ino
            raise self.fail(node, f"cannot read the tar header of {name!r}: {e}") from e
        if not ok:
            self.read_errors += 1  # the verifier logged why
            self.last_error = self.verifier.last_mismatch
            raise FsOpError(errno.EIO, f"tar header of inode {node.ino} does not match the zTOC")

    async def read(self, node: Node, offset: int, size: int) -> bytes:
        """Up to `size` bytes of a regular file from `offset`."""
        if self.closed:
            raise FsOpError(errno.EIO, f"layer {self.layer_id} is unmounted")
        if offset >= node.size or size <= 0:
            return b""
        length = min(size, node.size - offset)
        await self.check_header(node)
        try:
            data = await self.data.read(
                node.offset + offset, length, readahead_until=node.offset + node.size
            )
        except PysociError as e:
            raise self.fail(node, f"read of {length} bytes at {offset} failed: {e}") from e
        except Exception as e:
            log.exception(
                "layer %s inode %d: unexpected error while reading", self.layer_id, node.ino
            )
            raise self.fail(node, f"read of {length} bytes at {offset} failed: {e!r}") from e
        if len(data) != length:
            raise self.fail(node, f"short read at {offset}: {len(data)} of {length} bytes")
        return data


@dataclass(eq=False)
class Handle:
    """An open file or directory."""

    layer: MountedLayer | None
    node: Node
    snapshot: bytes | None = None
    """Status files: the JSON taken at open, so every read sees one version."""
    entries: list[tuple[bytes, Node]] | None = None
    """Directories: the listing taken at opendir, so offsets stay stable."""


def _dir_node(mode: int = DEFAULT_DIR_MODE) -> Node:
    node = Node(mode)
    node.children = {}
    return node


class MountTable:
    """Every inode and handle of the mount. Not thread-safe: used from the trio thread only."""

    def __init__(self, *, opaque_xattr: str = DEFAULT_OPAQUE_XATTR) -> None:
        self.opaque_xattr = opaque_xattr
        now = time.time_ns()
        self.root = _dir_node()
        self.root.ino = ROOT_INO
        self.root.mtime_ns = now
        self.status_dir = _dir_node(stat.S_IFDIR | 0o555)
        self.status_dir.ino = STATUS_DIR_INO
        self.status_dir.mtime_ns = now
        assert self.root.children is not None
        self.root.children[STATUS_DIR_NAME] = self.status_dir
        self.layers: dict[str, MountedLayer] = {}
        self._next_ino = STATUS_DIR_INO + 1
        self._bases: list[int] = []
        self._by_base: dict[int, MountedLayer] = {}
        self._status_inos: dict[int, MountedLayer] = {}
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._update_root()

    # -- layers ---------------------------------------------------------------------------

    def add_layer(self, layer_id: str, ztoc: Ztoc, data: LayerData) -> MountedLayer:
        """Build the layer's tree and make it the directory `/<layer_id>` of the mount."""
        _check_layer_id(layer_id)
        if layer_id in self.layers:
            raise FsError(f"layer {layer_id!r} is already mounted")
        status_node = Node(stat.S_IFREG | 0o444)
        status_node.ino = self._next_ino
        tree = build_tree(ztoc, self._next_ino + 1, opaque_xattr=self.opaque_xattr)
        self._next_ino += 1 + len(tree)
        files = tree.files
        verifier = HeaderVerifier(
            layer_id,
            tree.header_starts,
            [f.uncompressed_offset for f in files],
            files.__getitem__,
        )
        layer = MountedLayer(layer_id, tree, data, status_node, verifier)
        data.set_span_observer(verifier.observe_span)
        status_node.mtime_ns = tree.root.mtime_ns = tree.root.mtime_ns or time.time_ns()
        self.layers[layer_id] = layer
        self._bases.append(tree.first_ino)  # allocation is monotonic, so this stays sorted
        self._by_base[tree.first_ino] = layer
        self._status_inos[status_node.ino] = layer
        assert self.root.children is not None and self.status_dir.children is not None
        self.root.children[layer.name] = tree.root
        self.status_dir.children[os.fsencode(layer_id + STATUS_SUFFIX)] = status_node
        self._update_root()
        return layer

    def remove_layer(self, layer_id: str) -> MountedLayer:
        """Take the layer out of the mount; its open handles fail from now on."""
        layer = self.layers.pop(layer_id, None)
        if layer is None:
            raise LayerNotMountedError(f"layer {layer_id!r} is not mounted")
        layer.closed = True
        layer.data.set_span_observer(None)
        i = bisect.bisect_left(self._bases, layer.tree.first_ino)
        del self._bases[i]
        del self._by_base[layer.tree.first_ino]
        del self._status_inos[layer.status_node.ino]
        assert self.root.children is not None and self.status_dir.children is not None
        del self.root.children[layer.name]
        del self.status_dir.children[os.fsencode(layer_id + STATUS_SUFFIX)]
        self._update_root()
        return layer

    def layer(self, layer_id: str) -> MountedLayer:
        try:
            return self.layers[layer_id]
        except KeyError:
            raise LayerNotMountedError(f"layer {layer_id!r} is not mounted") from None

    def _update_root(self) -> None:
        self.root.nlink = 2 + len(self.layers) + 1
        self.status_dir.nlink = 2

    # -- inodes ---------------------------------------------------------------------------

    def resolve(self, ino: int) -> tuple[MountedLayer | None, Node]:
        """The node numbered `ino` and its layer; EIO if its layer is gone, else ENOENT."""
        if ino == ROOT_INO:
            return None, self.root
        if ino == STATUS_DIR_INO:
            return None, self.status_dir
        layer = self._status_inos.get(ino)
        if layer is not None:
            self.refresh_status_size(layer)
            return layer, layer.status_node
        i = bisect.bisect_right(self._bases, ino) - 1
        if i >= 0:
            layer = self._by_base[self._bases[i]]
            if ino in layer.tree:
                return layer, layer.tree.node(ino)
        if ino < self._next_ino:
            # An inode of an unmounted layer, still referenced by an open file or a cwd.
            raise FsOpError(errno.EIO, f"inode {ino} belongs to an unmounted layer")
        raise FsOpError(errno.ENOENT)

    def is_status(self, node: Node) -> bool:
        return node.ino in self._status_inos

    def refresh_status_size(self, layer: MountedLayer) -> bytes:
        body = (json.dumps(layer.status(), sort_keys=True, default=str) + "\n").encode()
        layer.status_node.size = len(body)
        return body

    def lookup(self, parent_ino: int, name: bytes) -> tuple[MountedLayer | None, Node | None]:
        """The child `name` of a directory (None if absent); ENOTDIR for a non-directory."""
        layer, parent = self.resolve(parent_ino)
        if parent.children is None:
            raise FsOpError(errno.ENOTDIR)
        child = parent.children.get(name)
        if child is None:
            return layer, None
        if parent is self.root and child is not self.status_dir:
            layer = self._layer_of_root(child)
        elif parent is self.status_dir:
            layer = self._status_inos[child.ino]
            self.refresh_status_size(layer)
        return layer, child

    def _layer_of_root(self, node: Node) -> MountedLayer:
        return self._by_base[node.ino]

    def in_layer_tree(self, layer: MountedLayer | None, node: Node) -> bool:
        """Whether `node` is a file of a layer (not the mount root, `.status` or a status file)."""
        return layer is not None and node is not layer.status_node

    # -- handles --------------------------------------------------------------------------

    def _new_handle(self, handle: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    def open(self, ino: int) -> tuple[int, bool]:
        """Open a file for reading: (handle, whether it is a status file)."""
        layer, node = self.resolve(ino)
        if node.children is not None:
            raise FsOpError(errno.EISDIR)
        if layer is not None and node is layer.status_node:
            return self._new_handle(Handle(layer, node, self.refresh_status_size(layer))), True
        if not node.is_reg:
            raise FsOpError(errno.EINVAL)
        return self._new_handle(Handle(layer, node)), False

    def opendir(self, ino: int) -> int:
        layer, node = self.resolve(ino)
        if node.children is None:
            raise FsOpError(errno.ENOTDIR)
        entries = list(node.children.items())
        if node is self.root:
            entries = [(n, c) for n, c in entries if c is not self.status_dir]
        return self._new_handle(Handle(layer, node, entries=entries))

    def handle(self, fh: int) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise FsOpError(errno.EBADF) from None

    def release(self, fh: int) -> None:
        self._handles.pop(fh, None)

    def entry_layer(self, handle: Handle, child: Node) -> MountedLayer | None:
        """The layer a directory entry belongs to (for the root listing, the child's own)."""
        if handle.node is self.root:
            return self._layer_of_root(child)
        return handle.layer

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        h = self.handle(fh)
        if h.snapshot is not None:
            return h.snapshot[offset : offset + size]
        if h.layer is None:
            raise FsOpError(errno.EIO)
        return await h.layer.read(h.node, offset, size)

    # -- statfs ---------------------------------------------------------------------------

    def totals(self) -> tuple[int, int]:
        """(bytes, inodes) over all mounted layers."""
        size = sum(layer.tree.total_size for layer in self.layers.values())
        inodes = 2 + sum(1 + len(layer.tree) for layer in self.layers.values())
        return size, inodes


def _check_layer_id(layer_id: str) -> None:
    name = os.fsencode(layer_id)
    if (
        not name
        or b"/" in name
        or b"\0" in name
        or name in (b".", b"..", STATUS_DIR_NAME)
        or len(name) + len(STATUS_SUFFIX) > NAME_MAX
    ):
        raise FsError(f"invalid layer id {layer_id!r}: must be one path component")
