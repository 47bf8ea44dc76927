"""Inflating a run of gzip spans while its compressed bytes arrive.

`SpanStreamInflater` does what `gzip.inflate_spans` does — from the first span's checkpoint
(primed bits, its 32 KiB window as the dictionary) through gzip member boundaries to the last
span's end — but fed chunk by chunk, so that inflating a span overlaps with receiving it.
The bytes it produces are not trusted by themselves: the caller serves them only after the
span digests of the same compressed bytes matched (see fetch/spans.py).
"""

from __future__ import annotations

from snapshotter.compression import isal
from snapshotter.compression.buffers import SPAN_BUFFERS
from snapshotter.compression.gzip import GZIP_TRAILER_SIZE, MAX_DEFLATE_RATIO
from snapshotter.compression.isal import RawInflater
from snapshotter.compression.zlib import WBITS_GZIP, WBITS_RAW, Z_NO_FLUSH, Z_STREAM_END, Inflater
from snapshotter.errors import CheckpointError, CompressionError
from snapshotter.soci.zinfo import WINDOW_SIZE, GzipZinfo


class SpanStreamInflater:
    """Inflate spans first..last (inclusive) from their compressed bytes, fed in order."""

    def __init__(self, zinfo: GzipZinfo, first: int, last: int) -> None:
        if first > last:
            raise CheckpointError(f"empty span range {first}..{last}")
        self._zinfo = zinfo
        self._first, self._last = first, last
        c_start = zinfo.compressed_bounds(first)[0]
        self._c_size = zinfo.compressed_bounds(last)[1] - c_start
        u_start = zinfo.uncompressed_bounds(first)[0]
        self._want = zinfo.uncompressed_bounds(last)[1] - u_start
        if self._want > MAX_DEFLATE_RATIO * self._c_size + WINDOW_SIZE:
            raise CompressionError(
                f"spans {first}..{last}: {self._want} bytes cannot come from {self._c_size} "
                "compressed bytes"
            )
        self._out = SPAN_BUFFERS.take(self._want)
        self._owns_out = True
        self._done = 0
        self._fed = 0
        self._skip = 0
        self._raw = True
        self._inflater = Inflater(WBITS_RAW)
        self._fast: RawInflater | None = None
        self._use_fast = isal.available()
        self._primed = zinfo.bits(first) == 0
        if self._primed:
            if self._use_fast:
                self._fast = RawInflater(zinfo.window(first))
            else:
                self._inflater.set_dictionary(zinfo.window(first))

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        """Inflate what `chunk` (the next compressed bytes of the run) allows."""
        src = memoryview(chunk).cast("B")
        n = len(src)
        self._fed += n
        if self._fed > self._c_size:
            raise CompressionError(
                f"spans {self._first}..{self._last}: more than {self._c_size} compressed bytes"
            )
        pos = 0
        if not self._primed and n:
            bits = self._zinfo.bits(self._first)
            window = self._zinfo.window(self._first)
            if self._use_fast:
                self._fast = RawInflater(window, bits, src[0])
            else:
                self._inflater.prime(bits, src[0] >> (8 - bits))
                self._inflater.set_dictionary(window)
            self._primed = True
            pos = 1
        if self._fast is not None:
            if pos < n and self._done < self._want:
                _, produced = self._fast.inflate(src, self._out, pos, self._done)
                self._done += produced
                if self._fast.finished and self._done < self._want:
                    # A gzip member ends inside the run: the zlib path crosses such boundaries.
                    raise CompressionError(
                        f"spans {self._first}..{self._last}: a gzip member ends inside them"
                    )
            return
        while pos < n and self._done < self._want:
            if self._skip:
                step = min(self._skip, n - pos)
                self._skip -= step
                pos += step
                continue
            ret, consumed, produced, _ = self._inflater.inflate(
                src, self._out, Z_NO_FLUSH, in_pos=pos, out_pos=self._done
            )
            pos += consumed
            self._done += produced
            if ret == Z_STREAM_END:
                # The spans go on in the next gzip member: only the first (raw) stream leaves
                # its trailer to us; gzip-mode streams consume their own.
                if self._raw:
                    self._skip = GZIP_TRAILER_SIZE
                    self._raw = False
                self._inflater.reset(WBITS_GZIP)
                continue
            if consumed == 0 and produced == 0:
                break  # needs the next chunk
        self._inflater.release_buffers()

    def finish(self) -> memoryview:
        """The inflated spans, in a buffer of `SPAN_BUFFERS` the caller gives back once it
        copied them out; CompressionError unless they came out whole."""
        try:
            if self._done != self._want:
                raise CompressionError(
                    f"spans {self._first}..{self._last}: compressed data ended after "
                    f"{self._done} of {self._want} bytes"
                )
            self._owns_out = False
            return self._out
        finally:
            self.close()

    def close(self) -> None:
        """Free the inflater and, unless `finish` handed it over, the buffer (idempotent)."""
        self._inflater.close()
        if self._owns_out:
            self._owns_out = False
            SPAN_BUFFERS.give(self._out)
