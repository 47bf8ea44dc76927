"""containerd's snapshot semantics, in one place (containerd's overlay snapshotter + metastore).

Layout under ROOT: `metadata.db` (the store) and `snapshots/<id>/{fs,work}`; a snapshot's own
directory is `snapshots/<id>/fs`, except for layers another component made (a lazily served
FUSE layer, a local unpack), whose directory is the record's `layer_dir`.

Remote snapshots: a Prepare carrying `containerd.io/snapshot.ref=TARGET` asks the RemoteHook
for the layer; when it gives one, the committed snapshot TARGET is recorded with the layer's
directory and the Prepare answers AlreadyExists, so containerd never downloads the layer.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from snapshotter import labels as label_names
from snapshotter.errors import ResourceLimitError
from snapshotter.service import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from snapshotter.service.filters import parse_all
from snapshotter.service.mounts import Mount, overlay_index_off, snapshot_mounts
from snapshotter.service.store import Kind, SnapshotRecord, Store, StoreFullError, Txn

log = logging.getLogger(__name__)

MAX_LABEL_SIZE = 4096


@dataclass(frozen=True)
class RemoteLayer:
    """What the RemoteHook made of a layer: its directory, and whether it is served lazily
    (remote=False: the hook unpacked it locally; containerd still skips the download)."""

    layer_dir: str
    remote: bool
    local_reason: str = ""
    """Why a layer of an indexed image was unpacked instead (kept as labels.LOCAL_REASON)."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """`pysoci.io/` labels the committed snapshot keeps (what serving it again needs)."""


class RemoteHook(Protocol):
    """Remote layers, as the service sees them (called from gRPC threads)."""

    def prepare_remote(
        self,
        key: str,
        parent: str | None,
        labels: Mapping[str, str],
        parent_layers: Sequence[LayerRecord],
        commit: Callable[[RemoteLayer], None],
    ) -> RemoteLayer | None:
        """Provide the layer Prepare(key, parent, labels) targets (labels hold
        `containerd.io/snapshot.ref`) and record it with `commit` (while nothing can release
        it), or None for an ordinary Prepare. `parent_layers`: the remote and local layers
        of the parent chain, nearest first."""
        ...

    def check(self, records: Sequence[LayerRecord]) -> None:
        """Raise UnavailableError when one of these remote layers cannot be served."""
        ...

    def release(self, record: LayerRecord) -> None:
        """A snapshot on `record`'s layer was removed (others may still use the layer)."""
        ...


@dataclass(frozen=True)
class Info:
    """A snapshot as containerd sees it (`snapshots.Info`); times in ns since the epoch, UTC."""

    name: str
    parent: str = ""
    kind: Kind = Kind.UNKNOWN
    created_at: int = 0
    updated_at: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Usage:
    """Disk usage: bytes of allocated blocks, and inodes (a hard-linked inode counts once)."""

    size: int = 0
    inodes: int = 0


@dataclass(frozen=True)
class LayerRecord:
    """A snapshot whose directory another component made (see `Snapshotter.layers`)."""

    name: str
    layer_dir: str
    remote: bool
    labels: Mapping[str, str]

    @classmethod
    def of(cls, rec: SnapshotRecord) -> LayerRecord:
        """The layer record of a store row that has a `layer_dir`."""
        assert rec.layer_dir is not None
        return cls(rec.name, rec.layer_dir, rec.remote, dict(rec.labels))


def validate_labels(labels: Mapping[str, str]) -> None:
    """containerd's label rule: key plus value at most 4096 bytes."""
    for k, v in labels.items():
        if len(k.encode()) + len(v.encode()) > MAX_LABEL_SIZE:
            raise InvalidArgumentError(
                f"label key and value greater than maximum size ({MAX_LABEL_SIZE} bytes), "
                f"key: {k[:10]}"
            )


def disk_usage(path: Path | str) -> Usage:
    """Like containerd's fs.DiskUsage: 512-byte blocks and inodes under `path` (inclusive),
    each (device, inode) counted once, symlinks not followed."""
    seen: set[tuple[int, int]] = set()
    size = 0
    stack = [os.fspath(path)]
    while stack:
        p = stack.pop()
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        key = (st.st_dev, st.st_ino)
        if key not in seen:
            seen.add(key)
            size += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            try:
                with os.scandir(p) as it:
                    stack.extend(e.path for e in it)
            except FileNotFoundError:
                continue
    return Usage(size=size, inodes=len(seen))


def _now() -> int:
    return time.time_ns()


