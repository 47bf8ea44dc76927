"""OCI and Docker image manifests, image indexes, descriptors, digests and platforms.

Pure and synchronous: bytes in, typed objects out. Every malformed input raises
`ManifestError`; nothing else (KeyError, TypeError, RecursionError, ...) escapes.

Serialisation is canonical and matches Go's `encoding/json` on the image-spec structs:
compact, fields in struct order, empty optional fields omitted, map keys sorted, and
`<`, `>`, `&`, U+2028, U+2029 escaped, so a manifest built here hashes the same as one
built by containerd or soci from the same values.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import platform as _pyplatform
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, TypeVar

from snapshotter.errors import DigestMismatchError, ManifestError

# --- media types -------------------------------------------------------------------------

MEDIA_TYPE_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_OCI_EMPTY = "application/vnd.oci.empty.v1+json"
MEDIA_TYPE_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPE_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MEDIA_TYPE_OCI_LAYER_NONDISTRIBUTABLE = "application/vnd.oci.image.layer.nondistributable.v1.tar"
MEDIA_TYPE_OCI_LAYER_NONDISTRIBUTABLE_GZIP = (
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
)
MEDIA_TYPE_OCI_LAYER_NONDISTRIBUTABLE_ZSTD = (
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
)

MEDIA_TYPE_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_TYPE_DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_TYPE_DOCKER_SCHEMA1_MANIFEST = "application/vnd.docker.distribution.manifest.v1+json"
MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED_MANIFEST = (
    "application/vnd.docker.distribution.manifest.v1+prettyjws"
)
MEDIA_TYPE_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_TYPE_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
MEDIA_TYPE_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_TYPE_DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"
MEDIA_TYPE_DOCKER_LAYER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

MANIFEST_MEDIA_TYPES = frozenset({MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST})
INDEX_MEDIA_TYPES = frozenset({MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_DOCKER_MANIFEST_LIST})

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
# BuildKit marks attestation (SBOM/provenance) manifests in an index with this annotation.
ANNOTATION_DOCKER_REFERENCE_TYPE = "vnd.docker.reference.type"

DEFAULT_MAX_MANIFEST_SIZE = 4 * 1024 * 1024

# Duplicated from snapshotter.soci.index (which imports this module); a test keeps them equal.
_SOCI_INDEX_V2_ARTIFACT_TYPE = "application/vnd.amazon.soci.index.v2+json"
_MAX_INT64 = 2**63 - 1

# --- JSON ---------------------------------------------------------------------------------

_GO_HTML_ESCAPES = str.maketrans(
    {
        "<": "\\u003c",
        ">": "\\u003e",
        "&": "\\u0026",
        "\u2028": "\\u2028",
        "\u2029": "\\u2029",
    }
)


def canonical_json(obj: object) -> bytes:
    """Encode `obj` as compact UTF-8 JSON the way Go's `json.Marshal` would.

    Dict key order is kept as given (callers build dicts in Go struct field order and sort
    map keys themselves).
    """
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    # The escaped characters can only occur inside JSON strings, so translating the whole
    # document is safe.
    return text.translate(_GO_HTML_ESCAPES).encode("utf-8")


def _reject_constant(name: str) -> object:
    raise ManifestError(f"invalid JSON number {name}")


def decode_json(data: bytes, *, max_size: int, what: str = "manifest") -> object:
    """Decode UTF-8 JSON of at most `max_size` bytes; any failure is a ManifestError."""
    if len(data) > max_size:
        raise ManifestError(f"{what} is {len(data)} bytes, more than the limit of {max_size}")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{what} is not valid UTF-8: {exc}") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ManifestError(f"{what} JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and int() digit limits
        raise ManifestError(f"{what} is not valid JSON: {exc}") from None


def _text(value: str, what: str) -> str:
    # json.loads accepts lone surrogate escapes ("\ud800"), which cannot be re-encoded.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ManifestError(f"{what} contains an invalid unicode escape") from None
    return value


def _as_object(value: object, what: str) -> Mapping[str, object]:
    if not isinstance(value, dict):
        raise ManifestError(f"{what} must be a JSON object, got {_json_type(value)}")
    return value


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _opt_str(obj: Mapping[str, object], key: str, what: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ManifestError(f"{what}.{key} must be a string, got {_json_type(value)}")
    return _text(value, f"{what}.{key}")


def _req_str(obj: Mapping[str, object], key: str, what: str) -> str:
    if obj.get(key) is None:
        raise ManifestError(f"{what}.{key} is missing")
    return _opt_str(obj, key, what)


def _str_list(obj: Mapping[str, object], key: str, what: str) -> tuple[str, ...]:
    value = obj.get(key)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ManifestError(f"{what}.{key} must be an array, got {_json_type(value)}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ManifestError(f"{what}.{key}[{i}] must be a string, got {_json_type(item)}")
        out.append(_text(item, f"{what}.{key}[{i}]"))
    return tuple(out)


def _annotations(obj: Mapping[str, object], what: str) -> dict[str, str]:
    value = obj.get("annotations")
    if value is None:
        return {}
    mapping = _as_object(value, f"{what}.annotations")
    out: dict[str, str] = {}
    for k, v in mapping.items():
        if not isinstance(v, str):
            raise ManifestError(f"{what}.annotations[{k!r}] must be a string, got {_json_type(v)}")
        out[_text(k, f"{what}.annotations key")] = _text(v, f"{what}.annotations[{k!r}]")
    return out


def _descriptor_list(obj: Mapping[str, object], key: str, what: str) -> tuple[Descriptor, ...]:
    value = obj.get(key)
    if value is None:
        raise ManifestError(f"{what}.{key} is missing")
    if not isinstance(value, list):
        raise ManifestError(f"{what}.{key} must be an array, got {_json_type(value)}")
    return tuple(Descriptor.from_json_obj(d, f"{what}.{key}[{i}]") for i, d in enumerate(value))


def _sorted_map(mapping: Mapping[str, str]) -> dict[str, str]:
    # Go sorts map keys by their UTF-8 bytes; for valid strings that is code point order.
    return {k: mapping[k] for k in sorted(mapping)}


# --- digests ------------------------------------------------------------------------------

_DIGEST_RE = re.compile(r"([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")
_DIGEST_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_HEX_RE = re.compile(r"[0-9a-f]+")


def validate_digest(digest: object) -> str:
    """Return `digest` if it is a well-formed sha256 or sha512 digest, else raise ManifestError."""
    if not isinstance(digest, str):
        raise ManifestError(f"digest must be a string, got {_json_type(digest)}")
    m = _DIGEST_RE.fullmatch(digest)
    if m is None:
        raise ManifestError(f"invalid digest {digest[:200]!r}: expected <algorithm>:<hex>")
    algorithm, encoded = m.group(1), m.group(2)
    length = _DIGEST_HEX_LENGTH.get(algorithm)
    if length is None:
        raise ManifestError(
            f"unsupported digest algorithm {algorithm!r} in {digest[:200]!r} "
            "(supported: sha256, sha512)"
        )
    if len(encoded) != length or _HEX_RE.fullmatch(encoded) is None:
        raise ManifestError(
            f"invalid {algorithm} digest {digest[:200]!r}: expected {length} lowercase hex digits"
        )
    return digest


def sha256_digest(data: bytes) -> str:
    """The `sha256:<hex>` digest of `data`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_hasher(digest: str) -> hashlib._Hash:
    """A fresh hash object for the algorithm of `digest` (validated)."""
    algorithm = validate_digest(digest).split(":", 1)[0]
    return hashlib.new(algorithm)


