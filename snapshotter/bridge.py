"""The one way from other threads (grpcio's pool) into the trio loop that owns I/O state."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")


class TrioBridge:
    """Runs trio work from other threads on one trio loop, and waits for its result."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run an async function on the loop and wait for its result."""
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a sync function on the loop thread (for state owned by the loop)."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)
