"""`pysoci ztoc build|info|get-file`: work with one layer's zTOC offline."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, BinaryIO

from snapshotter.cli.sizes import positive_size
from snapshotter.compression.detect import Compression, detect_compression
from snapshotter.soci.build import DEFAULT_SPAN_SIZE, ZtocBuilder
from snapshotter.soci.reader import ZtocReader
from snapshotter.soci.zinfo import decode_zinfo
from snapshotter.soci.ztoc import Ztoc, decode_ztoc, encode_ztoc, ztoc_digest

MAX_ZTOC_FILE = 1 << 30
_COMPRESSIONS = {"gzip": Compression.GZIP, "none": Compression.UNCOMPRESSED}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `ztoc` command group."""
    p = sub.add_parser("ztoc", help="build and inspect the zTOC of one layer blob")
    zsub = p.add_subparsers(dest="ztoc_command", required=True, metavar="COMMAND")

    b = zsub.add_parser(
        "build",
        help="build the zTOC of a layer blob (gzip or uncompressed tar)",
        description="Read a layer blob once and write its zTOC (the raw flatbuffer soci uses).",
    )
    b.add_argument("layer", metavar="LAYER_BLOB", help="the layer blob (.tar.gz or .tar)")
    b.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the zTOC")
    b.add_argument(
        "--span-size",
        type=positive_size,
        default=DEFAULT_SPAN_SIZE,
        help="uncompressed bytes between checkpoints (default 4MiB)",
    )
    b.add_argument(
        "--compression",
        choices=["auto", *_COMPRESSIONS],
        default="auto",
        help="the blob's compression (default: detected from its first bytes)",
    )
    b.set_defaults(func=cmd_build)

    i = zsub.add_parser(
        "info",
        help="print a zTOC as JSON",
        description="Print a zTOC's header and every file with its span range, as JSON.",
    )
    i.add_argument("ztoc", metavar="ZTOC_FILE", help="a zTOC blob (as ztoc build writes it)")
    i.add_argument("--no-files", action="store_true", help="omit the per-file list")
    i.set_defaults(func=cmd_info)

    g = zsub.add_parser(
        "get-file",
        help="extract one file from a layer blob through its zTOC",
        description=(
            "Extract PATH from LAYER_BLOB by reading only the compressed spans that hold it; "
            "every span is verified against the zTOC's digests."
        ),
    )
    g.add_argument("ztoc", metavar="ZTOC_FILE", help="the zTOC of the layer")
    g.add_argument("layer", metavar="LAYER_BLOB", help="the layer blob the zTOC describes")
    g.add_argument("path", metavar="PATH", help="path inside the layer (a/b, ./a/b or /a/b)")
    g.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    g.add_argument(
        "--stats",
        action="store_true",
        help="print to stderr how many compressed bytes were read, against the blob size",
    )
    g.set_defaults(func=cmd_get_file)


def _read_ztoc(path: str) -> tuple[Ztoc, int]:
    size = os.path.getsize(path)
    if size > MAX_ZTOC_FILE:
        raise SystemExit(f"pysoci: {path}: {size} bytes is too large for a zTOC")
    with open(path, "rb") as f:
        data = f.read()
    return decode_ztoc(data), len(data)


def cmd_build(args: argparse.Namespace) -> int:
    """`pysoci ztoc build`."""
    with open(args.layer, "rb") as f:
        compression = (
            detect_compression(f.read(8))
            if args.compression == "auto"
            else _COMPRESSIONS[args.compression]
        )
        if compression is Compression.ZSTD:
            print("pysoci: zstd layers have no zTOC (soci does not index them)", file=sys.stderr)
            return 2
        f.seek(0)
        builder = ZtocBuilder(compression, args.span_size)
        while chunk := f.read(1 << 20):
            builder.feed(chunk)
    blob = encode_ztoc(builder.finish())
    tmp = args.output + ".tmp"
    with open(tmp, "wb") as out:
        out.write(blob)
    os.replace(tmp, args.output)
    print(f"{ztoc_digest(blob)} {len(blob)} {args.output}")
    return 0


def ztoc_info(ztoc: Ztoc, size: int, *, files: bool = True) -> dict[str, Any]:
    """The JSON document `pysoci ztoc info` prints (the shape of soci's `ztoc info`)."""
    zinfo = decode_zinfo(
        ztoc.compression_algorithm,
        ztoc.checkpoints,
        compressed_size=ztoc.compressed_archive_size,
        uncompressed_size=ztoc.uncompressed_archive_size,
    )
    entries = []
    multi = 0
    for f in ztoc.files:
        start = zinfo.span_of(f.uncompressed_offset) if ztoc.uncompressed_archive_size else 0
        last = f.uncompressed_offset + max(f.uncompressed_size - 1, 0)
        end = zinfo.span_of(last) if ztoc.uncompressed_archive_size else 0
        if f.type == "reg" and end > start:
            multi += 1
        entries.append(
            {
                "filename": f.name,
                "offset": f.uncompressed_offset,
                "size": f.uncompressed_size,
                "type": f.type,
                "start_span": start,
                "end_span": end,
            }
        )
    info: dict[str, Any] = {
        "version": ztoc.version,
        "build_tool": ztoc.build_tool_identifier,
        "size": size,
        "span_size": zinfo.span_size,
        "num_spans": ztoc.max_span_id + 1,
        "num_files": len(ztoc.files),
        "num_multi_span_files": multi,
        "compression": ztoc.compression_algorithm.name.lower(),
        "compressed_size": ztoc.compressed_archive_size,
        "uncompressed_size": ztoc.uncompressed_archive_size,
    }
    if files:
        info["files"] = entries
    return info


def cmd_info(args: argparse.Namespace) -> int:
    """`pysoci ztoc info`."""
    ztoc, size = _read_ztoc(args.ztoc)
    json.dump(ztoc_info(ztoc, size, files=not args.no_files), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _range_reader(f: BinaryIO, blob_size: int) -> Any:
    def read(start: int, end: int) -> bytes:
        if end > blob_size:
            raise SystemExit(f"pysoci: the zTOC wants bytes up to {end}, the blob has {blob_size}")
        f.seek(start)
        return f.read(end - start)

    return read


def cmd_get_file(args: argparse.Namespace) -> int:
    """`pysoci ztoc get-file`."""
    ztoc, _ = _read_ztoc(args.ztoc)
    blob_size = os.path.getsize(args.layer)
    if blob_size != ztoc.compressed_archive_size:
        print(
            f"pysoci: {args.layer} is {blob_size} bytes, the zTOC describes a blob of "
            f"{ztoc.compressed_archive_size} bytes",
            file=sys.stderr,
        )
        return 1
    with open(args.layer, "rb") as f:
        reader = ZtocReader(ztoc, _range_reader(f, blob_size))
        try:
            entry = reader.find(args.path)
        except KeyError:
            print(f"pysoci: {args.path}: no such file in the layer", file=sys.stderr)
            return 1
        data = reader.read_file(entry)
    if args.output:
        with open(args.output, "wb") as out:
            out.write(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    if args.stats:
        pct = 100.0 * reader.compressed_bytes_read / max(blob_size, 1)
        print(
            f"read {reader.compressed_bytes_read} of {blob_size} compressed bytes "
            f"({pct:.1f}%) for {len(data)} bytes of {entry.name}",
            file=sys.stderr,
        )
    return 0
