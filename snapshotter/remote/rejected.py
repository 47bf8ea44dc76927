"""The zTOCs proven to lie, kept under ROOT so that a restart of either plane keeps them.

The data plane records a (layer, zTOC) pair when its checks prove the zTOC wrong (see
fetch/spans.py); the wing reads the record before each lazy mount and unpacks such a layer
locally instead. One small JSON file (`ROOT/rejected-ztocs.json`), replaced atomically; at
most `MAX_ENTRIES` pairs (the oldest go first), so an attacker pushing lies cannot grow it.
A file that cannot be read counts as empty (logged): the checks still run on every mount.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

REJECTED_FILE: Final = "rejected-ztocs.json"
MAX_ENTRIES: Final = 4096
_MAX_FILE: Final = 8 << 20
_MAX_REASON: Final = 1000


def _key(layer_digest: str, ztoc_digest: str) -> str:
    return f"{layer_digest} {ztoc_digest}"


class RejectedZtocs:
    """The record of rejected (layer digest, zTOC digest) pairs in one file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def _load(self) -> dict[str, dict[str, object]]:
        try:
            with self.path.open("rb") as f:
                raw = f.read(_MAX_FILE + 1)
        except FileNotFoundError:
            return {}
        except OSError as e:
            log.warning("cannot read the rejected zTOCs in %s: %s", self.path, e)
            return {}
        try:
            data = json.loads(raw) if len(raw) <= _MAX_FILE else None
        except ValueError:
            data = None
        if not isinstance(data, dict):
            log.warning("%s is not a record of rejected zTOCs; ignoring it", self.path)
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, dict)}

    def reason(self, layer_digest: str, ztoc_digest: str) -> str | None:
        """Why this zTOC of this layer was rejected, or None when it was not."""
        entry = self._load().get(_key(layer_digest, ztoc_digest))
        if entry is None:
            return None
        return str(entry.get("reason", "rejected"))

    def add(self, layer_digest: str, ztoc_digest: str, reason: str) -> None:
        """Record a rejection (OSError when the file cannot be written)."""
        with self._lock:
            entries = self._load()
            entries.pop(_key(layer_digest, ztoc_digest), None)
            entries[_key(layer_digest, ztoc_digest)] = {
                "reason": reason[:_MAX_REASON],
                "at": time.time(),
            }
            while len(entries) > MAX_ENTRIES:
                entries.pop(next(iter(entries)))
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(entries))
            os.replace(tmp, self.path)

    def entries(self) -> dict[str, str]:
        """Every rejected pair (`<layer digest> <zTOC digest>`) and why."""
        return {k: str(v.get("reason", "")) for k, v in self._load().items()}
