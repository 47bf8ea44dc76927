"""`pysoci mount REF DIR` and `pysoci unmount DIR`: an image's root filesystem, lazily,
without containerd.

`mount` serves the FUSE layers from a process of its own: it detaches once DIR is mounted
(or stays in the foreground with `--foreground`) and records itself in
`ROOT/mounts/<id>/state.json`; `unmount` stops it, which unmounts DIR and the layers.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from snapshotter.cli.registry_args import add_registry_options, registry_client
from snapshotter.config import Config, load_config, unpack_bounds
from snapshotter.content.discovery import Modes
from snapshotter.content.local_layers import LocalLayers
from snapshotter.dataplane.lazy import LazyLayers
from snapshotter.dataplane.plane import LocalDataPlane
from snapshotter.errors import PysociError
from snapshotter.overlay import mount_overlay, unmount
from snapshotter.registry.reference import parse_reference
from snapshotter.remote.layers import PreparedImage, RemoteLayers
from snapshotter.remote.resolve import ImageResolver
from snapshotter.soci import oci

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `mount` and `unmount`."""
    m = sub.add_parser(
        "mount",
        help="mount an image's root filesystem lazily (read-only), without containerd",
        description=(
            "Mount REF's root filesystem read-only at DIR: layers with a zTOC are served "
            "lazily over FUSE (only the spans that are read are fetched, the rest in the "
            "background; a start recorded under ROOT/prefetch or published as a SOCI prefetch "
            "artifact first), the others are downloaded and unpacked; overlayfs stacks them. The "
            "serving process detaches once DIR is ready; stop it with `pysoci unmount DIR`."
        ),
    )
    m.add_argument("ref", metavar="REF", help="image reference in a registry")
    m.add_argument("dir", metavar="DIR", type=Path, help="where to mount the root filesystem")
    m.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="default: this host's")
    m.add_argument(
        "--soci-index-digest", metavar="DIGEST", help="use this SOCI index instead of looking"
    )
    m.add_argument(
        "--foreground", action="store_true", help="serve in this process until signalled"
    )
    add_registry_options(m)
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("unmount", help="unmount a root filesystem made by `pysoci mount`")
    u.add_argument("dir", metavar="DIR", type=Path, help="a directory pysoci mount mounted")
    u.add_argument("--root", type=Path, default=Path("/var/lib/pysoci"), help="pysoci's root")
    u.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default 30)")
    u.set_defaults(func=cmd_unmount)


def _mount_dir(root: Path, target: Path) -> Path:
    key = hashlib.sha256(str(target.resolve()).encode()).hexdigest()[:16]
    return root / "mounts" / key


def _summary(ref: str, target: Path, prepared: PreparedImage) -> str:
    image = prepared.image
    lines = [f"mounted {ref} ({image.manifest_digest}) at {target}"]
    if image.index:
        lines.append(f"SOCI index {image.index.descriptor.digest} ({image.index.source})")
    for desc, layer in zip(image.manifest.layers, prepared.layers, strict=True):
        how = "lazy " if layer.remote else f"local ({layer.local_reason})"
        lines.append(f"  {how:<40} {desc.digest} {desc.size} bytes")
    return "\n".join(lines)


async def _serve(args: argparse.Namespace, config: Config, ready: Any) -> None:
    root = Path(args.root)
    workdir = _mount_dir(root, args.dir)
    workdir.mkdir(parents=True, exist_ok=True)
    ref = parse_reference(args.ref)
    # Recordings are kept in the root's store, as `pysoci serve` keeps them (atomic files).
    lazy = LazyLayers(config, workdir / "fuse", root / "cache", recordings_dir=root / "prefetch")
    platform = oci.parse_platform(args.platform) if args.platform else None
    async with (
        registry_client(args, config, [ref]) as client,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(lazy.run)
        resolver = ImageResolver(
            client,
            modes=Modes(
                v1=config.pull_modes.soci_v1.enable,
                v2=config.pull_modes.soci_v2.enable,
                local=config.pull_modes.local_store.enable,
            ),
            local_store_dir=root / "content",
        )
        plane = LocalDataPlane(lazy, client, local_store_dir=root / "content")
        plane.attach(nursery)  # prefetching after each mount runs there
        layers = RemoteLayers(
            resolver, plane, LocalLayers(root / "layers", bounds=unpack_bounds(config))
        )
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            image = await layers.prepare_image(
                ref, platform=platform, index_digest=args.soci_index_digest
            )
            await mount_overlay([Path(layer.layer_dir) for layer in image.layers], args.dir)
            try:
                state = {"dir": str(args.dir.resolve()), "pid": os.getpid(), "ref": str(ref)}
                (workdir / "state.json").write_text(json.dumps(state))
                ready(_summary(str(ref), args.dir, image))
                async for _ in signals:
                    break
            finally:
                with trio.CancelScope(shield=True):
                    await unmount(args.dir, lazy=True)
                    (workdir / "state.json").unlink(missing_ok=True)
                nursery.cancel_scope.cancel()


def cmd_mount(args: argparse.Namespace) -> int:
    """`pysoci mount`."""
    if os.geteuid() != 0:
        raise SystemExit("pysoci mount: needs root (FUSE with allow_other, overlayfs)")
    config, _unknown = load_config(args.config)
    if args.foreground:
        trio.run(_serve, args, config, lambda text: print(text, flush=True))
        return 0
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the serving process
        os.close(read_fd)
        os.setsid()
        workdir = _mount_dir(Path(args.root), args.dir)
        workdir.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(workdir / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        logging.basicConfig(
            level=logging.INFO, force=True, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        for noisy in ("httpx", "httpcore", "pyfuse3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        pipe = os.fdopen(write_fd, "w")

        def ready(text: str) -> None:
            pipe.write("ok\n" + text + "\n")
            pipe.close()

        code = 0
        try:
            trio.run(_serve, args, config, ready)
        except BaseException as e:  # report any failure to the waiting parent
            log.exception("pysoci mount failed")
            if not pipe.closed:
                pipe.write(f"error\n{_describe(e)}\n")
                pipe.close()
            code = 1
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        status = pipe.readline().strip()
        text = pipe.read().rstrip()
    if status == "ok":
        print(text)
        return 0
    print(f"pysoci mount: {text or 'the serving process died'}", file=sys.stderr)
    os.waitpid(pid, 0)
    return 1


def _describe(e: BaseException) -> str:
    if isinstance(e, BaseExceptionGroup):
        return "; ".join(_describe(x) for x in e.exceptions)
    return str(e) if isinstance(e, PysociError) else f"{type(e).__name__}: {e}"


def cmd_unmount(args: argparse.Namespace) -> int:
    """`pysoci unmount`."""
    workdir = _mount_dir(Path(args.root), args.dir)
    state_file = workdir / "state.json"
    if not state_file.exists():
        print(
            f"pysoci unmount: {args.dir} is not mounted by pysoci (no {state_file})",
            file=sys.stderr,
        )
        return 1
    pid = int(json.loads(state_file.read_text())["pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        # The server is gone: clean up what it left.
        trio.run(functools.partial(unmount, args.dir, lazy=True))
        state_file.unlink(missing_ok=True)
        subprocess.run(["fusermount3", "-u", "-z", str(workdir / "fuse")], capture_output=True)
        print(f"unmounted {args.dir} (its server had already exited)")
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"unmounted {args.dir}")
            return 0
        time.sleep(0.05)
    print(f"pysoci unmount: server {pid} did not stop within {args.timeout} s", file=sys.stderr)
    return 1
