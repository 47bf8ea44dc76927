"""`pysoci serve`: run the snapshotter daemon (containerd proxy plugin `soci`)."""

from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path

import trio

from snapshotter.config import DEFAULT_CONFIG_PATH, DEFAULT_ROOT, load_config
from snapshotter.daemon import DEFAULT_ADDRESS, serve_daemon
from snapshotter.dataplane.client import call_sync
from snapshotter.logs import FORMATS, configure_logging
from snapshotter.metrics import merged_registry, start_metrics_server


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `serve`."""
    s = sub.add_parser(
        "serve",
        help="run the snapshotter daemon containerd talks to (proxy plugin `soci`)",
        description=(
            "Serve containerd's Snapshots API on a unix socket (the control plane). Layers of "
            "SOCI-indexed images are served lazily over FUSE under ROOT/fuse by the data plane, "
            "a process of its own that outlives this one (`pysoci data-plane run`, started "
            "here when none runs); other layers are unpacked by containerd (no index) or here "
            "(indexed image, layer without zTOC). containerd config: [proxy_plugins.soci] "
            'type = "snapshot" address = "<ADDRESS>".'
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
    s.add_argument(
        "--log-format",
        choices=FORMATS,
        default=None,
        help="log lines on stderr: one JSON object each, or text (default: the config's "
        "log_format, json)",
    )
    s.add_argument(
        "--data-plane",
        choices=["spawn", "external"],
        default="spawn",
        help="spawn: start `pysoci data-plane run` when none serves ROOT (default); "
        "external: wait for one started by someone else (its own systemd unit)",
    )
    s.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """`pysoci serve`."""
    if os.geteuid() != 0:
        raise SystemExit("pysoci serve: needs root (FUSE, overlayfs)")
    configure_logging(args.serve_log_level, args.log_format or "json")
    config, _unknown = load_config(args.config)
    if not args.log_format and config.log_format != "json":
        configure_logging(args.serve_log_level, config.log_format)
    log_format = args.log_format or config.log_format
    root = args.root.absolute()
    stop_metrics = None
    if config.metrics_address:
        # The data plane keeps the span and FUSE counters: one scrape shows both processes.
        registry = merged_registry(lambda: str(call_sync(root, "metrics")))
        stop_metrics = start_metrics_server(
            config.metrics_address, config.metrics_network, registry
        )
    try:
        trio.run(
            functools.partial(
                serve_daemon,
                config,
                root,
                args.address,
                spawn=args.data_plane == "spawn",
                config_path=args.config.absolute() if args.config else None,
                log_level=args.serve_log_level,
                log_format=log_format,
            )
        )
    finally:
        if stop_metrics is not None:
            stop_metrics()
    return 0
