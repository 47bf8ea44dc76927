"""`pysoci create|convert|push` and `pysoci index list|info|rm`.

Images come from a registry (REF) or from an OCI image layout (`--oci-layout DIR[:TAG]`).
Registry images are copied into the local content store (`<root>/content`, an OCI layout) with
the layers that can get a zTOC; indexes are built there and published with `push` (v1) or as
part of `convert` (v2).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import trio

from snapshotter.cli.progress import LayerProgressPrinter, human_bytes
from snapshotter.cli.registry_args import add_registry_options, add_root_option, registry_client
from snapshotter.cli.sizes import parse_size, positive_size
from snapshotter.compression.detect import Compression, compression_from_media_type
from snapshotter.config import load_config
from snapshotter.content.indexing import (
    IndexOptions,
    IndexResult,
    LayoutIndexer,
    iter_soci_index_descriptors,
)
from snapshotter.content.layout import OciLayout
from snapshotter.content.remote import RemoteStore
from snapshotter.errors import ContentNotFoundError
from snapshotter.prefetch.build import PrefetchInputs, parse_paths_json
from snapshotter.prefetch.record import ImageRecording, parse_recordings
from snapshotter.registry.reference import Reference, parse_reference
from snapshotter.soci import oci
from snapshotter.soci.build import DEFAULT_MIN_LAYER_SIZE, DEFAULT_SPAN_SIZE

T = TypeVar("T")
MAX_PREFETCH_INPUT = 64 << 20


def _layout_ref(text: str) -> tuple[str, str]:
    """`DIR[:TAG]` → (DIR, TAG); TAG defaults to `latest`."""
    path, sep, tag = text.rpartition(":")
    if not sep or "/" in tag:
        return text, "latest"
    return path, tag or "latest"


def _add_build_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--oci-layout",
        metavar="DIR[:TAG]",
        help="take the image from an OCI image layout directory (tag or digest; default "
        "latest) instead of a registry",
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
    p.add_argument(
        "--prefetch-file",
        "--prefetch-files",
        dest="prefetch_file",
        action="append",
        default=[],
        metavar="PATH",
        help="a file whose spans nodes fetch at once when they mount its layer: a SOCI "
        "prefetch artifact per layer that has it (repeatable; as soci's flag)",
    )
    p.add_argument(
        "--prefetch-files-json",
        type=Path,
        metavar="FILE",
        help="a JSON array of such paths (as soci's flag)",
    )
    p.add_argument(
        "--prefetch-from",
        type=Path,
        metavar="FILE",
        help="a recorded start (`pysoci prefetch show --json` output): the spans it read "
        "become the prefetch artifacts (its files, where the zTOC differs)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `create`, `convert`, `push` and `index`."""
    c = sub.add_parser(
        "create",
        help="build a SOCI index v1 (with subject) for an image",
        description=(
            "Build zTOCs for the image's layers and a SOCI index manifest v1 whose subject is "
            "the image manifest. From a registry (REF): the image is copied into the local "
            "content store with the layers that can be indexed, and the index is stored there; "
            "publish it with `pysoci push REF`. From --oci-layout: zTOCs and index are written "
            "into the layout and listed (untagged) in its index.json."
        ),
    )
    c.add_argument("ref", metavar="REF", nargs="?", help="image reference in a registry")
    _add_build_options(c)
    add_registry_options(c)
    c.set_defaults(func=cmd_create)

    v = sub.add_parser(
        "convert",
        help="make a SOCI-enabled image (index v2) from an image",
        description=(
            "Build zTOCs and a SOCI index v2 for each platform, rewrite each platform manifest "
            "with the com.amazon.soci.index-digest annotation, and publish a new image index "
            "listing the rewritten manifests and the indexes, with the layers shared with the "
            "original. Registry: `pysoci convert SRC_REF DST_REF` pushes the result to DST_REF "
            "(layers are mounted from SRC_REF in the same registry, else copied). Layout: "
            "`pysoci convert --oci-layout DIR[:TAG] DST_TAG` tags the result in the layout."
        ),
    )
    v.add_argument("src", metavar="SRC_REF", nargs="?", help="source image in a registry")
    v.add_argument(
        "dst", metavar="DST", help="destination: a reference, or a tag with --oci-layout"
    )
    _add_build_options(v)
    add_registry_options(v)
    v.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "push",
        help="publish the SOCI index v1 built by `pysoci create REF`",
        description=(
            "Push the zTOCs and SOCI index v1 of REF from the local content store to REF's "
            "repository, and list the index under the referrers fallback tag sha256-<hex of the "
            "image manifest> so that registries without the referrers API serve it too."
        ),
    )
    p.add_argument(
        "ref", metavar="REF", help="the image whose SOCI indexes (built by create) to push"
    )
    add_registry_options(p)
    p.set_defaults(func=cmd_push)

    i = sub.add_parser("index", help="list, show and remove SOCI indexes in a local store")
    isub = i.add_subparsers(dest="index_command", required=True, metavar="COMMAND")
    ls = isub.add_parser("list", help="list SOCI indexes (local content store or --oci-layout)")
    ls.add_argument(
        "--oci-layout",
        metavar="DIR",
        help="the OCI image layout to use instead of the local content store (ROOT/content)",
    )
    ls.add_argument("--ref", metavar="REF", help="only the indexes of this image")
    add_root_option(ls)
    ls.set_defaults(func=cmd_index_list)
    info = isub.add_parser("info", help="print a SOCI index manifest")
    info.add_argument("digest", metavar="DIGEST", help="the SOCI index manifest's digest")
    info.add_argument(
        "--oci-layout",
        metavar="DIR",
        help="the OCI image layout to use instead of the local content store (ROOT/content)",
    )
    add_root_option(info)
    info.set_defaults(func=cmd_index_info)
    rm = isub.add_parser("rm", help="remove SOCI index entries from the store's index.json")
    rm.add_argument("digests", metavar="DIGEST", nargs="+", help="SOCI index manifest digests")
    rm.add_argument(
        "--oci-layout",
        metavar="DIR",
        help="the OCI image layout to use instead of the local content store (ROOT/content)",
    )
    add_root_option(rm)
    rm.set_defaults(func=cmd_index_rm)


