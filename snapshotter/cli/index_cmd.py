"""`pysoci create`, `pysoci convert` and `pysoci index list|info|rm` over local OCI layouts."""

from __future__ import annotations

import argparse
import json
import sys

from snapshotter.cli.progress import LayerProgressPrinter, human_bytes
from snapshotter.cli.sizes import parse_size, positive_size
from snapshotter.content.indexing import (
    IndexOptions,
    IndexResult,
    LayoutIndexer,
    iter_soci_index_descriptors,
)
from snapshotter.content.layout import OciLayout
from snapshotter.soci import oci
from snapshotter.soci.build import DEFAULT_MIN_LAYER_SIZE, DEFAULT_SPAN_SIZE


def _layout_ref(text: str) -> tuple[str, str]:
    """`DIR[:TAG]` → (DIR, TAG); TAG defaults to `latest`."""
    path, sep, tag = text.rpartition(":")
    if not sep or "/" in tag:
        return text, "latest"
    return path, tag or "latest"


def _add_build_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--oci-layout",
        required=True,
        metavar="DIR[:TAG]",
        help="the image, as an OCI image layout directory and a tag or digest (default tag latest)",
    )
    p.add_argument(
        "--span-size",
        type=positive_size,
        default=DEFAULT_SPAN_SIZE,
        help="uncompressed bytes per span (default 4MiB)",
    )
    p.add_argument(
        "--min-layer-size",
        type=parse_size,
        default=DEFAULT_MIN_LAYER_SIZE,
        help="layers smaller than this get no zTOC (default 10MiB)",
    )
    p.add_argument(
        "--platform",
        action="append",
        default=[],
        metavar="OS/ARCH[/VARIANT]",
        help="platform to index (repeatable; default: this host's)",
    )
    p.add_argument("--all-platforms", action="store_true", help="index every platform")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `create`, `convert` and `index`."""
    c = sub.add_parser(
        "create",
        help="build a SOCI index v1 (with subject) for an image in an OCI layout",
        description=(
            "Build zTOCs for the image's layers and a SOCI index manifest v1 whose subject is "
            "the image manifest. zTOCs and index are written into the layout, and the index is "
            "listed in its index.json (untagged)."
        ),
    )
    _add_build_options(c)
    c.set_defaults(func=cmd_create)

    v = sub.add_parser(
        "convert",
        help="make a SOCI-enabled image (index v2) from an image in an OCI layout",
        description=(
            "Build zTOCs and a SOCI index v2 for each platform, rewrite each platform manifest "
            "with the com.amazon.soci.index-digest annotation, and tag the new image index "
            "(layers shared with the original) as DST_TAG in the same layout."
        ),
    )
    _add_build_options(v)
    v.add_argument("dst_tag", metavar="DST_TAG", help="tag for the converted image")
    v.set_defaults(func=cmd_convert)

    i = sub.add_parser("index", help="list, show and remove SOCI indexes in an OCI layout")
    isub = i.add_subparsers(dest="index_command", required=True, metavar="COMMAND")
    ls = isub.add_parser("list", help="list the SOCI indexes in a layout")
    ls.add_argument("--oci-layout", required=True, metavar="DIR")
    ls.set_defaults(func=cmd_index_list)
    info = isub.add_parser("info", help="print a SOCI index manifest")
    info.add_argument("--oci-layout", required=True, metavar="DIR")
    info.add_argument("digest", metavar="DIGEST")
    info.set_defaults(func=cmd_index_info)
    rm = isub.add_parser("rm", help="remove a v1 SOCI index entry from a layout's index.json")
    rm.add_argument("--oci-layout", required=True, metavar="DIR")
    rm.add_argument("digest", metavar="DIGEST")
    rm.set_defaults(func=cmd_index_rm)


def _indexer(args: argparse.Namespace) -> tuple[LayoutIndexer, str, LayerProgressPrinter | None]:
    path, ref = _layout_ref(args.oci_layout)
    options = IndexOptions(
        span_size=args.span_size,
        min_layer_size=args.min_layer_size,
        platforms=tuple(oci.parse_platform(p) for p in args.platform),
        all_platforms=args.all_platforms,
    )
    printer = None if args.quiet else LayerProgressPrinter()
    return LayoutIndexer(OciLayout.open(path), options, printer), ref, printer


def _report(results: list[IndexResult]) -> None:
    for r in results:
        print(f"index {r.index_descriptor.digest} for manifest {r.manifest.digest}")
        for o in r.layers:
            detail = f" ({o.reason})" if o.reason else ""
            ztoc = o.ztoc.digest if o.ztoc else "-"
            size = human_bytes(o.layer.size)
            print(f"  layer {o.layer.digest} {size:>10} {o.status}{detail} ztoc {ztoc}")


def cmd_create(args: argparse.Namespace) -> int:
    """`pysoci create`."""
    indexer, ref, printer = _indexer(args)
    try:
        results = indexer.create(ref)
    finally:
        if printer:
            printer.close()
    _report(results)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """`pysoci convert`."""
    indexer, ref, printer = _indexer(args)
    try:
        desc, results = indexer.convert(ref, args.dst_tag)
    finally:
        if printer:
            printer.close()
    _report(results)
    print(f"converted image {desc.digest} tagged {args.dst_tag}")
    return 0


def cmd_index_list(args: argparse.Namespace) -> int:
    """`pysoci index list`."""
    layout = OciLayout.open(args.oci_layout)
    print(f"{'DIGEST':<72} {'VERSION':<8} {'ZTOCS':>5}  SUBJECT")
    for desc, idx in iter_soci_index_descriptors(layout):
        subject = idx.subject.digest if idx.subject else "-"
        print(f"{desc.digest:<72} {'v' + str(idx.version):<8} {len(idx.ztocs):>5}  {subject}")
    return 0


def cmd_index_info(args: argparse.Namespace) -> int:
    """`pysoci index info`."""
    layout = OciLayout.open(args.oci_layout)
    data = layout.read_blob(oci.validate_digest(args.digest), max_size=4 << 20)
    json.dump(json.loads(data), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def cmd_index_rm(args: argparse.Namespace) -> int:
    """`pysoci index rm`."""
    layout = OciLayout.open(args.oci_layout)
    digest = oci.validate_digest(args.digest)
    if not layout.remove_manifest(digest):
        print(f"pysoci: {digest} is not listed in {args.oci_layout}/index.json", file=sys.stderr)
        return 1
    print(f"removed {digest}")
    return 0
