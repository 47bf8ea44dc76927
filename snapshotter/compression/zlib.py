"""The system libz through ctypes: the inflate features CPython's zlib module lacks.

Random access into gzip needs `Z_BLOCK`, `inflatePrime`, `inflateGetDictionary` and
`inflateReset2`, none of which the standard library exposes. Calls go through
`ctypes.CDLL`, so the GIL is released while libz works.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from types import TracebackType
from typing import Any, Final, Self

from snapshotter.errors import CompressionError

Z_OK: Final = 0
Z_STREAM_END: Final = 1
Z_NEED_DICT: Final = 2
Z_ERRNO: Final = -1
Z_STREAM_ERROR: Final = -2
Z_DATA_ERROR: Final = -3
Z_MEM_ERROR: Final = -4
Z_BUF_ERROR: Final = -5
Z_VERSION_ERROR: Final = -6

Z_NO_FLUSH: Final = 0
Z_SYNC_FLUSH: Final = 2
Z_FINISH: Final = 4
Z_BLOCK: Final = 5

WBITS_RAW: Final = -15
WBITS_GZIP: Final = 31
WBITS_AUTO: Final = 47
"""gzip or zlib header, detected automatically."""

DATA_TYPE_BITS_MASK: Final = 7
DATA_TYPE_LAST_BLOCK: Final = 64
DATA_TYPE_BLOCK_END: Final = 128

_STATUS_NAMES: Final = {
    Z_NEED_DICT: "Z_NEED_DICT",
    Z_ERRNO: "Z_ERRNO",
    Z_STREAM_ERROR: "Z_STREAM_ERROR",
    Z_DATA_ERROR: "Z_DATA_ERROR",
    Z_MEM_ERROR: "Z_MEM_ERROR",
    Z_BUF_ERROR: "Z_BUF_ERROR",
    Z_VERSION_ERROR: "Z_VERSION_ERROR",
}


class _ZStream(ctypes.Structure):
    _fields_ = (
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    )


def _load_libz() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libz.so.1")
    except OSError:
        name = ctypes.util.find_library("z")
        if name is None:
            raise ImportError("the system zlib (libz.so.1) is required") from None
        return ctypes.CDLL(name)


_libz: Final = _load_libz()
_stream_p = ctypes.POINTER(_ZStream)


def _declare(name: str, argtypes: list[type], restype: type = ctypes.c_int) -> Any:
    fn = getattr(_libz, name)
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


_zlibVersion = _declare("zlibVersion", [], ctypes.c_char_p)
_inflateInit2_ = _declare("inflateInit2_", [_stream_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int])
_inflate = _declare("inflate", [_stream_p, ctypes.c_int])
_inflateEnd = _declare("inflateEnd", [_stream_p])
_inflateReset2 = _declare("inflateReset2", [_stream_p, ctypes.c_int])
_inflatePrime = _declare("inflatePrime", [_stream_p, ctypes.c_int, ctypes.c_int])
_inflateSetDictionary = _declare(
    "inflateSetDictionary", [_stream_p, ctypes.c_void_p, ctypes.c_uint]
)
_inflateGetDictionary = _declare(
    "inflateGetDictionary", [_stream_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint)]
)

ZLIB_VERSION: Final[str] = _zlibVersion().decode("ascii")
_VERSION_ARG: Final = ZLIB_VERSION.encode("ascii")
_UINT_MAX: Final = 0xFFFFFFFF


class _PyBuffer(ctypes.Structure):
    _fields_ = (
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.py_object),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    )


_PyObject_GetBuffer = ctypes.pythonapi.PyObject_GetBuffer
_PyObject_GetBuffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_PyObject_GetBuffer.restype = ctypes.c_int
_PyBuffer_Release = ctypes.pythonapi.PyBuffer_Release
_PyBuffer_Release.argtypes = [ctypes.POINTER(_PyBuffer)]
_PyBuffer_Release.restype = None
_PyBUF_SIMPLE: Final = 0
_PyBUF_WRITABLE: Final = 1

Buffer = bytes | bytearray | memoryview
WritableBuffer = bytearray | memoryview


class Pin:
    """A C-contiguous buffer's address, held (export kept open) until release()."""

    __slots__ = ("_view", "address", "obj", "size")

    def __init__(self, obj: Buffer, writable: bool) -> None:
        self.obj = obj
        self._view: _PyBuffer | None = None
        if type(obj) is bytes and not writable:
            self.address = ctypes.cast(ctypes.c_char_p(obj), ctypes.c_void_p).value or 0
            self.size = len(obj)
            return
        view = _PyBuffer()
        flags = _PyBUF_WRITABLE if writable else _PyBUF_SIMPLE
        try:
            _PyObject_GetBuffer(obj, ctypes.byref(view), flags)
        except (BufferError, TypeError) as exc:
            kind = "writable " if writable else ""
            raise TypeError(f"expected a contiguous {kind}buffer: {exc}") from None
        self._view = view
        self.address = view.buf or 0
        self.size = view.len

    def release(self) -> None:
        if self._view is not None:
            _PyBuffer_Release(ctypes.byref(self._view))
            self._view = None


