"""Every snapshot label pysoci reads or writes, in one table.

containerd passes a layer's descriptor annotations and its own hints as snapshot labels on
Prepare (`containerd.io/snapshot/...`; CRI's `cri.*`, nerdctl's `remote/soci.*`, ctr-remote's
`remote/stargz.*`). pysoci writes its own under `pysoci.io/` on the snapshots it commits: they
are the one record of what a remote snapshot needs to be served again after a restart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

# containerd's remote-snapshot protocol
TARGET: Final = "containerd.io/snapshot.ref"
"""On Prepare: the committed snapshot the unpacker wants (its chain ID)."""
REMOTE: Final = "containerd.io/snapshot/remote"
"""On a committed snapshot the snapshotter made itself (stargz and soci write it)."""
REMOTE_VALUE: Final = "remote snapshot"

# CRI (with `disable_snapshot_annotations = false`) and nerdctl
CRI_IMAGE_REF: Final = "containerd.io/snapshot/cri.image-ref"
CRI_MANIFEST_DIGEST: Final = "containerd.io/snapshot/cri.manifest-digest"
CRI_LAYER_DIGEST: Final = "containerd.io/snapshot/cri.layer-digest"
CRI_IMAGE_LAYERS: Final = "containerd.io/snapshot/cri.image-layers"

# ctr-remote (stargz-snapshotter's) rpull
STARGZ_REFERENCE: Final = "containerd.io/snapshot/remote/stargz.reference"
STARGZ_DIGEST: Final = "containerd.io/snapshot/remote/stargz.digest"
STARGZ_LAYERS: Final = "containerd.io/snapshot/remote/stargz.layers"

# nerdctl's SOCI hints
SOCI_INDEX_DIGEST: Final = "containerd.io/snapshot/remote/soci.index.digest"

# pysoci's own, on the snapshots it commits
PREFIX: Final = "pysoci.io/"
"""Labels under this prefix are pysoci's record: an Update from containerd cannot change them."""
LOCAL_REASON: Final = "pysoci.io/local-reason"
"""Why a layer of an indexed image was unpacked here instead of served lazily."""
LAYER_DIGEST: Final = "pysoci.io/layer.digest"
LAYER_SIZE: Final = "pysoci.io/layer.size"
LAYER_DIFF_ID: Final = "pysoci.io/layer.diff-id"
IMAGE_REF: Final = "pysoci.io/image.ref"
"""The reference the layer's bytes are fetched from (repository of the image)."""
IMAGE_MANIFEST: Final = "pysoci.io/image.manifest"
INDEX_DIGEST: Final = "pysoci.io/soci.index.digest"
INDEX_SOURCE: Final = "pysoci.io/soci.index.source"
"""How the SOCI index was found: explicit, v2-annotation, referrers, local."""
ZTOC_DIGEST: Final = "pysoci.io/ztoc.digest"
ZTOC_SIZE: Final = "pysoci.io/ztoc.size"


def image_ref(labels: Mapping[str, str] | None) -> str:
    """The image reference Prepare labels name (CRI/nerdctl first, then ctr-remote), or ""."""
    if not labels:
        return ""
    return labels.get(IMAGE_REF) or labels.get(CRI_IMAGE_REF) or labels.get(STARGZ_REFERENCE) or ""


def layer_digest(labels: Mapping[str, str] | None) -> str:
    """The layer digest Prepare labels name, or ""."""
    if not labels:
        return ""
    return (
        labels.get(LAYER_DIGEST) or labels.get(CRI_LAYER_DIGEST) or labels.get(STARGZ_DIGEST) or ""
    )
