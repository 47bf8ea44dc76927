"""The mounts a snapshot answers with: the shapes of containerd's overlay snapshotter.

- no parent: a bind of the snapshot's own directory (`rw`, or `ro` for a view), `rbind`;
- a view of exactly one parent: a read-only bind of that parent's directory;
- otherwise overlay: `lowerdir=<parents nearest first, ':'-joined>`, plus `workdir` and
  `upperdir` for an active snapshot (a view has only lower directories).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from snapshotter.service.store import Kind

_OVERLAY_INDEX_PARAM = Path("/sys/module/overlay/parameters/index")


@dataclass(frozen=True)
class Mount:
    """One mount(2) call, as containerd's `types.Mount`."""

    type: str
    source: str
    options: tuple[str, ...] = ()
    target: str = ""


def overlay_index_off() -> bool:
    """Whether to pass `index=off` (as containerd does whenever the kernel knows the option):
    the same lower directories are mounted under many upper directories."""
    return _OVERLAY_INDEX_PARAM.exists()


def snapshot_mounts(
    kind: Kind,
    upper: str,
    work: str,
    parents: Sequence[str],
    *,
    index_off: bool = False,
) -> list[Mount]:
    """Mounts for a snapshot of `kind` whose own directories are `upper` and `work` and whose
    parents' directories are `parents` (nearest first)."""
    if not parents:
        return [Mount("bind", upper, ("ro" if kind == Kind.VIEW else "rw", "rbind"))]
    if kind != Kind.ACTIVE and len(parents) == 1:
        return [Mount("bind", parents[0], ("ro", "rbind"))]
    options: list[str] = []
    if index_off:
        options.append("index=off")
    if kind == Kind.ACTIVE:
        options += [f"workdir={work}", f"upperdir={upper}"]
    options.append("lowerdir=" + ":".join(parents))
    return [Mount("overlay", "overlay", tuple(options))]
