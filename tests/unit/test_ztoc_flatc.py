"""Cross-check the zTOC codec against code that flatc generates from tests/fixtures/ztoc.fbs.

flatc is required (Debian: flatbuffers-compiler; `make test` installs it): without it this
test fails rather than skips, because it is the codec's only independent oracle.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import flatbuffers
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter.soci.ztoc import CompressionAlgorithm, Ztoc, decode_ztoc, encode_ztoc
from tests.unit.test_ztoc import sample_ztoc, ztocs

SCHEMA = Path(__file__).resolve().parents[1] / "fixtures" / "ztoc.fbs"
MODULES = ("Ztoc", "TOC", "FileMetadata", "Xattr", "CompressionInfo", "CompressionAlgorithm")


def _is_generated(name: str) -> bool:
    return name == "ztoc" or name.startswith("ztoc.")


@pytest.fixture(scope="module")
def gen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """The flatc-generated `ztoc` package, importable only while this module's tests run."""
    flatc = shutil.which("flatc")
    if flatc is None:
        pytest.fail(
            "flatc not found: install Debian's flatbuffers-compiler (`make test` does); "
            "the zTOC cross-check cannot run without it"
        )
    out = tmp_path_factory.mktemp("flatc")
    subprocess.run([flatc, "--python", "-o", str(out), str(SCHEMA)], check=True)
    # The generated package is called `ztoc`: isolate it on sys.path and in sys.modules.
    saved = {k: sys.modules.pop(k) for k in [k for k in sys.modules if _is_generated(k)]}
    sys.path.insert(0, str(out))
    importlib.invalidate_caches()
    try:
        mods: dict[str, ModuleType] = {m: importlib.import_module(f"ztoc.{m}") for m in MODULES}
        for m in mods.values():
            assert Path(str(m.__file__)).is_relative_to(out)
        yield SimpleNamespace(**mods)
    finally:
        sys.path.remove(str(out))
        for k in [k for k in sys.modules if _is_generated(k)]:
            del sys.modules[k]
        sys.modules.update(saved)


def _text(b: bytes | None) -> str:
    assert b is not None
    return b.decode("utf-8", "surrogateescape")


def _read_with_generated(gen: SimpleNamespace, blob: bytes) -> Ztoc:
    """An independent decoder: flatc's generated accessors (no validation)."""
    from snapshotter.soci.ztoc import FileMetadata

    root = gen.Ztoc.Ztoc.GetRootAs(blob, 0)
    toc = root.Toc()
    files = []
    for i in range(toc.MetadataLength()):
        f = toc.Metadata(i)
        for accessor in (f.Name, f.Type, f.Linkname, f.Uname, f.Gname, f.ModTime):
            assert accessor() is not None  # written even when empty, like soci's Go encoder
        pax = {}
        for j in range(f.XattrsLength()):
            x = f.Xattrs(j)
            pax[_text(x.Key())] = _text(x.Value())
        keys = list(pax)
        assert keys == sorted(keys)
        files.append(
            FileMetadata(
                name=_text(f.Name()),
                type=_text(f.Type()),
                uncompressed_offset=f.UncompressedOffset(),
                uncompressed_size=f.UncompressedSize(),
                linkname=_text(f.Linkname()),
                mode=f.Mode(),
                uid=f.Uid(),
                gid=f.Gid(),
                uname=_text(f.Uname()),
                gname=_text(f.Gname()),
                mod_time=_text(f.ModTime()),
                devmajor=f.Devmajor(),
                devminor=f.Devminor(),
                pax_records=pax,
            )
        )
    ci = root.CompressionInfo()
    return Ztoc(
        version=_text(root.Version()),
        build_tool_identifier=_text(root.BuildToolIdentifier()),
        compressed_archive_size=root.CompressedArchiveSize(),
        uncompressed_archive_size=root.UncompressedArchiveSize(),
        files=files,
        compression_algorithm=CompressionAlgorithm(ci.CompressionAlgorithm()),
        max_span_id=ci.MaxSpanId(),
        span_digests=[_text(ci.SpanDigests(i)) for i in range(ci.SpanDigestsLength())],
        checkpoints=bytes(ci.Checkpoints(i) for i in range(ci.CheckpointsLength())),
    )


