"""A local content store in the OCI image layout format (readable by umoci, skopeo, ...).

```
<root>/oci-layout            {"imageLayoutVersion": "1.0.0"}
<root>/index.json            an image index; tags are org.opencontainers.image.ref.name
<root>/blobs/<alg>/<hex>     content, named by digest
```

Writes are atomic (temporary file, fsync, rename) so a crash never leaves a partial blob or
index.json under its final name; index.json updates are serialised with flock on the layout
directory, so several processes may share one layout.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from snapshotter.errors import ContentNotFoundError, DigestMismatchError, FormatError, ManifestError
from snapshotter.soci.oci import (
    ANNOTATION_REF_NAME,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
    Descriptor,
    ImageIndex,
    ImageManifest,
    canonical_json,
    decode_json,
    digest_hasher,
    parse_image_index,
    parse_manifest,
    validate_digest,
)

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
BLOBS_DIR = "blobs"
IMAGE_LAYOUT_VERSION = "1.0.0"
MAX_INDEX_JSON_SIZE = 64 * 1024 * 1024
MAX_RESOLVED_MANIFEST_SIZE = 4 * 1024 * 1024
# containerd's `ctr image export` names images with this annotation instead of ref.name.
ANNOTATION_CONTAINERD_IMAGE_NAME = "io.containerd.image.name"

_TMP_PREFIX = ".tmp-"
# OCI image-layout ref.name grammar: components of alphanumerics joined by [-._:@+] or "--",
# separated by "/".
_COMPONENT = r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*"
_TAG_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_MAX_TAG_LENGTH = 4096


def validate_tag(tag: str) -> str:
    """Return `tag` if it is a valid `org.opencontainers.image.ref.name`, else raise."""
    if not 0 < len(tag) <= _MAX_TAG_LENGTH or _TAG_RE.fullmatch(tag) is None:
        raise ManifestError(f"invalid tag {tag[:200]!r}")
    return tag


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, tmp_dir: Path, data: bytes) -> None:
    """Write a file under a temporary name in `tmp_dir`, fsync, and rename it to `path`."""
    fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=tmp_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)


class OciLayout:
    """An OCI image layout directory used as a content store."""

    def __init__(self, root: Path) -> None:
        """Use `OciLayout.open`; this does not validate anything."""
        self.root = root

    @classmethod
    def open(cls, path: str | os.PathLike[str], create: bool = False) -> OciLayout:
        """Open a layout, or with `create` make one (oci-layout + empty index.json) if absent."""
        root = Path(path)
        layout_file = root / LAYOUT_FILE
        if create:
            root.mkdir(parents=True, exist_ok=True)
            (root / BLOBS_DIR / "sha256").mkdir(parents=True, exist_ok=True)
            # index.json first: oci-layout is what marks the directory as a layout.
            if not (root / INDEX_FILE).exists():
                empty = ImageIndex(media_type=MEDIA_TYPE_OCI_INDEX).to_json_bytes()
                _atomic_write(root / INDEX_FILE, root, empty)
            if not layout_file.exists():
                _atomic_write(
                    layout_file,
                    root,
                    canonical_json({"imageLayoutVersion": IMAGE_LAYOUT_VERSION}),
                )
        try:
            raw = layout_file.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ContentNotFoundError(f"{root} is not an OCI layout: no {LAYOUT_FILE}") from None
        obj = decode_json(raw, max_size=64 * 1024, what=str(layout_file))
        version = obj.get("imageLayoutVersion") if isinstance(obj, dict) else None
        if not isinstance(version, str) or not version.startswith("1."):
            raise ManifestError(
                f"{layout_file}: unsupported imageLayoutVersion {version!r:.60} (want 1.x)"
            )
        if not (root / INDEX_FILE).is_file():
            raise ManifestError(f"{root} is not an OCI layout: no {INDEX_FILE}")
        return cls(root)

    # --- blobs ----------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """Where the blob named `digest` lives (validated, so it cannot escape the layout)."""
        algorithm, encoded = validate_digest(digest).split(":", 1)
        return self.root / BLOBS_DIR / algorithm / encoded

    def has_blob(self, digest: str) -> bool:
        """True if the blob is present (not verified)."""
        return self.blob_path(digest).is_file()

    def open_blob(self, digest: str) -> BinaryIO:
        """Open a blob for reading (not verified; use read_blob for small verified reads)."""
        try:
            return self.blob_path(digest).open("rb")
        except (FileNotFoundError, IsADirectoryError):
            raise ContentNotFoundError(f"blob {digest} not found in {self.root}") from None

    def read_blob(self, digest: str, *, max_size: int) -> bytes:
        """Read a whole blob of at most `max_size` bytes and verify its digest."""
        hasher = digest_hasher(digest)
        with self.open_blob(digest) as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_size:
                raise FormatError(f"blob {digest} is {size} bytes, more than {max_size}")
            data = f.read(max_size + 1)
        if len(data) > max_size:
            raise FormatError(f"blob {digest} is larger than {max_size} bytes")
        hasher.update(data)
        if f"{hasher.name}:{hasher.hexdigest()}" != digest:
            raise DigestMismatchError(f"blob {digest} in {self.root} does not match its digest")
        return data

    def write_blob(self, data: bytes) -> str:
        """Store `data` under its sha256 digest (atomic, idempotent); return the digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = self.blob_path(digest)
        if self._blob_present(path, len(data)):
            return digest
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, path.parent.parent, data)
        return digest

    def write_blob_from_stream(
        self, chunks: Iterable[bytes], *, expected_digest: str | None = None
    ) -> tuple[str, int]:
        """Store a blob from byte chunks; return (digest, size).

        The digest is sha256 unless `expected_digest` names another algorithm; if given and
        the content does not match, nothing is stored and DigestMismatchError is raised.
        """
        with self.blob_writer(expected_digest) as writer:
            for chunk in chunks:
                writer.write(chunk)
            return writer.commit()

    def blob_writer(self, expected_digest: str | None = None) -> BlobWriter:
        """An incremental writer for one blob (for producers that are not iterables)."""
        return BlobWriter(self, expected_digest)

    @staticmethod
    def _blob_present(path: Path, size: int) -> bool:
        try:
            return path.stat().st_size == size
        except FileNotFoundError:
            return False

    def put_manifest(self, manifest: ImageManifest | ImageIndex) -> Descriptor:
        """Store a manifest or index (its exact raw bytes) and return its descriptor."""
        self.write_blob(manifest.raw_bytes())
        return manifest.descriptor()

    # --- index.json and tags ------------------------------------------------------------

    def index(self) -> ImageIndex:
        """The parsed index.json."""
        try:
            raw = (self.root / INDEX_FILE).read_bytes()
        except FileNotFoundError:
            raise ContentNotFoundError(f"{self.root} has no {INDEX_FILE}") from None
        try:
            return parse_image_index(
                raw, media_type_hint=MEDIA_TYPE_OCI_INDEX, max_size=MAX_INDEX_JSON_SIZE
            )
        except ManifestError as exc:
            raise ManifestError(f"{self.root / INDEX_FILE}: {exc}") from None

    def tags(self) -> list[str]:
        """Tags named in index.json, in order, without duplicates."""
        seen: dict[str, None] = {}
        for desc in self.index().manifests:
            tag = desc.annotations.get(ANNOTATION_REF_NAME)
            if tag is not None:
                seen[tag] = None
        return list(seen)

    def resolve(self, ref: str) -> Descriptor:
        """The descriptor for a tag, or for a digest (from index.json, else from the blob)."""
        manifests = self.index().manifests
        if _looks_like_digest(ref):
            for desc in manifests:
                if desc.digest == ref:
                    return desc
            return self._describe_blob(ref)
        for key in (ANNOTATION_REF_NAME, ANNOTATION_CONTAINERD_IMAGE_NAME):
            for desc in manifests:
                if desc.annotations.get(key) == ref:
                    return desc
        raise ContentNotFoundError(
            f"tag {ref[:200]!r} not found in {self.root}; available tags: "
            + (", ".join(self.tags()) or "none")
        )

    def _describe_blob(self, digest: str) -> Descriptor:
        data = self.read_blob(digest, max_size=MAX_RESOLVED_MANIFEST_SIZE)
        parsed = parse_manifest(data)
        default = (
            MEDIA_TYPE_OCI_INDEX if isinstance(parsed, ImageIndex) else MEDIA_TYPE_OCI_MANIFEST
        )
        return Descriptor(
            parsed.media_type or default, digest, len(data), artifact_type=parsed.artifact_type
        )

    def set_tag(self, tag: str, desc: Descriptor) -> None:
        """Point `tag` at `desc`, replacing whatever the tag named before."""
        validate_tag(tag)
        tagged = desc.with_annotations({ANNOTATION_REF_NAME: tag})
        with self._locked_index() as manifests:
            manifests[:] = [d for d in manifests if d.annotations.get(ANNOTATION_REF_NAME) != tag]
            manifests.append(tagged)

    def add_manifest(self, desc: Descriptor) -> None:
        """List `desc` in index.json without a tag (keeps it reachable); no duplicates."""
        untagged = {k: v for k, v in desc.annotations.items() if k != ANNOTATION_REF_NAME}
        entry = Descriptor(
            desc.media_type,
            desc.digest,
            desc.size,
            untagged,
            desc.platform,
            desc.artifact_type,
            desc.urls,
            desc.data,
        )
        with self._locked_index() as manifests:
            if not any(
                d.digest == desc.digest and ANNOTATION_REF_NAME not in d.annotations
                for d in manifests
            ):
                manifests.append(entry)

    def remove_tag(self, tag: str) -> None:
        """Drop `tag` from index.json (the blobs stay)."""
        with self._locked_index() as manifests:
            kept = [d for d in manifests if d.annotations.get(ANNOTATION_REF_NAME) != tag]
            if len(kept) == len(manifests):
                raise ContentNotFoundError(f"tag {tag[:200]!r} not found in {self.root}")
            manifests[:] = kept

    def remove_manifest(self, digest: str) -> bool:
        """Drop every index.json entry (tagged or not) for `digest`; False if none was listed.

        The blobs stay (run a garbage collector such as `umoci gc` to reclaim them).
        """
        validate_digest(digest)
        with self._locked_index() as manifests:
            kept = [d for d in manifests if d.digest != digest]
            removed = len(kept) != len(manifests)
            manifests[:] = kept
        return removed

    @contextlib.contextmanager
    def _locked_index(self) -> Iterator[list[Descriptor]]:
        """Yield index.json's manifests for editing under an exclusive lock; save on exit."""
        dir_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)
            current = self.index()
            manifests = list(current.manifests)
            yield manifests
            if manifests != list(current.manifests):
                updated = ImageIndex(
                    manifests=manifests,
                    media_type=current.media_type or MEDIA_TYPE_OCI_INDEX,
                    artifact_type=current.artifact_type,
                    subject=current.subject,
                    annotations=current.annotations,
                )
                data = updated.to_json_bytes()
                _atomic_write(self.root / INDEX_FILE, self.root, data)
        finally:
            os.close(dir_fd)  # releases the lock