class Inflater:
    """One zlib inflate stream (raw, gzip, zlib or auto, chosen by `wbits`)."""

    __slots__ = ("_in", "_out", "_stream", "_strm_ref")

    def __init__(self, wbits: int = WBITS_AUTO) -> None:
        self._stream: _ZStream | None = _ZStream()
        self._strm_ref = ctypes.byref(self._stream)
        self._in: Pin | None = None
        self._out: Pin | None = None
        ret = _inflateInit2_(self._strm_ref, wbits, _VERSION_ARG, ctypes.sizeof(_ZStream))
        if ret != Z_OK:
            self._stream = None
            raise self._error("inflateInit2", ret)

    def _error(self, what: str, ret: int) -> CompressionError:
        msg = None
        if self._stream is not None and self._stream.msg:
            msg = self._stream.msg.decode("utf-8", "replace")
        name = _STATUS_NAMES.get(ret, str(ret))
        return CompressionError(f"zlib {what} failed ({name}): {msg or 'no message'}")

    def _check_open(self) -> _ZStream:
        if self._stream is None:
            raise ValueError("Inflater is closed")
        return self._stream

    def reset(self, wbits: int) -> None:
        """Start a new stream (inflateReset2), keeping the allocated state."""
        self._check_open()
        ret = _inflateReset2(self._strm_ref, wbits)
        if ret != Z_OK:
            raise self._error("inflateReset2", ret)

    def prime(self, bits: int, value: int) -> None:
        """Insert `bits` bits of `value` into the input bit buffer (inflatePrime)."""
        self._check_open()
        ret = _inflatePrime(self._strm_ref, bits, value)
        if ret != Z_OK:
            raise self._error("inflatePrime", ret)

    def set_dictionary(self, dictionary: Buffer) -> None:
        """Preset the sliding window (raw streams: right after init/reset)."""
        self._check_open()
        pin = Pin(dictionary, writable=False)
        try:
            ret = _inflateSetDictionary(self._strm_ref, pin.address, pin.size)
        finally:
            pin.release()
        if ret != Z_OK:
            raise self._error("inflateSetDictionary", ret)

    def get_dictionary(self) -> bytes:
        """The current sliding window (up to 32 KiB of the latest output of this stream)."""
        self._check_open()
        buf = ctypes.create_string_buffer(32768)
        length = ctypes.c_uint(0)
        ret = _inflateGetDictionary(self._strm_ref, buf, ctypes.byref(length))
        if ret != Z_OK:
            raise self._error("inflateGetDictionary", ret)
        return buf.raw[: length.value]

    def inflate(
        self,
        data: Buffer,
        out: WritableBuffer,
        flush: int = Z_NO_FLUSH,
        *,
        in_pos: int = 0,
        out_pos: int = 0,
        out_end: int | None = None,
    ) -> tuple[int, int, int, int]:
        """Inflate `data[in_pos:]` into `out[out_pos:out_end]`.

        Returns (status, consumed, produced, data_type). status is Z_OK, Z_STREAM_END or
        Z_BUF_ERROR (no progress possible: more input or output space is needed; callers
        decide whether that means truncation). Corrupt data raises CompressionError.
        The buffers' addresses are cached by identity, so passing the same objects again
        (with advancing positions) costs no re-pinning.
        """
        strm = self._stream
        if strm is None:
            raise ValueError("Inflater is closed")
        pin_in = self._in
        if pin_in is None or pin_in.obj is not data:
            if pin_in is not None:
                pin_in.release()
            self._in = None
            pin_in = self._in = Pin(data, writable=False)
        pin_out = self._out
        if pin_out is None or pin_out.obj is not out:
            if pin_out is not None:
                pin_out.release()
            self._out = None
            pin_out = self._out = Pin(out, writable=True)
        end = pin_out.size if out_end is None else out_end
        if not (0 <= in_pos <= pin_in.size and 0 <= out_pos <= end <= pin_out.size):
            raise ValueError("inflate positions out of range")
        avail_in = min(pin_in.size - in_pos, _UINT_MAX)
        avail_out = min(end - out_pos, _UINT_MAX)
        strm.next_in = pin_in.address + in_pos
        strm.avail_in = avail_in
        strm.next_out = pin_out.address + out_pos
        strm.avail_out = avail_out
        ret = _inflate(self._strm_ref, flush)
        consumed = avail_in - strm.avail_in
        produced = avail_out - strm.avail_out
        if ret in (Z_OK, Z_STREAM_END, Z_BUF_ERROR):
            return ret, consumed, produced, strm.data_type
        raise self._error("inflate", ret)

    def release_buffers(self) -> None:
        """Drop the cached input/output buffers (so callers may resize or free them)."""
        if self._in is not None:
            self._in.release()
            self._in = None
        if self._out is not None:
            self._out.release()
            self._out = None

    def close(self) -> None:
        """Free the zlib state. Idempotent."""
        self.release_buffers()
        if self._stream is not None:
            _inflateEnd(self._strm_ref)
            self._stream = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Module globals may already be gone at interpreter shutdown.
        with contextlib.suppress(Exception):
            self.close()
