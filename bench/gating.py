"""Why each span of a cold start was fetched: what the header checks of issue 15 cost.

pysoci shows an entry that has no data to read but changes what a container may do or see
(symlinks, hardlinks, devices, setuid/setgid, file capabilities, whiteouts: `gated` in
snapshotter/fs/tree.py) only once its tar header has been checked, and serves a file's data
only once the file's own header chain has been. There is no switch to turn that off, so the
cost is measured from a run instead: the bytes-read run of bench.startup (no background
fetch, no read-ahead: every span fetched was asked for by a read or a check) is classified
span by span against the layer's zTOC and the files the workload opened (bench/filelist.py):

- `data`: the span holds data of a file the workload opened (the topmost layer's copy);
- `gated header`: otherwise, it holds the header chain of a gated entry;
- `file header`: otherwise, it holds the header chain of a file the workload opened (the
  data starts in the next span);
- `other`: none of those (a file read without an open the trace saw, a directory's data).

A span's bytes are its compressed size; its seconds are the proxy's time for the requests
that carried it, shared by bytes when a request carried several spans. `gated header` is
what the gating costs (a lower bound: a span that also holds opened data counts as `data`);
its seconds are an upper bound of the time (the fetches may overlap others).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from bench.soci_prefetch import LayerToc, clean
from snapshotter.fs.tree import _special_entries, header_starts
from snapshotter.soci.ztoc import entry_columns

CLASSES = ("data", "gated header", "file header", "other")


def _parse_range(value: str | None, nbytes: int) -> tuple[int, int]:
    start = 0
    if value and value.startswith("bytes="):
        try:
            start = int(value[6:].split(",", 1)[0].split("-", 1)[0])
        except ValueError:
            start = 0
    return start, start + nbytes


def _intervals_hit(starts: list[int], ends: list[int], lo: int, hi: int) -> bool:
    """Whether any [starts[i], ends[i]) (sorted by start, non-empty) meets [lo, hi)."""
    i = bisect.bisect_left(starts, hi)
    # intervals starting before hi: does one of them end after lo? (ends is a running max)
    return i > 0 and ends[i - 1] > lo


class _Layer:
    """One layer's intervals: opened files' data and header chains, gated headers."""

    def __init__(self, toc: LayerToc, opened: set[str]) -> None:
        self.toc = toc
        c = entry_columns(toc.ztoc.files)
        names = [clean(os.fsdecode(c.name(e))) for e in range(len(c))]
        gated = _special_entries(c)
        for e, name in enumerate(names):
            if os.path.basename(name).startswith(".wh."):
                gated[e] = True
        starts = header_starts(c)
        offsets = np.asarray(c.offset, np.int64)
        sizes = np.asarray(c.size, np.int64)
        kind_reg = np.asarray(c.kind) == 0
        data, head, gate = [], [], []
        last: dict[str, int] = {}
        for e, name in enumerate(names):
            last[name] = e  # the last entry of a name wins (tar semantics)
        for e in last.values():
            if names[e] in opened and kind_reg[e]:
                if sizes[e] > 0:
                    data.append((int(offsets[e]), int(offsets[e] + sizes[e])))
                head.append((int(starts[e]), int(offsets[e])))
            if gated[e]:
                gate.append((int(starts[e]), int(offsets[e])))
        self.sets = {
            "data": _sweep(data),
            "gated header": _sweep(gate),
            "file header": _sweep(head),
        }
        zi = toc.zinfo
        self.cstarts = [zi.compressed_bounds(s)[0] for s in range(zi.num_spans)]

    def classify(self, span: int) -> str:
        lo, hi = self.toc.zinfo.uncompressed_bounds(span)
        for name, (starts, ends) in self.sets.items():
            if _intervals_hit(starts, ends, lo, hi):
                return name
        return "other"


def _sweep(intervals: Iterable[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Sorted starts and the running max of ends (for `_intervals_hit`)."""
    ivs = sorted((a, b) for a, b in intervals if b > a)
    starts = [a for a, _ in ivs]
    ends: list[int] = []
    top = -1
    for _, b in ivs:
        top = max(top, b)
        ends.append(top)
    return starts, ends


def classify(
    records: Iterable[Any], tocs: dict[str, LayerToc], layers: list[str], files: list[str]
) -> dict[str, dict[str, float]]:
    """Spans, compressed bytes and proxy seconds per class (see the module docstring) of the
    layer blobs' range GETs in `records` (bench.netns request records)."""
    opened_by_layer: dict[str, set[str]] = {d: set() for d in layers}
    for path in files:
        name = clean(path)
        for digest in reversed(layers):  # the topmost layer holding it serves it
            toc = tocs.get(digest)
            if toc is not None and name in toc.files:
                opened_by_layer[digest].add(name)
                break
    mapped = {d: _Layer(tocs[d], opened_by_layer[d]) for d in layers if d in tocs}
    out = {k: {"spans": 0.0, "bytes": 0.0, "seconds": 0.0} for k in CLASSES}
    seen: set[tuple[str, int]] = set()
    for r in records:
        if r.kind != "blob" or r.method != "GET" or r.bytes <= 0:
            continue
        digest = r.path.rsplit("/", 1)[-1]
        layer = mapped.get(digest)
        if layer is None:
            continue  # a zTOC or another blob
        lo, hi = _parse_range(r.range, r.bytes)
        zi = layer.toc.zinfo
        first = max(0, bisect.bisect_right(layer.cstarts, lo) - 1)
        spans = []
        for s in range(first, zi.num_spans):
            a, b = zi.compressed_bounds(s)
            if a >= hi:
                break
            if b > lo and min(b, hi) - max(a, lo) > 1:  # more than the 1-byte overlap
                spans.append((s, b - a))
        carried = sum(n for _, n in spans) or 1
        for s, n in spans:
            cls = layer.classify(s)
            row = out[cls]
            row["seconds"] += r.seconds * n / carried
            if (digest, s) in seen:
                continue
            seen.add((digest, s))
            row["spans"] += 1
            row["bytes"] += n
    return out