# --- platforms ----------------------------------------------------------------------------

_PLATFORM_PART_RE = re.compile(r"[A-Za-z0-9_.-]+")
_KNOWN_OSES = frozenset(
    {
        "aix",
        "android",
        "darwin",
        "dragonfly",
        "freebsd",
        "illumos",
        "ios",
        "js",
        "linux",
        "netbsd",
        "openbsd",
        "plan9",
        "solaris",
        "wasip1",
        "windows",
    }
)
_ARM_MACHINE_RE = re.compile(r"armv(\d+)l?")


@dataclass(frozen=True)
class Platform:
    """An OCI platform. Compare with `matches`, which normalises architecture aliases."""

    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""
    os_features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "os_features", tuple(self.os_features))

    def normalized(self) -> Platform:
        """Canonical spelling: `x86_64`→`amd64`, `aarch64`→`arm64` (variant `v8` by
        default), `arm` variant `v7` by default, lower case."""
        os_name = self.os.lower()
        arch = self.architecture.lower()
        variant = self.variant.lower()
        if variant.isdigit():
            variant = "v" + variant
        m = _ARM_MACHINE_RE.fullmatch(arch)
        if m is not None:  # uname spellings such as armv7l
            arch, variant = "arm", variant or "v" + m.group(1)
        if arch in ("i386", "i486", "i586", "i686", "x86"):
            arch = "386"
        elif arch in ("x86_64", "x86-64", "amd64"):
            arch = "amd64"
            if variant == "v1":
                variant = ""
        elif arch in ("aarch64", "arm64"):
            arch = "arm64"
            if variant in ("", "v8.0"):
                variant = "v8"
            elif variant == "v9.0":
                variant = "v9"
        elif arch == "armhf":
            arch, variant = "arm", "v7"
        elif arch == "armel":
            arch, variant = "arm", "v6"
        elif arch == "arm" and not variant:
            variant = "v7"
        return Platform(os_name, arch, variant, self.os_version, self.os_features)

    def match_rank(self, candidate: Platform) -> int | None:
        """How well `candidate` (an image's platform) suits this wanted platform.

        0 = exact (after normalisation), 1 = same OS and architecture with one side not
        naming a variant, None = no match.
        """
        want, have = self.normalized(), candidate.normalized()
        if want.os != have.os or want.architecture != have.architecture:
            return None
        if want.variant == have.variant:
            return 0
        if not want.variant or not have.variant:
            return 1
        return None

    def matches(self, candidate: Platform) -> bool:
        """True if an image built for `candidate` runs on this platform."""
        return self.match_rank(candidate) is not None

    def __str__(self) -> str:
        parts = [self.os or "?", self.architecture or "?"]
        if self.variant:
            parts.append(self.variant)
        return "/".join(parts)

    def to_json_obj(self) -> dict[str, object]:
        """The image-spec JSON object, in Go field order."""
        obj: dict[str, object] = {"architecture": self.architecture, "os": self.os}
        if self.os_version:
            obj["os.version"] = self.os_version
        if self.os_features:
            obj["os.features"] = list(self.os_features)
        if self.variant:
            obj["variant"] = self.variant
        return obj

    @classmethod
    def from_json_obj(cls, value: object, what: str = "platform") -> Platform:
        """Parse and validate an image-spec platform object."""
        obj = _as_object(value, what)
        return cls(
            os=_req_str(obj, "os", what),
            architecture=_req_str(obj, "architecture", what),
            variant=_opt_str(obj, "variant", what),
            os_version=_opt_str(obj, "os.version", what),
            os_features=_str_list(obj, "os.features", what),
        )


