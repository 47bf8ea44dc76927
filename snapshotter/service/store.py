"""The snapshot metastore: one sqlite database, `ROOT/metadata.db`, one keyspace.

Every change runs in one `BEGIN IMMEDIATE` transaction (`Store.write()`); reads see one
consistent snapshot (`Store.read()`). Each thread (grpcio's pool) gets its own connection;
the database is in WAL mode so readers never wait for the writer.

A full disk: sqlite needs room to write even to delete (WAL frames, the `-shm` index), and a
Remove that cannot commit frees nothing. The store keeps `metadata.reserve`, a preallocated
file of `RESERVE_BYTES` next to the database: before a transaction, when the filesystem has
less than that free, the file is deleted so the metastore can go on (Remove frees the
snapshot's space once committed), and it is made again once there is room. A write that still
finds the disk full is a StoreFullError (RESOURCE_EXHAUSTED) naming the free space, never
sqlite's bare "database or disk is full". Opening an existing store writes nothing.

Names (keys) are at most `MAX_NAME_BYTES`, bbolt's key bound that containerd's own metastore
and snapshotters have; error messages quote at most `QUOTED_NAME_CHARS` of a name.

Durability: `synchronous=FULL`. SIGKILL alone loses nothing even with NORMAL (a committed
transaction is in the WAL file before `COMMIT` returns), but on power loss NORMAL may roll
back the last commits, while containerd's own metadata (bbolt, fsync on every commit) keeps
its record of them: containerd would then reference snapshots pysoci forgot. One fsync per
snapshot operation is negligible next to unpacking a layer.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Final

from snapshotter.freespace import free_bytes
from snapshotter.service import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    SnapshotError,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MAX_NAME_BYTES: Final = 32768
"""bbolt's MaxKeySize: containerd's metastore (and its snapshotters') refuse longer keys."""
QUOTED_NAME_CHARS: Final = 256
RESERVE_FILE: Final = "metadata.reserve"
RESERVE_BYTES: Final = 8 << 20
"""What the metastore keeps preallocated for itself: hundreds of transactions' WAL frames."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,  -- names ROOT/snapshots/<id>, never reused
    name       TEXT    NOT NULL UNIQUE,            -- the key (active, view) or name (committed)
    parent_id  INTEGER REFERENCES snapshots(id),
    kind       INTEGER NOT NULL CHECK (kind IN (1, 2, 3)),
    created_at INTEGER NOT NULL,                   -- nanoseconds since the epoch, UTC
    updated_at INTEGER NOT NULL,
    labels     TEXT    NOT NULL DEFAULT '{}',      -- JSON object of strings
    remote     INTEGER NOT NULL DEFAULT 0,         -- a lazily served layer
    layer_dir  TEXT,                               -- set when not ROOT/snapshots/<id>/fs
    size       INTEGER NOT NULL DEFAULT 0,         -- usage, stored at commit
    inodes     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
"""

_SELECT = """
SELECT s.id, s.name, p.name, s.parent_id, s.kind, s.created_at, s.updated_at, s.labels,
       s.remote, s.layer_dir, s.size, s.inodes
FROM snapshots s LEFT JOIN snapshots p ON s.parent_id = p.id
"""


class Kind(IntEnum):
    """Snapshot kinds, numbered as containerd's `Kind` enum."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


class StoreError(SnapshotError):
    """The metastore cannot be used (closed, or a newer schema)."""


class StoreFullError(StoreError, ResourceExhaustedError):
    """The filesystem of the metastore is full."""


def shown(name: str) -> str:
    """A snapshot name quoted for a message, its middle cut when it is long."""
    if len(name) <= 2 * QUOTED_NAME_CHARS:
        return repr(name)
    cut = len(name) - 2 * QUOTED_NAME_CHARS
    return f"{name[:QUOTED_NAME_CHARS]!r} [… {cut} characters …] {name[-QUOTED_NAME_CHARS:]!r}"


def check_name(name: str) -> None:
    """InvalidArgumentError for a name longer than containerd's metastore takes."""
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise InvalidArgumentError(
            f"snapshot key {shown(name)} is {size} bytes, more than {MAX_NAME_BYTES}"
        )


@dataclass(frozen=True)
class SnapshotRecord:
    """One row of the metastore."""

    id: int
    name: str
    parent: str  # "" when there is none
    parent_id: int | None
    kind: Kind
    created_at: int  # ns since the epoch, UTC
    updated_at: int
    labels: Mapping[str, str] = field(default_factory=dict)
    remote: bool = False
    layer_dir: str | None = None
    size: int = 0
    inodes: int = 0


def _record(row: tuple[object, ...]) -> SnapshotRecord:
    (
        id_,
        name,
        parent,
        parent_id,
        kind,
        created,
        updated,
        labels,
        remote,
        layer_dir,
        size,
        inodes,
    ) = row
    return SnapshotRecord(
        id=int(id_),  # type: ignore[call-overload]
        name=str(name),
        parent="" if parent is None else str(parent),
        parent_id=None if parent_id is None else int(parent_id),  # type: ignore[call-overload]
        kind=Kind(int(kind)),  # type: ignore[call-overload]
        created_at=int(created),  # type: ignore[call-overload]
        updated_at=int(updated),  # type: ignore[call-overload]
        labels=json.loads(str(labels)),
        remote=bool(remote),
        layer_dir=None if layer_dir is None else str(layer_dir),
        size=int(size),  # type: ignore[call-overload]
        inodes=int(inodes),  # type: ignore[call-overload]
    )


def _labels_json(labels: Mapping[str, str]) -> str:
    return json.dumps(dict(labels), sort_keys=True, ensure_ascii=False)


class Txn:
    """Queries and changes inside one transaction (obtained from `Store.read`/`Store.write`)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._c = conn

    def get(self, name: str) -> SnapshotRecord | None:
        """The snapshot of that key/name, or None."""
        row = self._c.execute(_SELECT + " WHERE s.name = ?", (name,)).fetchone()
        return None if row is None else _record(row)

    def get_id(self, id_: int) -> SnapshotRecord | None:
        """The snapshot of that id, or None."""
        row = self._c.execute(_SELECT + " WHERE s.id = ?", (id_,)).fetchone()
        return None if row is None else _record(row)

    def require(self, name: str) -> SnapshotRecord:
        """The snapshot of that key/name; NotFoundError when there is none."""
        rec = self.get(name)
        if rec is None:
            raise NotFoundError(f"snapshot {shown(name)} does not exist")
        return rec

    def parents(self, rec: SnapshotRecord) -> list[SnapshotRecord]:
        """The parent chain of `rec`, nearest first."""
        chain: list[SnapshotRecord] = []
        pid = rec.parent_id
        while pid is not None:
            parent = self.get_id(pid)
            if parent is None:  # the foreign key makes this impossible; say so if it happens
                raise NotFoundError(f"parent {pid} of snapshot {rec.name!r} is missing")
            chain.append(parent)
            pid = parent.parent_id
        return chain

    def count_layer_users(self, layer_dir: str) -> int:
        """How many snapshots have `layer_dir` as their directory."""
        row = self._c.execute("SELECT COUNT(*) FROM snapshots WHERE layer_dir = ?", (layer_dir,))
        return int(row.fetchone()[0])

    def has_children(self, id_: int) -> bool:
        """Whether any snapshot has `id_` as its parent."""
        row = self._c.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (id_,))
        return row.fetchone() is not None

    def all(self) -> list[SnapshotRecord]:
        """Every snapshot, in id order."""
        return [_record(r) for r in self._c.execute(_SELECT + " ORDER BY s.id")]

    def ids(self) -> set[int]:
        """The ids of every snapshot."""
        return {int(r[0]) for r in self._c.execute("SELECT id FROM snapshots")}

    def insert(
        self,
        name: str,
        kind: Kind,
        parent_id: int | None,
        labels: Mapping[str, str],
        now: int,
        *,
        remote: bool = False,
        layer_dir: str | None = None,
        size: int = 0,
        inodes: int = 0,
    ) -> SnapshotRecord:
        """Add a snapshot; AlreadyExistsError when the name is taken."""
        check_name(name)
        try:
            cur = self._c.execute(
                "INSERT INTO snapshots (name, parent_id, kind, created_at, updated_at, labels,"
                " remote, layer_dir, size, inodes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, parent_id, int(kind), now, now, _labels_json(labels), int(remote),
                 layer_dir, size, inodes),
            )  # fmt: skip
        except sqlite3.IntegrityError as e:
            if "UNIQUE" in str(e):
                raise AlreadyExistsError(f"snapshot {shown(name)} already exists") from None
            raise
        rec = self.get_id(int(cur.lastrowid or 0))
        assert rec is not None
        return rec

    def commit_active(
        self, id_: int, name: str, labels: Mapping[str, str], now: int, size: int, inodes: int
    ) -> SnapshotRecord:
        """Turn active snapshot `id_` into committed `name` (same id, so the same directory)."""
        check_name(name)
        try:
            self._c.execute(
                "UPDATE snapshots SET name = ?, kind = ?, labels = ?, created_at = ?,"
                " updated_at = ?, size = ?, inodes = ? WHERE id = ?",
                (name, int(Kind.COMMITTED), _labels_json(labels), now, now, size, inodes, id_),
            )
        except sqlite3.IntegrityError as e:
            if "UNIQUE" in str(e):
                raise AlreadyExistsError(f"snapshot {shown(name)} already exists") from None
            raise
        rec = self.get_id(id_)
        assert rec is not None
        return rec

    def set_labels(self, id_: int, labels: Mapping[str, str], now: int) -> None:
        """Replace the labels of snapshot `id_` and stamp its update time."""
        self._c.execute(
            "UPDATE snapshots SET labels = ?, updated_at = ? WHERE id = ?",
            (_labels_json(labels), now, id_),
        )

    def delete(self, id_: int) -> None:
        """Drop snapshot `id_` (the caller checked it has no children)."""
        self._c.execute("DELETE FROM snapshots WHERE id = ?", (id_,))


def _disk_full(e: BaseException, path: Path) -> bool:
    """Whether a sqlite or OS error is the filesystem being full (sqlite reports a full disk
    as SQLITE_FULL, or as an I/O error when its `-shm` file cannot grow)."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    if not isinstance(e, sqlite3.Error):
        return False
    code = getattr(e, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL:
        return True
    if code is not None and code & 0xFF == sqlite3.SQLITE_IOERR:
        with contextlib.suppress(OSError):
            return free_bytes(path.parent) < RESERVE_BYTES
    return False


class Store:
    """The sqlite metastore under `root`; safe to use from many threads at once."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / "metadata.db"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._reserve = self.path.with_name(RESERVE_FILE)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        self._closed = False
        self._release_reserve_if_low()
        try:
            self._open()
        except StoreError:
            self.close()
            raise
        except (sqlite3.Error, OSError) as e:
            self.close()
            if _disk_full(e, self.path):
                raise self._full(e) from e
            raise StoreError(f"{self.path}: cannot open the metastore: {e}") from e
        self._make_reserve()

    def _open(self) -> None:
        conn = self._conn()
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode=WAL")
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {version} is newer than this pysoci")
        if version == SCHEMA_VERSION:
            return  # nothing to write: a start on a full disk opens the store as it is
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # a failed COMMIT may have rolled back already
                conn.execute("ROLLBACK")
            raise

    def _full(self, e: BaseException) -> StoreFullError:
        try:
            free = f"{free_bytes(self.path.parent)} bytes free"
        except OSError:
            free = "free space unknown"
        return StoreFullError(
            f"{self.path}: the filesystem is full ({free}, and the metastore's reserve is "
            f"used up): {e}"
        )

    def _release_reserve_if_low(self) -> None:
        """Delete the reserve file when the filesystem has less free than it holds."""
        with self._lock:
            try:
                if not self._reserve.exists() or free_bytes(self.path.parent) >= RESERVE_BYTES:
                    return
                self._reserve.unlink()
            except OSError:
                return
        log.warning(
            "%s: the filesystem is nearly full: released the metastore's reserve of %d bytes "
            "so that snapshots can still be removed",
            self.path.parent,
            RESERVE_BYTES,
        )

    def _make_reserve(self) -> None:
        """Make the reserve file again, when there is ample room for it."""
        with self._lock:
            if self._reserve.exists():
                return
            tmp = self._reserve.with_name(RESERVE_FILE + ".tmp")
            try:
                if free_bytes(self.path.parent) < 4 * RESERVE_BYTES:
                    return
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                try:
                    os.posix_fallocate(fd, 0, RESERVE_BYTES)
                finally:
                    os.close(fd)
                os.rename(tmp, self._reserve)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                log.debug("cannot make the metastore's reserve %s: %s", self._reserve, e)

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError(f"{self.path}: the metastore is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=60.0
            )
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            with self._lock:
                if self._closed:
                    conn.close()
                    raise StoreError(f"{self.path}: the metastore is closed")
                self._conns.append(conn)
            self._local.conn = conn
        return conn

    @contextmanager
    def _txn(self, begin: str) -> Iterator[Txn]:
        conn = self._conn()
        if conn.in_transaction:
            raise StoreError("nested metastore transaction")
        try:
            conn.execute(begin)
            try:
                yield Txn(conn)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLITE_FULL and I/O errors may roll back by themselves
                    conn.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OSError) as e:
            if _disk_full(e, self.path):
                raise self._full(e) from e
            raise

    def read(self) -> AbstractContextManager[Txn]:
        """A read-only transaction: one consistent view of the store."""
        return self._txn("BEGIN")

    @contextmanager
    def write(self) -> Iterator[Txn]:
        """A write transaction (`BEGIN IMMEDIATE`): committed when the block ends, rolled back
        when it raises. On a nearly full filesystem the reserve file is given up first."""
        self._release_reserve_if_low()
        with self._txn("BEGIN IMMEDIATE") as tx:
            yield tx
        self._make_reserve()

    def close(self) -> None:
        """Close every connection; closing twice is fine."""
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
