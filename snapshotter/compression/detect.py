"""Which compression a layer uses (media type or magic bytes), and whole-stream decompression."""

from __future__ import annotations

import enum
import zlib
from collections.abc import Iterable, Iterator
from typing import Final

import zstandard

from snapshotter.errors import CompressionError

GZIP_MAGIC: Final = b"\x1f\x8b"
ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"


class Compression(enum.Enum):
    """Compression of a layer blob."""

    GZIP = "gzip"
    ZSTD = "zstd"
    UNCOMPRESSED = "uncompressed"


_MEDIA_TYPES: Final = {
    "application/vnd.oci.image.layer.v1.tar": Compression.UNCOMPRESSED,
    "application/vnd.oci.image.layer.v1.tar+gzip": Compression.GZIP,
    "application/vnd.oci.image.layer.v1.tar+zstd": Compression.ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar": Compression.UNCOMPRESSED,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": Compression.GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": Compression.ZSTD,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": Compression.GZIP,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": Compression.GZIP,
}


def detect_compression(prefix: bytes | bytearray | memoryview) -> Compression:
    """Compression from the first bytes of a blob (anything unrecognised is uncompressed)."""
    head = bytes(prefix[:4])
    if head.startswith(GZIP_MAGIC):
        return Compression.GZIP
    if head == ZSTD_MAGIC:
        return Compression.ZSTD
    return Compression.UNCOMPRESSED


def compression_from_media_type(media_type: str) -> Compression | None:
    """Compression of an OCI/Docker layer media type; None when the type is not a layer."""
    return _MEDIA_TYPES.get(media_type.split(";", 1)[0].strip())


def iter_decompress(
    compression: Compression, chunks: Iterable[bytes | bytearray | memoryview]
) -> Iterator[bytes]:
    """Decompress a whole layer stream chunk by chunk (multi-member gzip, multi-frame zstd)."""
    if compression is Compression.UNCOMPRESSED:
        for chunk in chunks:
            if chunk:
                yield bytes(chunk)
    elif compression is Compression.GZIP:
        yield from _iter_gunzip(chunks)
    elif compression is Compression.ZSTD:
        yield from _iter_unzstd(chunks)
    else:
        raise CompressionError(f"unsupported compression {compression!r}")


_OUT_LIMIT: Final = 1 << 20


def _iter_gunzip(chunks: Iterable[bytes | bytearray | memoryview]) -> Iterator[bytes]:
    d = zlib.decompressobj(31)
    started = False
    padding = False
    for chunk in chunks:
        data = bytes(chunk)
        while data:
            if padding:
                if data.lstrip(b"\x00"):
                    raise CompressionError("trailing garbage after the gzip zero padding")
                break
            if d.eof:
                if data[0] == GZIP_MAGIC[0]:
                    d = zlib.decompressobj(31)
                elif data[0] == 0:
                    padding = True
                    continue
                else:
                    raise CompressionError("trailing garbage after the last gzip member")
            started = True
            try:
                out = d.decompress(data, _OUT_LIMIT)
                yield out
                while d.unconsumed_tail:
                    out = d.decompress(d.unconsumed_tail, _OUT_LIMIT)
                    yield out
            except zlib.error as exc:
                raise CompressionError(f"corrupt gzip data: {exc}") from None
            data = d.unused_data
    if not started:
        raise CompressionError("empty gzip stream")
    if not d.eof and not padding:
        raise CompressionError("gzip stream truncated")


def _iter_unzstd(chunks: Iterable[bytes | bytearray | memoryview]) -> Iterator[bytes]:
    dctx = zstandard.ZstdDecompressor()
    d = dctx.decompressobj()
    in_frame = False
    started = False
    for chunk in chunks:
        data = bytes(chunk)
        while data:
            if d.eof:
                d = dctx.decompressobj()
            started = in_frame = True
            try:
                out = d.decompress(data)
            except zstandard.ZstdError as exc:
                raise CompressionError(f"corrupt zstd data: {exc}") from None
            if out:
                yield out
            if d.eof:
                in_frame = False
                data = d.unused_data
            else:
                data = b""
    if not started:
        raise CompressionError("empty zstd stream")
    if in_frame:
        raise CompressionError("zstd stream truncated")
