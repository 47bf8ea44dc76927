"""The registry client as a node configures it: the config's `[http]` and `[blob]` settings,
containerd-style hosts.toml (mirrors, TLS, also for token realms) and Docker credentials.

The daemon and the `pysoci` commands both build their client here, so a setting reaches both.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from snapshotter.config import Config
from snapshotter.registry.auth import RegistryAuth
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.credentials import Credentials, CredentialStore
from snapshotter.registry.hosts import RegistryHosts


def node_registry_client(
    config: Config,
    *,
    credential_overrides: Mapping[str, Credentials] | None = None,
    plain_http: bool = False,
    skip_verify: bool = False,
) -> RegistryClient:
    """A client for `config`; `credential_overrides` (registry → credentials) win over Docker's."""
    docker_dir = Path(config.registry.docker_config) if config.registry.docker_config else None
    credentials = CredentialStore(docker_dir, overrides=credential_overrides)
    hosts = RegistryHosts(config, plain_http=plain_http, skip_verify=skip_verify)
    return RegistryClient(
        config,
        hosts=hosts,
        auth=RegistryAuth(credentials.get, verify=hosts.verify_for, http=config.http),
        plain_http=plain_http,
        force_single_range=config.blob.force_single_range_mode,
    )
