"""`pysoci serve`: run the snapshotter daemon (containerd proxy plugin `soci`)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import trio

from snapshotter.config import DEFAULT_CONFIG_PATH, DEFAULT_ROOT, load_config
from snapshotter.daemon import DEFAULT_ADDRESS, serve_daemon


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `serve`."""
    s = sub.add_parser(
        "serve",
        help="run the snapshotter daemon containerd talks to (proxy plugin `soci`)",
        description=(
            "Serve containerd's Snapshots API on a unix socket. Layers of SOCI-indexed images "
            "are mounted lazily over FUSE under ROOT/fuse; other layers are unpacked by "
            "containerd (no index) or here (indexed image, layer without zTOC). containerd "
            'config: [proxy_plugins.soci] type = "snapshot" address = "<ADDRESS>".'
        ),
    )
    s.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"config file (default {DEFAULT_CONFIG_PATH} when it exists)",
    )
    s.add_argument(
        "--root", type=Path, default=DEFAULT_ROOT, help=f"state directory (default {DEFAULT_ROOT})"
    )
    s.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        help=f"unix socket path, unix://PATH, or fd://N for an inherited socket (systemd "
        f"socket activation) (default {DEFAULT_ADDRESS})",
    )
    s.add_argument(
        "--log-level",
        dest="serve_log_level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="daemon log level (default info)",
    )
    s.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """`pysoci serve`."""
    if os.geteuid() != 0:
        raise SystemExit("pysoci serve: needs root (FUSE, overlayfs)")
    logging.basicConfig(
        level=args.serve_log_level.upper(),
        force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "httpcore", "pyfuse3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config, _unknown = load_config(args.config)
    trio.run(serve_daemon, config, args.root, args.address)
    return 0
