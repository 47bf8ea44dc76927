"""The gRPC face of the Snapshotter: containerd.services.snapshots.v1.Snapshots.

Translation only: protobuf in, a Snapshotter call, protobuf out; the service's typed errors
become gRPC status codes. Handlers run in grpcio's thread pool. The `containerd-namespace`
metadata is only logged: containerd namespaces keys itself and its garbage collector calls
with or without it, so there is one keyspace.

`serve()` listens on a unix socket path (mode 0660) or on `fd://N`, an inherited listening
socket (systemd socket activation). grpcio cannot adopt a listening fd (its core has no server
call for it in the Python API), so for `fd://N` the gRPC server listens on a private unix socket
(in a fresh 0700 directory) and a small thread relays each accepted connection to it, bytes
both ways.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from snapshotter._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter._proto.containerd.types import mount_pb2
from snapshotter.service import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    SnapshotError,
    UnavailableError,
)
from snapshotter.service.mounts import Mount
from snapshotter.service.snapshots import Info, Snapshotter
from snapshotter.service.store import Kind

log = logging.getLogger(__name__)

SERVICE_NAME = "containerd.services.snapshots.v1.Snapshots"
NAMESPACE_METADATA = "containerd-namespace"
LIST_BATCH = 100
SOCKET_MODE = 0o660

_CODES: tuple[tuple[type[SnapshotError], grpc.StatusCode], ...] = (
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
)

Req = TypeVar("Req")
Resp = TypeVar("Resp")


def status_code(err: BaseException) -> grpc.StatusCode:
    """The gRPC status code of an error (INTERNAL for anything untyped)."""
    for cls, code in _CODES:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def _ns(ts: timestamp_pb2.Timestamp) -> int:
    return ts.seconds * 1_000_000_000 + ts.nanos


def info_to_pb(info: Info) -> pb.Info:
    """Info → protobuf."""
    return pb.Info(
        name=info.name,
        parent=info.parent,
        kind=int(info.kind),  # type: ignore[arg-type]
        created_at=_timestamp(info.created_at),
        updated_at=_timestamp(info.updated_at),
        labels=dict(info.labels),
    )


def info_from_pb(msg: pb.Info) -> Info:
    """protobuf → Info."""
    return Info(
        name=msg.name,
        parent=msg.parent,
        kind=Kind(msg.kind),
        created_at=_ns(msg.created_at),
        updated_at=_ns(msg.updated_at),
        labels=dict(msg.labels),
    )


def mounts_to_pb(mounts: Sequence[Mount]) -> list[mount_pb2.Mount]:
    """Mounts → protobuf."""
    return [
        mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options))
        for m in mounts
    ]


class SnapshotsService:
    """The ten RPCs, each a thin translation onto `Snapshotter`."""

    def __init__(self, snapshotter: Snapshotter) -> None:
        self.sn = snapshotter

    def _run(
        self, name: str, key: str, context: grpc.ServicerContext, fn: Callable[[], Resp]
    ) -> Resp:
        ns = next((v for k, v in context.invocation_metadata() if k == NAMESPACE_METADATA), "")
        log.debug("%s %r (namespace %r)", name, key, ns)
        try:
            return fn()
        except SnapshotError as e:
            code = status_code(e)
            level = logging.DEBUG if code == grpc.StatusCode.NOT_FOUND else logging.INFO
            if code == grpc.StatusCode.INTERNAL:
                level = logging.ERROR
            log.log(level, "%s %r (namespace %r): %s: %s", name, key, ns, code.name, e)
            context.abort(code, str(e))
        except Exception as e:
            log.exception("%s %r (namespace %r) failed", name, key, ns)
            context.abort(grpc.StatusCode.INTERNAL, f"{name} {key!r}: {type(e).__name__}: {e}")

    def Prepare(
        self, req: pb.PrepareSnapshotRequest, context: grpc.ServicerContext
    ) -> pb.PrepareSnapshotResponse:
        return self._run(
            "Prepare",
            req.key,
            context,
            lambda: pb.PrepareSnapshotResponse(
                mounts=mounts_to_pb(self.sn.prepare(req.key, req.parent, dict(req.labels)))
            ),
        )

    def View(
        self, req: pb.ViewSnapshotRequest, context: grpc.ServicerContext
    ) -> pb.ViewSnapshotResponse:
        return self._run(
            "View",
            req.key,
            context,
            lambda: pb.ViewSnapshotResponse(
                mounts=mounts_to_pb(self.sn.view(req.key, req.parent, dict(req.labels)))
            ),
        )

    def Mounts(self, req: pb.MountsRequest, context: grpc.ServicerContext) -> pb.MountsResponse:
        return self._run(
            "Mounts",
            req.key,
            context,
            lambda: pb.MountsResponse(mounts=mounts_to_pb(self.sn.mounts(req.key))),
        )

    def Commit(
        self, req: pb.CommitSnapshotRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        def call() -> empty_pb2.Empty:
            self.sn.commit(req.name, req.key, dict(req.labels))
            return empty_pb2.Empty()

        return self._run("Commit", f"{req.key} -> {req.name}", context, call)

    def Remove(
        self, req: pb.RemoveSnapshotRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        def call() -> empty_pb2.Empty:
            self.sn.remove(req.key)
            return empty_pb2.Empty()

        return self._run("Remove", req.key, context, call)

    def Stat(
        self, req: pb.StatSnapshotRequest, context: grpc.ServicerContext
    ) -> pb.StatSnapshotResponse:
        return self._run(
            "Stat",
            req.key,
            context,
            lambda: pb.StatSnapshotResponse(info=info_to_pb(self.sn.stat(req.key))),
        )

    def Update(
        self, req: pb.UpdateSnapshotRequest, context: grpc.ServicerContext
    ) -> pb.UpdateSnapshotResponse:
        paths = list(req.update_mask.paths) if req.HasField("update_mask") else []
        return self._run(
            "Update",
            req.info.name,
            context,
            lambda: pb.UpdateSnapshotResponse(
                info=info_to_pb(self.sn.update(info_from_pb(req.info), paths))
            ),
        )

    def List(
        self, req: pb.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ListSnapshotsResponse]:
        infos = self._run("List", ",".join(req.filters), context, lambda: self.sn.list(req.filters))
        for i in range(0, len(infos), LIST_BATCH):
            batch = infos[i : i + LIST_BATCH]
            yield pb.ListSnapshotsResponse(info=[info_to_pb(x) for x in batch])

    def Usage(self, req: pb.UsageRequest, context: grpc.ServicerContext) -> pb.UsageResponse:
        def call() -> pb.UsageResponse:
            u = self.sn.usage(req.key)
            return pb.UsageResponse(size=u.size, inodes=u.inodes)

        return self._run("Usage", req.key, context, call)

    def Cleanup(self, req: pb.CleanupRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        def call() -> empty_pb2.Empty:
            self.sn.cleanup()
            return empty_pb2.Empty()

        return self._run("Cleanup", "", context, call)


def _unary(fn: Callable[[Any, grpc.ServicerContext], Any], req: Any, resp: Any) -> Any:
    return grpc.unary_unary_rpc_method_handler(
        fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
    )


def generic_handler(service: SnapshotsService) -> grpc.GenericRpcHandler:
    """The method table of `containerd.services.snapshots.v1.Snapshots` for `service`."""
    s = service
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Prepare": _unary(s.Prepare, pb.PrepareSnapshotRequest, pb.PrepareSnapshotResponse),
        "View": _unary(s.View, pb.ViewSnapshotRequest, pb.ViewSnapshotResponse),
        "Mounts": _unary(s.Mounts, pb.MountsRequest, pb.MountsResponse),
        "Commit": _unary(s.Commit, pb.CommitSnapshotRequest, empty_pb2.Empty),
        "Remove": _unary(s.Remove, pb.RemoveSnapshotRequest, empty_pb2.Empty),
        "Stat": _unary(s.Stat, pb.StatSnapshotRequest, pb.StatSnapshotResponse),
        "Update": _unary(s.Update, pb.UpdateSnapshotRequest, pb.UpdateSnapshotResponse),
        "List": grpc.unary_stream_rpc_method_handler(
            s.List,
            request_deserializer=pb.ListSnapshotsRequest.FromString,
            response_serializer=pb.ListSnapshotsResponse.SerializeToString,
        ),
        "Usage": _unary(s.Usage, pb.UsageRequest, pb.UsageResponse),
        "Cleanup": _unary(s.Cleanup, pb.CleanupRequest, empty_pb2.Empty),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


# -- listening ---------------------------------------------------------------------------


def _socket_path(address: str) -> str:
    for prefix in ("unix://", "unix:"):
        if address.startswith(prefix):
            return address[len(prefix) :]
    return address


def _prepare_socket_path(path: str) -> None:
    """Create the parent directory; remove a stale socket, refuse one somebody serves."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        log.info("removing stale socket %s", path)
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(f"{path}: another process is serving on this socket")