def parse_platform(spec: str) -> Platform:
    """Parse `os[/arch[/variant]]` (or a bare architecture) into a normalised Platform.

    A bare OS takes the host architecture; a bare architecture takes the host OS.
    """
    parts = spec.split("/")
    if not spec or len(parts) > 3 or any(_PLATFORM_PART_RE.fullmatch(p) is None for p in parts):
        raise ManifestError(f"invalid platform {spec[:100]!r}: expected os[/arch[/variant]]")
    host = host_platform()
    if len(parts) == 1:
        if parts[0].lower() in _KNOWN_OSES:
            os_name = parts[0].lower()
            arch, variant = (host.architecture, host.variant) if os_name == host.os else ("", "")
            if not arch:
                raise ManifestError(f"platform {spec!r} names no architecture")
            return Platform(os_name, arch, variant).normalized()
        return Platform(host.os, parts[0]).normalized()
    variant = parts[2] if len(parts) == 3 else ""
    return Platform(parts[0], parts[1], variant).normalized()


def host_platform() -> Platform:
    """The platform of this machine, normalised."""
    if sys.platform.startswith("linux"):
        os_name = "linux"
    elif sys.platform == "win32":
        os_name = "windows"
    else:
        os_name = sys.platform
    machine = _pyplatform.machine() or "unknown"
    return Platform(os_name, machine).normalized()


