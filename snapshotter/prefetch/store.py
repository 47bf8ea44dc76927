"""ROOT/prefetch: the recorded starts of this node, one file per image manifest.

`<algorithm>-<hex of the manifest digest>.json` holds an `ImageRecording`. The data plane is the
only writer (one task, in order); `pysoci prefetch show|push` and the data plane's mounts read.
Files are replaced atomically (written aside, then renamed), so a reader sees a whole file.

Bounded: at most `max_images` files and `max_bytes` in all; past either, the files updated
longest ago are deleted. A recording that stopped early (its layer unmounted) does not replace
one that ran to its end; otherwise the newest start wins.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Final

from snapshotter.errors import FormatError
from snapshotter.prefetch.record import (
    DONE,
    UNMOUNTED,
    ImageRecording,
    LayerRecording,
    parse_recordings,
)
from snapshotter.soci.oci import validate_digest

log = logging.getLogger(__name__)

SUFFIX: Final = ".json"
MAX_FILE_BYTES: Final = 64 << 20
"""No recording file is read past this (whatever `max_bytes` says)."""


def _complete(layer: LayerRecording) -> bool:
    return layer.state == DONE and layer.reason != UNMOUNTED


def replaces(new: LayerRecording, old: LayerRecording | None) -> bool:
    """Whether `new` should be kept instead of `old` for the same layer."""
    if old is None:
        return True
    if old.ztoc_digest != new.ztoc_digest:
        return True
    return _complete(new) or not _complete(old) or old.started == new.started


class RecordingStore:
    """The recordings under one directory (created on the first write, mode 0700)."""

    def __init__(self, directory: Path, *, max_images: int = 100, max_bytes: int = 64 << 20):
        self.directory = directory
        self.max_images = max_images
        self.max_bytes = max_bytes

    def path(self, manifest_digest: str) -> Path:
        """The file of one image manifest."""
        algorithm, _, encoded = validate_digest(manifest_digest).partition(":")
        return self.directory / f"{algorithm}-{encoded}{SUFFIX}"

    def _read(self, path: Path) -> ImageRecording | None:
        try:
            with open(path, "rb") as f:
                data = f.read(min(self.max_bytes, MAX_FILE_BYTES) + 1)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("cannot read the recorded start %s: %s", path, e.strerror)
            return None
        try:
            found = parse_recordings(data, max_size=min(self.max_bytes, MAX_FILE_BYTES))
        except FormatError as e:
            log.warning("ignoring the recorded start %s: %s", path, e)
            return None
        if len(found) != 1:
            log.warning("ignoring the recorded start %s: not one recorded image", path)
            return None
        return found[0]

    def load(self, manifest_digest: str) -> ImageRecording | None:
        """The recorded start of an image manifest, if any (and readable)."""
        found = self._read(self.path(manifest_digest))
        if found is not None and found.manifest_digest != manifest_digest:
            log.warning(
                "ignoring %s: it records %s", self.path(manifest_digest), found.manifest_digest
            )
            return None
        return found

    def layer(
        self, manifest_digest: str, layer_digest: str, ztoc_digest: str
    ) -> LayerRecording | None:
        """One layer's recording, if it was made with that zTOC and recorded spans."""
        image = self.load(manifest_digest)
        layer = image.layer(layer_digest) if image is not None else None
        if layer is None or layer.ztoc_digest != ztoc_digest or not layer.spans:
            return None
        return layer

    def all(self) -> list[ImageRecording]:
        """Every readable recording, the most recently updated first."""
        out = []
        for path in self._files():
            found = self._read(path)
            if found is not None:
                out.append(found)
        out.sort(key=lambda r: r.updated, reverse=True)
        return out

    def _files(self) -> list[Path]:
        try:
            return [p for p in self.directory.iterdir() if p.name.endswith(SUFFIX)]
        except FileNotFoundError:
            return []

    def save(
        self, manifest_digest: str, image_ref: str, layer: LayerRecording, *, now: float
    ) -> bool:
        """Keep a layer's recording in its image's file (unless the file holds a better one:
        see `replaces`); whether it was written."""
        image = self.load(manifest_digest) or ImageRecording(manifest_digest, image_ref, now)
        if not replaces(layer, image.layer(layer.layer_digest)):
            return False
        image = image.with_layer(layer, now)
        if image_ref and image.image_ref != image_ref:
            image = ImageRecording(manifest_digest, image_ref, now, image.layers)
        data = image.to_bytes()
        path = self.path(manifest_digest)
        if len(data) > min(self.max_bytes, MAX_FILE_BYTES):
            log.warning(
                "the recorded start of %s takes %d bytes, over the bound of %d: not kept",
                manifest_digest,
                len(data),
                self.max_bytes,
            )
            return False
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.warning("cannot keep the recorded start of %s: %s", manifest_digest, e.strerror)
            return False
        self._enforce(keep=path)
        return True

    def _enforce(self, keep: Path) -> None:
        """Delete the files updated longest ago while over `max_images` or `max_bytes`."""
        entries = []
        for path in self._files():
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime_ns, path, st.st_size))
        entries.sort(key=lambda e: (e[1] == keep, e[0]))  # oldest first, the new one last
        total = sum(size for _, _, size in entries)
        count = len(entries)
        for _, path, size in entries:
            if count <= self.max_images and total <= self.max_bytes:
                break
            if path == keep:
                break
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                log.info("dropped the recorded start %s (the oldest, over the bound)", path.name)
            count -= 1
            total -= size
        for stray in self.directory.glob(".*.tmp"):
            if not stray.name.endswith(f".{os.getpid()}.tmp"):
                with contextlib.suppress(OSError):
                    stray.unlink()

    def remove(self, manifest_digest: str) -> bool:
        """Forget an image's recorded start."""
        try:
            self.path(manifest_digest).unlink()
        except FileNotFoundError:
            return False
        return True
