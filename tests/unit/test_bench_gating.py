"""bench.gating: why each fetched span was fetched, from a real zTOC of a gzip layer."""

from __future__ import annotations

import gzip
import io
import random
import tarfile
from dataclasses import dataclass

from bench import gating
from bench.soci_prefetch import LayerToc, clean
from snapshotter.compression.detect import Compression
from snapshotter.soci.build import build_ztoc
from snapshotter.soci.zinfo import decode_gzip_zinfo

SPAN = 64 << 10


def _layer() -> bytes:
    rnd = random.Random(7)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, size in (("a", 300_000), ("pad", 200_000), ("s", -1), ("b", 400_000)):
            info = tarfile.TarInfo(f"usr/{name}")
            if size < 0:
                info.type, info.linkname = tarfile.SYMTYPE, "a"
                tar.addfile(info)
                continue
            info.size = size
            tar.addfile(info, io.BytesIO(rnd.randbytes(size)))  # incompressible
    return gzip.compress(buf.getvalue(), mtime=0)


@dataclass
class Rec:
    path: str
    range: str | None
    bytes: int
    seconds: float
    kind: str = "blob"
    method: str = "GET"


def test_spans_are_told_apart_by_what_they_hold() -> None:
    blob = _layer()
    z = build_ztoc([blob], Compression.GZIP, SPAN)
    zi = decode_gzip_zinfo(
        z.checkpoints,
        compressed_size=z.compressed_archive_size,
        uncompressed_size=z.uncompressed_archive_size,
    )
    outs = [zi.uncompressed_bounds(i)[0] for i in range(zi.num_spans)]
    files = {clean(f.name): (f.uncompressed_offset, f.uncompressed_size) for f in z.files}
    toc = LayerToc(z, zi, outs, files)
    by_name = {clean(f.name): f for f in z.files}
    sym = by_name["usr/s"]
    # every span fetched once, two spans per request (seconds shared by bytes)
    records = []
    for s in range(0, zi.num_spans, 2):
        lo = zi.compressed_bounds(s)[0]
        hi = zi.compressed_bounds(min(s + 1, zi.num_spans - 1))[1]
        records.append(Rec("/v2/x/blobs/sha256:L", f"bytes={lo}-{hi - 1}", hi - lo, 1.0))
    records.append(Rec("/v2/x/blobs/sha256:Z", None, 999, 5.0))  # another blob: ignored
    out = gating.classify(records, {"sha256:L": toc}, ["sha256:L"], ["/usr/a"])
    layer = gating._Layer(toc, {"usr/a"})

    def cls_of(offset: int) -> str:
        return layer.classify(zi.span_of(offset))

    a = by_name["usr/a"]
    assert cls_of(a.uncompressed_offset) == "data"
    assert cls_of(a.uncompressed_offset + a.uncompressed_size - 1) == "data"
    assert cls_of(sym.uncompressed_offset - 1) == "gated header"  # its header, in pad's tail
    b = by_name["usr/b"]
    assert cls_of(b.uncompressed_offset + b.uncompressed_size // 2) == "other"
    assert out["data"]["spans"] >= 5 and out["gated header"]["spans"] == 1
    assert sum(row["spans"] for row in out.values()) == zi.num_spans
    assert sum(row["bytes"] for row in out.values()) == sum(
        zi.compressed_bounds(s)[1] - zi.compressed_bounds(s)[0] for s in range(zi.num_spans)
    )
    assert abs(sum(row["seconds"] for row in out.values()) - len(records[:-1])) < 1e-9
