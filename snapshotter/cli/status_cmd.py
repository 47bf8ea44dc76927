"""`pysoci status`: per image and layer, how much the running daemon has fetched.

It reads what the daemon publishes, never its internals: the snapshot store
(`ROOT/metadata.db`, read-only: which layers were pulled for which image, lazily or not) and
the per-layer status files of the FUSE mount (`ROOT/fuse/.status/<layer-id>.json`: fetched
bytes, state, errors). A FUSE mount that is absent or disconnected means the daemon is down.
Images mounted by `pysoci mount` under the same root are shown too, from their own FUSE
mounts (`ROOT/mounts/<id>/state.json` names the image and directory, the layers' status is in
`ROOT/mounts/<id>/fuse/.status/`).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sqlite3
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from snapshotter import labels as label_names
from snapshotter.cli.progress import human_bytes
from snapshotter.config import DEFAULT_ROOT
from snapshotter.errors import PysociError
from snapshotter.mountinfo import mounts_at
from snapshotter.service.store import Kind, SnapshotRecord, Txn

REASON_BY_CONTAINERD = "unpacked by containerd (no SOCI index, or no remote-snapshot labels)"
REASON_BY_PYSOCI = "unpacked by pysoci (no zTOC for this layer, or the lazy mount failed)"
UNKNOWN_IMAGE = "(unknown image)"
DONE_STATES = frozenset({"complete", "fetched", "error", "closed"})


class DaemonNotRunningError(PysociError):
    """The daemon does not serve ROOT (no FUSE mount, or a dead one)."""


@dataclass
class LayerStatus:
    """One layer of an image, as `--json` prints it."""

    digest: str
    mode: str  # "lazy" or "local"
    snapshot: str = ""
    layerId: str = ""  # camelCase: the status files' (soci's) names
    reason: str = ""
    state: str = ""
    error: str = ""
    fetchedBytes: int | None = None
    totalBytes: int | None = None
    fetchedPercent: float | None = None
    spansFetched: int | None = None
    spansTotal: int | None = None
    readErrors: int = 0


@dataclass
class ImageStatus:
    """One image and its layers, bottom first."""

    image: str
    layers: list[LayerStatus] = field(default_factory=list)
    mount: str = ""
    """For an image of `pysoci mount`: the directory it is mounted at."""
    error: str = ""
    """Why its layers cannot be shown (a `pysoci mount` whose server is gone)."""

    @property
    def lazy(self) -> list[LayerStatus]:
        """Its lazily served layers."""
        return [layer for layer in self.layers if layer.mode == "lazy"]

    def totals(self) -> tuple[int, int]:
        """Fetched and total compressed bytes of its lazy layers."""
        return (
            sum(layer.fetchedBytes or 0 for layer in self.lazy),
            sum(layer.totalBytes or 0 for layer in self.lazy),
        )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `status`."""
    s = sub.add_parser(
        "status",
        help="show what the running daemon serves: per image and layer, lazy or local, "
        "fetched bytes",
        description=(
            "Per image and layer pulled through the daemon: whether the layer is served lazily "
            "or was unpacked locally (and why), how much of it is fetched, its state and last "
            "error. Reads ROOT/metadata.db and ROOT/fuse/.status; the daemon must be running. "
            "Images mounted with `pysoci mount --root ROOT` are shown too (their lazy layers, "
            "from ROOT/mounts/<id>/fuse/.status)."
        ),
    )
    s.add_argument(
        "--root", type=Path, default=DEFAULT_ROOT, help=f"state directory (default {DEFAULT_ROOT})"
    )
    s.add_argument("--json", action="store_true", help="one JSON document for machines")
    s.add_argument(
        "--watch",
        action="store_true",
        help="refresh until no layer is being fetched (Ctrl-C stops)",
    )
    s.add_argument(
        "--interval", type=float, default=1.0, help="seconds between --watch refreshes (1)"
    )
    s.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    """`pysoci status`."""
    root: Path = args.root
    try:
        while True:
            try:
                images = collect(root)
            except DaemonNotRunningError as e:
                print(f"pysoci status: {e}", file=sys.stderr)
                return 1
            if args.json:
                json.dump(
                    {"root": str(root), "images": [_image_json(i) for i in images]},
                    sys.stdout,
                    indent=None if args.watch else 2,
                )
                sys.stdout.write("\n")
            else:
                if args.watch and sys.stdout.isatty():
                    sys.stdout.write("\x1b[H\x1b[2J")
                render(images, sys.stdout)
            sys.stdout.flush()
            if not args.watch or not any(
                layer.state not in DONE_STATES for image in images for layer in image.lazy
            ):
                return 0
            time.sleep(max(0.1, args.interval))
            if not args.json and not sys.stdout.isatty():
                sys.stdout.write("\n")
    except KeyboardInterrupt:
        return 0


