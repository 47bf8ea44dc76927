"""Disk cache of layer bytes, kept across daemon restarts.

Layout under the cache root, one directory per layer digest (`sha256-<hex>`):

- `blob`: a sparse file of the layer's compressed size holding the bytes fetched so far at
  their real offsets, so a complete layer file equals the layer blob;
- `spans`: an append-only log of the span ids written, one decimal id per line, appended after
  the span's bytes were written (duplicates are harmless);
- `inflated` and `inflated-spans` (gzip layers whose handle was opened with their uncompressed
  size): the same pair for decompressed spans, at their offsets in the tar, so a span read
  again needs no inflate; each log line is `<span> <sha256 hex of its decompressed bytes>
  <key>`, the key naming the zTOC the span was inflated with (its layer id): a handle opened
  with another key (another image's index for the same layer) trusts none of those lines, so
  one zTOC's inflated bytes never serve another's reads.

Nothing is fsync'ed: a crash can leave a logged span with missing or partial bytes, which is
fine because the span manager hashes every span (against its zTOC digest, or against the
digest logged with its decompressed bytes) before it uses bytes read from here. The logs say
which spans are worth checking, never that they are good.

The byte bound is kept across layers by evicting whole layers that no handle holds open,
least recently used first (the directory's mtime is the use time, so the order survives a
restart). A layer in use is never evicted; when only such layers remain, the bound is
exceeded and reported. All methods are thread-safe: the span manager calls them from worker
threads.

The free-space reserve (`FreeSpaceReserve`) is a harder limit than the bound: before a write
would leave less than the reserve free on the cache's filesystem, unused layers are evicted,
and if that is not enough the write fails with ENOSPC (the span manager then serves the
bytes it fetched without keeping them), so the cache never fills the disk, whoever else
writes to it. `room_for` (what background fetching asks before each request) says no while
either limit is reached.
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
from snapshotter.freespace import FreeSpaceReserve

log = logging.getLogger(__name__)

BLOB_FILE: Final = "blob"
SPANS_FILE: Final = "spans"
INFLATED_FILE: Final = "inflated"
INFLATED_SPANS_FILE: Final = "inflated-spans"
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


def _allocated(*fds: int | None) -> int:
    return sum(os.fstat(fd).st_blocks * 512 for fd in fds if fd is not None)


def _dir_allocated(path: Path) -> int:
    total = 0
    for name in (BLOB_FILE, INFLATED_FILE):
        with contextlib.suppress(FileNotFoundError):
            total += (path / name).stat().st_blocks * 512
    return total


def _open_pair(path: Path, data: str, log_name: str, size: int) -> tuple[int, int]:
    """A sparse data file of `size` bytes and its append-only log (both reset on a size
    mismatch, which means a stale or foreign file)."""
    data_fd = os.open(path / data, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        log_fd = os.open(
            path / log_name, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
    except BaseException:
        os.close(data_fd)
        raise
    if os.fstat(data_fd).st_size != size:
        os.ftruncate(log_fd, 0)
        os.ftruncate(data_fd, 0)
        os.ftruncate(data_fd, size)
    return data_fd, log_fd


def _pread_exact(fd: int, start: int, end: int, digest: str) -> bytes:
    first = os.pread(fd, end - start, start)
    if len(first) == end - start:
        return first
    out = bytearray(first)
    while start + len(out) < end:
        chunk = os.pread(fd, end - start - len(out), start + len(out))
        if not chunk:
            raise OSError(errno.EIO, f"short read of cached layer {digest}")
        out += chunk
    return bytes(out)


def _pwrite_all(fd: int, start: int, view: memoryview) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], start + done)


class _LayerFiles:
    """The open files of one cached layer, shared by every handle on it."""

    def __init__(self, path: Path, digest: str, compressed_size: int) -> None:
        self.path = path
        self.digest = digest
        self.compressed_size = compressed_size
        self.refs = 0
        self.uncompressed_size: int | None = None
        self.inflated_fd: int | None = None
        self.inflated_log_fd: int | None = None
        path.mkdir(parents=True, exist_ok=True)
        self.blob_fd, self.log_fd = _open_pair(path, BLOB_FILE, SPANS_FILE, compressed_size)
        self.allocated = self.measure()

    def open_inflated(self, uncompressed_size: int) -> None:
        """Open (or create) the store of decompressed spans."""
        self.inflated_fd, self.inflated_log_fd = _open_pair(
            self.path, INFLATED_FILE, INFLATED_SPANS_FILE, uncompressed_size
        )
        self.uncompressed_size = uncompressed_size

    def measure(self) -> int:
        """Allocated bytes of the data files."""
        return _allocated(self.blob_fd, self.inflated_fd)

    def close(self) -> None:
        for fd in (self.blob_fd, self.log_fd, self.inflated_fd, self.inflated_log_fd):
            if fd is not None:
                os.close(fd)


class LayerCache:
    """A handle on one layer's cached bytes; `close()` it when the layer is unmounted."""

    def __init__(self, owner: DiskCache, files: _LayerFiles, inflated_key: str = "") -> None:
        self._owner = owner
        self._files = files
        self._closed = False
        self._key = inflated_key.encode()

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
        return _pread_exact(self._files.blob_fd, start, end, self.digest)

    def write(self, start: int, data: bytes | bytearray | memoryview) -> None:
        """Store bytes at their offset in the blob (does not log any span)."""
        self._check_open()
        view = memoryview(data).cast("B")
        if not 0 <= start <= start + len(view) <= self._files.compressed_size:
            raise ValueError(f"write [{start}, {start + len(view)}) outside the layer")
        self._owner._make_room(len(view))
        _pwrite_all(self._files.blob_fd, start, view)
        self._owner._grown(self._files)

    @property
    def keeps_inflated(self) -> bool:
        """Whether this layer has a store of decompressed spans."""
        return self._files.inflated_fd is not None

    def inflated_spans(self) -> dict[int, str]:
        """Logged decompressed spans and the sha256 hex of their bytes (check before use)."""
        self._check_open()
        fd = self._files.inflated_log_fd
        if fd is None:
            return {}
        spans: dict[int, str] = {}
        for line in os.pread(fd, os.fstat(fd).st_size, 0).split(b"\n"):
            span, _, rest = line.partition(b" ")
            digest, _, key = rest.partition(b" ")
            if key != self._key:
                continue  # inflated with another zTOC (or a torn line)
            # A torn last line fails one of these checks and is skipped.
            if len(digest) == 64 and span.isdigit():
                with contextlib.suppress(ValueError):
                    int(digest, 16)
                    spans[int(span)] = digest.decode()
        return spans

    def read_inflated(self, start: int, end: int) -> bytes:
        """Decompressed bytes [start, end) of the layer's tar, as stored."""
        self._check_open()
        fd, size = self._files.inflated_fd, self._files.uncompressed_size
        if fd is None or size is None:
            raise ValueError("this layer keeps no decompressed spans")
        if not 0 <= start <= end <= size:
            raise ValueError(f"range [{start}, {end}) outside the layer's tar")
        return _pread_exact(fd, start, end, self.digest)

    def write_inflated(self, span: int, start: int, data: bytes, digest: str) -> None:
        """Store a decompressed span at its tar offset, then log it with its sha256 hex."""
        self._check_open()
        fd, log_fd, size = (
            self._files.inflated_fd,
            self._files.inflated_log_fd,
            self._files.uncompressed_size,
        )
        if fd is None or log_fd is None or size is None:
            raise ValueError("this layer keeps no decompressed spans")
        if not 0 <= start <= start + len(data) <= size:
            raise ValueError(f"write [{start}, {start + len(data)}) outside the layer's tar")
        self._owner._make_room(len(data))
        _pwrite_all(fd, start, memoryview(data))
        key = f" {self._key.decode()}" if self._key else ""
        os.write(log_fd, f"{span} {digest}{key}\n".encode())
        self._owner._grown(self._files)

    def fits(self, nbytes: int) -> bool:
        """Whether `nbytes` more fit under the cache bound and the free-space reserve as they
        are (nothing is evicted)."""
        return self._owner.room_for(nbytes)

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
        if files.inflated_fd is not None and files.inflated_log_fd is not None:
            os.ftruncate(files.inflated_log_fd, 0)
            os.ftruncate(files.inflated_fd, 0)
            os.ftruncate(files.inflated_fd, files.uncompressed_size or 0)
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
    """Every cached layer under `root`, bounded by `max_bytes` of allocated space and by the
    free space `reserve` keeps on root's filesystem."""

    def __init__(
        self, root: Path, max_bytes: int, *, reserve: FreeSpaceReserve | None = None
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"negative cache bound {max_bytes}")
        self.root = root
        self.max_bytes = max_bytes
        self.reserve = reserve or FreeSpaceReserve()
        self._low_on_space = False
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
            self._closed_sizes[digest] = _dir_allocated(entry)

    def open_layer(
        self,
        digest: str,
        compressed_size: int,
        *,
        uncompressed_size: int | None = None,
        inflated_key: str = "",
    ) -> LayerCache:
        """A handle on the layer's cache (created empty if absent); with `uncompressed_size`,
        the layer also keeps decompressed spans, those the handle logs and trusts being the
        ones of `inflated_key` (the zTOC they are inflated with: no spaces)."""
        if " " in inflated_key or "\n" in inflated_key:
            raise FormatError(f"invalid inflated-span key {inflated_key[:80]!r}")
        if compressed_size < 0 or (uncompressed_size or 0) < 0:
            raise FormatError(f"negative layer size {compressed_size}/{uncompressed_size}")
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
            if uncompressed_size is not None and files.uncompressed_size != uncompressed_size:
                if files.uncompressed_size is not None:
                    raise FormatError(
                        f"layer {digest} is open with tar size {files.uncompressed_size}, "
                        f"not {uncompressed_size}"
                    )
                files.open_inflated(uncompressed_size)
                files.allocated = files.measure()
            files.refs += 1
            os.utime(path)
            self._evict_locked()
        return LayerCache(self, files, inflated_key)

    def usage(self) -> int:
        """Allocated bytes of every cached layer."""
        with self._lock:
            return self._usage_locked()

    def cached_layers(self) -> list[str]:
        """Digests of every layer with a cache directory."""
        with self._lock:
            return sorted([*self._open, *self._closed_sizes])

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

    def room_for(self, nbytes: int) -> bool:
        """Whether `nbytes` more fit under the bound and above the free-space reserve, as the
        cache is (nothing is evicted)."""
        with self._lock:
            if self._usage_locked() + nbytes > self.max_bytes:
                return False
            return self._space_ok_locked(self._room_locked(nbytes))

    def _room_locked(self, nbytes: int) -> int:
        try:
            return self.reserve.room(self.root, nbytes)
        except OSError:
            return 0

    def _space_ok_locked(self, room: int) -> bool:
        """Whether `room` (see FreeSpaceReserve.room) is enough; logs each change."""
        low = room < 0
        if low != self._low_on_space:
            self._low_on_space = low
            if low:
                log.warning(
                    "span cache: the filesystem of %s is down to its free-space reserve of %d "
                    "bytes; the cache stops growing (it holds %d bytes)",
                    self.root,
                    self.reserve.bytes_on(self.root),
                    self._usage_locked(),
                )
            else:
                log.info("span cache: free space above the reserve again under %s", self.root)
        return not low

    def _make_room(self, nbytes: int) -> None:
        """Evict unused layers until `nbytes` can be written above the free-space reserve;
        OSError(ENOSPC) when even that is not enough (layers in use are never evicted)."""
        with self._lock:
            room = self._room_locked(nbytes)
            if room >= 0:
                self._space_ok_locked(room)
                return
            self._evict_locked(need_space=nbytes)
            room = self._room_locked(nbytes)
            if self._space_ok_locked(room):
                return
        raise OSError(
            errno.ENOSPC,
            f"the span cache keeps {self.reserve.bytes_on(self.root)} bytes free on the "
            f"filesystem of {self.root} and has no unused layer left to evict",
        )

    def _grown(self, files: _LayerFiles) -> None:
        allocated = files.measure()
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
            files.allocated = files.measure()
            files.close()
            self._closed_sizes[files.digest] = files.allocated
            with contextlib.suppress(FileNotFoundError):
                os.utime(files.path)
            self._evict_locked()

    def _evict_locked(self, *, need_space: int | None = None) -> int:
        """Evict unused layers, least recently used first, while the cache is over its bound
        (or, with `need_space`, while that many bytes would eat into the free-space reserve)."""
        usage = self._usage_locked()

        def enough(freed: int) -> bool:
            if usage - freed > self.max_bytes:
                return False
            return need_space is None or self._room_locked(need_space) >= 0

        if enough(0):
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
            if enough(freed):
                break
            size = self._closed_sizes.pop(digest)
            shutil.rmtree(self.root / layer_dir_name(digest), ignore_errors=True)
            freed += size
            log.info(
                "evicted cached layer %s (%d bytes)%s",
                digest,
                size,
                "" if need_space is None else " for the free-space reserve",
            )
        if usage - freed > self.max_bytes and not self._over_bound_reported:
            self._over_bound_reported = True
            log.warning(
                "span cache holds %d bytes, over its bound of %d, and every remaining layer is "
                "in use",
                usage - freed,
                self.max_bytes,
            )
        return freed
