"""Image references (`[registry/]repository[:tag][@digest]`), normalised the way Docker does.

Pure: text in, `Reference` out; anything malformed raises `InvalidReferenceError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from snapshotter.errors import InvalidReferenceError, ManifestError
from snapshotter.soci.oci import validate_digest

DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io"})
_OFFICIAL_NAMESPACE = "library"
NAME_TOTAL_LENGTH_MAX = 255

_TAG_RE = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_PATH_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST_RE = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+(?:%[\w.-]+)?\])(?::[0-9]+)?"
)
_HEX64_RE = re.compile(r"[a-f0-9]{64}")


@dataclass(frozen=True)
class Reference:
    """A normalised image reference. At least one of `tag` and `digest` is set when parsed."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        text = self.locator
        if self.tag is not None:
            text += ":" + self.tag
        if self.digest is not None:
            text += "@" + self.digest
        return text

    @property
    def locator(self) -> str:
        """`registry/repository`."""
        return f"{self.registry}/{self.repository}"

    @property
    def object(self) -> str:
        """What to ask the registry for: the digest if set, else the tag."""
        if self.digest is not None:
            return self.digest
        if self.tag is not None:
            return self.tag
        raise InvalidReferenceError(f"reference {self.locator} has neither a tag nor a digest")

    def with_digest(self, digest: str | None) -> Reference:
        """A copy naming `digest` (validated; the tag is kept)."""
        if digest is not None:
            _check_digest(digest)
        return replace(self, digest=digest)

    def with_tag(self, tag: str | None) -> Reference:
        """A copy naming `tag` instead of any tag or digest."""
        if tag is not None:
            _check_tag(tag)
        return replace(self, tag=tag, digest=None)


def _check_tag(tag: str) -> None:
    if _TAG_RE.fullmatch(tag) is None:
        raise InvalidReferenceError(
            f"invalid tag {tag[:140]!r}: up to 128 characters of letters, digits, '_', '.', '-',"
            " not starting with '.' or '-'"
        )


def _check_digest(digest: str) -> None:
    try:
        validate_digest(digest)
    except ManifestError as exc:
        raise InvalidReferenceError(f"invalid reference digest: {exc}") from None


def _split_registry(name: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    is_registry = sep and (
        "." in first or ":" in first or first == "localhost" or first.lower() != first
    )
    if not is_registry:
        return DOCKER_HUB, name
    return first, rest


def parse_reference(text: str, *, default_tag: str | None = "latest") -> Reference:
    """Parse and normalise an image reference.

    `ubuntu` → `docker.io/library/ubuntu:latest`; `user/app` → `docker.io/user/app:latest`;
    a first component is a registry when it contains `.` or `:`, is `localhost`, or has upper
    case letters. Without a digest the tag defaults to `default_tag` (None: leave it unset).
    """
    if not isinstance(text, str) or not text:
        raise InvalidReferenceError("empty image reference")
    if len(text) > 4096:
        raise InvalidReferenceError(f"image reference is too long ({len(text)} characters)")
    shown = repr(text[:300])
    name, at, digest_text = text.partition("@")
    digest: str | None = None
    if at:
        if not digest_text:
            raise InvalidReferenceError(f"invalid reference {shown}: empty digest after '@'")
        try:
            validate_digest(digest_text)
        except ManifestError as exc:
            raise InvalidReferenceError(f"invalid reference {shown}: {exc}") from None
        digest = digest_text
    tag: str | None = None
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not tag:
            raise InvalidReferenceError(f"invalid reference {shown}: empty tag after ':'")
        if _TAG_RE.fullmatch(tag) is None:
            raise InvalidReferenceError(
                f"invalid reference {shown}: invalid tag {tag[:140]!r} (letters, digits, '_',"
                " '.', '-'; at most 128; not starting with '.' or '-')"
            )
    if not name:
        raise InvalidReferenceError(f"invalid reference {shown}: empty repository name")
    if _HEX64_RE.fullmatch(name):
        raise InvalidReferenceError(
            f"invalid reference {shown}: a repository name cannot be a 64-character hex string"
        )
    registry, repository = _split_registry(name)
    if _HOST_RE.fullmatch(registry) is None:
        raise InvalidReferenceError(f"invalid reference {shown}: invalid registry {registry!r}")
    if registry in _DOCKER_HUB_ALIASES:
        registry = DOCKER_HUB
        if repository and "/" not in repository:
            repository = f"{_OFFICIAL_NAMESPACE}/{repository}"
    if not repository:
        raise InvalidReferenceError(f"invalid reference {shown}: empty repository name")
    for component in repository.split("/"):
        if _PATH_COMPONENT_RE.fullmatch(component) is None:
            why = (
                "must be lowercase"
                if component.lower() != component
                else "components are lowercase letters and digits separated by '.', '_', '__'"
                " or dashes"
            )
            raise InvalidReferenceError(
                f"invalid reference {shown}: invalid repository name {repository[:260]!r} ({why})"
            )
    locator = f"{registry}/{repository}"
    if len(locator) > NAME_TOTAL_LENGTH_MAX:
        raise InvalidReferenceError(
            f"invalid reference {shown}: repository name is {len(locator)} characters, more than"
            f" {NAME_TOTAL_LENGTH_MAX}"
        )
    if tag is None and digest is None and default_tag is not None:
        _check_tag(default_tag)
        tag = default_tag
    return Reference(registry, repository, tag, digest)


def validate_repository(name: str) -> str:
    """Return `name` if it is a valid repository path (`a/b/c`, lower case), else raise."""
    if (
        not name
        or len(name) > NAME_TOTAL_LENGTH_MAX
        or any(_PATH_COMPONENT_RE.fullmatch(c) is None for c in name.split("/"))
    ):
        raise InvalidReferenceError(f"invalid repository name {name[:260]!r}")
    return name
