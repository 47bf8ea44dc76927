"""Disk cache of compressed layer bytes, kept across daemon restarts.

Layout under the cache root, one directory per layer digest (`sha256-<hex>`):

- `blob`: a sparse file of the layer's compressed size holding the bytes fetched so far at
  their real offsets, so a complete layer file equals the layer blob;
- `spans`: an append-only log of the span ids written, one decimal id per line, appended after
  the span's bytes were written (duplicates are harmless).

Nothing is fsync'ed: a crash can leave a logged span with missing or partial bytes, which is
fine because the span manager hashes every span against its zTOC digest before it uses bytes
read from here. The log says which spans are worth checking, never that they are good.

The byte bound is kept across layers by evicting whole layers that no handle holds open,
least recently used first (the directory's mtime is the use time, so the order survives a
restart). A layer in use is never evicted; when only such layers remain, the bound is
exceeded and reported. All methods are thread-safe: the span manager calls them from worker
threads.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Final

from snapshotter.errors import FormatError

log = logging.getLogger(__name__)

BLOB_FILE: Final = "blob"
SPANS_FILE: Final = "spans"
_DIGEST_RE: Final = re.compile(r"^(sha256|sha384|sha512):([0-9a-f]{64,128})$")
_HASH_CHUNK: Final = 1 << 20


def layer_dir_name(digest: str) -> str:
    """The cache directory name of a layer digest (`sha256:ab…` → `sha256-ab…`)."""
    m = _DIGEST_RE.match(digest)
    if m is None:
        raise FormatError(f"invalid layer digest {digest!r}")
    return f"{m.group(1)}-{m.group(2)}"


def _dir_digest(name: str) -> str | None:
    algo, sep, hexpart = name.partition("-")
    digest = f"{algo}:{hexpart}"
    return digest if sep and _DIGEST_RE.match(digest) else None


def _allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


class _LayerFiles:
    """The open files of one cached layer, shared by every handle on it."""

    def __init__(self, path: Path, digest: str, compressed_size: int) -> None:
        self.path = path
        self.digest = digest
        self.compressed_size = compressed_size
        self.refs = 0
        path.mkdir(parents=True, exist_ok=True)
        self.blob_fd = os.open(path / BLOB_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self.log_fd = os.open(
                path / SPANS_FILE,
                os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                0o600,
            )
        except BaseException:
            os.close(self.blob_fd)
            raise
        if os.fstat(self.blob_fd).st_size != compressed_size:
            # A different size means a stale or foreign file: start over.
            os.ftruncate(self.log_fd, 0)
            os.ftruncate(self.blob_fd, 0)
            os.ftruncate(self.blob_fd, compressed_size)
        self.allocated = _allocated(self.blob_fd)

    def close(self) -> None:
        os.close(self.blob_fd)
        os.close(self.log_fd)


class LayerCache:
    """A handle on one layer's cached bytes; `close()` it when the layer is unmounted."""

    def __init__(self, owner: DiskCache, files: _LayerFiles) -> None:
        self._owner = owner
        self._files = files
        self._closed = False

    @property
    def digest(self) -> str:
        """The layer digest."""
        return self._files.digest

    @property
    def compressed_size(self) -> int:
        """Size of the layer blob."""
        return self._files.compressed_size

    def present_spans(self) -> set[int]:
        """Span ids in the log (written once, maybe partially: verify before use)."""
        self._check_open()
        spans: set[int] = set()
        size = os.fstat(self._files.log_fd).st_size
        data = os.pread(self._files.log_fd, size, 0)
        # The last line may be torn by a crash; int() rejects it and it is skipped.
        for line in data.split(b"\n"):
            try:
                span = int(line)
            except ValueError:
                continue
            if span >= 0:
                spans.add(span)
        return spans

    def read(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the cached blob (zeros where nothing was written)."""
        self._check_open()
        if not 0 <= start <= end <= self._files.compressed_size:
            raise ValueError(f"range [{start}, {end}) outside the layer")
        out = bytearray()
        while start + len(out) < end:
            chunk = os.pread(self._files.blob_fd, end - start - len(out), start + len(out))
            if not chunk:
                raise OSError(errno.EIO, f"short read of cached layer {self.digest}")
            out += chunk
        return bytes(out)

    def write(self, start: int, data: bytes | bytearray | memoryview) -> None:
        """Store bytes at their offset in the blob (does not log any span)."""
        self._check_open()
        view = memoryview(data).cast("B")
        if not 0 <= start <= start + len(view) <= self._files.compressed_size:
            raise ValueError(f"write [{start}, {start + len(view)}) outside the layer")
        done = 0
        while done < len(view):
            done += os.pwrite(self._files.blob_fd, view[done:], start + done)
        self._owner._grown(self._files)

    def mark(self, spans: list[int] | range) -> None:
        """Log spans as written (call after `write`)."""
        self._check_open()
        if spans:
            os.write(self._files.log_fd, "".join(f"{s}\n" for s in spans).encode())

    def clear(self) -> None:
        """Forget every cached byte of the layer (keeps the handle usable)."""
        self._check_open()
        files = self._files
        os.ftruncate(files.log_fd, 0)
        os.ftruncate(files.blob_fd, 0)
        os.ftruncate(files.blob_fd, files.compressed_size)
        self._owner._grown(files)

    def blob_digest(self, algorithm: str = "sha256") -> str:
        """Digest of the whole cached blob (meaningful once every span is present)."""
        self._check_open()
        h = hashlib.new(algorithm)
        offset = 0
        size = self._files.compressed_size
        while offset < size:
            chunk = os.pread(self._files.blob_fd, min(_HASH_CHUNK, size - offset), offset)
            if not chunk:
                raise OSError(errno.EIO, f"short read of cached layer {self.digest}")
            h.update(chunk)
            offset += len(chunk)
        return f"{algorithm}:{h.hexdigest()}"

    def close(self) -> None:
        """Release the handle; the layer becomes evictable when no handle is left."""
        if not self._closed:
            self._closed = True
            self._owner._release(self._files)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("layer cache handle is closed")


class DiskCache:
    """Every cached layer under `root`, bounded by `max_bytes` of allocated blob space."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"negative cache bound {max_bytes}")
        self.root = root
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._open: dict[str, _LayerFiles] = {}
        # Allocated bytes of layers with no handle, measured at start and at release.
        self._closed_sizes: dict[str, int] = {}
        self._over_bound_reported = False
        root.mkdir(parents=True, exist_ok=True)
        for entry in root.iterdir():
            digest = _dir_digest(entry.name)
            if digest is None or not entry.is_dir():
                continue
            try:
                self._closed_sizes[digest] = (entry / BLOB_FILE).stat().st_blocks * 512
            except FileNotFoundError:
                self._closed_sizes[digest] = 0

    def open_layer(self, digest: str, compressed_size: int) -> LayerCache:
        """A handle on the layer's cache (created empty if absent)."""
        if compressed_size < 0:
            raise FormatError(f"negative layer size {compressed_size}")
        path = self.root / layer_dir_name(digest)
        with self._lock:
            files = self._open.get(digest)
            if files is not None and files.compressed_size != compressed_size:
                raise FormatError(
                    f"layer {digest} is open with size {files.compressed_size}, "
                    f"not {compressed_size}"
                )
            if files is None:
                files = _LayerFiles(path, digest, compressed_size)
                self._open[digest] = files
                self._closed_sizes.pop(digest, None)
            files.refs += 1
            os.utime(path)
            self._evict_locked()
        return LayerCache(self, files)

    def usage(self) -> int:
        """Allocated bytes of every cached layer."""
        with self._lock:
            return self._usage_locked()

    def cached_layers(self) -> list[str]:
        """Digests of every layer with a cache directory."""
        with self._lock:
            return sorted([*self._open, *self._closed_sizes])

    def evict(self) -> int:
        """Evict unused layers until under the bound; returns the bytes freed."""
        with self._lock:
            return self._evict_locked()

    def remove_layer(self, digest: str) -> bool:
        """Delete one layer's cache now; False if it is open."""
        with self._lock:
            if digest in self._open:
                return False
            if self._closed_sizes.pop(digest, None) is None:
                return False
            shutil.rmtree(self.root / layer_dir_name(digest), ignore_errors=True)
            return True

    def _usage_locked(self) -> int:
        return sum(f.allocated for f in self._open.values()) + sum(self._closed_sizes.values())

    def _grown(self, files: _LayerFiles) -> None:
        allocated = _allocated(files.blob_fd)
        with self._lock:
            files.allocated = allocated
            if self._usage_locked() > self.max_bytes:
                self._evict_locked()

    def _release(self, files: _LayerFiles) -> None:
        with self._lock:
            files.refs -= 1
            if files.refs > 0:
                return
            del self._open[files.digest]
            files.allocated = _allocated(files.blob_fd)
            files.close()
            self._closed_sizes[files.digest] = files.allocated
            with contextlib.suppress(FileNotFoundError):
                os.utime(files.path)
            self._evict_locked()

    def _evict_locked(self) -> int:
        usage = self._usage_locked()
        if usage <= self.max_bytes:
            self._over_bound_reported = False
            return 0

        def last_used(digest: str) -> int:
            try:
                return (self.root / layer_dir_name(digest)).stat().st_mtime_ns
            except FileNotFoundError:
                return 0

        freed = 0
        for digest in sorted(self._closed_sizes, key=last_used):
            if usage - freed <= self.max_bytes:
                break
            size = self._closed_sizes.pop(digest)
            shutil.rmtree(self.root / layer_dir_name(digest), ignore_errors=True)
            freed += size
            log.info("evicted cached layer %s (%d bytes)", digest, size)
        if usage - freed > self.max_bytes and not self._over_bound_reported:
            self._over_bound_reported = True
            log.warning(
                "span cache holds %d bytes, over its bound of %d, and every remaining layer is "
                "in use",
                usage - freed,
                self.max_bytes,
            )
        return freed