# -- plumbing ------------------------------------------------------------------------------


def _local_store(args: argparse.Namespace, *, create: bool = False) -> OciLayout:
    if getattr(args, "oci_layout", None):
        return OciLayout.open(_layout_ref(args.oci_layout)[0])
    path = Path(args.root) / "content"
    if create:
        path.mkdir(parents=True, exist_ok=True)
    elif not path.exists():
        raise ContentNotFoundError(f"no local content store at {path} (nothing created yet)")
    return OciLayout.open(path, create=create)


def _prefetch_inputs(args: argparse.Namespace) -> PrefetchInputs:
    paths = list(args.prefetch_file)
    if args.prefetch_files_json is not None:
        with open(args.prefetch_files_json, "rb") as f:
            paths.extend(parse_paths_json(f.read(MAX_PREFETCH_INPUT + 1)))
    recordings: list[ImageRecording] = []
    if args.prefetch_from is not None:
        with open(args.prefetch_from, "rb") as f:
            data = f.read(MAX_PREFETCH_INPUT + 1)
        recordings = parse_recordings(data, max_size=MAX_PREFETCH_INPUT)
    return PrefetchInputs(tuple(paths), tuple(recordings))


def _options(args: argparse.Namespace) -> IndexOptions:
    return IndexOptions(
        span_size=args.span_size,
        min_layer_size=args.min_layer_size,
        platforms=tuple(oci.parse_platform(p) for p in args.platform),
        all_platforms=args.all_platforms,
        prefetch=_prefetch_inputs(args),
    )


def _run_with_registry(
    args: argparse.Namespace,
    refs: list[Reference],
    body: Callable[[RemoteStore], Awaitable[T]],
    printer: LayerProgressPrinter | None = None,
) -> T:
    config, _unknown = load_config(args.config)
    store = _local_store(args, create=True)

    async def main() -> T:
        async with registry_client(args, config, refs) as client:
            return await body(RemoteStore(client, store, printer))

    try:
        return trio.run(main)
    finally:
        if printer:
            printer.close()


def _indexable(min_layer_size: int) -> Callable[[oci.Descriptor], bool]:
    def want(layer: oci.Descriptor) -> bool:
        return layer.size >= min_layer_size and (
            compression_from_media_type(layer.media_type) is not Compression.ZSTD
        )

    return want


def _report(results: list[IndexResult]) -> None:
    for r in results:
        print(f"index {r.index_descriptor.digest} for manifest {r.manifest.digest}")
        for o in r.layers:
            detail = f" ({o.reason})" if o.reason else ""
            ztoc = o.ztoc.digest if o.ztoc else "-"
            size = human_bytes(o.layer.size)
            print(f"  layer {o.layer.digest} {size:>10} {o.status}{detail} ztoc {ztoc}")


# -- commands ------------------------------------------------------------------------------


