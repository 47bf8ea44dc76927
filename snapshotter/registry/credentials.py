"""Registry credentials from Docker's `config.json` and `docker-credential-*` helpers.

Lookup for a host: explicit overrides (`--user`), then the helper named by `credHelpers[host]`
or else `credsStore`, then the `auths` entry. (Docker ignores `auths` once a helper is
configured; falling back to it when the helper has nothing is friendlier and harmless.)
Results are cached per host for the life of the store. Secrets never reach reprs, logs or
error messages.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapshotter.config import ConfigError
from snapshotter.errors import AuthenticationError

log = logging.getLogger(__name__)

DOCKER_HUB = "docker.io"
DOCKER_HUB_SERVER_URL = "https://index.docker.io/v1/"
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
HELPER_TIMEOUT = 30.0
_HELPER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_NOT_FOUND = "credentials not found"
_TOKEN_USERNAME = "<token>"


@dataclass(frozen=True, repr=False)
class Credentials:
    """A username and password, or an identity (refresh) token."""

    username: str = ""
    password: str = ""
    identity_token: str = ""

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r})"

    __str__ = __repr__


def parse_user(value: str) -> Credentials:
    """`NAME:PASSWORD` (a `--user` flag) → Credentials; the value is never echoed back."""
    username, sep, password = value.partition(":")
    if not sep or not username:
        raise ConfigError("--user must be NAME:PASSWORD")
    return Credentials(username=username, password=password)


def credential_host(server: str) -> str:
    """The host a credential entry or request belongs to: no scheme, no path, Hub aliases merged."""
    host = server.strip()
    if "://" in host:
        host = host.split("://", 1)[1]
    host = host.split("/", 1)[0].lower()
    return DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host


def default_docker_config_dir() -> Path:
    """`$DOCKER_CONFIG`, else `~/.docker`."""
    env = os.environ.get("DOCKER_CONFIG")
    return Path(env) if env else Path.home() / ".docker"


class CredentialStore:
    """Credentials per registry host; `get` is the callable `RegistryAuth` takes.

    `get` may run a helper program (up to `helper_timeout` seconds), so async code should call it
    from a worker thread; it is thread-safe and runs a helper at most once per host.
    """

    def __init__(
        self,
        docker_config_dir: Path | None = None,
        *,
        overrides: Mapping[str, Credentials] | None = None,
        helper_timeout: float = HELPER_TIMEOUT,
    ) -> None:
        self._dir = docker_config_dir
        self._overrides = {credential_host(h): c for h, c in (overrides or {}).items()}
        self._timeout = helper_timeout
        self._config: dict[str, Any] | None = None
        self._cache: dict[str, Credentials | None] = {}
        # get() runs in worker threads (helpers block); a thread lock keeps one helper per host.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CredentialStore({self._config_path()})"

    def get(self, host: str) -> Credentials | None:
        """Credentials for `host` (`host[:port]`, or a URL), or None when there are none."""
        key = credential_host(host)
        if key in self._overrides:
            return self._overrides[key]
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._lookup(key)
            return self._cache[key]

    def _config_path(self) -> Path:
        return (self._dir or default_docker_config_dir()) / "config.json"

    def _load(self) -> dict[str, Any]:
        if self._config is None:
            path = self._config_path()
            try:
                raw = json.loads(path.read_bytes())
            except FileNotFoundError:
                raw = {}
            except OSError as e:
                raise ConfigError(f"cannot read {path}: {e.strerror}") from e
            except ValueError:
                raise ConfigError(f"{path}: not valid JSON") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}: expected a JSON object")
            self._config = raw
        return self._config

    def _lookup(self, host: str) -> Credentials | None:
        config = self._load()
        helpers = config.get("credHelpers") or {}
        if not isinstance(helpers, dict):
            raise ConfigError(f"{self._config_path()}: credHelpers: expected an object")
        helper = helpers.get(host)
        if helper is None and host == DOCKER_HUB:
            helper = next((helpers[h] for h in helpers if credential_host(h) == host), None)
        if helper is None:
            helper = config.get("credsStore") or None
        if helper is not None:
            if not isinstance(helper, str):
                raise ConfigError(f"{self._config_path()}: credential helper name must be a string")
            found = self._run_helper(helper, host)
            if found is not None:
                return found
        return self._from_auths(config, host)

    def _from_auths(self, config: dict[str, Any], host: str) -> Credentials | None:
        auths = config.get("auths") or {}
        if not isinstance(auths, dict):
            raise ConfigError(f"{self._config_path()}: auths: expected an object")
        entry = auths.get(host)
        if entry is None:
            entry = next((v for k, v in auths.items() if credential_host(k) == host), None)
        if entry is None:
            return None
        if not isinstance(entry, dict):
            raise ConfigError(f"{self._config_path()}: auths entry for {host}: expected an object")
        username = entry.get("username") or ""
        password = entry.get("password") or ""
        token = entry.get("identitytoken") or ""
        encoded = entry.get("auth") or ""
        if not all(isinstance(v, str) for v in (username, password, token, encoded)):
            raise ConfigError(f"{self._config_path()}: auths entry for {host}: expected strings")
        if encoded:
            try:
                decoded = base64.b64decode(encoded, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise ConfigError(
                    f"{self._config_path()}: auths entry for {host}: `auth` is not base64"
                ) from None
            username, sep, password = decoded.partition(":")
            if not sep:
                raise ConfigError(
                    f"{self._config_path()}: auths entry for {host}: `auth` is not user:password"
                )
        if not (username or password or token):
            return None
        return Credentials(username=username, password=password, identity_token=token)

    def _run_helper(self, name: str, host: str) -> Credentials | None:
        if not _HELPER_NAME.match(name):
            raise ConfigError(f"{self._config_path()}: invalid credential helper name {name!r}")
        program = f"docker-credential-{name}"
        path = shutil.which(program)
        if path is None:
            raise AuthenticationError(f"credential helper {program} is not on PATH (for {host})")
        server_url = DOCKER_HUB_SERVER_URL if host == DOCKER_HUB else host
        log.debug("asking %s for credentials for %s", program, host)
        try:
            proc = subprocess.run(
                [path, "get"],
                input=server_url.encode(),
                capture_output=True,
                timeout=self._timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise AuthenticationError(
                f"credential helper {program} timed out after {self._timeout:g} s (for {host})"
            ) from None
        except OSError as e:
            raise AuthenticationError(
                f"credential helper {program} could not run: {e.strerror}"
            ) from None
        if proc.returncode != 0:
            if _NOT_FOUND in (proc.stdout + proc.stderr).decode(errors="replace").lower():
                return None
            # The helper's output is not quoted: it is not ours to know what it contains.
            raise AuthenticationError(
                f"credential helper {program} failed for {host} (exit status {proc.returncode})"
            )
        try:
            answer = json.loads(proc.stdout)
            username, secret = answer["Username"], answer["Secret"]
            if not isinstance(username, str) or not isinstance(secret, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise AuthenticationError(
                f"credential helper {program} gave a malformed answer for {host}"
            ) from None
        if username == _TOKEN_USERNAME:
            return Credentials(identity_token=secret)
        if not username and not secret:
            return None
        return Credentials(username=username, password=secret)