# --- descriptors --------------------------------------------------------------------------


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor. Annotations are stored read-only."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    artifact_type: str = ""
    urls: tuple[str, ...] = ()
    data: bytes | None = None

    def __post_init__(self) -> None:
        validate_digest(self.digest)
        if isinstance(self.size, bool) or not isinstance(self.size, int):
            raise ManifestError(f"descriptor size must be an integer, got {self.size!r}")
        if not 0 <= self.size <= _MAX_INT64:
            raise ManifestError(f"descriptor size {self.size} out of range")
        object.__setattr__(self, "annotations", MappingProxyType(dict(self.annotations)))
        object.__setattr__(self, "urls", tuple(self.urls))
        if self.data is not None and not self.data:
            object.__setattr__(self, "data", None)  # Go omits empty data, so it cannot round-trip

    def with_annotations(self, extra: Mapping[str, str]) -> Descriptor:
        """A copy with `extra` merged into the annotations."""
        return Descriptor(
            self.media_type,
            self.digest,
            self.size,
            {**self.annotations, **extra},
            self.platform,
            self.artifact_type,
            self.urls,
            self.data,
        )

    def verified_data(self) -> bytes | None:
        """The embedded `data`, after checking it against size and digest."""
        if self.data is None:
            return None
        if len(self.data) != self.size:
            raise DigestMismatchError(
                f"embedded data of {self.digest} is {len(self.data)} bytes, expected {self.size}"
            )
        h = digest_hasher(self.digest)
        h.update(self.data)
        if f"{h.name}:{h.hexdigest()}" != self.digest:
            raise DigestMismatchError(f"embedded data does not match {self.digest}")
        return self.data

    def to_json_obj(self) -> dict[str, object]:
        """The image-spec JSON object, in Go field order, empty optionals omitted."""
        obj: dict[str, object] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.urls:
            obj["urls"] = list(self.urls)
        if self.annotations:
            obj["annotations"] = _sorted_map(self.annotations)
        if self.data:
            obj["data"] = base64.b64encode(self.data).decode("ascii")
        if self.platform is not None:
            obj["platform"] = self.platform.to_json_obj()
        if self.artifact_type:
            obj["artifactType"] = self.artifact_type
        return obj

    @classmethod
    def from_json_obj(cls, value: object, what: str = "descriptor") -> Descriptor:
        """Parse and strictly validate a descriptor object."""
        obj = _as_object(value, what)
        media_type = _req_str(obj, "mediaType", what)
        digest = obj.get("digest")
        if digest is None:
            raise ManifestError(f"{what}.digest is missing")
        try:
            validate_digest(digest)
        except ManifestError as exc:
            raise ManifestError(f"{what}.digest: {exc}") from None
        assert isinstance(digest, str)
        size = obj.get("size")
        if size is None:
            raise ManifestError(f"{what}.size is missing")
        if isinstance(size, bool) or not isinstance(size, int):
            raise ManifestError(f"{what}.size must be an integer, got {_json_type(size)}")
        if not 0 <= size <= _MAX_INT64:
            raise ManifestError(f"{what}.size {size} is out of range")
        platform = obj.get("platform")
        data_field = obj.get("data")
        data: bytes | None = None
        if data_field is not None:
            if not isinstance(data_field, str):
                raise ManifestError(f"{what}.data must be a base64 string")
            try:
                data = base64.b64decode(data_field.encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError):
                raise ManifestError(f"{what}.data is not valid base64") from None
        return cls(
            media_type=media_type,
            digest=digest,
            size=size,
            annotations=_annotations(obj, what),
            platform=None
            if platform is None
            else Platform.from_json_obj(platform, f"{what}.platform"),
            artifact_type=_opt_str(obj, "artifactType", what),
            urls=_str_list(obj, "urls", what),
            data=data,
        )


