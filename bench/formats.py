"""Format benchmarks: zTOC build throughput, span random access, zTOC size.

Run with `make bench-formats`. The layer is a gzip'd tar of real binaries and libraries on this
machine (about 1.2 GB of tar, about 0.5 GB of gzip), built once and cached in bench/cache.
Every figure is reported as a ratio against a baseline measured in the same run:

- build throughput: `pysoci` building a zTOC (one pass: inflate + checkpoints + span digests +
  tar parse + blob digest) vs `gzip -dc > /dev/null` on the same file;
- span access: inflating one 4 MiB span from its checkpoint vs the same span's share of one
  sequential inflate of the whole layer;
- zTOC size per GiB of uncompressed layer at 4 MiB spans.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import time
import zlib
from pathlib import Path

from snapshotter.compression.detect import Compression
from snapshotter.compression.gzip import inflate_span
from snapshotter.soci.build import DEFAULT_SPAN_SIZE, ZtocBuilder
from snapshotter.soci.zinfo import GzipZinfo, decode_zinfo
from snapshotter.soci.ztoc import encode_ztoc

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
OUT = HERE / "out"
SOURCE_DIRS = [
    "/usr/lib/jvm",
    "/usr/local/go",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/share",
    "/usr/lib/gcc",
]
TARGET_TAR_BYTES = 1200 << 20


def du(path: str) -> int:
    out = subprocess.run(["du", "-sb", path], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def make_layer() -> Path:
    """The cached benchmark layer (built from this machine's directories on first use)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    layer = CACHE / "layer.tar.gz"
    if layer.exists():
        return layer
    dirs, total = [], 0
    for d in SOURCE_DIRS:
        if os.path.isdir(d) and total < TARGET_TAR_BYTES:
            dirs.append(d)
            total += du(d)
    tmp = layer.with_suffix(".tmp")
    tar = subprocess.Popen(
        ["tar", "--sort=name", "--mtime=@0", "-cf", "-", *dirs],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    with open(tmp, "wb") as out:
        subprocess.run(["pigz", "-6", "-n"], stdin=tar.stdout, stdout=out, check=True)
    tar.wait()
    tmp.rename(layer)
    return layer


def timed(fn: object, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return times


def bench_build(layer: Path, repeat: int) -> dict[str, object]:
    def gzip_dc() -> None:
        subprocess.run(f"gzip -dc {layer} > /dev/null", shell=True, check=True)

    ztoc_holder: dict[str, bytes] = {}

    def build() -> None:
        import hashlib

        builder = ZtocBuilder(Compression.GZIP, DEFAULT_SPAN_SIZE)
        h = hashlib.sha256()
        with open(layer, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                builder.feed(chunk)
        ztoc_holder["blob"] = encode_ztoc(builder.finish())

    # Alternate baseline and candidate so drift hits both alike.
    base, cand = [], []
    for _ in range(repeat):
        base += timed(gzip_dc, 1)
        cand += timed(build, 1)
    b, c = statistics.median(base), statistics.median(cand)
    return {
        "gzip_dc_s": base,
        "ztoc_build_s": cand,
        "throughput_ratio": b / c,
        "ztoc_blob": ztoc_holder["blob"],
    }


def bench_spans(layer: Path, ztoc_blob: bytes, samples: int) -> dict[str, object]:
    from snapshotter.soci.ztoc import decode_ztoc

    ztoc = decode_ztoc(ztoc_blob)
    zinfo = decode_zinfo(
        ztoc.compression_algorithm,
        ztoc.checkpoints,
        compressed_size=ztoc.compressed_archive_size,
        uncompressed_size=ztoc.uncompressed_archive_size,
    )
    assert isinstance(zinfo, GzipZinfo)
    data = layer.read_bytes()
    # Baseline: one sequential inflate of the whole layer (CPython's zlib), fed span by span,
    # so each span's share of it is timed on exactly the bytes the random access inflates.
    view = memoryview(data)
    d = zlib.decompressobj(31)
    seq_span_s = []
    total = 0
    t_all = time.perf_counter()
    first_in = zinfo.compressed_bounds(0)[0]
    total += len(d.decompress(view[:first_in]))
    for s in range(zinfo.num_spans):
        end = (
            zinfo.compressed_bounds(s + 1)[0] + (1 if zinfo.bits(s + 1) else 0)
            if s + 1 < zinfo.num_spans
            else len(data)
        )
        start = zinfo.compressed_bounds(s)[0] + (1 if zinfo.bits(s) else 0)
        t0 = time.perf_counter()
        total += len(d.decompress(view[start:end]))
        seq_span_s.append(time.perf_counter() - t0)
    seq_s = time.perf_counter() - t_all
    rng = random.Random(1)
    spans = rng.sample(range(zinfo.num_spans - 1), min(samples, zinfo.num_spans - 1))
    ratios = []
    for s in spans:
        cs, ce = zinfo.compressed_bounds(s)
        us, ue = zinfo.uncompressed_bounds(s)
        chunk = bytes(view[cs:ce])
        dt = float("inf")
        for _ in range(3):  # best of three: one call is short enough to catch scheduler noise
            t0 = time.perf_counter()
            out = inflate_span(zinfo, s, chunk)
            dt = min(dt, time.perf_counter() - t0)
        assert len(out) == ue - us
        ratios.append(dt / seq_span_s[s])
    return {
        "sequential_inflate_s": seq_s,
        "uncompressed_bytes": total,
        "span_samples": samples,
        "span_overhead_ratio_median": statistics.median(ratios),
        "span_overhead_ratio_max": max(ratios),
        "num_spans": zinfo.num_spans,
        "checkpoint_bytes": len(ztoc.checkpoints),
        "num_files": len(ztoc.files),
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--span-samples", type=int, default=40)
    args = ap.parse_args()
    layer = make_layer()
    build = bench_build(layer, args.repeat)
    ztoc_blob = build.pop("ztoc_blob")
    assert isinstance(ztoc_blob, bytes)
    spans = bench_spans(layer, ztoc_blob, args.span_samples)
    uncompressed = spans["uncompressed_bytes"]
    assert isinstance(uncompressed, int)
    result = {
        "machine": f"{platform.node()} {os.cpu_count()} cpu {platform.machine()}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "layer_compressed_bytes": layer.stat().st_size,
        "layer_uncompressed_bytes": uncompressed,
        "build": build,
        "spans": spans,
        "ztoc_bytes": len(ztoc_blob),
        "ztoc_mib_per_gib_uncompressed": len(ztoc_blob) / 2**20 / (uncompressed / 2**30),
        "checkpoint_mib_per_gib_uncompressed": spans["checkpoint_bytes"]  # type: ignore[operator]
        / 2**20
        / (uncompressed / 2**30),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "formats.json").write_text(json.dumps(result, indent=2))
    build_s = statistics.median(build["ztoc_build_s"])  # type: ignore[arg-type]
    gzip_s = statistics.median(build["gzip_dc_s"])  # type: ignore[arg-type]
    gzip_mib = layer.stat().st_size / 2**20
    md = [
        "| measure | value | target |",
        "|---|---|---|",
        f"| layer | {gzip_mib:.0f} MiB gzip, {uncompressed / 2**20:.0f} MiB tar | |",
        f"| zTOC build throughput / `gzip -dc` | {build['throughput_ratio']:.2f} "
        f"({build_s:.1f} s vs {gzip_s:.1f} s, medians) | ≥ 0.7 |",
        "| one 4 MiB span from its checkpoint / the same span in a sequential inflate | "
        f"median {spans['span_overhead_ratio_median']:.2f}, "
        f"max {spans['span_overhead_ratio_max']:.2f} | ≤ 1.2 |",
        f"| zTOC size per GiB of tar | {result['ztoc_mib_per_gib_uncompressed']:.2f} MiB "
        f"(checkpoints {result['checkpoint_mib_per_gib_uncompressed']:.2f} MiB, TOC of "
        f"{spans['num_files']} files the rest) | ~8 MiB |",
    ]
    (OUT / "formats.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