# ----------------------------------------------------------------------------- gathering


def collect(root: Path) -> list[ImageStatus]:
    """Images and layers of ROOT's store joined with the live layer statuses, then the images
    of `pysoci mount` under ROOT. Raises DaemonNotRunningError when there is neither; with
    mounts only, a daemon that is down is noted on stderr."""
    mounts = collect_mounts(root)
    try:
        images = collect_daemon(root)
    except DaemonNotRunningError as e:
        if not mounts:
            raise
        if (root / "metadata.db").is_file():
            print(f"pysoci status: {e}", file=sys.stderr)
        images = []
    return images + mounts


def collect_daemon(root: Path) -> list[ImageStatus]:
    """Images and layers of the daemon's store, joined with the live layer statuses."""
    mount = root / "fuse"
    if not (root / "metadata.db").is_file():
        raise DaemonNotRunningError(
            f"no pysoci state at {root} (no metadata.db, no mounts/*/state.json): is this "
            "the --root of `pysoci serve` or `pysoci mount`?"
        )
    if not is_pysoci_mount(mount):
        raise DaemonNotRunningError(
            f"the pysoci data plane is not running: {mount} is not mounted (start it: "
            f"`systemctl start pysoci-data-plane pysoci` or `pysoci serve --root {root}`)"
        )
    statuses = read_statuses(mount)
    records = read_snapshots(root / "metadata.db")
    return build(records, statuses, root)


def collect_mounts(root: Path) -> list[ImageStatus]:
    """One image per `pysoci mount` under ROOT (`ROOT/mounts/<id>/state.json`), its lazy
    layers from that mount's own status files."""
    images: list[ImageStatus] = []
    for state_file in sorted(root.glob("mounts/*/state.json")):
        try:
            state = json.loads(state_file.read_bytes())
        except (OSError, ValueError):
            state = {}
        if not isinstance(state, dict):
            state = {}
        image = ImageStatus(str(state.get("ref") or UNKNOWN_IMAGE), mount=str(state.get("dir", "")))
        fuse = state_file.parent / "fuse"
        try:
            if not is_pysoci_mount(fuse):
                raise DaemonNotRunningError(f"{fuse} is not mounted")
            statuses = read_statuses(fuse)
        except DaemonNotRunningError as e:
            image.error = f"its server is gone ({e}); clean up: pysoci unmount {image.mount}"
            images.append(image)
            continue
        for layer_id, status in sorted(statuses.items()):
            layer = LayerStatus(digest=str(status.get("digest", "")), mode="lazy")
            layer.layerId = layer_id
            _apply_status(layer, status)
            image.layers.append(layer)
        images.append(image)
    return images


def is_pysoci_mount(path: Path) -> bool:
    """Whether `path` is a mount point of a pysoci FUSE session (in this mount namespace)."""
    try:
        stacked = mounts_at(os.path.realpath(path))
    except OSError:
        return path.is_mount()
    return bool(stacked) and stacked[-1].fstype == "fuse.pysoci"  # the last one is on top


def read_statuses(mount: Path) -> dict[str, dict[str, Any]]:
    """Layer id → its status file's JSON."""
    status_dir = mount / ".status"
    try:
        names = sorted(os.listdir(status_dir))
    except OSError as e:
        if e.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO):
            raise DaemonNotRunningError(
                f"the pysoci data plane is not running: {mount} is a stale FUSE mount "
                f"({e.strerror}); restart it (`systemctl start pysoci-data-plane`, or "
                "`pysoci serve` starts one)"
            ) from None
        raise
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            data = json.loads((status_dir / name).read_bytes())
        except FileNotFoundError:
            continue  # unmounted meanwhile
        except (OSError, ValueError) as e:
            data = {"state": "unknown", "error": f"status unreadable: {e}"}
        if isinstance(data, dict):
            out[name.removesuffix(".json")] = data
    return out


def read_snapshots(db: Path) -> list[SnapshotRecord]:
    """Every snapshot of the store, opened read-only (the daemon keeps writing)."""
    try:
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error as e:
        raise PysociError(f"cannot open {db}: {e}") from e
    try:
        conn.execute("BEGIN")
        try:
            return Txn(conn).all()
        finally:
            conn.execute("ROLLBACK")
    except sqlite3.Error as e:
        raise PysociError(f"cannot read {db}: {e}") from e
    finally:
        conn.close()


