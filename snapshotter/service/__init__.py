"""The containerd-facing service: gRPC servicer, snapshot semantics, sqlite metastore, mounts.

The typed errors of the service live here so every module of the package (and the
remote-snapshot hook) can raise them; `server.py` maps each one to its gRPC status code.
"""

from snapshotter.errors import PysociError


class SnapshotError(PysociError):
    """Base of the errors a snapshot operation answers with (one gRPC code per subclass)."""


class NotFoundError(SnapshotError, LookupError):
    """The snapshot (or its parent) does not exist: NOT_FOUND."""


class AlreadyExistsError(SnapshotError):
    """A snapshot of that key or name exists already: ALREADY_EXISTS."""


class FailedPreconditionError(SnapshotError):
    """The snapshot is in the wrong state for the operation: FAILED_PRECONDITION."""


class InvalidArgumentError(SnapshotError, ValueError):
    """The request is malformed (labels, filters, field masks): INVALID_ARGUMENT."""


class UnavailableError(SnapshotError):
    """A remote layer the snapshot needs cannot be served now: UNAVAILABLE."""


class ResourceExhaustedError(SnapshotError):
    """A bound was reached (the disk's free-space reserve, a layer's expansion bound):
    RESOURCE_EXHAUSTED."""


__all__ = [
    "AlreadyExistsError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NotFoundError",
    "ResourceExhaustedError",
    "SnapshotError",
    "UnavailableError",
]