def _looks_like_digest(ref: str) -> bool:
    try:
        validate_digest(ref)
    except ManifestError:
        return False
    return True


class BlobWriter:
    """Writes one blob incrementally and atomically: `write()` chunks, then `commit()`.

    Leaving the `with` block without a commit discards the temporary file; nothing partial is
    ever visible under `blobs/`.
    """

    def __init__(self, layout: OciLayout, expected_digest: str | None) -> None:
        self._layout = layout
        self._expected = expected_digest
        self._hasher = digest_hasher(expected_digest) if expected_digest else hashlib.sha256()
        blobs = layout.root / BLOBS_DIR
        blobs.mkdir(exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=blobs)
        self._file = os.fdopen(fd, "wb")
        self.size = 0
        self._done = False

    def write(self, chunk: bytes) -> None:
        """Append a chunk."""
        self._hasher.update(chunk)
        self._file.write(chunk)
        self.size += len(chunk)

    def commit(self) -> tuple[str, int]:
        """Verify and move the blob into place; return (digest, size)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        digest = f"{self._hasher.name}:{self._hasher.hexdigest()}"
        if self._expected is not None and digest != self._expected:
            raise DigestMismatchError(
                f"streamed blob hashes to {digest}, expected {self._expected}"
            )
        path = self._layout.blob_path(digest)
        if OciLayout._blob_present(path, self.size):
            os.unlink(self._tmp)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(self._tmp, 0o644)
            os.replace(self._tmp, path)
            _fsync_dir(path.parent)
        self._done = True
        return digest, self.size

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self._file.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
