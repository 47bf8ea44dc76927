"""`pysoci prefetch show|push`: the starts this node recorded, and publishing one as SOCI
prefetch artifacts so that other nodes (pysoci or soci-snapshotter) fetch it at once."""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import trio

from snapshotter.cli.progress import human_bytes
from snapshotter.cli.registry_args import add_registry_options, add_root_option, registry_client
from snapshotter.config import load_config
from snapshotter.content.discovery import Modes
from snapshotter.errors import ContentNotFoundError
from snapshotter.prefetch.publish import prefetch_index, publish, resolve_image
from snapshotter.prefetch.record import ImageRecording, parse_recordings
from snapshotter.prefetch.store import MAX_FILE_BYTES, RecordingStore
from snapshotter.registry.reference import Reference, parse_reference
from snapshotter.soci import oci

DIR = "prefetch"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `prefetch show|push`."""
    p = sub.add_parser(
        "prefetch",
        help="show the container starts this node recorded; publish one as SOCI prefetch",
        description=(
            "The data plane records, per image manifest and lazy layer, the spans and files "
            "containers read from their first read until reads go quiet ([prefetch] record, "
            "quiet_period_sec), under ROOT/prefetch. The next mount of the same layer on this "
            "node fetches them at once; `prefetch push` publishes them for every node."
        ),
    )
    psub = p.add_subparsers(dest="prefetch_command", required=True, metavar="COMMAND")
    show = psub.add_parser(
        "show",
        help="print the recorded starts (files, spans, bytes, when)",
        description="Print the starts recorded under ROOT/prefetch, the most recent first.",
    )
    show.add_argument(
        "ref", metavar="REF", nargs="?", help="only this image (reference or manifest digest)"
    )
    show.add_argument(
        "--json",
        action="store_true",
        help="the recordings as JSON (what `prefetch push --from` and "
        "`convert --prefetch-from` read)",
    )
    show.add_argument(
        "--files", type=int, default=10, metavar="N", help="file names to print per layer"
    )
    add_root_option(show)
    show.set_defaults(func=cmd_show)

    push = psub.add_parser(
        "push",
        help="publish the recorded start of REF as SOCI prefetch artifacts",
        description=(
            "Resolve REF's platform manifest and SOCI index in its registry, turn the start "
            "recorded for that manifest into one prefetch artifact per layer "
            "(application/vnd.amazon.soci.prefetch.v1+json, annotated with the layer digest, "
            "listed after the zTOCs) and publish a new SOCI index: for a SOCI-enabled image "
            "(index v2) a new image tagged --dst (default: REF's tag + '-prefetch'); for an "
            "index v1 a new referrer of the unchanged image. Nodes that mount the image fetch "
            "the spans at once (pysoci: [prefetch] enable; soci-snapshotter: its [prefetch] "
            "enable)."
        ),
    )
    push.add_argument("ref", metavar="REF", help="the image whose start was recorded")
    push.add_argument(
        "--dst", metavar="DST_REF", help="v2: the new image's reference (same repository)"
    )
    push.add_argument(
        "--from",
        dest="from_file",
        type=Path,
        metavar="FILE",
        help="the recording to publish (`prefetch show --json` output) instead of ROOT/prefetch",
    )
    push.add_argument(
        "--platform", metavar="OS/ARCH[/VARIANT]", help="platform (default: this host's)"
    )
    add_registry_options(push)
    push.set_defaults(func=cmd_push)


def _store(root: Path) -> RecordingStore:
    return RecordingStore(Path(root) / DIR, max_bytes=MAX_FILE_BYTES)


def _matches(recording: ImageRecording, wanted: str) -> bool:
    if wanted.startswith("sha256:"):
        return recording.manifest_digest == wanted
    try:
        return recording.image_ref == str(parse_reference(wanted))
    except Exception:
        return recording.image_ref == wanted


def _when(t: float) -> str:
    if not t:
        return "-"
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def cmd_show(args: argparse.Namespace) -> int:
    """`pysoci prefetch show`."""
    found = _store(args.root).all()
    if args.ref:
        found = [r for r in found if _matches(r, args.ref)]
    if args.json:
        print(json.dumps({"recordings": [r.to_json() for r in found]}, indent=1))
        return 0
    if not found:
        where = Path(args.root) / DIR
        print(f"no recorded start{' of ' + args.ref if args.ref else ''} under {where}")
        return 1 if args.ref else 0
    for image in found:
        print(f"image {image.image_ref or '-'} manifest {image.manifest_digest}")
        print(f"  updated {_when(image.updated)}")
        for layer in image.layers:
            why = f" ({layer.reason})" if layer.reason else ""
            print(
                f"  layer {layer.layer_digest} {layer.state}{why}: {len(layer.spans)} of "
                f"{layer.num_spans} spans ({human_bytes(layer.span_bytes)} compressed), "
                f"{len(layer.files) + layer.files_dropped} files "
                f"({human_bytes(layer.read_bytes)} read), from {_when(layer.started)} for "
                f"{layer.duration:.1f} s; zTOC {layer.ztoc_digest}"
            )
            for name in layer.files[: max(0, args.files)]:
                print(f"    {name}")
            more = len(layer.files) + layer.files_dropped - max(0, args.files)
            if more > 0:
                print(f"    ... {more} more")
    return 0


def _recording_for(args: argparse.Namespace, manifest_digest: str) -> ImageRecording:
    if args.from_file is not None:
        with open(args.from_file, "rb") as f:
            candidates = parse_recordings(f.read(MAX_FILE_BYTES + 1), max_size=MAX_FILE_BYTES)
        exact = [r for r in candidates if r.manifest_digest == manifest_digest]
        if exact:
            return exact[0]
        if len(candidates) == 1:
            return candidates[0]  # matched to the index by layer and zTOC digests
        raise ContentNotFoundError(
            f"{args.from_file} holds no recording of manifest {manifest_digest} "
            f"(it records {', '.join(r.manifest_digest for r in candidates) or 'nothing'})"
        )
    found = _store(args.root).load(manifest_digest)
    if found is None or not any(layer.spans for layer in found.layers):
        raise ContentNotFoundError(
            f"no recorded start of {args.ref} (manifest {manifest_digest}) under "
            f"{Path(args.root) / DIR}: start a container from it on this node first"
        )
    return found


def _default_dst(ref: Reference) -> Reference:
    return Reference(ref.registry, ref.repository, f"{ref.tag or 'latest'}-prefetch", None)


def cmd_push(args: argparse.Namespace) -> int:
    """`pysoci prefetch push`."""
    config, _unknown = load_config(args.config)
    ref = parse_reference(args.ref)
    dst = parse_reference(args.dst) if args.dst else _default_dst(ref)
    platform = oci.parse_platform(args.platform) if args.platform else None
    modes = Modes(v1=config.pull_modes.soci_v1.enable, v2=config.pull_modes.soci_v2.enable)

    async def main() -> None:
        async with registry_client(args, config, [ref, dst]) as client:
            image = await resolve_image(client, ref, modes=modes, platform=platform)
            recording = _recording_for(args, image.manifest_desc.digest)
            built = prefetch_index(image.found.index, recording)
            for why in built.skipped:
                print(f"skipped {why}")
            if not built.artifacts:
                raise ContentNotFoundError(
                    f"the recorded start of {ref} has no span of a layer its SOCI index "
                    f"{image.found.descriptor.digest} indexes"
                )
            published = await publish(client, image, built, dst)
            for a in built.artifacts:
                print(
                    f"prefetch {a.descriptor.digest} layer {a.layer_digest}: {a.spans} "
                    f"spans in {a.runs} runs"
                )
            print(
                f"pushed SOCI index v{published.version} {published.index.digest} "
                f"(from {image.found.descriptor.digest})"
            )
            if published.image is not None:
                print(f"pushed SOCI-enabled image {published.image} ({published.image_digest})")
            else:
                print(f"listed as a referrer of {ref} ({image.manifest_desc.digest})")

    trio.run(main)
    return 0
