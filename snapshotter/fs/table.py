"""The state of the one FUSE mount: mounted layers, their inodes, open handles, header checks.

The mount root holds one directory per layer (the root of its `LayerTree`) and a hidden
`.status` directory with one `<layer-id>.json` per layer. Inode numbers are never reused within
a process, so a kernel reference to an unmounted layer's inode can only miss, never alias.
Failures are raised as `FsOpError(errno)`; the FUSE operations only translate them.

A layer's tree is built in a worker thread after `add_layer` returns (its inode numbers are
reserved at once): requests for its inodes wait for it, requests for other layers do not.
An entry that the tree gates (fs.tree) is shown only once its tar header has been checked
(fs.headers): lookups, listings and attributes wait for that check, EIO if it lies.
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
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import trio

from snapshotter.dataplane.memory import return_freed_memory
from snapshotter.errors import PysociError
from snapshotter.fs.headers import HeaderVerifier
from snapshotter.fs.tree import (
    BLKSIZE,
    BLOCK_UNIT,
    DEFAULT_DIR_MODE,
    DEFAULT_OPAQUE_XATTR,
    Inode,
    LayerTree,
    build_tree,
)
from snapshotter.soci.ztoc import Ztoc, entry_columns

log = logging.getLogger(__name__)

ROOT_INO = 1
STATUS_DIR_INO = 2
STATUS_DIR_NAME = b".status"
STATUS_SUFFIX = ".json"
NAME_MAX = 255
BIG_DIR = 4096
"""Directories with more children are sorted in a worker thread."""


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


ReadObserver = Callable[[LayerTree, int, int, int], None]
"""Told (tree, entry, uncompressed start, length) before a file's bytes are read, length 0
before only its tar header is checked (the recorder of a layer's start, prefetch.recorder)."""


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


class Node:
    """An inode of the mount itself: its root, `.status` and the status files."""

    __slots__ = ("children", "gid", "ino", "mode", "mtime_ns", "nlink", "rdev", "size", "uid")

    def __init__(self, ino: int, mode: int) -> None:
        self.ino = ino
        self.mode = mode
        self.nlink = 1
        self.uid = 0
        self.gid = 0
        self.size = 0
        self.rdev = 0
        self.mtime_ns = 0
        self.children: dict[bytes, int] | None = {} if stat.S_ISDIR(mode) else None

    @property
    def is_dir(self) -> bool:
        return self.children is not None

    @property
    def blocks(self) -> int:
        return -(-self.size // BLKSIZE) * (BLKSIZE // BLOCK_UNIT)


Attrs = Node | Inode


@dataclass(eq=False)
class MountedLayer:
    """One layer directory of the mount, with the per-file state of its reads."""

    layer_id: str
    data: LayerData
    status_node: Node
    first_ino: int
    reserved: int
    entries: int
    tree: LayerTree | None = None
    verifier: HeaderVerifier | None = None
    ready: trio.Event = field(default_factory=trio.Event)
    build_error: str = ""
    closed: bool = False
    observer: ReadObserver | None = None
    read_errors: int = 0
    last_error: str = ""
    _sorting: dict[int, trio.Event] = field(default_factory=dict)

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
            files=len(self.tree) if self.tree is not None else self.entries,
            readErrors=self.read_errors,
            lastReadError=self.last_error,
            treeReady=self.tree is not None,
        )
        if self.verifier is not None:
            base.update(self.verifier.status())
        if self.build_error:
            base.update(state="error", error=self.build_error)
        return base

    async def built(self) -> tuple[LayerTree, HeaderVerifier]:
        """The tree, once built (EIO if it could not be, or the layer is gone)."""
        if self.tree is None:
            await self.ready.wait()
        if self.closed:
            raise FsOpError(errno.EIO, f"layer {self.layer_id} is unmounted")
        if self.tree is None or self.verifier is None:
            log.error("layer %s has no tree: %s", self.layer_id, self.build_error)
            raise FsOpError(errno.EIO, f"layer {self.layer_id}: {self.build_error}")
        return self.tree, self.verifier

    def fail(self, what: str, message: str) -> FsOpError:
        """Record a failed read and return the EIO to raise."""
        self.read_errors += 1
        self.last_error = message
        log.error("layer %s, %s: %s", self.layer_id, what, message)
        return FsOpError(errno.EIO, message)

    async def vouch(self, gates: list[int]) -> None:
        """Wait until the tar headers of `gates` are checked; EIO if one lies or is unreadable."""
        if not gates:
            return
        tree, verifier = await self.built()
        for entry in gates:
            self._observe(tree, entry, 0, 0)
        failures: list[str] = []

        async def one(entry: int) -> None:
            try:
                ok = await verifier.check(entry, self._read_chain)
            except PysociError as e:
                failures.append(f"cannot read the tar header of entry {entry}: {e}")
                return
            if not ok:
                failures.append(verifier.last_mismatch)

        if len(gates) == 1:
            await one(gates[0])
        else:
            async with trio.open_nursery() as nursery:
                for entry in gates:
                    nursery.start_soon(one, entry)
        if failures:
            raise self.fail(f"entries {gates}", failures[0])

    def _observe(self, tree: LayerTree, entry: int, start: int, length: int) -> None:
        observer = self.observer
        if observer is None:
            return
        try:
            observer(tree, entry, start, length)
        except Exception:  # a recorder must never fail a read: it is dropped instead
            log.exception("layer %s: the read observer failed; not observing", self.layer_id)
            self.observer = None

    async def _read_chain(self, offset: int, length: int) -> bytes:
        return await self.data.read(offset, length, readahead_until=offset + length)

    async def sorted_dir(self, tree: LayerTree, ino: int) -> None:
        """Make sure the directory's children are sorted (big ones in a worker thread)."""
        while tree.needs_sort(ino):
            pending = self._sorting.get(ino)
            if pending is not None:
                await pending.wait()
                continue
            if tree.dir_size(ino) <= BIG_DIR:
                tree.sort_dir(ino)
                return
            event = self._sorting[ino] = trio.Event()
            try:
                await trio.to_thread.run_sync(tree.sort_dir, ino)
            finally:
                del self._sorting[ino]
                event.set()

    async def check_header(self, entry: int, file_end: int) -> None:
        """Before a file's data is served, its tar header must match the zTOC; EIO if not."""
        _, verifier = await self.built()

        async def read_chain(offset: int, length: int) -> bytes:
            # The data is read next: read ahead up to the file's end, not past it.
            return await self.data.read(offset, length, readahead_until=file_end)

        try:
            ok = await verifier.check(entry, read_chain)
        except PysociError as e:
            raise self.fail(f"entry {entry}", f"cannot read its tar header: {e}") from e
        if not ok:
            self.read_errors += 1  # the verifier logged why
            self.last_error = verifier.last_mismatch
            raise FsOpError(errno.EIO, f"tar header of entry {entry} does not match the zTOC")

    async def read(self, ino: int, offset: int, size: int) -> bytes:
        """Up to `size` bytes of a regular file from `offset`."""
        if self.closed:
            raise FsOpError(errno.EIO, f"layer {self.layer_id} is unmounted")
        tree, _ = await self.built()
        found = tree.data(ino)
        if found is None:
            raise FsOpError(errno.EINVAL)
        entry, data_offset, file_size = found
        if offset >= file_size or size <= 0:
            return b""
        length = min(size, file_size - offset)
        file_end = data_offset + file_size
        self._observe(tree, entry, data_offset + offset, length)
        await self.check_header(entry, file_end)
        what = f"inode {ino}"
        try:
            data = await self.data.read(data_offset + offset, length, readahead_until=file_end)
        except PysociError as e:
            raise self.fail(what, f"read of {length} bytes at {offset} failed: {e}") from e
        except Exception as e:
            log.exception("layer %s inode %d: unexpected error while reading", self.layer_id, ino)
            raise self.fail(what, f"read of {length} bytes at {offset} failed: {e!r}") from e
        if len(data) != length:
            raise self.fail(what, f"short read at {offset}: {len(data)} of {length} bytes")
        return data


@dataclass(eq=False)
class Handle:
    """An open file or directory."""

    layer: MountedLayer | None
    ino: int
    snapshot: bytes | None = None
    """Status files: the JSON taken at open, so every read sees one version."""
    entries: list[tuple[bytes, int, list[int]]] | None = None
    """Directories: (name, ino, gates) taken at opendir, so offsets stay stable."""


def _inode_bound(ztoc: Ztoc) -> int:
    """More inode numbers than the tree can use: entries, implicit directories (at most one
    per "/" of the names) and whiteout targets, plus the root."""
    c = entry_columns(ztoc.files)
    slashes = int(np.count_nonzero(np.frombuffer(c.blob, np.uint8) == 0x2F))
    return 2 * len(c) + slashes + 2


class MountTable:
    """Every inode and handle of the mount. Not thread-safe: used from the trio thread only."""

    def __init__(self, *, opaque_xattr: str = DEFAULT_OPAQUE_XATTR) -> None:
        self.opaque_xattr = opaque_xattr
        now = time.time_ns()
        self.root = Node(ROOT_INO, DEFAULT_DIR_MODE)
        self.root.mtime_ns = now
        self.status_dir = Node(STATUS_DIR_INO, stat.S_IFDIR | 0o555)
        self.status_dir.mtime_ns = now
        self.status_dir.nlink = 2
        assert self.root.children is not None
        self.root.children[STATUS_DIR_NAME] = STATUS_DIR_INO
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
        """Make the layer the directory `/<layer_id>` of the mount; its tree is built in a
        worker thread (requests for it wait; `ready` is set when done)."""
        _check_layer_id(layer_id)
        if layer_id in self.layers:
            raise FsError(f"layer {layer_id!r} is already mounted")
        status_node = Node(self._next_ino, stat.S_IFREG | 0o444)
        reserved = _inode_bound(ztoc)
        first = self._next_ino + 1
        self._next_ino = first + reserved
        layer = MountedLayer(layer_id, data, status_node, first, reserved, len(ztoc.files))
        status_node.mtime_ns = time.time_ns()
        self.layers[layer_id] = layer
        self._bases.append(first)  # allocation is monotonic, so this stays sorted
        self._by_base[first] = layer
        self._status_inos[status_node.ino] = layer
        assert self.root.children is not None and self.status_dir.children is not None
        self.root.children[layer.name] = first
        self.status_dir.children[os.fsencode(layer_id + STATUS_SUFFIX)] = status_node.ino
        self._update_root()
        trio.lowlevel.spawn_system_task(self._build, layer, ztoc)
        return layer

    async def _build(self, layer: MountedLayer, ztoc: Ztoc) -> None:
        started = time.perf_counter()
        try:
            tree = await trio.to_thread.run_sync(
                self._build_in_thread, ztoc, layer.first_ino, abandon_on_cancel=True
            )
            verifier = HeaderVerifier(
                layer.layer_id, tree.header_start, tree.entries.offset, tree.expected
            )
            if not layer.closed:
                layer.tree, layer.verifier = tree, verifier
                layer.data.set_span_observer(verifier.observe_span)
        except trio.Cancelled:
            layer.build_error = "the FUSE session stopped while its tree was being built"
            raise
        except BaseException as e:  # never crash the run: the layer reports the error
            layer.build_error = f"cannot build the tree of the layer: {e!r}"
            log.exception("layer %s: cannot build its tree", layer.layer_id)
            return
        finally:
            layer.ready.set()
        log.info(
            "layer %s: tree of %d inodes from %d entries built in %.2f s",
            layer.layer_id,
            len(tree),
            len(tree.entries),
            time.perf_counter() - started,
        )
        del ztoc, tree, verifier  # the blob and its decoded columns go with ztoc
        # Decoding and building allocate and free several times what the tree keeps;
        # glibc would keep that in its heap (4-5x the tree's own size in RSS).
        await trio.to_thread.run_sync(return_freed_memory)

    def _build_in_thread(self, ztoc: Ztoc, first_ino: int) -> LayerTree:
        return build_tree(ztoc, first_ino, opaque_xattr=self.opaque_xattr)

    def remove_layer(self, layer_id: str) -> MountedLayer:
        """Take the layer out of the mount; its open handles fail from now on."""
        layer = self.layers.pop(layer_id, None)
        if layer is None:
            raise LayerNotMountedError(f"layer {layer_id!r} is not mounted")
        layer.closed = True
        layer.data.set_span_observer(None)
        i = bisect.bisect_left(self._bases, layer.first_ino)
        del self._bases[i]
        del self._by_base[layer.first_ino]
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

    # -- inodes ---------------------------------------------------------------------------

    def _owner(self, ino: int) -> MountedLayer | None:
        """The layer whose reserved inode range holds `ino` (EIO: an unmounted one's)."""
        i = bisect.bisect_right(self._bases, ino) - 1
        if i >= 0:
            layer = self._by_base[self._bases[i]]
            if ino < layer.first_ino + layer.reserved:
                return layer
        if ino < self._next_ino:
            # An inode of an unmounted layer, still referenced by an open file or a cwd.
            raise FsOpError(errno.EIO, f"inode {ino} belongs to an unmounted layer")
        raise FsOpError(errno.ENOENT)

    async def getattr(self, ino: int) -> tuple[MountedLayer | None, Attrs]:
        """The attributes of `ino` and its layer, once its gates are checked."""
        if ino == ROOT_INO:
            return None, self.root
        if ino == STATUS_DIR_INO:
            return None, self.status_dir
        status_layer = self._status_inos.get(ino)
        if status_layer is not None:
            self.refresh_status_size(status_layer)
            return status_layer, status_layer.status_node
        layer = self._owner(ino)
        assert layer is not None
        tree, _ = await layer.built()
        try:
            attrs = tree.stat(ino)
        except KeyError:
            raise FsOpError(errno.ENOENT) from None
        await layer.vouch(tree.inode_gates(ino))
        return layer, attrs

    def is_status(self, layer: MountedLayer | None, attrs: Attrs) -> bool:
        return layer is not None and attrs is layer.status_node

    def refresh_status_size(self, layer: MountedLayer) -> bytes:
        body = (json.dumps(layer.status(), sort_keys=True, default=str) + "\n").encode()
        layer.status_node.size = len(body)
        return body

    async def lookup(
        self, parent_ino: int, name: bytes
    ) -> tuple[MountedLayer | None, Attrs | None]:
        """The child `name` of a directory (None if absent); ENOTDIR for a non-directory."""
        if parent_ino == ROOT_INO:
            assert self.root.children is not None
            child = self.root.children.get(name)
            if child is None:
                return None, None
            return await self.getattr(child)
        if parent_ino == STATUS_DIR_INO:
            assert self.status_dir.children is not None
            child = self.status_dir.children.get(name)
            if child is None:
                return None, None
            return await self.getattr(child)
        layer, parent = await self.getattr(parent_ino)
        if layer is None or not parent.is_dir or self.is_status(layer, parent):
            raise FsOpError(errno.ENOTDIR)
        tree, _ = await layer.built()
        await layer.sorted_dir(tree, parent_ino)
        found = tree.lookup_child(parent_ino, name)
        if found is None:
            return layer, None
        ino, gates = found
        await layer.vouch(gates)
        return layer, tree.stat(ino)

    async def readlink(self, ino: int) -> bytes:
        layer, _ = await self.getattr(ino)
        target = layer.tree.readlink(ino) if layer is not None and layer.tree else None
        if target is None:
            raise FsOpError(errno.EINVAL)
        return target

    async def xattrs(self, ino: int) -> dict[bytes, bytes] | None:
        layer, attrs = await self.getattr(ino)
        if layer is None or layer.tree is None or self.is_status(layer, attrs):
            return None
        return layer.tree.xattrs(ino)

    # -- handles --------------------------------------------------------------------------

    def _new_handle(self, handle: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    async def open(self, ino: int) -> tuple[int, bool]:
        """Open a file for reading: (handle, whether it is a status file)."""
        layer, attrs = await self.getattr(ino)
        if attrs.is_dir:
            raise FsOpError(errno.EISDIR)
        if layer is not None and self.is_status(layer, attrs):
            return self._new_handle(Handle(layer, ino, self.refresh_status_size(layer))), True
        if not stat.S_ISREG(attrs.mode):
            raise FsOpError(errno.EINVAL)
        return self._new_handle(Handle(layer, ino)), False

    async def opendir(self, ino: int) -> int:
        layer, attrs = await self.getattr(ino)
        if not attrs.is_dir or self.is_status(layer, attrs):
            raise FsOpError(errno.ENOTDIR)
        if layer is None:
            node = self.root if ino == ROOT_INO else self.status_dir
            assert node.children is not None
            entries: list[tuple[bytes, int, list[int]]] = [
                (n, c, []) for n, c in node.children.items() if c != STATUS_DIR_INO
            ]
            return self._new_handle(Handle(None, ino, entries=entries))
        tree, _ = await layer.built()
        await layer.sorted_dir(tree, ino)
        return self._new_handle(Handle(layer, ino, entries=tree.children(ino)))

    async def entry_attrs(self, handle: Handle, child: int, gates: list[int]) -> Attrs:
        """The attributes of a directory entry, once its gates are checked."""
        if handle.layer is None:
            return (await self.getattr(child))[1]
        tree, _ = await handle.layer.built()
        await handle.layer.vouch(gates)
        return tree.stat(child)

    def handle(self, fh: int) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise FsOpError(errno.EBADF) from None

    def release(self, fh: int) -> None:
        self._handles.pop(fh, None)

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        h = self.handle(fh)
        if h.snapshot is not None:
            return h.snapshot[offset : offset + size]
        if h.layer is None:
            raise FsOpError(errno.EIO)
        return await h.layer.read(h.ino, offset, size)

    # -- statfs ---------------------------------------------------------------------------

    def totals(self) -> tuple[int, int]:
        """(bytes, inodes) over all mounted layers."""
        size = sum(layer.tree.total_size for layer in self.layers.values() if layer.tree)
        inodes = 2 + sum(
            1 + (len(layer.tree) if layer.tree else layer.entries) for layer in self.layers.values()
        )
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
