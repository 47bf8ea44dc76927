"""The data plane's side of its local API: calls on `ROOT/data-plane.sock`, served on trio.

Only root may call (the socket is 0600 in a 0700 root, and the peer's credentials are
checked). Each connection carries one call; a slow call (a mount fetching its zTOC) holds
only its own connection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from snapshotter.dataplane.plane import LocalDataPlane
from snapshotter.dataplane.protocol import (
    MAX_REQUEST,
    OPS,
    ProtocolError,
    decode,
    encode,
    error_reply,
)
from snapshotter.errors import PysociError
from snapshotter.remote.spec import LayerSpec

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


async def read_line(stream: trio.abc.ReceiveStream, limit: int) -> bytes | None:
    """One newline-terminated message (without the newline), None at a clean EOF."""
    buf = bytearray()
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            if buf:
                raise ProtocolError("connection closed in the middle of a message")
            return None
        buf += chunk
        end = buf.find(b"\n")
        if end >= 0:
            return bytes(buf[:end])
        if len(buf) > limit:
            raise ProtocolError(f"message over {limit} bytes")


def _peer_uid(stream: trio.SocketStream) -> int:
    creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class DataPlaneServer:
    """Serves a LocalDataPlane's calls; `hello`/`watch` describe this process."""

    def __init__(
        self,
        plane: LocalDataPlane,
        *,
        generation: str,
        extra: dict[str, Handler] | None = None,
    ) -> None:
        self.plane = plane
        self.generation = generation
        self.started = trio.current_time()
        self._extra = dict(extra or {})
        self._closing = trio.Event()
        self._listener: trio.SocketListener | None = None

    def hello(self) -> dict[str, Any]:
        """Who serves: pid, generation (changes with each process), mountpoint, state."""
        return {
            "pid": os.getpid(),
            "generation": self.generation,
            "mountpoint": str(self.plane.mountpoint),
            "uptime": round(trio.current_time() - self.started, 3),
            "layers": len(self.plane.lazy.served()),
            "draining": self.plane.lazy.draining,
        }

    async def serve(
        self, path: Path, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on `path` until `close()`."""
        path.unlink(missing_ok=True)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            await sock.bind(os.fspath(path))
        finally:
            os.umask(old)
        sock.listen(128)
        self._listener = trio.SocketListener(sock)
        log.info("data plane API on %s", path)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._accept_until_closed, nursery)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self._listener.aclose()

    async def _accept_until_closed(self, nursery: trio.Nursery) -> None:
        assert self._listener is not None
        with trio.CancelScope() as scope:
            nursery.start_soon(self._cancel_on_close, scope)
            while True:
                stream = await self._listener.accept()
                nursery.start_soon(self._handle, stream)

    async def _cancel_on_close(self, scope: trio.CancelScope) -> None:
        await self._closing.wait()
        scope.cancel()

    def close(self, path: Path | None = None) -> None:
        """Stop accepting calls and end every `watch` (their callers reconnect elsewhere)."""
        if path is not None:
            path.unlink(missing_ok=True)
        self._closing.set()

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                if _peer_uid(stream) not in (0, os.geteuid()):
                    raise ProtocolError("only root may call the data plane")
                line = await read_line(stream, MAX_REQUEST)
                if line is None:
                    return
                request = decode(line, MAX_REQUEST)
                op = request.get("op")
                args = request.get("args", {})
                if op not in OPS or not isinstance(args, dict):
                    raise ProtocolError(f"unknown call {str(op)[:40]!r}")
                if op == "watch":
                    await stream.send_all(encode({"ok": self.hello()}))
                    await self._closing.wait()
                    return
                reply: dict[str, Any] = {"ok": await self._call(str(op), args)}
            except trio.BrokenResourceError:
                return
            except PysociError as e:
                reply = error_reply(e)
            except Exception as e:
                log.exception("data plane call failed unexpectedly")
                reply = error_reply(e)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(encode(reply))

    async def _call(self, op: str, args: dict[str, Any]) -> Any:
        plane = self.plane
        if op == "hello":
            return self.hello()
        if op == "mount":
            return str(await plane.mount(LayerSpec.from_json(args.get("spec"))))
        if op == "unmount":
            await plane.unmount(_str(args, "layer_id"), forget=bool(args.get("forget")))
            return None
        if op == "check":
            await plane.check(_str(args, "layer_id"))
            return None
        if op == "layers":
            return [layer.to_json() for layer in await plane.layers()]
        if op == "sweep":
            keep = args.get("keep")
            if not isinstance(keep, list):
                raise ProtocolError("sweep: keep must be a list of layer specs")
            result = await plane.sweep([LayerSpec.from_json(k) for k in keep])
            return {"unmounted": result.unmounted, "caches": result.caches, "ztocs": result.ztocs}
        if op == "warm":
            specs = args.get("specs")
            if not isinstance(specs, list) or len(specs) > 1024:
                raise ProtocolError("warm: specs must be a list of at most 1024 layer specs")
            return await plane.warm([LayerSpec.from_json(x) for x in specs])
        handler = self._extra.get(op)
        if handler is None:
            raise ProtocolError(f"{op} is not served here")
        return await handler(args)


def _str(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"{key} must be a string")
    return value
