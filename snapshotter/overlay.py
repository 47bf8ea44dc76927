"""Read-only overlay (or bind) mounts of layer directories, for `pysoci mount`."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from snapshotter.errors import PysociError


class MountError(PysociError):
    """An overlay or bind mount failed."""


def overlay_options(lowers_bottom_first: list[Path]) -> str:
    """`lowerdir=` with the topmost layer first, as overlayfs wants it."""
    return "lowerdir=" + ":".join(str(p) for p in reversed(lowers_bottom_first))


async def mount_overlay(lowers_bottom_first: list[Path], target: Path) -> None:
    """Mount the layers read-only at `target` (a bind mount when there is one layer)."""
    target.mkdir(parents=True, exist_ok=True)
    if len(lowers_bottom_first) == 1:
        cmd = ["mount", "--bind", "-o", "ro", str(lowers_bottom_first[0]), str(target)]
    else:
        cmd = [
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            overlay_options(lowers_bottom_first),
            str(target),
        ]
    result = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    if result.returncode != 0:
        raise MountError(f"{' '.join(cmd[:4])} … {target} failed: {result.stderr.decode().strip()}")


async def unmount(target: Path, *, lazy: bool = False) -> bool:
    """Unmount `target`; False if it was not mounted."""
    if not os.path.ismount(target):
        return False
    cmd = ["umount", *(["-l"] if lazy else []), str(target)]
    result = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    if result.returncode != 0:
        raise MountError(f"umount {target} failed: {result.stderr.decode().strip()}")
    return True
