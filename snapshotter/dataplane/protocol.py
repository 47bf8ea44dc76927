"""The data plane's local API on the wire: one JSON object per line over a unix socket.

A call is one connection: the client sends `{"op": NAME, "args": {...}}` and reads one line,
`{"ok": RESULT}` or `{"error": {"type": CLASS, "message": TEXT}}`; the error's class is one
of pysoci's typed errors (below), so a caller on the other side handles them as if the call
were local. `watch` is the exception: its answer comes at once and the connection then stays
open until that data plane stops serving, so the control plane learns at once when it must
reconnect.
"""

from __future__ import annotations

import json
from typing import Any, Final

from snapshotter import errors
from snapshotter.dataplane.api import (
    DataPlaneError,
    DataPlaneUnavailableError,
    LayerNotMountedError,
    LayerUnavailableError,
)
from snapshotter.errors import PysociError
from snapshotter.soci.ztoc import ZtocTooLargeError

MAX_REQUEST: Final = 1 << 20
MAX_RESPONSE: Final = 64 << 20
OPS: Final = frozenset(
    {
        "hello",
        "mount",
        "unmount",
        "check",
        "layers",
        "sweep",
        "warm",
        "metrics",
        "watch",
        "stop",
        "upgrade",
    }
)

_ERRORS: Final[dict[str, type[PysociError]]] = {
    cls.__name__: cls
    for cls in (
        LayerNotMountedError,
        LayerUnavailableError,
        DataPlaneUnavailableError,
        DataPlaneError,
        errors.ZtocRejectedError,
        errors.ZtocMismatchError,
        errors.ZtocError,
        errors.CheckpointError,
        errors.TarFormatError,
        errors.CompressionError,
        errors.ManifestError,
        errors.DigestMismatchError,
        errors.ContentNotFoundError,
        errors.InvalidReferenceError,
        errors.RegistryUnavailableError,
        errors.AuthenticationError,
        errors.RegistryNotFoundError,
        errors.RegistryResponseError,
        errors.RegistryError,
        errors.LayerClosedError,
        errors.ResourceLimitError,
        ZtocTooLargeError,
        errors.FormatError,
        errors.PysociError,
    )
}


class ProtocolError(DataPlaneError):
    """A malformed message on the data plane's socket."""


def encode(obj: dict[str, Any]) -> bytes:
    """One message, newline-terminated."""
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes, limit: int) -> dict[str, Any]:
    """One message; ProtocolError when it is not a JSON object within `limit` bytes."""
    if len(line) > limit:
        raise ProtocolError(f"message of {len(line)} bytes, over {limit}")
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("a message must be a JSON object")
    return obj


def error_reply(exc: BaseException) -> dict[str, Any]:
    """The answer for a failed call (the most precise known class of `exc`)."""
    name = "DataPlaneError"
    for cls in type(exc).__mro__:
        if cls.__name__ in _ERRORS:
            name = cls.__name__
            break
    return {"error": {"type": name, "message": str(exc)[:4000]}}


def raise_reply(reply: dict[str, Any]) -> Any:
    """The result of an answer, or its error raised as its typed class."""
    if "ok" in reply:
        return reply["ok"]
    err = reply.get("error")
    if not isinstance(err, dict) or not isinstance(err.get("message"), str):
        raise ProtocolError(f"malformed answer: {str(reply)[:200]}")
    cls = _ERRORS.get(str(err.get("type")), DataPlaneError)
    raise cls(err["message"])