class _Relay:
    """Accepts on an inherited listening socket and relays each connection to `target`."""

    def __init__(self, listener: socket.socket, target: str) -> None:
        self.listener = listener
        self.target = target
        self._wake_r, self._wake_w = os.pipe()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name="grpc-fd-relay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.listener.close()

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for sk, _ in sel.select():
                    if sk.fileobj == self._wake_r:
                        return
                    try:
                        client, _ = self.listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        log.exception("accept on the inherited socket failed")
                        return
                    self._relay(client)

    def _relay(self, client: socket.socket) -> None:
        client.setblocking(True)
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(self.target)
        except OSError:
            log.exception("relay: cannot reach the gRPC server at %s", self.target)
            client.close()
            upstream.close()
            return
        with self._lock:
            self._conns.update((client, upstream))
        done = threading.Barrier(2, action=lambda: self._close(client, upstream))
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(
                target=self._pump, args=(src, dst, done), name="grpc-fd-pump", daemon=True
            ).start()

    def _close(self, *socks: socket.socket) -> None:
        with self._lock:
            for s in socks:
                self._conns.discard(s)
        for s in socks:
            s.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, done: threading.Barrier) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with contextlib.suppress(threading.BrokenBarrierError):
                done.wait()


class RelayedServer(grpc.Server):
    """A grpc.Server reached through an inherited socket; stopping it stops the relay."""

    def __init__(self, server: grpc.Server, relay: _Relay, private_dir: str) -> None:
        self._server = server
        self._relay = relay
        self._dir = private_dir

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]
    ) -> None:
        self._server.add_generic_rpc_handlers(generic_rpc_handlers)

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self._server.add_registered_method_handlers(service_name, method_handlers)

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, server_credentials)

    def start(self) -> None:
        self._server.start()
        self._relay.start()

    def stop(self, grace: float | None) -> threading.Event:
        self._relay.stop()
        event = self._server.stop(grace)
        threading.Thread(target=self._remove_dir, args=(event,), daemon=True).start()
        return event

    def _remove_dir(self, event: threading.Event) -> None:
        event.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)