def build(
    records: list[SnapshotRecord], statuses: dict[str, dict[str, Any]], root: Path
) -> list[ImageStatus]:
    """Group committed layer snapshots by image; attach live status to the lazy ones."""
    images: dict[str, ImageStatus] = {}
    seen_ids: set[str] = set()
    layers_dir = os.path.realpath(root / "layers")
    for rec in records:
        if rec.kind != Kind.COMMITTED:
            continue
        labels = rec.labels
        digest = label_names.layer_digest(labels)
        image = label_names.image_ref(labels)
        if not digest and not rec.remote:
            continue  # not a layer pulled through the remote-snapshot path
        layer = LayerStatus(digest=digest or "", mode="lazy" if rec.remote else "local")
        layer.snapshot = rec.name
        if rec.remote and rec.layer_dir:
            layer.layerId = Path(rec.layer_dir).name
            seen_ids.add(layer.layerId)
            _apply_status(layer, statuses.get(layer.layerId))
        elif not rec.remote:
            layer.state = "local"
            layer.reason = labels.get(label_names.LOCAL_REASON) or (
                REASON_BY_PYSOCI
                if rec.layer_dir and os.path.realpath(rec.layer_dir).startswith(layers_dir)
                else REASON_BY_CONTAINERD
            )
            layer.totalBytes = rec.size or None
        key = image or UNKNOWN_IMAGE
        images.setdefault(key, ImageStatus(key)).layers.append(layer)
    for layer_id, status in sorted(statuses.items()):
        if layer_id in seen_ids:
            continue  # mounted without a snapshot: another tool, or a restore in progress
        layer = LayerStatus(digest=str(status.get("digest", "")), mode="lazy", layerId=layer_id)
        _apply_status(layer, status)
        images.setdefault(UNKNOWN_IMAGE, ImageStatus(UNKNOWN_IMAGE)).layers.append(layer)
    return list(images.values())


def _apply_status(layer: LayerStatus, status: dict[str, Any] | None) -> None:
    if status is None:
        layer.state = "unavailable"
        layer.error = "not mounted in the daemon (restarted and not restored yet?)"
        return
    layer.digest = layer.digest or str(status.get("digest", ""))
    layer.state = str(status.get("state", "unknown"))
    layer.error = str(
        status.get("error") or status.get("lastReadError") or status.get("cacheError") or ""
    )
    layer.fetchedBytes = _int(status.get("fetchedSize"))
    layer.totalBytes = _int(status.get("size"))
    percent = status.get("fetchedPercent")
    layer.fetchedPercent = float(percent) if isinstance(percent, int | float) else None
    layer.spansFetched = _int(status.get("spansFetched"))
    layer.spansTotal = _int(status.get("spansTotal"))
    layer.readErrors = _int(status.get("readErrors")) or 0


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _image_json(image: ImageStatus) -> dict[str, Any]:
    fetched, total = image.totals()
    return {
        "image": image.image,
        **({"mount": image.mount} if image.mount else {}),
        **({"error": image.error} if image.error else {}),
        "fetchedBytes": fetched,
        "totalBytes": total,
        "layers": [asdict(layer) for layer in image.layers],
    }


# ------------------------------------------------------------------------------ printing


def progress_bar(fraction: float, width: int = 20) -> str:
    """`[#######.............]`."""
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _short(digest: str) -> str:
    algorithm, _, hexpart = digest.partition(":")
    return f"{algorithm}:{hexpart[:12]}" if hexpart else digest or "?"


def render(images: list[ImageStatus], out: TextIO) -> None:
    """The human-readable report."""
    if not images:
        out.write("no images pulled through pysoci\n")
        return
    for image in images:
        fetched, total = image.totals()
        lazy = image.lazy
        where = f" (pysoci mount at {image.mount})" if image.mount else ""
        if image.error:
            out.write(f"{image.image}{where}: {image.error}\n")
            continue
        line = f"{image.image}{where}  ({len(lazy)} of {len(image.layers)} layers lazy"
        if total:
            line += f", {human_bytes(fetched)} / {human_bytes(total)} fetched"
            line += f", {100.0 * fetched / total:.1f}%"
        out.write(line + ")\n")
        for layer in image.layers:
            out.write("  " + _layer_line(layer) + "\n")


def _layer_line(layer: LayerStatus) -> str:
    head = f"{_short(layer.digest):<19}  {layer.mode:<5}  "
    if layer.mode == "local":
        size = f"{human_bytes(layer.totalBytes)} on disk; " if layer.totalBytes else ""
        return head + f"{size}{layer.reason}"
    if layer.fetchedBytes is None or not layer.totalBytes:
        return head + f"{layer.state}: {layer.error}" if layer.error else head + layer.state
    fraction = layer.fetchedBytes / layer.totalBytes
    text = (
        f"{progress_bar(fraction)} {100 * fraction:5.1f}%  "
        f"{human_bytes(layer.fetchedBytes)} / {human_bytes(layer.totalBytes)}  {layer.state}"
    )
    if layer.readErrors:
        text += f"  {layer.readErrors} read error(s)"
    if layer.error:
        text += f"  ({layer.error})"
    return head + text
