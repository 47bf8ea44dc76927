"""gzip random access: build checkpoints in one streaming pass, inflate spans from them."""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterator
from typing import Any, Final

from snapshotter.compression import isal
from snapshotter.compression.layer_index import LayerIndexResult
from snapshotter.compression.zlib import (
    DATA_TYPE_BITS_MASK,
    DATA_TYPE_BLOCK_END,
    DATA_TYPE_LAST_BLOCK,
    WBITS_AUTO,
    WBITS_GZIP,
    WBITS_RAW,
    Z_BLOCK,
    Z_BUF_ERROR,
    Z_NO_FLUSH,
    Z_STREAM_END,
    Inflater,
)
from snapshotter.errors import CheckpointError, CompressionError, ZtocMismatchError
from snapshotter.soci.zinfo import (
    CHECKPOINT_SIZE,
    HEADER_SIZE,
    WINDOW_SIZE,
    GzipZinfo,
)
from snapshotter.soci.ztoc import CompressionAlgorithm

GZIP_MAGIC: Final = b"\x1f\x8b"
GZIP_TRAILER_SIZE: Final = 8
_OUT_CHUNK: Final = 256 * 1024
MAX_DEFLATE_RATIO: Final = 1032
"""Deflate's best case: one 258-byte match per 2 bits of input."""

_IN_MEMBER: Final = 0
_BETWEEN_MEMBERS: Final = 1
_IN_PADDING: Final = 2


def _sha256_digest(h: hashlib._Hash) -> str:
    return "sha256:" + h.hexdigest()