# --- manifests and indexes ----------------------------------------------------------------


class _Document:
    """What manifests and indexes share: canonical JSON, and the raw bytes they came from."""

    # Set only by the parser, outside the dataclass fields so that `dataclasses.replace`
    # never carries stale bytes over to a modified copy.
    _raw: ClassVar[bytes | None] = None

    def to_json_obj(self) -> dict[str, object]:
        """The JSON object, in Go field order."""
        raise NotImplementedError

    def to_json_bytes(self) -> bytes:
        """Canonical compact JSON."""
        return canonical_json(self.to_json_obj())

    def raw_bytes(self) -> bytes:
        """The bytes this document was parsed from, or its canonical JSON if built here."""
        return self._raw if self._raw is not None else self.to_json_bytes()

    @property
    def digest(self) -> str:
        """sha256 digest of `raw_bytes()`."""
        return sha256_digest(self.raw_bytes())


@dataclass(frozen=True)
class ImageManifest(_Document):
    """An OCI image manifest or Docker schema2 manifest.

    A parsed manifest remembers the exact bytes it came from: `raw_bytes()` and `digest`
    refer to those, while `to_json_bytes()` is the canonical re-encoding.
    """

    config: Descriptor
    layers: Sequence[Descriptor] = ()
    media_type: str = MEDIA_TYPE_OCI_MANIFEST
    artifact_type: str = ""
    subject: Descriptor | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "annotations", MappingProxyType(dict(self.annotations)))

    @property
    def is_docker(self) -> bool:
        """True for a Docker schema2 manifest."""
        return self.media_type == MEDIA_TYPE_DOCKER_MANIFEST

    def to_json_obj(self) -> dict[str, object]:
        """The JSON object, in Go field order."""
        obj: dict[str, object] = {"schemaVersion": 2}
        if self.media_type:
            obj["mediaType"] = self.media_type
        if self.artifact_type:
            obj["artifactType"] = self.artifact_type
        obj["config"] = self.config.to_json_obj()
        obj["layers"] = [d.to_json_obj() for d in self.layers]
        if self.subject is not None:
            obj["subject"] = self.subject.to_json_obj()
        if self.annotations:
            obj["annotations"] = _sorted_map(self.annotations)
        return obj

    def descriptor(
        self,
        *,
        platform: Platform | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> Descriptor:
        """A descriptor naming this manifest's bytes."""
        raw = self.raw_bytes()
        return Descriptor(
            media_type=self.media_type or MEDIA_TYPE_OCI_MANIFEST,
            digest=sha256_digest(raw),
            size=len(raw),
            annotations=annotations or {},
            platform=platform,
            artifact_type=self.artifact_type,
        )

    @classmethod
    def from_json_obj(cls, value: object, what: str = "manifest") -> ImageManifest:
        """Validate a decoded JSON object as an image manifest (no raw bytes attached)."""
        obj = _as_object(value, what)
        _check_schema_version(obj, what)
        if "manifests" in obj:
            raise ManifestError(f"{what} has 'manifests': it is an index, not a manifest")
        if obj.get("config") is None:
            raise ManifestError(f"{what}.config is missing")
        subject = obj.get("subject")
        return cls(
            config=Descriptor.from_json_obj(obj["config"], f"{what}.config"),
            layers=_descriptor_list(obj, "layers", what),
            media_type=_opt_str(obj, "mediaType", what),
            artifact_type=_opt_str(obj, "artifactType", what),
            subject=None
            if subject is None
            else Descriptor.from_json_obj(subject, f"{what}.subject"),
            annotations=_annotations(obj, what),
        )


@dataclass(frozen=True)
class ImageIndex(_Document):
    """An OCI image index or Docker manifest list (same raw-bytes rules as ImageManifest)."""

    manifests: Sequence[Descriptor] = ()
    media_type: str = MEDIA_TYPE_OCI_INDEX
    artifact_type: str = ""
    subject: Descriptor | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "manifests", tuple(self.manifests))
        object.__setattr__(self, "annotations", MappingProxyType(dict(self.annotations)))

    def to_json_obj(self) -> dict[str, object]:
        """The JSON object, in Go field order."""
        obj: dict[str, object] = {"schemaVersion": 2}
        if self.media_type:
            obj["mediaType"] = self.media_type
        if self.artifact_type:
            obj["artifactType"] = self.artifact_type
        obj["manifests"] = [d.to_json_obj() for d in self.manifests]
        if self.subject is not None:
            obj["subject"] = self.subject.to_json_obj()
        if self.annotations:
            obj["annotations"] = _sorted_map(self.annotations)
        return obj

    def descriptor(self, *, annotations: Mapping[str, str] | None = None) -> Descriptor:
        """A descriptor naming this index's bytes."""
        raw = self.raw_bytes()
        return Descriptor(
            media_type=self.media_type or MEDIA_TYPE_OCI_INDEX,
            digest=sha256_digest(raw),
            size=len(raw),
            annotations=annotations or {},
            artifact_type=self.artifact_type,
        )

    @classmethod
    def from_json_obj(cls, value: object, what: str = "index") -> ImageIndex:
        """Validate a decoded JSON object as an image index (no raw bytes attached)."""
        obj = _as_object(value, what)
        _check_schema_version(obj, what)
        if "layers" in obj or "config" in obj:
            raise ManifestError(f"{what} has 'layers'/'config': it is a manifest, not an index")
        subject = obj.get("subject")
        return cls(
            manifests=_descriptor_list(obj, "manifests", what),
            media_type=_opt_str(obj, "mediaType", what),
            artifact_type=_opt_str(obj, "artifactType", what),
            subject=None
            if subject is None
            else Descriptor.from_json_obj(subject, f"{what}.subject"),
            annotations=_annotations(obj, what),
        )


