"""Which spans a prefetch artifact lists: from files (soci's rule) and from recorded reads. Pure.

soci (`soci create|convert --prefetch-file PATH`, v0.16.1) maps a file to the spans holding
`[uncompressed_offset, uncompressed_offset + uncompressed_size]` — both ends inclusive, so a
file ending on a span boundary also names the next span; past the archive the last span —,
looks for the path from the top layer down (the first layer that has it wins, and in that layer
its first entry), and writes each layer's spans sorted and merged into runs. pysoci does the
same, except that it compares cleaned names on both sides: soci compares the cleaned path with
the raw tar name, so in a layer whose names start with "./" (`tar -C dir .`) or whose
directories end in "/" soci finds nothing, and pysoci finds the file.

A recorded start keeps the order in which spans were first read (what was read first is
fetched first): `runs_in_order` merges only spans that follow each other in that order. soci's
reader takes the runs in the order listed, so both orders are valid artifacts for it.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from snapshotter.soci.index import PrefetchSpan
from snapshotter.soci.zinfo import Zinfo
from snapshotter.soci.ztoc import EntryColumns


def clean_path(path: str | bytes) -> bytes:
    """A path or tar name as soci's cleanEntryPath sees it: `Clean("/" + p)` without the
    leading slash ("" for the root)."""
    raw = path.encode("utf-8", "surrogateescape") if isinstance(path, str) else path
    return posixpath.normpath(b"/" + raw).lstrip(b"/")


def span_at(zinfo: Zinfo, offset: int) -> int:
    """The span holding uncompressed `offset`; the last span for offsets past the archive
    (as soci's `UncompressedOffsetToSpanID`)."""
    if offset >= zinfo.uncompressed_size:
        return zinfo.num_spans - 1
    return zinfo.span_of(max(offset, 0))


def file_span_range(zinfo: Zinfo, offset: int, size: int) -> tuple[int, int]:
    """soci's spans of a file: (first, last), inclusive, of `[offset, offset + size]`."""
    first = span_at(zinfo, offset)
    return first, max(first, span_at(zinfo, offset + size))


def range_spans(zinfo: Zinfo, start: int, end: int) -> range:
    """The spans holding uncompressed bytes `[start, end)` (clipped to the archive)."""
    end = min(end, zinfo.uncompressed_size)
    start = max(start, 0)
    if start >= end:
        return range(0)
    return zinfo.spans_for_range(start, end - start)


def runs_in_order(spans: Iterable[int]) -> list[PrefetchSpan]:
    """Spans in the order given (repeats dropped) as runs: a span that follows the previous
    one's id extends its run."""
    seen: set[int] = set()
    runs: list[list[int]] = []
    for s in spans:
        if s < 0 or s in seen:
            continue
        seen.add(s)
        if runs and runs[-1][1] + 1 == s:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return [PrefetchSpan(a, b) for a, b in runs]


def normalized_runs(ranges: Iterable[tuple[int, int]]) -> list[PrefetchSpan]:
    """soci's normalizePrefetchSpans: inclusive ranges sorted, overlapping or adjacent ones
    merged."""
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [PrefetchSpan(a, b) for a, b in out]


def expand_runs(runs: Iterable[PrefetchSpan], num_spans: int) -> tuple[list[int], int]:
    """The span ids the runs name, in their order, each once, within `[0, num_spans)`; and
    how many named ids lay outside (an artifact for another zTOC, or a lying one). Work is
    bounded by `num_spans`, however long the runs claim to be."""
    out: list[int] = []
    seen = bytearray(num_spans)
    outside = 0
    for run in runs:
        if run.end_span >= num_spans:
            outside += run.end_span - max(run.start_span, num_spans) + 1
        for s in range(run.start_span, min(run.end_span, num_spans - 1) + 1):
            if not seen[s]:
                seen[s] = 1
                out.append(s)
    return out, outside


@dataclass(frozen=True)
class LayerEntries:
    """What path matching needs of one indexed layer: its digest, entries and checkpoints."""

    layer_digest: str
    entries: EntryColumns
    zinfo: Zinfo


def first_entries(entries: EntryColumns) -> dict[bytes, int]:
    """Cleaned name → the first entry that has it (soci's match within a layer)."""
    out: dict[bytes, int] = {}
    for i in range(len(entries)):
        out.setdefault(clean_path(entries.name(i)), i)
    return out


def spans_for_paths(
    layers: Sequence[LayerEntries], paths: Iterable[str]
) -> tuple[dict[str, list[PrefetchSpan]], list[str]]:
    """soci's `--prefetch-file` rule over an image's indexed layers (bottom first): layer
    digest → its normalized runs, and the paths no layer has."""
    names = [first_entries(layer.entries) for layer in layers]
    found: dict[str, list[tuple[int, int]]] = {}
    missing: list[str] = []
    for path in paths:
        key = clean_path(path)
        for layer, index in zip(reversed(layers), reversed(names), strict=True):
            entry = index.get(key)
            if entry is None:
                continue
            c = layer.entries
            span = file_span_range(layer.zinfo, int(c.offset[entry]), int(c.size[entry]))
            found.setdefault(layer.layer_digest, []).append(span)
            break
        else:
            missing.append(path)
    return {digest: normalized_runs(r) for digest, r in found.items()}, missing