def cmd_create(args: argparse.Namespace) -> int:
    """`pysoci create`."""
    if bool(args.ref) == bool(args.oci_layout):
        raise SystemExit("pysoci create: give either REF or --oci-layout DIR[:TAG]")
    printer = None if args.quiet else LayerProgressPrinter()
    if args.oci_layout:
        path, tag = _layout_ref(args.oci_layout)
        indexer = LayoutIndexer(OciLayout.open(path), _options(args), printer)
        try:
            results = indexer.create(tag)
        finally:
            if printer:
                printer.close()
        _report(results)
        return 0
    ref = parse_reference(args.ref)
    options = _options(args)

    async def body(remote: RemoteStore) -> list[IndexResult]:
        await remote.pull(
            ref,
            platforms=options.platforms,
            all_platforms=options.all_platforms,
            want_layer=_indexable(options.min_layer_size),
        )
        indexer = LayoutIndexer(remote.store, options, printer)
        return await trio.to_thread.run_sync(indexer.create, str(ref))

    results = _run_with_registry(args, [ref], body, printer)
    _report(results)
    print(f"stored in {_local_store(args).root}; publish with: pysoci push {ref}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """`pysoci convert`."""
    printer = None if args.quiet else LayerProgressPrinter()
    if args.oci_layout:
        if args.src:
            raise SystemExit("pysoci convert: with --oci-layout give only DST_TAG")
        path, tag = _layout_ref(args.oci_layout)
        indexer = LayoutIndexer(OciLayout.open(path), _options(args), printer)
        try:
            desc, results = indexer.convert(tag, args.dst)
        finally:
            if printer:
                printer.close()
        _report(results)
        print(f"converted image {desc.digest} tagged {args.dst}")
        return 0
    if not args.src:
        raise SystemExit("pysoci convert: give SRC_REF DST_REF, or --oci-layout DIR[:TAG] DST_TAG")
    src, dst = parse_reference(args.src), parse_reference(args.dst)
    options = _options(args)

    async def body(remote: RemoteStore) -> tuple[oci.Descriptor, list[IndexResult]]:
        await remote.pull(
            src,
            platforms=options.platforms,
            all_platforms=options.all_platforms,
            want_layer=_indexable(options.min_layer_size),
        )
        indexer = LayoutIndexer(remote.store, options, printer)
        desc, results = await trio.to_thread.run_sync(indexer.convert, str(src), str(dst))
        pushed = await remote.push_image(desc, dst, source=src)
        return pushed, results

    desc, results = _run_with_registry(args, [src, dst], body, printer)
    _report(results)
    print(f"pushed SOCI-enabled image {dst} ({desc.digest})")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """`pysoci push`."""
    ref = parse_reference(args.ref)
    store = _local_store(args)
    try:
        top = store.resolve(str(ref))
    except ContentNotFoundError:
        raise ContentNotFoundError(
            f"{ref} is not in the local store: run pysoci create {ref}"
        ) from None
    manifests = {top.digest}
    if top.media_type in oci.INDEX_MEDIA_TYPES:
        index = oci.parse_manifest(store.read_blob(top.digest, max_size=4 << 20))
        if isinstance(index, oci.ImageIndex):
            manifests |= {d.digest for d in index.manifests}
    found = [
        desc
        for desc, idx in iter_soci_index_descriptors(store)
        if idx.version == 1 and idx.subject is not None and idx.subject.digest in manifests
    ]
    if not found:
        raise ContentNotFoundError(
            f"no SOCI index v1 for {ref} in the local store: run pysoci create {ref}"
        )

    async def body(remote: RemoteStore) -> None:
        for desc in found:
            await remote.push_soci_index(ref, desc)

    _run_with_registry(args, [ref], body)
    for desc in found:
        print(f"pushed SOCI index {desc.digest} to {ref.registry}/{ref.repository}")
    return 0


def cmd_index_list(args: argparse.Namespace) -> int:
    """`pysoci index list`."""
    layout = _local_store(args)
    subjects: set[str] | None = None
    if args.ref:
        top = layout.resolve(str(parse_reference(args.ref)))
        subjects = {top.digest}
        if top.media_type in oci.INDEX_MEDIA_TYPES:
            parsed = oci.parse_manifest(layout.read_blob(top.digest, max_size=4 << 20))
            if isinstance(parsed, oci.ImageIndex):
                subjects |= {d.digest for d in parsed.manifests}
    print(f"{'DIGEST':<72} {'VERSION':<8} {'ZTOCS':>5}  SUBJECT")
    for desc, idx in iter_soci_index_descriptors(layout):
        subject = idx.subject.digest if idx.subject else "-"
        if subjects is not None and subject not in subjects and desc.digest not in subjects:
            continue
        print(f"{desc.digest:<72} {'v' + str(idx.version):<8} {len(idx.ztocs):>5}  {subject}")
    return 0


def cmd_index_info(args: argparse.Namespace) -> int:
    """`pysoci index info`."""
    layout = _local_store(args)
    data = layout.read_blob(oci.validate_digest(args.digest), max_size=4 << 20)
    json.dump(json.loads(data), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def cmd_index_rm(args: argparse.Namespace) -> int:
    """`pysoci index rm`."""
    layout = _local_store(args)
    status = 0
    for digest in args.digests:
        if layout.remove_manifest(oci.validate_digest(digest)):
            print(f"removed {digest}")
        else:
            print(f"pysoci: {digest} is not listed in {layout.root}/index.json", file=sys.stderr)
            status = 1
    return status
