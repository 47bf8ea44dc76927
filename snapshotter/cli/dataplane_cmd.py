"""`pysoci data-plane run|status|upgrade|stop`: the long-lived process lazy layers live in."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import trio

from snapshotter.config import DEFAULT_CONFIG_PATH, DEFAULT_ROOT, load_config
from snapshotter.dataplane.api import DataPlaneUnavailableError
from snapshotter.dataplane.client import DataPlaneClient
from snapshotter.dataplane.process import DRAINING_DIR, run_data_plane
from snapshotter.logs import FORMATS, configure_logging


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `data-plane` and its subcommands."""
    d = sub.add_parser(
        "data-plane",
        help="the process that serves lazy layers (FUSE, caches, fetching); outlives serve",
        description=(
            "The data plane serves the lazy layers containers read: the FUSE session at "
            "ROOT/fuse, the span caches, background fetching and the registry range requests. "
            "`pysoci serve` starts it when none runs (or, with --data-plane external, waits "
            "for its systemd unit) and talks to it on ROOT/data-plane.sock. It keeps running "
            "while serve restarts; `upgrade` replaces it without failing running containers' "
            "reads; `stop` ends it and the containers' lazy layers with it."
        ),
    )
    dsub = d.add_subparsers(dest="data_plane_command", required=True, metavar="COMMAND")
    run = dsub.add_parser("run", help="serve lazy layers (what serve and the systemd unit start)")
    run.add_argument(
        "--config", type=Path, default=None, help=f"config file ({DEFAULT_CONFIG_PATH})"
    )
    run.add_argument("--log-level", dest="dp_log_level", default="info",
                     choices=["debug", "info", "warning", "error"],
                     help="log level (default info)")  # fmt: skip
    run.add_argument("--log-format", dest="dp_log_format", choices=FORMATS, default=None,
                     help="log lines on stderr: JSON objects or text (default: the config's "
                     "log_format)")  # fmt: skip
    run.add_argument(
        "--takeover",
        action="store_true",
        help="wait for the running data plane to hand over (what upgrade starts)",
    )
    run.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)
    for name, func, text in (
        ("status", cmd_status, "say which data plane serves ROOT (and which are draining)"),
        ("upgrade", cmd_upgrade, "start a new data plane from the installed pysoci and hand "
         "over to it; the old one serves running containers until they stop"),
        ("stop", cmd_stop, "stop the data plane: every lazy layer is unmounted (containers "
         "still reading them fail)"),
    ):  # fmt: skip
        p = dsub.add_parser(name, help=text)
        p.add_argument("--json", action="store_true", help="one JSON document")
        p.set_defaults(func=func)
    for p in (run, *[dsub.choices[n] for n in ("status", "upgrade", "stop")]):
        p.add_argument("--root", type=Path, default=DEFAULT_ROOT,
                       help=f"state directory (default {DEFAULT_ROOT})")  # fmt: skip


def cmd_run(args: argparse.Namespace) -> int:
    """`pysoci data-plane run`."""
    if os.geteuid() != 0:
        raise SystemExit("pysoci data-plane run: needs root (FUSE, overlayfs)")
    config, _unknown = load_config(args.config)
    log_format = args.dp_log_format or config.log_format
    configure_logging(args.dp_log_level, log_format)
    trio.run(
        lambda: run_data_plane(
            config,
            args.root,
            config_path=args.config.absolute() if args.config else None,
            log_level=args.dp_log_level,
            log_format=log_format,
            takeover=args.takeover,
            ready_fd=args.ready_fd,
        )
    )
    return 0


def _draining(root: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted((root / DRAINING_DIR).glob("*.json")):
        try:
            record = json.loads(path.read_text())
            os.kill(int(record["pid"]), 0)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # gone
        out.append(record)
    return out


def _print(args: argparse.Namespace, doc: dict[str, Any], text: str) -> None:
    print(json.dumps(doc, indent=2) if args.json else text)


def cmd_status(args: argparse.Namespace) -> int:
    """`pysoci data-plane status`."""
    draining = _draining(args.root)
    try:
        hello = trio.run(lambda: DataPlaneClient(args.root).hello(wait=0))
    except DataPlaneUnavailableError as e:
        doc = {"serving": None, "draining": draining, "error": str(e)}
        _print(args, doc, f"no data plane: {e}")
        return 1
    lines = [
        f"data plane pid {hello['pid']} serving {hello['layers']} layer(s) at "
        f"{hello['mountpoint']} for {hello['uptime']:.0f} s"
    ]
    lines += [
        f"draining: pid {d['pid']} (handed over {time.time() - d['since']:.0f} s ago, "
        f"serving the running containers of {d['layers']} layer(s))"
        for d in draining
    ]
    _print(args, {"serving": hello, "draining": draining}, "\n".join(lines))
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    """`pysoci data-plane upgrade`."""
    client = DataPlaneClient(args.root)

    async def upgrade() -> dict[str, Any]:
        before = await client.hello(wait=0)
        result = await client.call("upgrade", timeout=120)
        with trio.fail_after(60):
            while True:
                try:
                    after = await client.hello(wait=1)
                    if after["generation"] != before["generation"]:
                        return {"old": before, "new": after, **result}
                except DataPlaneUnavailableError:
                    pass
                await trio.sleep(0.1)

    try:
        doc = trio.run(upgrade)
    except (DataPlaneUnavailableError, trio.TooSlowError) as e:
        print(f"pysoci data-plane upgrade: {e or 'the new data plane did not serve in 60 s'}",
              file=sys.stderr)  # fmt: skip
        return 1
    _print(
        args,
        doc,
        f"data plane pid {doc['new']['pid']} serves {args.root / 'fuse'}; pid "
        f"{doc['old']['pid']} serves its running containers until they stop",
    )
    return 0


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie its parent has not reaped yet does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def cmd_stop(args: argparse.Namespace) -> int:
    """`pysoci data-plane stop`."""
    client = DataPlaneClient(args.root)

    async def stop() -> int:
        hello = await client.hello(wait=0)
        await client.call("stop", timeout=30)
        pid = int(hello["pid"])
        with trio.fail_after(60):
            while _alive(pid):
                await trio.sleep(0.05)
        return pid

    try:
        pid = trio.run(stop)
    except (DataPlaneUnavailableError, trio.TooSlowError) as e:
        print(f"pysoci data-plane stop: {e or 'it did not stop within 60 s'}", file=sys.stderr)
        return 1
    _print(args, {"stopped": pid}, f"data plane pid {pid} stopped")
    return 0