def serve(snapshotter: Snapshotter, address: str, *, max_workers: int = 16) -> grpc.Server:
    """Start the Snapshots service on `address` (a unix socket path, `unix://PATH`, or
    `fd://N`); returns the started server (stop it with `.stop(grace)`)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=[("grpc.max_receive_message_length", 16 << 20)],
    )
    server.add_generic_rpc_handlers((generic_handler(SnapshotsService(snapshotter)),))
    if address.startswith("fd://"):
        try:
            fd = int(address[len("fd://") :])
        except ValueError:
            raise ValueError(f"bad address {address!r}: want fd://<number>") from None
        listener = socket.socket(fileno=fd)
        if not listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            listener.detach()  # not ours to close
            raise ValueError(f"{address}: fd {fd} is not a listening socket")
        listener.setblocking(False)
        private_dir = tempfile.mkdtemp(prefix="pysoci-grpc-")
        inner = os.path.join(private_dir, "grpc.sock")
        server.add_insecure_port("unix:" + inner)
        relayed = RelayedServer(server, _Relay(listener, inner), private_dir)
        relayed.start()
        log.info("serving %s on %s (relayed to %s)", SERVICE_NAME, address, inner)
        return relayed
    path = _socket_path(address)
    _prepare_socket_path(path)
    server.add_insecure_port("unix:" + path)
    os.chmod(path, SOCKET_MODE)
    server.start()
    log.info("serving %s on %s", SERVICE_NAME, path)
    return server