class GzipCheckpointer:
    """Streaming zTOC checkpoint builder for a gzip layer (one or more members).

    Push compressed chunks with `feed()` and exhaust each returned iterator: it yields the
    uncompressed output as it is produced (views into an internal buffer, valid until the
    next item). `finish()` returns the checkpoint blob and the span digests.

    After the last member, trailing zero bytes are accepted (they belong to the last span);
    any other trailing data that is not a further gzip member is an error.
    """

    def __init__(self, span_size: int) -> None:
        if span_size <= 0:
            raise ValueError(f"span size must be positive, got {span_size}")
        self._span_size = span_size
        self._inflater = Inflater(WBITS_AUTO)
        # [0, WINDOW_SIZE) always holds the 32 KiB before the write position (zeros at first).
        self._buf = bytearray(WINDOW_SIZE + _OUT_CHUNK)
        self._view = memoryview(self._buf)
        self._pos = WINDOW_SIZE
        self._state = _IN_MEMBER
        self._fed = 0
        self._total_in = 0
        self._total_out = 0
        self._last_out = 0
        self._last_byte = 0
        self._checkpoints: list[bytes] = []
        self._digests: list[str] = []
        self._hasher: hashlib._Hash | None = None
        self._hashed_to = 0
        self._finished = False

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[memoryview]:
        """Consume one chunk of the compressed layer; the iterator MUST be exhausted."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if self._fed != self._total_in:
            raise RuntimeError("the previous feed() iterator was not exhausted")
        mv = memoryview(data).cast("B")
        self._fed += len(mv)
        return self._process(mv)

    def _process(self, data: memoryview) -> Iterator[memoryview]:
        inflater = self._inflater
        buf = self._buf
        view = self._view
        span_size = self._span_size
        buf_size = len(buf)
        n = len(data)
        base = self._total_in
        pos = 0
        stalls = 0
        try:
            while pos < n:
                if self._state != _IN_MEMBER:
                    pos = self._between_members(data, pos, base)
                    continue
                out_pos = self._pos
                if out_pos == buf_size:
                    buf[:WINDOW_SIZE] = view[buf_size - WINDOW_SIZE :]
                    out_pos = WINDOW_SIZE
                ret, consumed, produced, data_type = inflater.inflate(
                    data, buf, Z_BLOCK, in_pos=pos, out_pos=out_pos
                )
                pos += consumed
                if produced:
                    self._pos = out_pos + produced
                    self._total_out += produced
                    yield view[out_pos : out_pos + produced]
                if ret == Z_STREAM_END:
                    self._state = _BETWEEN_MEMBERS
                    continue
                if ret == Z_BUF_ERROR or (consumed == 0 and produced == 0):
                    stalls += 1
                    if stalls > 1:
                        raise CompressionError(f"inflate stalled at offset {base + pos}")
                else:
                    stalls = 0
                if data_type & DATA_TYPE_BLOCK_END and not data_type & DATA_TYPE_LAST_BLOCK:
                    totout = self._total_out
                    if not self._checkpoints or totout - self._last_out > span_size:
                        self._add_checkpoint(data, base, base + pos, data_type)
            if n:
                if self._hasher is not None:
                    self._hasher.update(data[self._hashed_to - base :])
                    self._hashed_to = base + n
                self._last_byte = data[n - 1]
                self._total_in = base + n
        finally:
            # Let the caller reuse or resize its buffer.
            inflater.release_buffers()

    def _between_members(self, data: memoryview, pos: int, base: int) -> int:
        if self._state == _BETWEEN_MEMBERS:
            first = data[pos]
            if first == GZIP_MAGIC[0]:
                self._inflater.reset(WBITS_GZIP)
                self._state = _IN_MEMBER
                return pos
            if first != 0:
                raise CompressionError(
                    f"trailing garbage after the last gzip member at offset {base + pos}"
                )
            self._state = _IN_PADDING
        if bytes(data[pos:]).lstrip(b"\x00"):
            raise CompressionError(
                f"trailing garbage after the zero padding at offset {base + pos}"
            )
        return len(data)

    def _add_checkpoint(self, data: memoryview, base: int, abs_in: int, data_type: int) -> None:
        bits = data_type & DATA_TYPE_BITS_MASK
        totout = self._total_out
        window = self._view[self._pos - WINDOW_SIZE : self._pos]
        self._checkpoints.append(
            abs_in.to_bytes(8, "little", signed=True)
            + totout.to_bytes(8, "little", signed=True)
            + bytes((bits,))
            + window
        )
        self._last_out = totout
        if self._hasher is not None:
            self._hasher.update(data[self._hashed_to - base : abs_in - base])
            self._digests.append(_sha256_digest(self._hasher))
        hasher = hashlib.sha256()
        if bits:
            local = abs_in - 1 - base
            hasher.update(bytes((data[local] if local >= 0 else self._last_byte,)))
        self._hasher = hasher
        self._hashed_to = abs_in

    def finish(self) -> LayerIndexResult:
        """End of the layer: validate it ended cleanly and return the index."""
        if self._finished:
            raise RuntimeError("finish() called twice")
        if self._fed != self._total_in:
            raise RuntimeError("a feed() iterator was not exhausted")
        self._finished = True
        self._inflater.close()
        if self._state == _IN_MEMBER:
            if self._total_in == 0:
                raise CompressionError("empty gzip stream")
            raise CompressionError(
                f"gzip stream truncated after {self._total_in} bytes (member not ended)"
            )
        if self._hasher is None or not self._checkpoints:
            raise CompressionError("gzip stream has no deflate data")
        self._digests.append(_sha256_digest(self._hasher))
        count = len(self._checkpoints)
        header = count.to_bytes(4, "little", signed=True) + self._span_size.to_bytes(
            8, "little", signed=True
        )
        blob = b"".join([header, *self._checkpoints])
        assert len(blob) == HEADER_SIZE + count * CHECKPOINT_SIZE
        self._checkpoints.clear()
        return LayerIndexResult(
            algorithm=CompressionAlgorithm.GZIP,
            zinfo_blob=blob,
            span_digests=self._digests,
            compressed_size=self._total_in,
            uncompressed_size=self._total_out,
            span_size=self._span_size,
        )


def inflate_spans(
    zinfo: GzipZinfo, first: int, last: int, compressed: bytes | bytearray | memoryview
) -> bytes:
    """Inflate spans first..last (inclusive) from exactly their compressed bytes."""
    if first > last:
        raise CheckpointError(f"empty span range {first}..{last}")
    c_start = zinfo.compressed_bounds(first)[0]
    c_end = zinfo.compressed_bounds(last)[1]
    u_start = zinfo.uncompressed_bounds(first)[0]
    u_end = zinfo.uncompressed_bounds(last)[1]
    if len(compressed) != c_end - c_start:
        raise CompressionError(
            f"spans {first}..{last} need {c_end - c_start} compressed bytes, got {len(compressed)}"
        )
    want = u_end - u_start
    if want == 0:
        return b""
    # Bound the allocation by what the given bytes could possibly inflate to.
    if want > MAX_DEFLATE_RATIO * len(compressed) + WINDOW_SIZE:
        raise CompressionError(
            f"spans {first}..{last}: {want} bytes cannot come from {len(compressed)} "
            "compressed bytes"
        )
    src = memoryview(compressed).cast("B")
    if isal.available():
        fast = isal.inflate_run(zinfo.window(first), zinfo.bits(first), src, want)
        if fast is not None:
            return bytes(fast)
    out = bytearray(want)
    n = len(src)
    with Inflater(WBITS_RAW) as inflater:
        pos = 0
        bits = zinfo.bits(first)
        if bits:
            if n == 0:
                raise CompressionError(f"span {first}: no compressed bytes")
            inflater.prime(bits, src[0] >> (8 - bits))
            pos = 1
        inflater.set_dictionary(zinfo.window(first))
        done = 0
        raw = True
        while True:
            ret, consumed, produced, _ = inflater.inflate(
                src, out, Z_NO_FLUSH, in_pos=pos, out_pos=done
            )
            pos += consumed
            done += produced
            if done == want:
                break
            if ret == Z_STREAM_END:
                # The spans continue in the next gzip member. Only the first (raw) stream
                # leaves its trailer to us; gzip-mode streams consume their own.
                if raw:
                    pos += GZIP_TRAILER_SIZE
                    raw = False
                if pos >= n:
                    raise CompressionError(
                        f"spans {first}..{last}: gzip member ended after {done} of {want} bytes"
                    )
                inflater.reset(WBITS_GZIP)
                continue
            if pos >= n or (consumed == 0 and produced == 0):
                raise CompressionError(
                    f"spans {first}..{last}: compressed data ended after {done} of {want} bytes"
                )
    return bytes(out)


def inflate_span(zinfo: GzipZinfo, span: int, compressed: bytes | bytearray | memoryview) -> bytes:
    """Inflate one span from exactly its compressed bytes."""
    return inflate_spans(zinfo, span, span, compressed)


def _window_mismatch(zinfo: GzipZinfo, checkpoint: int, before: bytes | memoryview) -> bool:
    """Whether checkpoint `checkpoint`'s window differs from `before`, the layer's
    uncompressed bytes just before its offset (its last ≤ 32 KiB; shorter only at the start
    of the layer, where deflate cannot reach further back)."""
    k = len(before)
    return zinfo.window(checkpoint)[WINDOW_SIZE - k :] != before


def check_windows(
    zinfo: GzipZinfo, first: int, last: int, plain: bytes | bytearray | memoryview
) -> None:
    """Prove the windows of checkpoints first+1..last+1 against `plain`, spans first..last
    inflated from checkpoint `first`: each must be the 32 KiB of output before its offset.

    A window feeds only the inflate that starts at its checkpoint, so nothing else notices a
    wrong one (span digests cover compressed bytes). ZtocMismatchError when one differs.
    Checkpoint `first`'s own window is proven by whichever run ends at it (the background
    pass runs through them all, see `LayerVerifier`)."""
    view = memoryview(plain).cast("B")
    u_base = zinfo.uncompressed_bounds(first)[0]
    for cp in range(first + 1, min(last + 2, zinfo.num_spans)):
        at = zinfo.uncompressed_bounds(cp)[0] - u_base
        if at > len(view):
            raise CompressionError(f"spans {first}..{last}: output ends before checkpoint {cp}")
        # What `plain` holds of the 32 KiB before (all of it unless spans are that small).
        before = view[max(0, at - WINDOW_SIZE) : at]
        if _window_mismatch(zinfo, cp, before):
            raise ZtocMismatchError(
                f"the zTOC lies: checkpoint {cp}'s window is not the layer's 32 KiB before "
                f"uncompressed offset {zinfo.uncompressed_bounds(cp)[0]}"
            )


class LayerVerifier:
    """Proves a whole gzip layer against its zTOC, fed its compressed bytes in order: every
    checkpoint's window and uncompressed offset, the uncompressed size, and (given) the
    diff ID, the sha256 of the uncompressed stream that the image config names.

    Memory stays bounded (one output chunk and a 32 KiB tail). ZtocMismatchError when the
    zTOC or the diff ID does not match, CompressionError for a malformed stream."""

    def __init__(self, zinfo: GzipZinfo, diff_id: str = "") -> None:
        self._zinfo = zinfo
        self._diff_id = diff_id
        self._sha = hashlib.sha256()
        self._tail = b""
        self._out = 0
        self._next = 1  # the next checkpoint to prove
        self._d: Any = zlib.decompressobj(WBITS_GZIP)
        self._padding = False
        self._pending = b""
        self._finished = False
        self._last_lo, self._last_hi = zinfo.uncompressed_bounds(zinfo.num_spans - 1)
        self._last_sha = hashlib.sha256()
        """Of the layer's bytes in its last span (see `check_last_span`)."""

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        """Inflate and check the next compressed bytes of the layer."""
        data = self._pending + bytes(chunk)
        self._pending = b""
        while data:
            if self._padding:
                if data.strip(b"\x00"):
                    raise CompressionError("trailing garbage after the last gzip member")
                return
            if self._d is None:
                if data[:1] == GZIP_MAGIC[:1]:
                    if len(data) < 2:
                        self._pending = data
                        return
                    if data[:2] != GZIP_MAGIC:
                        raise CompressionError("no gzip member after a member's end")
                    self._d = zlib.decompressobj(WBITS_GZIP)
                elif data[:1] == b"\x00":
                    self._padding = True
                    continue
                else:
                    raise CompressionError("no gzip member after a member's end")
            try:
                out = self._d.decompress(data, _OUT_CHUNK)
            except zlib.error as e:
                raise CompressionError(f"corrupt gzip stream: {e}") from None
            self._emit(out)
            if self._d.eof:
                data = self._d.unused_data
                self._d = None
            else:
                data = self._d.unconsumed_tail

    def _emit(self, out: bytes) -> None:
        if not out:
            return
        z = self._zinfo
        end = self._out + len(out)
        while self._next < z.num_spans and z.uncompressed_bounds(self._next)[0] <= end:
            at = z.uncompressed_bounds(self._next)[0] - self._out
            before = (self._tail + out[:at])[-WINDOW_SIZE:]
            if _window_mismatch(z, self._next, before):
                raise ZtocMismatchError(
                    f"the zTOC lies: checkpoint {self._next}'s window is not the layer's "
                    f"32 KiB before uncompressed offset {z.uncompressed_bounds(self._next)[0]}"
                )
            self._next += 1
        self._sha.update(out)
        lo, hi = max(self._last_lo, self._out), min(self._last_hi, end)
        if lo < hi:
            self._last_sha.update(out[lo - self._out : hi - self._out])
        self._tail = (self._tail + out)[-WINDOW_SIZE:]
        self._out = end

    def finish(self) -> None:
        """The layer ended: the checks that need all of it."""
        if self._d is not None or self._pending:
            raise CompressionError("the gzip stream ends inside a member")
        usize = self._zinfo.uncompressed_bounds(self._zinfo.num_spans - 1)[1]
        if self._out < usize:  # more is fine: the tar's zero padding may go past it
            raise ZtocMismatchError(
                f"the zTOC lies: the layer inflates to {self._out} bytes, the zTOC says {usize}"
            )
        self._finished = True
        if self._diff_id:
            got = "sha256:" + self._sha.hexdigest()
            if got != self._diff_id:
                raise ZtocMismatchError(
                    f"the layer's uncompressed digest is {got}, its image config says "
                    f"{self._diff_id}"
                )

    def check_last_span(self, compressed: bytes | bytearray | memoryview) -> None:
        """After `finish`: the last span inflated from its own checkpoint (its `in` and
        `bits`, which no window after it can refute) from its `compressed` bytes must be the
        layer's bytes there. ZtocMismatchError if not."""
        if not self._finished:
            raise RuntimeError("check_last_span() before finish()")
        last = self._zinfo.num_spans - 1
        try:
            plain = inflate_spans(self._zinfo, last, last, compressed)
        except CompressionError as e:
            raise ZtocMismatchError(
                f"the zTOC lies: span {last} does not inflate from its checkpoint: {e}"
            ) from e
        if hashlib.sha256(plain).digest() != self._last_sha.digest():
            raise ZtocMismatchError(
                f"the zTOC lies: span {last} inflated from its checkpoint is not the layer's "
                "bytes there"
            )
