"""State an older pysoci left, moved into today's layout once, at start.

Before the metastore became the one record of remote snapshots, a lazy layer's restore data
lived in `ROOT/lazy/<layer-id>.json` (image reference, layer digest and size, zTOC
descriptor) and its zTOC in `ROOT/lazy/ztocs`. The records become the snapshots'
`pysoci.io/` labels, the zTOCs move to the data plane's store `ROOT/ztocs`, and `ROOT/lazy`
goes away.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from snapshotter import labels
from snapshotter.errors import PysociError
from snapshotter.service.snapshots import Snapshotter

log = logging.getLogger(__name__)


def migrate_lazy_records(root: Path, snapshotter: Snapshotter) -> int:
    """Move `ROOT/lazy` into labels and `ROOT/ztocs`; how many snapshots got labels."""
    lazy = root / "lazy"
    if not lazy.is_dir():
        return 0
    moved = 0
    for rec in snapshotter.layers():
        if not rec.remote or labels.ZTOC_DIGEST in rec.labels:
            continue
        path = lazy / f"{Path(rec.layer_dir).name}.json"
        try:
            raw = json.loads(path.read_bytes())
            values = {
                labels.IMAGE_REF: str(raw["ref"]),
                labels.LAYER_DIGEST: str(raw["layer_digest"]),
                labels.LAYER_SIZE: str(int(raw["layer_size"])),
                labels.ZTOC_DIGEST: str(raw["ztoc_digest"]),
                labels.ZTOC_SIZE: str(int(raw["ztoc_size"])),
            }
            snapshotter.add_labels(rec.name, values)
            moved += 1
        except (OSError, ValueError, KeyError, TypeError, PysociError) as e:
            log.error("cannot move the lazy layer record %s into the metastore: %s", path, e)
    blobs = lazy / "ztocs" / "blobs" / "sha256"
    if blobs.is_dir():
        target = root / "ztocs" / "blobs" / "sha256"
        target.mkdir(parents=True, exist_ok=True)
        for blob in blobs.iterdir():
            if not (target / blob.name).exists():
                os.replace(blob, target / blob.name)
    shutil.rmtree(lazy, ignore_errors=True)
    log.info("moved %d lazy layer record(s) of an older pysoci into the metastore", moved)
    return moved
