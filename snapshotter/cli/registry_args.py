"""The registry options every registry-facing command takes, and the client they configure."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

from snapshotter.config import DEFAULT_ROOT, Config
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.credentials import parse_user
from snapshotter.registry.node import node_registry_client
from snapshotter.registry.reference import Reference


def add_root_option(p: argparse.ArgumentParser) -> None:
    """`--root`."""
    p.add_argument(
        "--root",
        type=Path,
        default=DEFAULT_ROOT,
        help=f"pysoci's root; the local content store is ROOT/content (default {DEFAULT_ROOT})",
    )


def add_registry_options(p: argparse.ArgumentParser) -> None:
    """`--plain-http`, `--skip-verify`, `--user`, `--config` and `--root`."""
    g = p.add_argument_group("registry")
    g.add_argument("--plain-http", action="store_true", help="talk HTTP, not HTTPS, to registries")
    g.add_argument(
        "--skip-verify", action="store_true", help="do not verify registries' TLS certificates"
    )
    g.add_argument(
        "--user",
        metavar="USER:PASSWORD",
        help="credentials for the registries named on the command line "
        "(default: Docker's config.json and its credential helpers)",
    )
    g.add_argument(
        "--config",
        type=Path,
        help="pysoci config file ([http] timeouts and retries, mirrors, hosts.toml directory; "
        "default /etc/pysoci/config.toml when it exists)",
    )
    add_root_option(p)


def registry_client(
    args: argparse.Namespace, config: Config, refs: Iterable[Reference]
) -> RegistryClient:
    """A client configured from the options (`--user` applies to the registries of `refs`)."""
    overrides = {}
    if args.user:
        creds = parse_user(args.user)
        overrides = {ref.registry: creds for ref in refs}
    return node_registry_client(
        config,
        credential_overrides=overrides,
        plain_http=args.plain_http,
        skip_verify=args.skip_verify,
    )
