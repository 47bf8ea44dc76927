"""The data plane as the control plane sees it: a few calls taking and returning plain values.

The same interface is served in-process (`LocalDataPlane`, used by `pysoci mount`) and across
a process boundary (`DataPlaneClient` talking to `pysoci data-plane run`): nothing that
crosses it is a live object — a `LayerSpec` in, a directory path and `ServedLayer` records
out, typed errors back.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from snapshotter.errors import FormatError, PysociError
from snapshotter.fs.table import LayerNotMountedError, LayerUnavailableError
from snapshotter.remote.spec import LayerSpec

__all__ = [
    "DataPlane",
    "DataPlaneError",
    "DataPlaneUnavailableError",
    "LayerNotMountedError",
    "LayerUnavailableError",
    "ServedLayer",
    "SweepResult",
]


class DataPlaneError(PysociError):
    """The data plane failed in a way it did not name more precisely."""


class DataPlaneUnavailableError(DataPlaneError):
    """No data plane answers (not started, restarting, or dead)."""


@dataclass(frozen=True)
class ServedLayer:
    """A layer the data plane serves now."""

    layer_id: str
    layer_digest: str
    ztoc_digest: str
    path: str
    state: str

    def to_json(self) -> dict[str, Any]:
        return {
            "layer_id": self.layer_id,
            "layer_digest": self.layer_digest,
            "ztoc_digest": self.ztoc_digest,
            "path": self.path,
            "state": self.state,
        }

    @classmethod
    def from_json(cls, raw: object) -> ServedLayer:
        if not isinstance(raw, dict) or not all(
            isinstance(raw.get(k), str)
            for k in ("layer_id", "layer_digest", "ztoc_digest", "path", "state")
        ):
            raise FormatError("data plane: malformed served layer")
        return cls(
            raw["layer_id"], raw["layer_digest"], raw["ztoc_digest"], raw["path"], raw["state"]
        )


@dataclass(frozen=True)
class SweepResult:
    """What a sweep removed."""

    unmounted: int = 0
    caches: int = 0
    ztocs: int = 0


class DataPlane(Protocol):
    """The long-lived serving side: FUSE session, span caches, background fetch, range source."""

    @property
    def mountpoint(self) -> Path:
        """The FUSE mount whose top-level directories are the layers."""
        ...

    async def mount(self, spec: LayerSpec) -> Path:
        """Serve the layer (a no-op when it is served already); its directory."""
        ...

    async def unmount(self, layer_id: str, *, forget: bool = False) -> None:
        """Stop serving it; with `forget`, also delete its cached spans."""
        ...

    async def check(self, layer_id: str) -> None:
        """LayerNotMountedError or LayerUnavailableError unless the layer can serve reads."""
        ...

    async def layers(self) -> list[ServedLayer]:
        """Every layer served now."""
        ...

    async def sweep(self, keep: Collection[LayerSpec]) -> SweepResult:
        """Unmount layers not in `keep`; delete cached spans and zTOCs nothing in `keep` uses."""
        ...

    async def warm(self, specs: Collection[LayerSpec]) -> int:
        """Start fetching the zTOCs of layers about to be mounted (returns at once)."""
        ...
