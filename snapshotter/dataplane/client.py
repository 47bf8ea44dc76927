"""The control plane's side of the data plane's local API (implements `DataPlane`).

Each call opens a connection to `ROOT/data-plane.sock`. While no data plane listens (one is
starting, or a successor is taking over) a call waits up to `connect_timeout` for one, then
raises DataPlaneUnavailableError; so does a call whose data plane goes away before answering.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
from collections.abc import Collection
from pathlib import Path
from typing import Any, Final

import trio

from snapshotter.dataplane.api import DataPlaneUnavailableError, ServedLayer, SweepResult
from snapshotter.dataplane.protocol import MAX_RESPONSE, decode, encode, raise_reply
from snapshotter.dataplane.server import read_line
from snapshotter.remote.spec import LayerSpec

log = logging.getLogger(__name__)

SOCKET_NAME: Final = "data-plane.sock"
_ABSENT: Final = (errno.ENOENT, errno.ECONNREFUSED)
QUICK: Final = 30.0
"""Seconds for calls that do no I/O of their own (check probes the registry for 5 s at most)."""


def socket_path(root: Path) -> Path:
    """Where the data plane of ROOT listens."""
    return root / SOCKET_NAME


class DataPlaneClient:
    """The DataPlane calls, made to the `pysoci data-plane` process of ROOT."""

    def __init__(self, root: Path, *, connect_timeout: float = 10.0) -> None:
        self.root = root
        self.path = socket_path(root)
        self.connect_timeout = connect_timeout

    @property
    def mountpoint(self) -> Path:
        """The data plane's FUSE mount."""
        return self.root / "fuse"

    async def _connect(self, wait: float) -> trio.SocketStream:
        deadline = trio.current_time() + wait
        while True:
            try:
                return await trio.open_unix_socket(str(self.path))
            except OSError as e:
                if e.errno not in _ABSENT or trio.current_time() >= deadline:
                    raise DataPlaneUnavailableError(
                        f"no data plane answers on {self.path} ({e.strerror}): "
                        "is `pysoci data-plane run` running?"
                    ) from None
            await trio.sleep(0.1)

    async def call(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        *,
        timeout: float = math.inf,
        wait: float | None = None,
    ) -> Any:
        """One call: its result, or its error raised as the typed class the data plane named."""
        stream = await self._connect(self.connect_timeout if wait is None else wait)
        async with stream:
            with trio.move_on_after(timeout) as scope:
                try:
                    await stream.send_all(encode({"op": op, "args": args or {}}))
                    line = await read_line(stream, MAX_RESPONSE)
                except (trio.BrokenResourceError, OSError) as e:
                    raise DataPlaneUnavailableError(f"the data plane went away: {e}") from None
            if scope.cancelled_caught:
                raise DataPlaneUnavailableError(
                    f"the data plane did not answer {op} in {timeout} s"
                )
        if line is None:
            raise DataPlaneUnavailableError(f"the data plane stopped before answering {op}")
        return raise_reply(decode(line, MAX_RESPONSE))

    async def hello(self, *, wait: float | None = None) -> dict[str, Any]:
        """Who serves (pid, generation, state)."""
        result = await self.call("hello", timeout=QUICK, wait=wait)
        if not isinstance(result, dict):
            raise DataPlaneUnavailableError("malformed hello from the data plane")
        return result

    async def watch(
        self, *, task_status: trio.TaskStatus[dict[str, Any]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Report the data plane's hello, then return when it stops serving (it exited, or it
        handed over to a successor)."""
        stream = await self._connect(self.connect_timeout)
        async with stream:
            try:
                await stream.send_all(encode({"op": "watch", "args": {}}))
                line = await read_line(stream, MAX_RESPONSE)
                if line is None:
                    raise DataPlaneUnavailableError("the data plane closed the watch")
                task_status.started(raise_reply(decode(line, MAX_RESPONSE)))
                while await stream.receive_some(4096):
                    pass
            except (trio.BrokenResourceError, OSError):
                return

    # -- DataPlane --------------------------------------------------------------------------

    async def mount(self, spec: LayerSpec) -> Path:
        """Serve the layer; its directory."""
        return Path(await self.call("mount", {"spec": spec.to_json()}))

    async def unmount(self, layer_id: str, *, forget: bool = False) -> None:
        """Stop serving it (and with `forget`, drop its cache)."""
        await self.call("unmount", {"layer_id": layer_id, "forget": forget}, timeout=300)

    async def check(self, layer_id: str) -> None:
        """Typed errors unless the layer serves reads."""
        await self.call("check", {"layer_id": layer_id}, timeout=QUICK)

    async def layers(self) -> list[ServedLayer]:
        """Every layer served now."""
        raw = await self.call("layers", timeout=QUICK)
        return [ServedLayer.from_json(item) for item in raw or []]

    async def warm(self, specs: Collection[LayerSpec]) -> int:
        """Start fetching these layers' zTOCs in the data plane."""
        return int(await self.call("warm", {"specs": [s.to_json() for s in specs]}, timeout=QUICK))

    async def sweep(self, keep: Collection[LayerSpec]) -> SweepResult:
        """Unmount and delete what `keep` does not use."""
        raw = await self.call("sweep", {"keep": [s.to_json() for s in keep]}, timeout=600)
        return SweepResult(int(raw["unmounted"]), int(raw["caches"]), int(raw["ztocs"]))


def call_sync(root: Path, op: str, timeout: float = 10.0) -> Any:
    """A call from a thread that has no trio loop (the metrics server's)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(socket_path(root)))
            sock.sendall(encode({"op": op, "args": {}}))
            buf = bytearray()
            while b"\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_RESPONSE:
                    break
        except OSError as e:
            raise DataPlaneUnavailableError(
                f"no data plane answers on {socket_path(root)}: {e}"
            ) from None
    line, sep, _ = bytes(buf).partition(b"\n")
    if not sep:
        raise DataPlaneUnavailableError(f"the data plane did not answer {op}")
    return raise_reply(decode(line, MAX_RESPONSE))
