"""Apply a layer (tar stream) to a directory the way overlayfs wants its layers.

Whiteouts become what overlayfs reads as whiteouts: `.wh.<x>` → a character device `x` 0:0,
`.wh..wh..opq` → the opaque xattr on its directory. Every path is resolved component by
component with O_NOFOLLOW relative to the target directory, so no tar entry (`..`, absolute
names, a symlink planted by an earlier entry) can write outside it; a hardlink must name a
file an earlier entry of the same layer made. The uncompressed stream's sha256 is returned
for the diffID check.

Resources: the tar is read as a stream (`tarstream`), one entry at a time; the directory
mtimes that must be set last go to a scratch file, not to memory, so memory does not grow
with the number of entries. Sparse files are written as holes (seek over them, truncate to
the real size). What the layer may take on disk is a `WriteBudget`: bytes of file data
allocated, plus a tar block per other entry, at most its `limit`, and the filesystem's free
space never below its reserve; past either, a ResourceLimitError names the layer's entry.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import stat
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Final

from snapshotter.compression.detect import Compression, iter_decompress
from snapshotter.content.tarstream import TarEntry, TarReader
from snapshotter.errors import DigestMismatchError, ResourceLimitError, TarFormatError
from snapshotter.freespace import FreeSpaceReserve

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
DEFAULT_OPAQUE_XATTR = "trusted.overlay.opaque"
ENTRY_COST: Final = 512
"""What an entry that is not a regular file counts against the budget: its tar header's size
(an inode and a directory entry, at least)."""
_COPY_CHUNK: Final = 1 << 20
_SPACE_CHECK_BYTES: Final = 16 << 20
"""Free space is looked at again after this many bytes (and at each file's end)."""


@dataclass(frozen=True)
class UnpackBounds:
    """What a locally unpacked layer may take: at most `max_expansion_ratio` times its
    compressed size on disk, but never less than `expansion_floor_bytes` (ratio 0: no bound),
    and never past the free-space `reserve`."""

    max_expansion_ratio: int = 0
    expansion_floor_bytes: int = 0
    reserve: FreeSpaceReserve = field(default_factory=FreeSpaceReserve)

    def budget(self, compressed_size: int, what: str) -> WriteBudget:
        """The budget of one layer of `compressed_size` bytes."""
        limit = None
        if self.max_expansion_ratio:
            limit = max(self.expansion_floor_bytes, self.max_expansion_ratio * compressed_size)
        return WriteBudget(limit, self.reserve, what=what)


class WriteBudget:
    """What one layer's unpack may write: `limit` bytes (None: no bound) and never past the
    free-space `reserve` of `target`'s filesystem."""

    def __init__(
        self,
        limit: int | None = None,
        reserve: FreeSpaceReserve | None = None,
        *,
        what: str = "the layer",
    ) -> None:
        self.limit = limit
        self.reserve = reserve or FreeSpaceReserve()
        self.what = what
        self.used = 0
        self._unchecked = 0
        self.target: Path | None = None

    def charge(self, nbytes: int, entry: str) -> None:
        """Count `nbytes` more for `entry`; ResourceLimitError past the limit or the reserve."""
        self.used += nbytes
        self._unchecked += nbytes
        if self.limit is not None and self.used > self.limit:
            raise ResourceLimitError(
                f"{self.what} expands to more than its bound of {self.limit} bytes on disk "
                f"(reached at tar entry {entry!r}); a bomb, or raise [unpack] "
                "max_expansion_ratio / expansion_floor_bytes"
            )
        if self._unchecked >= _SPACE_CHECK_BYTES:
            self.check_space(entry)

    def check_space(self, entry: str, more: int = 0) -> None:
        """ResourceLimitError when `more` bytes would eat into the free-space reserve."""
        self._unchecked = 0
        if self.target is None:
            return
        try:
            room = self.reserve.room(self.target, more)
        except OSError:
            return
        if room < 0:
            raise ResourceLimitError(
                f"unpacking {self.what} stopped at tar entry {entry!r}: the filesystem of "
                f"{self.target} is down to its free-space reserve of "
                f"{self.reserve.bytes_on(self.target)} bytes ([cache] min_free_bytes / "
                "min_free_percent)"
            )


class _ChunkReader:
    """A file-like view of decompressed chunks that hashes what passes through."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""
        self._pos = 0
        self.hasher = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        parts = []
        while n != 0:
            if self._pos == len(self._buf):
                try:
                    self._buf = next(self._chunks)
                except StopIteration:
                    break
                self._pos = 0
                self.hasher.update(self._buf)
                continue
            take = len(self._buf) - self._pos if n < 0 else min(n, len(self._buf) - self._pos)
            parts.append(self._buf[self._pos : self._pos + take])
            self._pos += take
            if n > 0:
                n -= take
        return b"".join(parts)

    def drain(self) -> None:
        """Consume (and hash) the rest of the stream: the diffID covers every byte."""
        for chunk in self._chunks:
            self.hasher.update(chunk)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _split(name: str) -> list[str]:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise TarFormatError(f"tar entry {name!r} escapes the layer root")
    return parts


def _open_dir(root_fd: int, parts: list[str], *, create: bool) -> int:
    """An fd for the directory at `parts` under root_fd, never following symlinks."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            try:
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    # A non-directory (maybe a symlink) where a directory is needed: replace it,
                    # as tar does, instead of following it.
                    if not create:
                        raise
                    _remove(fd, part)
                    os.mkdir(part, 0o755, dir_fd=fd)
                    nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                else:
                    raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def _remove(dir_fd: int, name: str) -> None:
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
        try:
            for child in os.listdir(sub):
                _remove(sub, child)
        finally:
            os.close(sub)
        os.rmdir(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _set_metadata(dir_fd: int, name: str, entry: TarEntry, *, is_link: bool) -> None:
    with contextlib.suppress(PermissionError):
        os.chown(name, entry.uid, entry.gid, dir_fd=dir_fd, follow_symlinks=False)
    if not is_link:
        os.chmod(name, entry.mode & 0o7777, dir_fd=dir_fd)
    for key, raw in entry.xattrs.items():
        target = f"/proc/self/fd/{dir_fd}/{name}"
        try:
            os.setxattr(target, key, raw, follow_symlinks=False)
        except OSError as e:
            log.warning("cannot set xattr %s on %s: %s", key, entry.name, e.strerror)
    _set_mtime(dir_fd, name, entry.mtime_ns)


def _set_mtime(dir_fd: int, name: str, mtime_ns: int) -> None:
    os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=dir_fd, follow_symlinks=False)


_DIR_RECORD = struct.Struct("<qI")


class _DirTimes:
    """Directory mtimes to set once everything is extracted, spilled to a scratch file."""

    def __init__(self, scratch_dir: Path) -> None:
        self._file: BinaryIO = tempfile.TemporaryFile(  # noqa: SIM115 (closed by close())
            dir=scratch_dir, prefix=".dirtimes-"
        )

    def add(self, parts: list[str], mtime_ns: int) -> None:
        path = "/".join(parts).encode("utf-8", "surrogateescape")
        self._file.write(_DIR_RECORD.pack(mtime_ns, len(path)) + path)

    def replay(self) -> Iterator[tuple[list[str], int]]:
        self._file.flush()
        self._file.seek(0)
        while head := self._file.read(_DIR_RECORD.size):
            mtime_ns, size = _DIR_RECORD.unpack(head)
            path = self._file.read(size).decode("utf-8", "surrogateescape")
            yield (path.split("/") if path else []), mtime_ns

    def close(self) -> None:
        self._file.close()


def apply_layer(
    chunks: Iterable[bytes],
    compression: Compression,
    target: Path,
    *,
    opaque_xattr: str = DEFAULT_OPAQUE_XATTR,
    expected_diff_id: str | None = None,
    budget: WriteBudget | None = None,
) -> str:
    """Extract a layer blob's chunks into `target`; return the diffID (sha256 of the tar).

    Bad tar input is a TarFormatError; more than `budget` allows (or a full disk) is a
    ResourceLimitError. Either way `target` may hold part of the layer: the caller unpacks
    into a scratch directory and discards it."""
    budget = budget or WriteBudget()
    target.mkdir(parents=True, exist_ok=True)
    budget.target = target
    budget.check_space("(start)")
    reader = _ChunkReader(iter_decompress(compression, chunks))
    root_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    dir_times = _DirTimes(target.parent)
    try:
        try:
            tar = TarReader(reader.read)
            for entry in tar:
                _apply_entry(tar, entry, root_fd, opaque_xattr, dir_times, budget)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceLimitError(
                    f"unpacking {budget.what}: the filesystem of {target} is full: {e}"
                ) from e
            raise
        reader.drain()
        # Directory mtimes last: creating their children changed them. In tar order, so a
        # directory listed twice gets its last entry's time, as GNU tar gives it.
        for parts, mtime_ns in dir_times.replay():
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                parent = _open_dir(root_fd, parts[:-1], create=False) if parts else os.dup(root_fd)
                try:
                    _set_mtime(parent, parts[-1] if parts else ".", mtime_ns)
                finally:
                    os.close(parent)
    finally:
        dir_times.close()
        os.close(root_fd)
    diff_id = "sha256:" + reader.hasher.hexdigest()
    if expected_diff_id is not None and diff_id != expected_diff_id:
        raise DigestMismatchError(
            f"layer diffID is {diff_id}, the image config says {expected_diff_id}"
        )
    return diff_id


def _apply_entry(
    tar: TarReader,
    entry: TarEntry,
    root_fd: int,
    opaque_xattr: str,
    dir_times: _DirTimes,
    budget: WriteBudget,
) -> None:
    parts = _split(entry.name)
    if entry.kind != "reg":
        budget.charge(ENTRY_COST, entry.name)
    if not parts:
        if entry.kind == "dir":
            _set_metadata(root_fd, ".", entry, is_link=False)
            dir_times.add([], entry.mtime_ns)
        return
    *parents, base = parts
    dfd = _open_dir(root_fd, parents, create=True)
    try:
        if base == OPAQUE_MARKER:
            os.setxattr(f"/proc/self/fd/{dfd}", opaque_xattr, b"y")
            return
        if base.startswith(WHITEOUT_PREFIX):
            name = base[len(WHITEOUT_PREFIX) :]
            _remove(dfd, name)
            os.mknod(name, 0o600 | stat.S_IFCHR, os.makedev(0, 0), dir_fd=dfd)
            return
        if entry.kind == "dir":
            try:
                st = os.lstat(base, dir_fd=dfd)
                if not stat.S_ISDIR(st.st_mode):
                    _remove(dfd, base)
                    os.mkdir(base, 0o700, dir_fd=dfd)
            except FileNotFoundError:
                os.mkdir(base, 0o700, dir_fd=dfd)
            _set_metadata(dfd, base, entry, is_link=False)
            dir_times.add(parts, entry.mtime_ns)
            return
        _remove(dfd, base)
        if entry.kind == "reg":
            _write_file(tar, dfd, base, entry, budget)
        elif entry.kind == "symlink":
            os.symlink(entry.linkname, base, dir_fd=dfd)
        elif entry.kind == "hardlink":
            _link(root_fd, dfd, base, entry)
            return  # a hardlink shares its target's metadata
        elif entry.kind in ("char", "block"):
            kind = stat.S_IFCHR if entry.kind == "char" else stat.S_IFBLK
            os.mknod(base, 0o600 | kind, os.makedev(entry.devmajor, entry.devminor), dir_fd=dfd)
        else:  # fifo
            os.mkfifo(base, 0o600, dir_fd=dfd)
        _set_metadata(dfd, base, entry, is_link=entry.kind == "symlink")
    finally:
        os.close(dfd)


def _write_file(tar: TarReader, dfd: int, base: str, entry: TarEntry, budget: WriteBudget) -> None:
    """The file's data, its holes left unwritten; charged to the budget as written."""
    fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dfd)
    try:
        regions = entry.sparse if entry.sparse is not None else [(0, entry.size)]
        written = 0
        for offset, length in regions:
            if entry.sparse is not None:
                os.lseek(fd, offset, os.SEEK_SET)
            left = length
            while left:
                chunk = tar.read_data(min(left, _COPY_CHUNK))
                if not chunk:
                    raise TarFormatError(f"tar entry {entry.name!r}: data ends early")
                budget.charge(len(chunk), entry.name)
                _write_all(fd, chunk)
                written += len(chunk)
                left -= len(chunk)
        if entry.sparse is not None:
            try:
                os.ftruncate(fd, entry.size)
            except OSError as e:
                if e.errno not in (errno.EFBIG, errno.EINVAL):
                    raise
                raise TarFormatError(
                    f"sparse file {entry.name!r} claims {entry.size} bytes, more than the "
                    "filesystem holds in one file"
                ) from None
        # Blocks, not bytes, are what the disk gives: charge the rounding (and a data region
        # of one byte in every block of a huge sparse file) too.
        allocated = os.fstat(fd).st_blocks * 512
        if allocated > written:
            budget.charge(allocated - written, entry.name)
        budget.check_space(entry.name)
    finally:
        os.close(fd)


