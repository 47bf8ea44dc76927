"""`/proc/self/mountinfo`, parsed once and in one place.

Fields with spaces, tabs, newlines or backslashes are octal-escaped by the kernel (`\\040`);
`unescape` undoes exactly that, byte-wise, so non-UTF-8 paths survive as surrogate escapes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = "/proc/self/mountinfo"
_ESCAPE = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    """One line of mountinfo."""

    mount_point: str
    fstype: str
    source: str
    super_options: str
    device: str
    """`major:minor` of the filesystem (`/sys/class/bdi/<device>` for FUSE)."""


def unescape(field: str) -> str:
    """Undo mountinfo's octal escapes."""
    if "\\" not in field:
        return field
    raw = os.fsencode(field)
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), raw))


def mount_table(path: str = MOUNTINFO) -> list[MountEntry]:
    """Every mount this process sees, in mount order (the last of a path is the topmost)."""
    out: list[MountEntry] = []
    with open(path, "rb") as f:
        text = os.fsdecode(f.read())
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        rest = right.split(" ", 2)
        if not sep or len(fields) < 5 or len(rest) < 3:
            continue
        out.append(MountEntry(unescape(fields[4]), rest[0], unescape(rest[1]), rest[2], fields[2]))
    return out


def mounts_at(mountpoint: Path | str, *, fstype_prefix: str = "") -> list[MountEntry]:
    """The mounts stacked at `mountpoint` (bottom first), optionally of one filesystem type."""
    target = os.path.abspath(mountpoint)
    return [
        m for m in mount_table() if m.mount_point == target and m.fstype.startswith(fstype_prefix)
    ]


def overlay_lowerdirs(entry: MountEntry) -> list[str]:
    """The lower directories of an overlay mount, topmost first (`lowerdir=a:b`, or one
    `lowerdir+=` option per layer as newer kernels may show them; commas in paths are
    escaped, so splitting the options on commas is safe)."""
    dirs: list[str] = []
    for opt in entry.super_options.split(","):
        if opt.startswith("lowerdir="):
            dirs.extend(d for d in opt[len("lowerdir=") :].split(":") if d)
        elif opt.startswith("lowerdir+="):
            dirs.append(opt[len("lowerdir+=") :])
    return [unescape(d) for d in dirs]
