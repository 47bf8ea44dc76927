"""The typed errors pysoci raises for bad input and unavailable data.

Every malformed external input (zTOC, checkpoint blob, tar header, manifest, compressed
stream) becomes a subclass of FormatError; the service maps these to gRPC codes and the
filesystem to errno, so nothing else in the code base needs to guess.
"""


class PysociError(Exception):
    """Base of every error pysoci raises on purpose."""


class FormatError(PysociError, ValueError):
    """Input does not follow the format it claims to be in."""


class ZtocError(FormatError):
    """A zTOC flatbuffer is malformed or inconsistent."""


class ZtocMismatchError(ZtocError):
    """A zTOC proven wrong by its layer's own verified bytes: a checkpoint, a tar header or
    the whole layer's digest does not match what the zTOC says."""


class ZtocRejectedError(PysociError):
    """A layer whose zTOC was proven wrong: not served lazily (reads fail, mounts refuse)."""


class CheckpointError(FormatError):
    """A checkpoint (zinfo) blob is malformed or inconsistent with its zTOC."""


class TarFormatError(FormatError):
    """A tar stream is malformed or uses an entry kind SOCI does not support."""


class CompressionError(FormatError):
    """Compressed data is corrupt, truncated or in an unsupported format."""


class ManifestError(FormatError):
    """An OCI manifest, index, descriptor or SOCI artifact is malformed."""


class DigestMismatchError(FormatError):
    """Bytes do not hash to the digest that names them."""


class ContentNotFoundError(PysociError, LookupError):
    """A blob, manifest or tag is not in the content store."""


class TimestampError(FormatError):
    """A timestamp string (RFC 3339) is malformed or out of range."""


class InvalidReferenceError(FormatError):
    """An image reference is not valid."""


class RegistryError(PysociError):
    """A registry could not do what was asked."""


class RegistryUnavailableError(RegistryError):
    """The registry could not be reached, or kept failing until the retry budget ran out."""


class AuthenticationError(RegistryError):
    """The registry refused our credentials (or we had none where it needs some)."""


class RegistryNotFoundError(RegistryError, ContentNotFoundError):
    """The registry has no such repository, manifest, tag or blob."""


class RegistryResponseError(RegistryError, FormatError):
    """The registry answered something malformed or unexpected (wrong status, size, range)."""


class ResourceLimitError(PysociError):
    """An input needs more than a bound allows: a layer expanding past its bound on disk, or
    a write that would eat into the filesystem's free-space reserve."""


class LayerClosedError(PysociError):
    """The layer was unmounted (its span manager closed) while it was being read."""