def _link(root_fd: int, dfd: int, base: str, entry: TarEntry) -> None:
    """A hardlink to a file an earlier entry of this layer made; TarFormatError otherwise."""
    target = entry.linkname
    lparts = _split(target)
    if not lparts:
        raise TarFormatError(f"hardlink {entry.name!r} has an empty target")
    try:
        ldir = _open_dir(root_fd, lparts[:-1], create=False)
    except OSError as e:
        raise _bad_link(entry, e) from None
    try:
        os.link(lparts[-1], base, src_dir_fd=ldir, dst_dir_fd=dfd, follow_symlinks=False)
    except OSError as e:
        raise _bad_link(entry, e) from None
    finally:
        os.close(ldir)


def _bad_link(entry: TarEntry, e: OSError) -> TarFormatError:
    why = {
        errno.ENOENT: "no earlier entry of this layer has that path",
        errno.ELOOP: "its path goes through a symlink",
        errno.ENOTDIR: "its path goes through something that is not a directory",
        errno.EPERM: "it is a directory",
    }.get(e.errno or 0, e.strerror or str(e))
    return TarFormatError(
        f"hardlink {entry.name!r} -> {entry.linkname!r} refused: a hardlink must name a file "
        f"of the same layer, and {why} (tar entry at offset {entry.offset})"
    )