class _KeyedLocks:
    """One lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._lock:
            lock, n = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, n + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                lock, n = self._locks[key]
                if n == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, n - 1)


class Snapshotter:
    """containerd's Snapshotter operations over the store and ROOT/snapshots."""

    def __init__(
        self,
        root: Path,
        store: Store,
        *,
        remote: RemoteHook | None = None,
    ) -> None:
        self.root = Path(root)
        self.store = store
        self.remote = remote
        self.snapshots_dir = self.root / "snapshots"
        # 0700 like containerd's snapshot roots: the trees below keep the images' modes.
        self.snapshots_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.snapshots_dir, 0o700)
        self.index_off = overlay_index_off()
        self._targets = _KeyedLocks()

    # -- paths and mounts --------------------------------------------------------------

    def upper_path(self, id_: int) -> Path:
        """`ROOT/snapshots/<id>/fs`."""
        return self.snapshots_dir / str(id_) / "fs"

    def work_path(self, id_: int) -> Path:
        """`ROOT/snapshots/<id>/work`."""
        return self.snapshots_dir / str(id_) / "work"

    def layer_path(self, rec: SnapshotRecord) -> str:
        """The directory holding a snapshot's files: its `layer_dir`, else its `fs`."""
        return rec.layer_dir if rec.layer_dir else str(self.upper_path(rec.id))

    def _check_remote(self, parents: Sequence[SnapshotRecord]) -> None:
        remote = [LayerRecord.of(p) for p in parents if p.remote and p.layer_dir]
        if not remote or self.remote is None:
            return
        try:
            self.remote.check(remote)
        except UnavailableError:
            raise
        except Exception as e:
            raise UnavailableError(f"remote layer check failed: {e}") from e

    def _mounts(self, rec: SnapshotRecord, parents: Sequence[SnapshotRecord]) -> list[Mount]:
        return snapshot_mounts(
            rec.kind,
            str(self.upper_path(rec.id)),
            str(self.work_path(rec.id)),
            [self.layer_path(p) for p in parents],
            index_off=self.index_off,
        )

    # -- operations ---------------------------------------------------------------------

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        """An active snapshot `key` on top of committed `parent`; its mounts.

        With `containerd.io/snapshot.ref` in `labels` the layer may come from the RemoteHook:
        then the target is committed and AlreadyExistsError is raised (containerd's protocol).
        """
        labels = dict(labels or {})
        validate_labels(labels)
        target = labels.get(label_names.TARGET, "")
        if target:
            self._prepare_remote(key, parent, labels, target)
        return self._create(Kind.ACTIVE, key, parent, labels)

    def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        """A read-only view `key` of committed `parent`; its mounts."""
        labels = dict(labels or {})
        validate_labels(labels)
        return self._create(Kind.VIEW, key, parent, labels)

    def _prepare_remote(self, key: str, parent: str, labels: dict[str, str], target: str) -> None:
        """Raise AlreadyExistsError when TARGET exists or the hook provides it; else return."""
        with self.store.read() as tx:
            if tx.get(target) is not None:
                raise AlreadyExistsError(f"target snapshot {target!r} already exists")
        if self.remote is None:
            return
        with self._targets.hold(target):
            with self.store.read() as tx:
                if tx.get(target) is not None:
                    raise AlreadyExistsError(f"target snapshot {target!r} already exists")
                if tx.get(key) is not None:
                    raise AlreadyExistsError(f"snapshot {key!r} already exists")
                prec = self._require_parent(tx, parent)
                chain = [prec, *tx.parents(prec)] if prec else []
            self._check_remote(chain)

            def commit(layer: RemoteLayer) -> None:
                usage = Usage() if layer.remote else disk_usage(layer.layer_dir)
                tlabels = {k: v for k, v in labels.items() if not k.startswith(label_names.PREFIX)}
                tlabels.update(layer.labels)
                if layer.remote:
                    tlabels[label_names.REMOTE] = label_names.REMOTE_VALUE
                elif layer.local_reason:
                    tlabels[label_names.LOCAL_REASON] = layer.local_reason
                validate_labels(tlabels)
                with self.store.write() as tx:
                    prec = self._require_parent(tx, parent)
                    tx.insert(
                        target,
                        Kind.COMMITTED,
                        prec.id if prec else None,
                        tlabels,
                        _now(),
                        remote=layer.remote,
                        layer_dir=layer.layer_dir,
                        size=usage.size,
                        inodes=usage.inodes,
                    )

            parents = [LayerRecord.of(p) for p in chain if p.layer_dir]
            try:
                layer = self.remote.prepare_remote(key, parent or None, labels, parents, commit)
            except AlreadyExistsError:
                raise
            except ResourceLimitError as e:
                # Not a fallback: containerd's own unpack would fill the disk the same way.
                raise ResourceExhaustedError(f"snapshot {target!r}: {e}") from e
            except Exception:
                log.exception(
                    "REMOTE SNAPSHOT FAILED for %s (key %r): falling back to an ordinary "
                    "Prepare, containerd will download and unpack the layer",
                    target,
                    key,
                )
                return
            if layer is None:
                return
            log.info(
                "prepare %r: %s snapshot %s in %s",
                key,
                "remote" if layer.remote else "local",
                target,
                layer.layer_dir,
            )
        raise AlreadyExistsError(f"target snapshot {target!r} already exists")

    @staticmethod
    def _require_parent(tx: Txn, parent: str) -> SnapshotRecord | None:
        if not parent:
            return None
        prec = tx.get(parent)
        if prec is None:
            raise NotFoundError(f"parent snapshot {parent!r} does not exist")
        if prec.kind != Kind.COMMITTED:
            raise InvalidArgumentError(f"parent {parent!r} is not a committed snapshot")
        return prec

    def _create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        if not key:
            raise InvalidArgumentError("snapshot key must not be empty")
        with self.store.read() as tx:
            prec = self._require_parent(tx, parent)
            chain = [prec, *tx.parents(prec)] if prec else []
        self._check_remote(chain)
        tmp: Path | None = None
        final: Path | None = None
        try:
            with self.store.write() as tx:
                prec = self._require_parent(tx, parent)
                if tx.get(key) is not None:
                    raise AlreadyExistsError(f"snapshot {key!r} already exists")
                chain = [prec, *tx.parents(prec)] if prec else []
                tmp = Path(tempfile.mkdtemp(prefix="new-", dir=self.snapshots_dir))
                upper = tmp / "fs"
                upper.mkdir()
                os.chmod(upper, 0o755)
                if kind == Kind.ACTIVE:
                    (tmp / "work").mkdir()
                    os.chmod(tmp / "work", 0o711)
                if chain:
                    self._copy_owner(self.layer_path(chain[0]), upper)
                rec = tx.insert(key, kind, prec.id if prec else None, labels, _now())
                final = self.snapshots_dir / str(rec.id)
                if final.exists():  # left by a crash between rename and commit: no record has it
                    log.warning("removing stale snapshot directory %s", final)
                    shutil.rmtree(final)
                os.rename(tmp, final)
                tmp = None
        except BaseException:
            for d in (tmp, final):
                if d is not None:
                    shutil.rmtree(d, ignore_errors=True)
            raise
        return self._mounts(rec, chain)

    @staticmethod
    def _copy_owner(parent_dir: str, upper: Path) -> None:
        try:
            st = os.stat(parent_dir)
        except OSError as e:
            raise UnavailableError(f"parent layer {parent_dir} is not accessible: {e}") from e
        if (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
            os.lchown(upper, st.st_uid, st.st_gid)

    def mounts(self, key: str) -> list[Mount]:
        """The mounts of active or view snapshot `key`."""
        with self.store.read() as tx:
            rec = tx.require(key)
            if rec.kind not in (Kind.ACTIVE, Kind.VIEW):
                raise FailedPreconditionError(f"snapshot {key!r} is not active or view")
            chain = tx.parents(rec)
        self._check_remote(chain)
        return self._mounts(rec, chain)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        """Turn active snapshot `key` into committed snapshot `name` (labels replace its own)."""
        labels = dict(labels or {})
        validate_labels(labels)
        if not name:
            raise InvalidArgumentError("snapshot name must not be empty")
        with self.store.read() as tx:
            rec = tx.require(key)
        if rec.kind != Kind.ACTIVE:
            raise FailedPreconditionError(f"snapshot {key!r} is not active")
        usage = disk_usage(self.upper_path(rec.id))
        with self.store.write() as tx:
            cur = tx.require(key)
            if tx.get(name) is not None:
                raise AlreadyExistsError(f"snapshot {name!r} already exists")
            if cur.id != rec.id or cur.kind != Kind.ACTIVE:
                raise FailedPreconditionError(f"snapshot {key!r} is not active")
            tx.commit_active(rec.id, name, labels, _now(), usage.size, usage.inodes)

    def remove(self, key: str) -> None:
        """Drop snapshot `key` and its directory; refused while it has children.

        On a full disk the store gives up its reserve file to commit; if even that is used
        up, the snapshot's own directory is deleted first (it is being removed anyway, and a
        failed Remove is retried by containerd's GC), then the record."""
        try:
            rec = self._remove_record(key)
        except StoreFullError:
            with self.store.read() as tx:
                rec = tx.require(key)
                if tx.has_children(rec.id):
                    raise FailedPreconditionError(
                        f"cannot remove snapshot {key!r} with child"
                    ) from None
            log.warning("remove %r: the disk is full; deleting its files first", key)
            shutil.rmtree(self.snapshots_dir / str(rec.id), ignore_errors=True)
            rec = self._remove_record(key)
        d = self.snapshots_dir / str(rec.id)
        if d.exists():
            shutil.rmtree(d, ignore_errors=True)
        if rec.layer_dir and self.remote is not None:
            try:
                self.remote.release(LayerRecord.of(rec))
            except Exception:
                log.exception("releasing layer %s failed", rec.layer_dir)

    def _remove_record(self, key: str) -> SnapshotRecord:
        with self.store.write() as tx:
            rec = tx.require(key)
            if tx.has_children(rec.id):
                raise FailedPreconditionError(f"cannot remove snapshot {key!r} with child")
            tx.delete(rec.id)
        return rec

    def layer_users(self, layer_dir: str) -> int:
        """How many snapshots use the layer directory `layer_dir`."""
        with self.store.read() as tx:
            return tx.count_layer_users(layer_dir)

    @staticmethod
    def _info(rec: SnapshotRecord) -> Info:
        return Info(
            name=rec.name,
            parent=rec.parent,
            kind=rec.kind,
            created_at=rec.created_at,
            updated_at=rec.updated_at,
            labels=dict(rec.labels),
        )

    def stat(self, key: str) -> Info:
        """The Info of snapshot `key`."""
        with self.store.read() as tx:
            return self._info(tx.require(key))

    def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        """Update the labels of snapshot `info.name`: all of them (no paths, or `labels`) or
        the named ones (`labels.<key>`); an empty value removes a label. Other paths are
        immutable: InvalidArgumentError. pysoci's own labels (`pysoci.io/`) stay as they
        are: they are what serving a remote layer again needs."""
        validate_labels(info.labels)
        with self.store.write() as tx:
            rec = tx.require(info.name)
            labels = dict(rec.labels)
            if not fieldpaths:
                labels = dict(info.labels)
            for path in fieldpaths:
                if path.startswith("labels."):
                    k = path[len("labels.") :]
                    labels[k] = info.labels.get(k, "")
                elif path == "labels":
                    labels = dict(info.labels)
                else:
                    raise InvalidArgumentError(
                        f"cannot update {path!r} field on snapshot {info.name!r}"
                    )
            labels = {
                k: v for k, v in labels.items() if v != "" and not k.startswith(label_names.PREFIX)
            }
            labels.update({k: v for k, v in rec.labels.items() if k.startswith(label_names.PREFIX)})
            tx.set_labels(rec.id, labels, _now())
            out = tx.get_id(rec.id)
            assert out is not None
            return self._info(out)

    def usage(self, key: str) -> Usage:
        """Disk usage: walked for an active snapshot, recorded at commit otherwise."""
        with self.store.read() as tx:
            rec = tx.require(key)
        if rec.kind == Kind.ACTIVE:
            return disk_usage(self.upper_path(rec.id))
        return Usage(size=rec.size, inodes=rec.inodes)

    def cleanup(self) -> None:
        """Remove directories under ROOT/snapshots that no snapshot owns."""
        with self.store.write() as tx:
            ids = {str(i) for i in tx.ids()}
            stale = [e for e in os.scandir(self.snapshots_dir) if e.name not in ids]
        for e in stale:
            log.info("cleanup: removing %s", e.path)
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path, ignore_errors=True)
            else:
                os.unlink(e.path)

    def layers(self) -> list[LayerRecord]:
        """Snapshots whose directory another component made (remote or local layers), e.g.
        to restore lazy mounts after a restart."""
        with self.store.read() as tx:
            return [LayerRecord.of(r) for r in tx.all() if r.layer_dir]

    def add_labels(self, name: str, labels: Mapping[str, str]) -> None:
        """Set labels of snapshot `name` (pysoci's own included: for records of older
        versions moved into the metastore)."""
        validate_labels(labels)
        with self.store.write() as tx:
            rec = tx.require(name)
            tx.set_labels(rec.id, {**rec.labels, **labels}, _now())

    def close(self) -> None:
        """Close the store (idempotent)."""
        self.store.close()

    def list(self, filters: Sequence[str] = ()) -> list[Info]:
        """Every snapshot matching any of `filters` (containerd filter syntax)."""
        flt = parse_all(filters)
        with self.store.read() as tx:
            recs = tx.all()
        out = []
        for rec in recs:
            info = self._info(rec)

            def lookup(path: Sequence[str], info: Info = info) -> tuple[str, bool]:
                return _field(info, path)

            if flt.match(lookup):
                out.append(info)
        return out


_KIND_NAMES = {Kind.ACTIVE: "active", Kind.VIEW: "view", Kind.COMMITTED: "committed"}


def _field(info: Info, path: Sequence[str]) -> tuple[str, bool]:
    """containerd's snapshot filter adaptor."""
    if not path:
        return "", False
    head = path[0]
    if head == "kind":
        name = _KIND_NAMES.get(info.kind)
        return (name, True) if name else ("", False)
    if head == "name":
        return info.name, True
    if head == "parent":
        return info.parent, True
    if head == "labels":
        if not info.labels:
            return "", False
        k = ".".join(path[1:])
        return (info.labels[k], True) if k in info.labels else ("", False)
    return "", False
