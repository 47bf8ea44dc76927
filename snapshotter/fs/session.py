"""The one FUSE mount of a process: every layer is a top-level directory of it.

    async with trio.open_nursery() as nursery:
        session = FuseSession(root / "fuse")
        await nursery.start(session.run)
        lower = session.mount_layer(layer_id, ztoc, data)   # overlay lowerdir

pyfuse3 keeps its session in module globals, so a process runs at most one `FuseSession`.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from pathlib import Path
from typing import Final

import pyfuse3
import trio

from snapshotter.fs.operations import LayerOperations
from snapshotter.fs.table import (
    STATUS_DIR_INO,
    STATUS_SUFFIX,
    FsError,
    LayerData,
    LayerUnavailableError,
    MountTable,
)
from snapshotter.fs.tree import DEFAULT_OPAQUE_XATTR
from snapshotter.mountinfo import mounts_at
from snapshotter.soci.ztoc import Ztoc

log = logging.getLogger(__name__)

DEFAULT_READ_AHEAD_KB = 1024
BROKEN_STATES = frozenset({"error", "failed", "broken"})

_active: FuseSession | None = None
_LIBC: Final = ctypes.CDLL(None, use_errno=True)
_MNT_DETACH: Final = 2


class FuseSession:
    """Serves mounted layers under `mountpoint` while `run` runs (in the trio main thread)."""

    def __init__(
        self,
        mountpoint: Path,
        *,
        attr_timeout: float = 60.0,
        entry_timeout: float = 60.0,
        negative_timeout: float = 60.0,
        opaque_xattr: str = DEFAULT_OPAQUE_XATTR,
        read_ahead_kb: int | None = DEFAULT_READ_AHEAD_KB,
        max_tasks: int = 99,
        debug: bool = False,
    ) -> None:
        self.mountpoint = Path(mountpoint)
        self.table = MountTable(opaque_xattr=opaque_xattr)
        self.operations = LayerOperations(
            self.table,
            attr_timeout=attr_timeout,
            entry_timeout=entry_timeout,
            negative_timeout=negative_timeout,
        )
        self.read_ahead_kb = read_ahead_kb
        self.max_tasks = max_tasks
        self.debug = debug
        self.running = False
        self.ended = trio.Event()
        """Set once the session stopped serving (cancelled, or its connection is gone)."""
        self._detached = False

    def options(self) -> set[str]:
        """Mount options: read-only, reachable by every container user, kernel-checked modes.

        No `max_read`: libfuse then requires the same value from the init handler, which
        pyfuse3 cannot set; libfuse already negotiates 1 MiB requests (max_pages).
        """
        opts = {
            "fsname=pysoci",
            "subtype=pysoci",
            "ro",
            "allow_other",
            "default_permissions",
        }
        if self.debug:
            opts.add("debug")
        return opts

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Mount, report started, serve until cancelled (or unmounted from outside); unmount."""
        global _active
        if _active is not None:
            raise FsError(f"a FUSE session is already running at {_active.mountpoint}")
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        _active = self
        try:
            pyfuse3.init(self.operations, os.fspath(self.mountpoint), self.options())
        except BaseException:
            _active = None
            raise
        log.info("FUSE session mounted at %s", self.mountpoint)
        try:
            self.running = True
            task_status.started()
            async with trio.open_nursery() as nursery:
                if self.read_ahead_kb is not None:
                    nursery.start_soon(self._tune_read_ahead, self.read_ahead_kb)
                await pyfuse3.main(max_tasks=self.max_tasks)
            if self._detached:
                log.info("detached FUSE session ended: its last user is gone")
            else:
                log.warning("FUSE session at %s ended (unmounted from outside?)", self.mountpoint)
        finally:
            self.running = False
            _active = None
            with trio.CancelScope(shield=True):
                # Detached, the path may hold another process's session by now.
                pyfuse3.close(unmount=not self._detached)
            if not self._detached:
                log.info("FUSE session at %s unmounted", self.mountpoint)
            self.ended.set()

    def detach(self) -> None:
        """Take the mount out of the mount namespace (MNT_DETACH) and keep serving it.

        Overlays made on its layers hold the mount by reference, so their containers read on
        through this session; new lookups of the path find whatever is mounted there next.
        The kernel ends the connection when the last overlay goes, and `run` returns then."""
        if self._detached or not self.running:
            return
        target = os.fsencode(os.path.abspath(self.mountpoint))
        if _LIBC.umount2(target, _MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise FsError(f"cannot detach {self.mountpoint}: {os.strerror(err)}")
        self._detached = True
        log.info("FUSE session at %s detached: serving its existing users only", self.mountpoint)

    async def _tune_read_ahead(self, kib: int) -> None:
        # The kernel applies the readahead it negotiated when it gets our INIT reply, so set
        # ours afterwards: a statfs through the mount returns once INIT is done.
        await trio.to_thread.run_sync(os.statvfs, self.mountpoint, abandon_on_cancel=True)
        set_read_ahead(self.mountpoint, kib)

    def mount_layer(self, layer_id: str, ztoc: Ztoc, data: LayerData) -> Path:
        """Add the layer as `<mountpoint>/<layer_id>` and return that directory."""
        layer = self.table.add_layer(layer_id, ztoc, data)
        self._root_changed()
        log.info(
            "mounted layer %s: %d zTOC entries, %d bytes (its tree is built in the background)",
            layer_id,
            layer.entries,
            ztoc.uncompressed_archive_size,
        )
        return self.mountpoint / layer_id

    async def unmount_layer(self, layer_id: str) -> None:
        """Remove the layer; reads in flight complete or fail with EIO, new ones find nothing."""
        layer = self.table.remove_layer(layer_id)
        self._root_changed()
        if self.running:
            pyfuse3.invalidate_entry_async(pyfuse3.ROOT_INODE, layer.name, ignore_enoent=True)
            pyfuse3.invalidate_entry_async(
                STATUS_DIR_INO,
                os.fsencode(layer_id + STATUS_SUFFIX),
                ignore_enoent=True,
            )
        await trio.lowlevel.checkpoint()
        log.info("unmounted layer %s", layer_id)

    def _root_changed(self) -> None:
        # The kernel caches the root's attributes (its nlink counts the layers): without
        # that, every path walk from the mountpoint would cost a GETATTR.
        if not self.running:
            return
        try:
            pyfuse3.invalidate_inode(pyfuse3.ROOT_INODE, attr_only=True)
        except OSError as e:
            if e.errno != errno.ENOENT:  # ENOENT: the kernel holds no attributes to drop
                log.warning("cannot invalidate the attributes of %s: %s", self.mountpoint, e)

    def check(self, layer_id: str) -> None:
        """Raise LayerNotMountedError or LayerUnavailableError unless the layer can serve."""
        layer = self.table.layer(layer_id)
        if not self.running:
            raise LayerUnavailableError(f"the FUSE session at {self.mountpoint} is not running")
        status = layer.status()
        if status.get("state") in BROKEN_STATES:
            raise LayerUnavailableError(
                f"layer {layer_id} is {status.get('state')}: {status.get('error') or 'no detail'}"
            )

    def status(self, layer_id: str) -> dict[str, object]:
        """The layer's status (soci's keys plus the filesystem's read errors)."""
        return self.table.layer(layer_id).status()


def set_read_ahead(mountpoint: Path, kib: int) -> None:
    """Set the kernel readahead of the mount (128 KiB by default) for sequential reads.

    The device number comes from /proc/self/mountinfo, not from a stat of the mountpoint,
    which from the serving thread would wait for its own answer.
    """
    try:
        stacked = mounts_at(mountpoint)
        if not stacked:
            raise OSError(f"{os.path.abspath(mountpoint)} not in /proc/self/mountinfo")
        device = stacked[-1].device  # the topmost mount
        Path(f"/sys/class/bdi/{device}/read_ahead_kb").write_text(f"{kib}\n")
    except OSError as e:
        log.warning("cannot set readahead of %s to %d KiB: %s", mountpoint, kib, e)
