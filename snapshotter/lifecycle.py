"""What the daemon does about the state a previous run left: the root lock, a FUSE mount whose
daemon died, and the container overlays that still use it.

A FUSE connection dies with the process that served it: after a SIGKILL the kernel aborts it
and `ROOT/fuse` stays mounted but answers ENOTCONN. It cannot be adopted (pyfuse3 has no way to
take over a `/dev/fuse` descriptor whose INIT another process answered), so it is detached
(`fusermount3 -u -z`) and a fresh session is mounted at the same path. Overlays made before
keep the dead superblock (overlayfs holds its lower layers by reference, not by path): they
are only reported here.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from snapshotter.errors import PysociError
from snapshotter.mountinfo import MountEntry, mount_table, mounts_at, overlay_lowerdirs

log = logging.getLogger(__name__)

LOCK_FILE = "pysoci.lock"
_CONTAINER_ROOTFS = re.compile(r"/io\.containerd\.runtime\.v2\.task/([^/]+)/([^/]+)/rootfs$")


class RootBusyError(PysociError):
    """Another pysoci process serves the same root."""


@dataclass(frozen=True)
class OverlayUser:
    """An overlay mount (a container's rootfs, usually) with lower layers under the FUSE root."""

    mount_point: str
    layer_ids: tuple[str, ...]

    @property
    def container(self) -> str:
        """`namespace/id` when the mount point is containerd's task rootfs, else the path."""
        m = _CONTAINER_ROOTFS.search(self.mount_point)
        return f"{m.group(1)}/{m.group(2)}" if m else self.mount_point


def lock_root(root: Path, name: str = LOCK_FILE, *, wait: float = 0.0) -> int:
    """Hold `ROOT/<name>` for the life of the process (`pysoci.lock`: the control plane;
    `data-plane.lock`: the data plane, as a second one would unmount the first one's live
    FUSE mount), waiting up to `wait` seconds for it. Returns the descriptor; closing it
    releases the lock."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(root / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                raise RootBusyError(
                    f"{root / name} is held by another pysoci process (pid {holder or '?'})"
                ) from None
            time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def fuse_mounts_at(mountpoint: Path) -> list[MountEntry]:
    """The FUSE mounts stacked at `mountpoint`."""
    return mounts_at(mountpoint, fstype_prefix="fuse")


def unmount_stale_fuse(mountpoint: Path) -> int:
    """Detach every FUSE mount left at `mountpoint` by a daemon that died; how many."""
    stale = fuse_mounts_at(mountpoint)
    for entry in stale:
        log.warning(
            "a FUSE mount (%s, %s) is left at %s by a pysoci that did not stop cleanly: "
            "detaching it",
            entry.fstype,
            entry.source,
            mountpoint,
        )
        res = subprocess.run(
            ["fusermount3", "-u", "-z", os.fspath(mountpoint)], capture_output=True, text=True
        )
        if res.returncode != 0:
            res = subprocess.run(
                ["umount", "-l", os.fspath(mountpoint)], capture_output=True, text=True
            )
        if res.returncode != 0:
            raise PysociError(f"cannot unmount the stale FUSE mount at {mountpoint}: {res.stderr}")
    return len(stale)


def overlays_using(fuse_root: Path) -> list[OverlayUser]:
    """Overlay mounts whose lower layers are directories of the FUSE root."""
    prefix = os.path.abspath(fuse_root) + "/"
    users: list[OverlayUser] = []
    for m in mount_table():
        if m.fstype != "overlay":
            continue
        ids = tuple(
            d[len(prefix) :].split("/", 1)[0] for d in overlay_lowerdirs(m) if d.startswith(prefix)
        )
        if ids:
            users.append(OverlayUser(m.mount_point, ids))
    return users
