"""pyfuse3 request handlers: translate FUSE requests to `MountTable` calls and errors to errno.

Read-only: every request that would change the filesystem fails with EROFS. No handler lets an
exception other than FUSEError escape, since that would end the whole session.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio
from pyfuse3 import FileHandleT, FileNameT, FlagT, InodeT, ModeT, XAttrNameT

from snapshotter import metrics
from snapshotter.fs.table import NAME_MAX, Attrs, FsOpError, MountedLayer, MountTable
from snapshotter.fs.tree import BLKSIZE

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _translated(
    fn: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """Map FsOpError to its errno and anything unexpected to EIO (logged); count requests."""
    operation = fn.__name__
    requests = metrics.FUSE_OPERATIONS.labels(operation)

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        requests.inc()
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError as e:
            metrics.FUSE_FAILURES.labels(operation, metrics.errno_name(e.errno)).inc()
            raise
        except FsOpError as e:
            metrics.FUSE_FAILURES.labels(operation, metrics.errno_name(e.errno)).inc()
            raise pyfuse3.FUSEError(e.errno) from None
        except trio.Cancelled:
            raise
        except Exception:
            metrics.FUSE_FAILURES.labels(operation, "EIO").inc()
            log.exception("FUSE %s failed unexpectedly", operation)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _erofs(operation: str) -> Callable[..., Coroutine[Any, Any, Any]]:
    """A handler refusing a write request with EROFS."""

    async def refuse(*_: Any, **__: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    refuse.__name__ = operation
    return _translated(refuse)


class LayerOperations(pyfuse3.Operations):
    """The FUSE view of a `MountTable`."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        table: MountTable,
        *,
        attr_timeout: float = 60.0,
        entry_timeout: float = 60.0,
        negative_timeout: float = 60.0,
    ) -> None:
        super().__init__()
        self.table = table
        self.attr_timeout = attr_timeout
        self.entry_timeout = entry_timeout
        self.negative_timeout = negative_timeout

    def _attrs(self, layer: MountedLayer | None, node: Attrs) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_rdev = node.rdev
        a.st_size = node.size
        a.st_blksize = BLKSIZE
        a.st_blocks = node.blocks
        a.st_atime_ns = a.st_ctime_ns = a.st_mtime_ns = node.mtime_ns
        if (layer is not None and not self.table.is_status(layer, node)) or (
            node is self.table.root
        ):
            # The session invalidates the root's attributes when layers come and go.
            a.attr_timeout = self.attr_timeout
            a.entry_timeout = self.entry_timeout
        else:
            # `.status` and status files change as layers come and go.
            a.attr_timeout = 0
            a.entry_timeout = 0
        return a

    # -- lookups and attributes -----------------------------------------------------------

    @_translated
    async def lookup(
        self, parent_inode: InodeT, name: FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if len(name) > NAME_MAX:
            raise FsOpError(errno.ENAMETOOLONG)
        layer, child = await self.table.lookup(parent_inode, name)
        if child is None:
            if layer is None:
                raise FsOpError(errno.ENOENT)  # the root changes: never cache a miss there
            miss = pyfuse3.EntryAttributes()
            miss.st_ino = 0
            miss.entry_timeout = self.negative_timeout
            return miss
        return self._attrs(layer, child)

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        # Inodes live as long as their layer, whatever the kernel still references.
        return None

    @_translated
    async def getattr(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        layer, node = await self.table.getattr(inode)
        return self._attrs(layer, node)

    @_translated
    async def readlink(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> FileNameT:
        return FileNameT(await self.table.readlink(inode))

    @_translated
    async def access(self, inode: InodeT, mode: ModeT, ctx: pyfuse3.RequestContext) -> bool:
        _, node = await self.table.getattr(inode)
        if mode & os.W_OK:
            raise FsOpError(errno.EROFS)
        if ctx.uid == 0:
            return not (mode & os.X_OK) or node.is_dir or bool(node.mode & 0o111)
        if ctx.uid == node.uid:
            bits = (node.mode >> 6) & 7
        elif ctx.gid == node.gid or node.gid in pyfuse3.get_sup_groups(ctx.pid):
            bits = (node.mode >> 3) & 7
        else:
            bits = node.mode & 7
        return mode & bits == mode

    # -- directories ----------------------------------------------------------------------

    @_translated
    async def opendir(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> FileHandleT:
        return FileHandleT(await self.table.opendir(inode))

    @_translated
    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self.table.handle(fh)
        entries = handle.entries or []
        for i in range(start_id, len(entries)):
            name, child, gates = entries[i]
            layer = handle.layer
            if layer is None:
                layer, node = await self.table.getattr(child)
            else:
                node = await self.table.entry_attrs(handle, child, gates)
            if not pyfuse3.readdir_reply(token, FileNameT(name), self._attrs(layer, node), i + 1):
                break

    @_translated
    async def releasedir(self, fh: FileHandleT) -> None:
        self.table.release(fh)

    # -- files ----------------------------------------------------------------------------

    @_translated
    async def open(
        self, inode: InodeT, flags: FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            raise FsOpError(errno.EROFS)
        fh, is_status = await self.table.open(inode)
        if is_status:
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_translated
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        return await self.table.read(fh, off, size)

    @_translated
    async def release(self, fh: FileHandleT) -> None:
        self.table.release(fh)

    async def flush(self, fh: FileHandleT) -> None:
        # Nothing to flush on a read-only layer; ENOSYS makes the kernel stop sending FLUSH
        # (one round trip saved on every close()).
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        return None

    async def fsyncdir(self, fh: FileHandleT, datasync: bool) -> None:
        return None

    # -- xattrs ---------------------------------------------------------------------------

    @_translated
    async def getxattr(self, inode: InodeT, name: XAttrNameT, ctx: pyfuse3.RequestContext) -> bytes:
        xattrs = await self.table.xattrs(inode)
        value = xattrs.get(name) if xattrs else None
        if value is None:
            raise FsOpError(pyfuse3.ENOATTR)
        return value

    @_translated
    async def listxattr(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> Sequence[XAttrNameT]:
        xattrs = await self.table.xattrs(inode)
        return [XAttrNameT(k) for k in xattrs] if xattrs else []

    # -- the filesystem -------------------------------------------------------------------

    @_translated
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        size, inodes = self.table.totals()
        s = pyfuse3.StatvfsData()
        s.f_bsize = BLKSIZE
        s.f_frsize = BLKSIZE
        s.f_blocks = -(-size // BLKSIZE)
        s.f_bfree = 0
        s.f_bavail = 0
        s.f_files = inodes
        s.f_ffree = 0
        s.f_favail = 0
        s.f_namemax = NAME_MAX
        return s

    # -- everything that would write ------------------------------------------------------

    setattr = _erofs("setattr")
    mknod = _erofs("mknod")
    mkdir = _erofs("mkdir")
    unlink = _erofs("unlink")
    rmdir = _erofs("rmdir")
    symlink = _erofs("symlink")
    rename = _erofs("rename")
    link = _erofs("link")
    write = _erofs("write")
    create = _erofs("create")
    setxattr = _erofs("setxattr")
    removexattr = _erofs("removexattr")