def _check_schema_version(obj: Mapping[str, object], what: str) -> None:
    version = obj.get("schemaVersion")
    if isinstance(version, bool) or not isinstance(version, int) or version != 2:
        raise ManifestError(f"{what}.schemaVersion must be 2, got {version!r:.40}")


_ParsedT = TypeVar("_ParsedT", ImageManifest, ImageIndex)


def _attach_raw(obj: _ParsedT, raw: bytes) -> _ParsedT:
    object.__setattr__(obj, "_raw", bytes(raw))
    return obj


def parse_manifest(
    data: bytes,
    *,
    media_type_hint: str | None = None,
    max_size: int = DEFAULT_MAX_MANIFEST_SIZE,
) -> ImageManifest | ImageIndex:
    """Parse an OCI/Docker image manifest or image index.

    The kind comes from the `mediaType` field, else from `media_type_hint` (e.g. the HTTP
    Content-Type or the referring descriptor), else from the presence of `manifests` vs
    `layers`. A body whose mediaType names the other kind than a known hint is rejected.
    """
    obj = _as_object(decode_json(data, max_size=max_size), "manifest")
    field_type = _opt_str(obj, "mediaType", "manifest")
    known = MANIFEST_MEDIA_TYPES | INDEX_MEDIA_TYPES
    hint = media_type_hint if media_type_hint in known else None
    if field_type in (
        MEDIA_TYPE_DOCKER_SCHEMA1_MANIFEST,
        MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED_MANIFEST,
    ):
        raise ManifestError("Docker schema1 manifests are not supported")
    if field_type and field_type not in known:
        raise ManifestError(f"unsupported manifest media type {field_type[:200]!r}")
    # Docker vs OCI spelling of the same kind is tolerated (the body wins), as containerd does.
    if field_type and hint and (field_type in INDEX_MEDIA_TYPES) != (hint in INDEX_MEDIA_TYPES):
        raise ManifestError(
            f"manifest declares media type {field_type!r} but was served as {hint!r}"
        )
    kind = field_type or hint
    if not kind:
        has_index, has_manifest = "manifests" in obj, "layers" in obj or "config" in obj
        if has_index == has_manifest:
            raise ManifestError(
                "cannot tell whether the document is a manifest or an index: "
                "no mediaType and " + ("both" if has_index else "neither") + " of "
                "'manifests' and 'layers'/'config'"
            )
        kind = MEDIA_TYPE_OCI_INDEX if has_index else MEDIA_TYPE_OCI_MANIFEST
    if kind in INDEX_MEDIA_TYPES:
        return _attach_raw(ImageIndex.from_json_obj(obj), data)
    return _attach_raw(ImageManifest.from_json_obj(obj), data)


