"""The snapshot metastore: one sqlite database, `ROOT/metadata.db`, one keyspace.

Every change runs in one `BEGIN IMMEDIATE` transaction (`Store.write()`); reads see one
consistent snapshot (`Store.read()`). Each thread (grpcio's pool) gets its own connection;
the database is in WAL mode so readers never wait for the writer.

Durability: `synchronous=FULL`. SIGKILL alone loses nothing even with NORMAL (a committed
transaction is in the WAL file before `COMMIT` returns), but on power loss NORMAL may roll
back the last commits, while containerd's own metadata (bbolt, fsync on every commit) keeps
its record of them: containerd would then reference snapshots pysoci forgot. One fsync per
snapshot operation is negligible next to unpacking a layer.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from snapshotter.service import AlreadyExistsError, NotFoundError, SnapshotError

SCHEMA_VERSION = 1

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
            raise NotFoundError(f"snapshot {name!r} does not exist")
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
        try:
            cur = self._c.execute(
                "INSERT INTO snapshots (name, parent_id, kind, created_at, updated_at, labels,"
                " remote, layer_dir, size, inodes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, parent_id, int(kind), now, now, _labels_json(labels), int(remote),
                 layer_dir, size, inodes),
            )  # fmt: skip
        except sqlite3.IntegrityError as e:
            if "UNIQUE" in str(e):
                raise AlreadyExistsError(f"snapshot {name!r} already exists") from None
            raise
        rec = self.get_id(int(cur.lastrowid or 0))
        assert rec is not None
        return rec

    def commit_active(
        self, id_: int, name: str, labels: Mapping[str, str], now: int, size: int, inodes: int
    ) -> SnapshotRecord:
        """Turn active snapshot `id_` into committed `name` (same id, so the same directory)."""
        try:
            self._c.execute(
                "UPDATE snapshots SET name = ?, kind = ?, labels = ?, created_at = ?,"
                " updated_at = ?, size = ?, inodes = ? WHERE id = ?",
                (name, int(Kind.COMMITTED), _labels_json(labels), now, now, size, inodes, id_),
            )
        except sqlite3.IntegrityError as e:
            if "UNIQUE" in str(e):
                raise AlreadyExistsError(f"snapshot {name!r} already exists") from None
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


class Store:
    """The sqlite metastore under `root`; safe to use from many threads at once."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / "metadata.db"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        self._closed = False
        conn = self._conn()
        conn.execute("PRAGMA journal_mode=WAL")
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {version} is newer than this pysoci")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

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
        conn.execute(begin)
        try:
            yield Txn(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def read(self) -> AbstractContextManager[Txn]:
        """A read-only transaction: one consistent view of the store."""
        return self._txn("BEGIN")

    def write(self) -> AbstractContextManager[Txn]:
        """A write transaction (`BEGIN IMMEDIATE`): committed when the block ends, rolled back
        when it raises."""
        return self._txn("BEGIN IMMEDIATE")

    def close(self) -> None:
        """Close every connection; closing twice is fine."""
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
