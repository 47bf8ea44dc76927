"""Apply a layer (tar stream) to a directory the way overlayfs wants its layers.

Whiteouts become what overlayfs reads as whiteouts: `.wh.<x>` → a character device `x` 0:0,
`.wh..wh..opq` → the opaque xattr on its directory. Every path is resolved component by
component with O_NOFOLLOW relative to the target directory, so no tar entry (`..`, absolute
names, a symlink planted by an earlier entry) can write outside it. The uncompressed stream's
sha256 is returned for the diffID check.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import stat
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from snapshotter.compression.detect import Compression, iter_decompress
from snapshotter.errors import DigestMismatchError, TarFormatError
from snapshotter.soci.tarheader import parse_pax_time

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
DEFAULT_OPAQUE_XATTR = "trusted.overlay.opaque"


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


def _set_metadata(dir_fd: int, name: str, member: tarfile.TarInfo, *, is_link: bool) -> None:
    with contextlib.suppress(PermissionError):
        os.chown(name, member.uid, member.gid, dir_fd=dir_fd, follow_symlinks=False)
    if not is_link:
        os.chmod(name, member.mode & 0o7777, dir_fd=dir_fd)
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            raw = value.encode("utf-8", "surrogateescape")
            target = f"/proc/self/fd/{dir_fd}/{name}"
            try:
                os.setxattr(target, key[len("SCHILY.xattr.") :], raw, follow_symlinks=False)
            except OSError as e:
                log.warning("cannot set xattr %s on %s: %s", key, member.name, e.strerror)
    os.utime(name, ns=(_mtime_ns(member),) * 2, dir_fd=dir_fd, follow_symlinks=False)


def _mtime_ns(member: tarfile.TarInfo) -> int:
    """The exact mtime: tarfile's float loses the last digits of a PAX nanosecond time."""
    pax = member.pax_headers.get("mtime")
    if pax:
        seconds, nanos = parse_pax_time(pax)
        return seconds * 10**9 + nanos
    return int(member.mtime) * 10**9


def apply_layer(
    chunks: Iterable[bytes],
    compression: Compression,
    target: Path,
    *,
    opaque_xattr: str = DEFAULT_OPAQUE_XATTR,
    expected_diff_id: str | None = None,
) -> str:
    """Extract a layer blob's chunks into `target`; return the diffID (sha256 of the tar)."""
    target.mkdir(parents=True, exist_ok=True)
    reader = _ChunkReader(iter_decompress(compression, chunks))
    root_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    dir_mtimes: list[tuple[list[str], tarfile.TarInfo]] = []
    try:
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                for member in tar:
                    _apply_member(tar, member, root_fd, opaque_xattr, dir_mtimes)
        except tarfile.TarError as e:
            raise TarFormatError(f"layer is not a valid tar: {e}") from e
        reader.drain()
        # Directory mtimes last: creating their children changed them.
        for parts, member in reversed(dir_mtimes):
            with contextlib.suppress(FileNotFoundError):
                parent = _open_dir(root_fd, parts[:-1], create=False) if parts else os.dup(root_fd)
                try:
                    _set_metadata(parent, parts[-1] if parts else ".", member, is_link=False)
                finally:
                    os.close(parent)
    finally:
        os.close(root_fd)
    diff_id = "sha256:" + reader.hasher.hexdigest()
    if expected_diff_id is not None and diff_id != expected_diff_id:
        raise DigestMismatchError(
            f"layer diffID is {diff_id}, the image config says {expected_diff_id}"
        )
    return diff_id


def _apply_member(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    root_fd: int,
    opaque_xattr: str,
    dir_mtimes: list[tuple[list[str], tarfile.TarInfo]],
) -> None:
    parts = _split(member.name)
    if not parts:
        if member.isdir():
            dir_mtimes.append(([], member))
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
        if member.isdir():
            try:
                st = os.lstat(base, dir_fd=dfd)
                if not stat.S_ISDIR(st.st_mode):
                    _remove(dfd, base)
                    os.mkdir(base, 0o755, dir_fd=dfd)
            except FileNotFoundError:
                os.mkdir(base, 0o755, dir_fd=dfd)
            dir_mtimes.append((parts, member))
            return
        _remove(dfd, base)
        if member.isreg():
            src = tar.extractfile(member)
            fd = os.open(
                base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dfd
            )
            with os.fdopen(fd, "wb") as out:
                _copy(src, out)
        elif member.issym():
            os.symlink(member.linkname, base, dir_fd=dfd)
        elif member.islnk():
            lparts = _split(member.linkname)
            if not lparts:
                raise TarFormatError(f"hardlink {member.name!r} has an empty target")
            ldir = _open_dir(root_fd, lparts[:-1], create=False)
            try:
                os.link(lparts[-1], base, src_dir_fd=ldir, dst_dir_fd=dfd, follow_symlinks=False)
            finally:
                os.close(ldir)
            return  # a hardlink shares its target's metadata
        elif member.ischr() or member.isblk():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(base, 0o600 | kind, os.makedev(member.devmajor, member.devminor), dir_fd=dfd)
        elif member.isfifo():
            os.mkfifo(base, 0o600, dir_fd=dfd)
        else:
            raise TarFormatError(f"unsupported tar entry type {member.type!r} for {member.name!r}")
        _set_metadata(dfd, base, member, is_link=member.issym())
    finally:
        os.close(dfd)


def _copy(src: IO[bytes] | None, out: IO[bytes]) -> None:
    if src is None:
        return
    while chunk := src.read(1 << 20):
        out.write(chunk)