def parse_image_manifest(
    data: bytes,
    *,
    media_type_hint: str | None = None,
    max_size: int = DEFAULT_MAX_MANIFEST_SIZE,
) -> ImageManifest:
    """Like `parse_manifest`, but the document must be an image manifest."""
    parsed = parse_manifest(data, media_type_hint=media_type_hint, max_size=max_size)
    if not isinstance(parsed, ImageManifest):
        raise ManifestError("expected an image manifest, got an image index")
    return parsed


def parse_image_index(
    data: bytes,
    *,
    media_type_hint: str | None = None,
    max_size: int = DEFAULT_MAX_MANIFEST_SIZE,
) -> ImageIndex:
    """Like `parse_manifest`, but the document must be an image index."""
    parsed = parse_manifest(data, media_type_hint=media_type_hint, max_size=max_size)
    if not isinstance(parsed, ImageIndex):
        raise ManifestError("expected an image index, got an image manifest")
    return parsed


# --- platform selection -------------------------------------------------------------------


def _is_platform_image(desc: Descriptor) -> bool:
    if desc.artifact_type == _SOCI_INDEX_V2_ARTIFACT_TYPE:
        return False
    if ANNOTATION_DOCKER_REFERENCE_TYPE in desc.annotations:
        return False
    return desc.media_type in MANIFEST_MEDIA_TYPES or desc.media_type in INDEX_MEDIA_TYPES


def select_manifest(index: ImageIndex, platform: Platform) -> Descriptor:
    """The entry of `index` to run on `platform`.

    Skips SOCI v2 index entries and attestation manifests. An exact platform match wins over
    a variant-less one, which wins over an entry without a platform; ties go to the first.
    """
    best: tuple[int, Descriptor] | None = None
    for desc in index.manifests:
        if not _is_platform_image(desc):
            continue
        if desc.platform is None:
            rank: int | None = None if desc.artifact_type else 2
        else:
            rank = platform.match_rank(desc.platform)
        if rank is not None and (best is None or rank < best[0]):
            best = (rank, desc)
    if best is None:
        available = sorted(
            {str(d.platform) for d in index.manifests if d.platform and _is_platform_image(d)}
        )
        raise ManifestError(
            f"no manifest for platform {platform} in the index; available: "
            + (", ".join(available) or "none")
        )
    return best[1]


def image_diff_ids(config: bytes, layer_count: int) -> list[str]:
    """The `rootfs.diff_ids` of an image config, one per layer of its manifest."""
    try:
        ids = json.loads(config)["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"image config has no rootfs.diff_ids: {e}") from e
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ManifestError("image config's rootfs.diff_ids is not a list of strings")
    if len(ids) != layer_count:
        raise ManifestError(f"image config has {len(ids)} diff_ids for {layer_count} layers")
    return [validate_digest(i) for i in ids]