def _build_with_generated(
    gen: SimpleNamespace, z: Ztoc, *, force_defaults: bool, omit_empty: bool, rev_xattrs: bool
) -> bytes:
    """An independent encoder: flatc's generated builder functions."""
    b = flatbuffers.Builder(0)
    b.ForceDefaults(force_defaults)
    FM, X, CI, TOC, ZT = gen.FileMetadata, gen.Xattr, gen.CompressionInfo, gen.TOC, gen.Ztoc

    def string(s: str) -> int | None:
        if omit_empty and not s:
            return None
        return int(b.CreateString(s.encode("utf-8", "surrogateescape")))

    def vector(start: Any, offsets: list[int]) -> int:
        start(b, len(offsets))
        for o in reversed(offsets):
            b.PrependUOffsetTRelative(o)
        return int(b.EndVector())

    file_offsets = []
    for f in z.files:
        pairs = sorted(f.pax_records.items(), reverse=rev_xattrs)
        xoffs = []
        for k, v in pairs:
            ko, vo = string(k), string(v)
            X.XattrStart(b)
            if ko is not None:
                X.XattrAddKey(b, ko)
            if vo is not None:
                X.XattrAddValue(b, vo)
            xoffs.append(X.XattrEnd(b))
        xattrs = vector(FM.FileMetadataStartXattrsVector, xoffs) if xoffs else None
        strings = {
            "Name": string(f.name),
            "Type": string(f.type),
            "Linkname": string(f.linkname),
            "Uname": string(f.uname),
            "Gname": string(f.gname),
            "ModTime": string(f.mod_time),
        }
        FM.FileMetadataStart(b)
        for field, off in strings.items():
            if off is not None:
                getattr(FM, f"FileMetadataAdd{field}")(b, off)
        FM.FileMetadataAddUncompressedOffset(b, f.uncompressed_offset)
        FM.FileMetadataAddUncompressedSize(b, f.uncompressed_size)
        FM.FileMetadataAddMode(b, f.mode)
        FM.FileMetadataAddUid(b, f.uid)
        FM.FileMetadataAddGid(b, f.gid)
        FM.FileMetadataAddDevmajor(b, f.devmajor)
        FM.FileMetadataAddDevminor(b, f.devminor)
        if xattrs is not None:
            FM.FileMetadataAddXattrs(b, xattrs)
        file_offsets.append(FM.FileMetadataEnd(b))
    metadata = vector(TOC.TOCStartMetadataVector, file_offsets)
    TOC.TOCStart(b)
    TOC.TOCAddMetadata(b, metadata)
    toc = TOC.TOCEnd(b)

    digests = vector(
        CI.CompressionInfoStartSpanDigestsVector, [b.CreateString(d) for d in z.span_digests]
    )
    checkpoints = b.CreateByteVector(z.checkpoints)
    CI.CompressionInfoStart(b)
    CI.CompressionInfoAddCompressionAlgorithm(b, int(z.compression_algorithm))
    CI.CompressionInfoAddMaxSpanId(b, z.max_span_id)
    CI.CompressionInfoAddSpanDigests(b, digests)
    CI.CompressionInfoAddCheckpoints(b, checkpoints)
    ci = CI.CompressionInfoEnd(b)

    version = b.CreateString(z.version.encode("utf-8", "surrogateescape"))
    tool = string(z.build_tool_identifier)
    ZT.ZtocStart(b)
    ZT.ZtocAddVersion(b, version)
    if tool is not None:
        ZT.ZtocAddBuildToolIdentifier(b, tool)
    ZT.ZtocAddCompressedArchiveSize(b, z.compressed_archive_size)
    ZT.ZtocAddUncompressedArchiveSize(b, z.uncompressed_archive_size)
    ZT.ZtocAddToc(b, toc)
    ZT.ZtocAddCompressionInfo(b, ci)
    b.Finish(ZT.ZtocEnd(b))
    return bytes(b.Output())


def test_generated_code_matches_schema_facts(gen: SimpleNamespace) -> None:
    assert gen.CompressionAlgorithm.CompressionAlgorithm.Gzip == CompressionAlgorithm.GZIP
    assert (
        gen.CompressionAlgorithm.CompressionAlgorithm.Uncompressed
        == CompressionAlgorithm.UNCOMPRESSED
    )
    # An empty CompressionInfo reads as the schema default, Gzip.
    b = flatbuffers.Builder(0)
    gen.CompressionInfo.CompressionInfoStart(b)
    b.Finish(gen.CompressionInfo.CompressionInfoEnd(b))
    empty = gen.CompressionInfo.CompressionInfo.GetRootAs(bytes(b.Output()), 0)
    assert empty.CompressionAlgorithm() == CompressionAlgorithm.GZIP


def test_sample_read_by_generated_code(gen: SimpleNamespace) -> None:
    z = sample_ztoc()
    assert _read_with_generated(gen, encode_ztoc(z)) == z


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(z=ztocs())
def test_encoded_read_by_generated_code(gen: SimpleNamespace, z: Ztoc) -> None:
    assert _read_with_generated(gen, encode_ztoc(z)) == z


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(z=ztocs(), force=st.booleans(), omit=st.booleans(), rev=st.booleans())
def test_generated_builder_decoded(
    gen: SimpleNamespace, z: Ztoc, force: bool, omit: bool, rev: bool
) -> None:
    blob = _build_with_generated(gen, z, force_defaults=force, omit_empty=omit, rev_xattrs=rev)
    decoded = decode_ztoc(blob)
    assert decoded == z
    for f in decoded.files:
        assert list(f.pax_records) == sorted(f.pax_records)
    # ...and the two encoders agree on meaning, if not on bytes.
    assert decode_ztoc(encode_ztoc(decoded)) == decode_ztoc(blob)
