"""Interop with the real soci-snapshotter v0.16.1, both ways, with a real docker-registry.

Two images: `deb` (the Debian rootfs as one gzip layer) and `tarl` (the same base plus an
uncompressed tar layer: a 12 MiB file with an xattr, a hardlink, a symlink, a fifo, a device,
a whiteout of a base file, and directories that are only implied by their children).

- soci → pysoci: `soci create` + `soci push` (v1, found through the referrers fallback tag
  `sha256-<hex>`: docker-registry 2.8 has no referrers API) and `soci convert` (v2), with and
  without `--prefetch-file`, pulled with nerdctl through containerd 1.6 + `pysoci serve`.
- pysoci → soci: `pysoci create` + `pysoci push` (v1) and `pysoci convert` (v2), pulled with
  nerdctl through containerd 1.7 + soci-snapshotter-grpc; `soci index/ztoc` read them.

Every container's tree is compared with a full unpack by containerd's own overlayfs
snapshotter (TREE, from test_containerd), and what legitimately differs is stated: the
directories that exist in the tar layer only as implied parents get the newest mtime of
their layer in pysoci, Go's zero time (year 1) in soci, and the time of the unpack with
containerd's applier.

containerd skips Prepare for a layer chain it already has, so every test removes the images
it pulled (`ctr images rm --sync`, which also makes containerd remove the snapshots, so that
the snapshotter drops the layer and its cache; the next pull through pysoci checks it did).
Container ids are used once; `ctr run` keeps runc's state in each containerd's own directory;
the teardown ends what a failed test left running and then checks that no process and no
mount of the module's scratch directory is left.

Prefetch: here pysoci parses soci's prefetch artifacts
(test_soci_prefetch_artifacts_parse_in_pysoci) and serves the indexes that carry them; that a
node fetches their spans ahead, and that soci reads the artifacts pysoci publishes, is
tests/integration/test_prefetch_record.py's.
"""

from __future__ import annotations

import ast
import hashlib
import io
import itertools
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapshotter.soci.index import MEDIA_TYPE_PREFETCH, parse_prefetch, parse_soci_index
from snapshotter.soci.zinfo import decode_tar_zinfo, decode_zinfo
from snapshotter.soci.ztoc import Ztoc, decode_ztoc
from tests.fixtures import gotools
from tests.fixtures.containerd import (
    Containerd,
    Pysoci,
    layer_status,
    layer_statuses,
    start_containerd,
)
from tests.fixtures.debootstrap import rootfs_tar
from tests.fixtures.images import GZIP_LAYER, TAR_LAYER, Layer, pigz_blob, write_image
from tests.fixtures.pysoci_config import pysoci_config
from tests.fixtures.registry import Registry, start_registry
from tests.fixtures.soci import PREPARED, SociNode, assert_nothing_left, reap_tasks, start_soci_node
from tests.integration.test_containerd import TREE

PYSOCI = str(Path(sys.executable).with_name("pysoci"))
WORKLOAD = "import json, sqlite3, email; print('ready')"
M1 = 1_700_000_000.123456
M2 = 1_700_000_100.5
"""The newest mtime of the tar layer (only /opt/implicit/deep/file has it)."""
M2_NS = 1_700_000_100_500_000_000
GO_ZERO_TIME_NS = -62_135_596_800 * 1_000_000_000
"""`time.Time{}` (0001-01-01T00:00:00Z) as the kernel shows it from soci's FUSE."""
IMPLICIT = ("/etc", "/opt", "/opt/implicit", "/opt/implicit/deep")
"""The directories the tar layer holds only as implied parents (merged directories take
their attributes from the uppermost layer that has them: here the tar layer)."""
PREFETCH_FILES = ("/opt/explicit/data", "/usr/bin/python3.11")
BUILD_NS = "build"
"""containerd 1.7 namespace of the soci CLI's own work (pulls for the tests use `default`)."""


def _tar_layer() -> bytes:
    """The uncompressed layer of `tarl` (names without "./", as BuildKit writes them)."""
    rng = random.Random(16)
    buf = io.BytesIO()

    def add(name: str, kind: bytes, data: bytes = b"", **attrs: object) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mtime, info.mode = kind, M1, 0o644
        for key, value in attrs.items():
            setattr(info, key, value)
        info.size = len(data)
        t.addfile(info, io.BytesIO(data) if data else None)

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        add("etc/.wh.issue", tarfile.REGTYPE)  # implies /etc, hides the base's /etc/issue
        add("opt/explicit", tarfile.DIRTYPE, mode=0o750)  # implies /opt
        add(
            "opt/explicit/data",
            tarfile.REGTYPE,
            rng.randbytes(12 << 20),
            pax_headers={"SCHILY.xattr.user.pysoci": "lazy"},
        )
        add("opt/explicit/data-link", tarfile.LNKTYPE, linkname="opt/explicit/data")
        add("opt/explicit/symlink", tarfile.SYMTYPE, linkname="data", mode=0o777)
        add("opt/explicit/fifo", tarfile.FIFOTYPE, mode=0o600)
        add("opt/explicit/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3)
        add("opt/implicit/deep/file", tarfile.REGTYPE, b"deep\n", mtime=M2)
    return buf.getvalue()


def _go_archive_end(tar: bytes) -> int:
    """Where Go's archive/tar stops reading: after the last entry and two zero blocks."""
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.getmembers()
        return t.offset + 1024


@dataclass
class Images:
    """The test images in the registry and what they are made of."""

    reg: Registry
    base: Layer
    tar: Layer
    deb: str
    """`HOST/deb:v1`."""
    tarl: str
    """`HOST/tarl:v1`."""
    deb_manifest: str
    tarl_manifest: str
    applied: tuple[float, float]
    """When the full unpack of `tarl` ran (its implied directories' mtimes lie in between)."""
    full_trees: dict[str, list[str]]
    """TREE of each image as containerd's overlayfs snapshotter unpacks it."""


@dataclass
class SociBuilt:
    """soci's outputs in the registry."""

    deb_v1_index: str
    deb_v2: str
    tarl_v1_index: str
    tarl_v2: str
    create_pf_output: str
    convert_pf_output: str


@dataclass
class PysociBuilt:
    """pysoci's outputs for `tarl`, pushed to repository `ptar` (its own referrers tag)."""

    v1_ref: str
    v1_index: str
    v2_ref: str
    v2_index: str
    create_output: str
    deb_v2: str
    """pysoci's own v2 of `deb` (the baseline of what a workload fetches)."""


# ------------------------------------------------------------------------------- helpers


def _push_layout(reg: Registry, layout: Path, tag: str, repo: str) -> None:
    """Push the image tagged `tag` in an OCI layout to `repo:tag`, blobs as they are
    (skopeo would gzip an uncompressed layer on its way to a docker:// destination)."""
    index = json.loads((layout / "index.json").read_bytes())
    (desc,) = [
        m
        for m in index["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] == tag
    ]

    def blob(digest: str) -> bytes:
        return (layout / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()

    manifest = blob(desc["digest"])
    parsed = json.loads(manifest)
    for d in [parsed["config"], *parsed["layers"]]:
        start = urllib.request.Request(f"{reg.url}/v2/{repo}/blobs/uploads/", method="POST")
        with urllib.request.urlopen(start, timeout=30) as resp:
            location = resp.headers["Location"]
        sep = "&" if "?" in location else "?"
        url = location if location.startswith("http") else reg.url + location
        put = urllib.request.Request(
            f"{url}{sep}digest={d['digest']}", data=blob(d["digest"]), method="PUT"
        )
        put.add_header("Content-Type", "application/octet-stream")
        urllib.request.urlopen(put, timeout=300).close()
    put = urllib.request.Request(
        f"{reg.url}/v2/{repo}/manifests/{tag}", data=manifest, method="PUT"
    )
    put.add_header("Content-Type", desc["mediaType"])
    urllib.request.urlopen(put, timeout=30).close()


def _registry_get(reg: Registry, path: str, accept: str = "") -> tuple[int, bytes]:
    req = urllib.request.Request(f"{reg.url}/v2/{path}")
    if accept:
        req.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json,application/vnd.oci.image.index.v1+json"
)


def _manifest(reg: Registry, repo: str, ref: str) -> tuple[str, dict[str, object]]:
    code, body = _registry_get(reg, f"{repo}/manifests/{ref}", MANIFEST_TYPES)
    assert code == 200, (repo, ref, code, body[:200])
    return "sha256:" + hashlib.sha256(body).hexdigest(), json.loads(body)


def _blob(reg: Registry, repo: str, digest: str) -> bytes:
    code, body = _registry_get(reg, f"{repo}/blobs/{digest}")
    assert code == 200, (repo, digest, code)
    return body


def _v1_index_via_fallback_tag(reg: Registry, repo: str, manifest: str) -> str:
    """The one SOCI v1 index listed under the referrers fallback tag of `manifest`."""
    _, tag_index = _manifest(reg, repo, manifest.replace(":", "-"))
    refs = [
        m
        for m in tag_index["manifests"]  # type: ignore[attr-defined]
        if m.get("artifactType") == "application/vnd.amazon.soci.index.v1+json"
    ]
    assert len(refs) == 1, tag_index
    return str(refs[0]["digest"])


def _v2_index(reg: Registry, repo: str, tag: str) -> str:
    """The SOCI index a SOCI-enabled image's platform manifest names (in its annotations;
    soci also copies it onto the manifest's descriptor in the image index, pysoci does not)."""
    _, top = _manifest(reg, repo, tag)
    (entry,) = [
        m
        for m in top["manifests"]  # type: ignore[attr-defined]
        if m.get("artifactType") != "application/vnd.amazon.soci.index.v2+json"
    ]
    _, manifest = _manifest(reg, repo, entry["digest"])
    return str(manifest["annotations"]["com.amazon.soci.index-digest"])  # type: ignore[index]


def _ztocs_of(reg: Registry, repo: str, index: str) -> dict[str, Ztoc]:
    """Image layer digest → its zTOC (decoded by pysoci), for a SOCI index."""
    _, manifest = _manifest(reg, repo, index)
    out = {}
    for desc in manifest["layers"]:  # type: ignore[attr-defined]
        if desc["mediaType"] == "application/octet-stream":
            layer = desc["annotations"]["com.amazon.soci.image-layer-digest"]
            out[layer] = decode_ztoc(_blob(reg, repo, desc["digest"]))
    return out


def _pysoci(*args: str, timeout: float = 600) -> str:
    res = subprocess.run(
        [PYSOCI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert res.returncode == 0, f"pysoci {' '.join(args[:2])}: {res.stderr[-3000:]}"
    return res.stdout


_ids = itertools.count()


def _tree_run(ref: str) -> tuple[str, ...]:
    """`ctr run` arguments that print the TREE of `ref` through the soci snapshotter."""
    return (
        "run",
        "--rm",
        "--snapshotter",
        "soci",
        ref,
        _cid("tree"),
        "/usr/bin/python3",
        "-c",
        TREE,
    )


def _cid(what: str) -> str:
    """A container id used once in this run (a failed `ctr run --rm` leaves its container)."""
    return f"{what}-{os.getpid()}-{next(_ids)}"


def _entries(lines: list[str]) -> dict[str, tuple[object, ...]]:
    return {e[0]: e for e in map(ast.literal_eval, lines)}


def _assert_tree(
    full: list[str], got: list[str], who: str, implicit_mtime: dict[str, object]
) -> None:
    """`got` equals the full unpack entry by entry, except the mtime (index 4) of the
    directories of `implicit_mtime`, which must be what it says (an int, or a range)."""
    assert len(full) > 5000, "the whole Debian tree was walked"
    want, have = _entries(full), _entries(got)
    assert sorted(have) == sorted(want), f"{who}: paths differ: {set(have) ^ set(want)}"
    for path, entry in want.items():
        if path in implicit_mtime:
            expected = implicit_mtime[path]
            mtime = have[path][4]
            ok = mtime in expected if isinstance(expected, range) else mtime == expected
            assert ok, f"{who}: {path} mtime {mtime}, expected {expected}"
            assert have[path][:4] + have[path][5:] == entry[:4] + entry[5:], (who, path)
        else:
            assert have[path] == entry, f"{who}: {path}\n full: {entry}\n {who}: {have[path]}"


def _applied_window(images: Images) -> range:
    lo, hi = images.applied
    return range(int(lo * 1e9) - 1_000_000_000, int(hi * 1e9) + 1_000_000_000)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The module's scratch directory; once every fixture under it is torn down, no process
    names it and nothing is mounted under it (pysoci's data plane, soci's FUSE mounts,
    containerd's shims and rootfs mounts)."""
    path = tmp_path_factory.mktemp("soci-interop")
    yield path
    assert_nothing_left(path)


@pytest.fixture(scope="module")
def registry(tmp: Path) -> Iterator[Registry]:
    reg = start_registry(tmp / "registry")
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def rig(tmp: Path, registry: Registry) -> Iterator[tuple[Pysoci, Containerd]]:
    """containerd 1.6 + `pysoci serve` (background fetching off: fetched = read)."""
    config = tmp / "pysoci.toml"
    (tmp / "certs.d").mkdir()
    config.write_text(
        pysoci_config(
            f'[background_fetch]\ndisable = true\n[registry]\nconfig_path = "{tmp / "certs.d"}"\n'
        )
    )
    pysoci = Pysoci(tmp / "pysoci", tmp / "pysoci.sock", tmp / "pysoci.log", config)
    pysoci.start()
    cd = start_containerd(tmp / "cd16", tmp / "pysoci.sock")
    try:
        yield pysoci, cd
    finally:
        reap_tasks(cd.ctr)
        cd.stop()
        pysoci.stop_all()


@pytest.fixture(scope="module")
def images(tmp: Path, registry: Registry, rig: tuple[Pysoci, Containerd]) -> Images:
    _, cd = rig
    tar = rootfs_tar().read_bytes()
    base = Layer(
        pigz_blob(tar, blocksize_kib=1024), GZIP_LAYER, "sha256:" + hashlib.sha256(tar).hexdigest()
    )
    layer = Layer.from_tar(_tar_layer(), TAR_LAYER)
    refs = {}
    for repo, layers in (("deb", [base]), ("tarl", [base, layer])):
        write_image(tmp / "layouts" / repo, "v1", layers)
        refs[repo] = f"{registry.host}/{repo}:v1"
        _push_layout(registry, tmp / "layouts" / repo, "v1", repo)
    trees: dict[str, list[str]] = {}
    applied = (0.0, 0.0)
    for repo, ref in refs.items():
        start = time.time()
        cd.ctr("image", "pull", "--plain-http", ref)  # containerd's own overlayfs
        if repo == "tarl":
            applied = (start, time.time())
        out = cd.ctr("run", "--rm", ref, _cid(f"full-{repo}"), "/usr/bin/python3", "-c", TREE)
        trees[ref] = out.stdout.splitlines()
        cd.ctr("image", "rm", "--sync", ref)
    return Images(
        registry,
        base,
        layer,
        refs["deb"],
        refs["tarl"],
        _manifest(registry, "deb", "v1")[0],
        _manifest(registry, "tarl", "v1")[0],
        applied,
        trees,
    )


@pytest.fixture(scope="module")
def node(tmp: Path, images: Images) -> Iterator[SociNode]:
    """containerd 1.7 + soci-snapshotter-grpc with soci's defaults (v2 lookups only)."""
    n = start_soci_node(tmp / "soci-node")
    try:
        yield n
    finally:
        n.stop()


@pytest.fixture(scope="module")
def soci_built(node: SociNode, images: Images) -> SociBuilt:
    """soci's v1 and v2 outputs for both images; `tarl`'s with prefetch files."""
    reg = images.reg
    host = reg.host
    prefetch = [arg for f in PREFETCH_FILES for arg in ("--prefetch-file", f)]
    for ref in (images.deb, images.tarl):
        node.ctr("-n", BUILD_NS, "content", "fetch", "--plain-http", ref)
    node.soci("create", images.deb, namespace=BUILD_NS)
    create_pf = node.soci("create", *prefetch, images.tarl, namespace=BUILD_NS)
    for ref in (images.deb, images.tarl):
        node.soci("push", "--plain-http", ref, namespace=BUILD_NS)
    node.soci(
        "convert", images.deb, f"{host}/deb:soci", namespace=BUILD_NS, content_store="containerd"
    )
    convert_pf = node.soci(
        "convert",
        *prefetch,
        images.tarl,
        f"{host}/tarl:soci-pf",
        namespace=BUILD_NS,
        content_store="containerd",
    )
    for ref in (f"{host}/deb:soci", f"{host}/tarl:soci-pf"):
        node.ctr("-n", BUILD_NS, "images", "push", "--plain-http", ref)
    return SociBuilt(
        _v1_index_via_fallback_tag(reg, "deb", images.deb_manifest),
        f"{host}/deb:soci",
        _v1_index_via_fallback_tag(reg, "tarl", images.tarl_manifest),
        f"{host}/tarl:soci-pf",
        create_pf.stdout + create_pf.stderr,
        convert_pf.stdout + convert_pf.stderr,
    )


@pytest.fixture(scope="module")
def pysoci_built(tmp: Path, images: Images) -> PysociBuilt:
    reg = images.reg
    v1 = f"{reg.host}/ptar:v1"
    _push_layout(reg, tmp / "layouts" / "tarl", "v1", "ptar")
    root = ["--root", str(tmp / "pysoci-build")]
    created = _pysoci("create", v1, *root, "-q")
    _pysoci("push", v1, *root)
    v2 = f"{reg.host}/ptar:pysoci"
    _pysoci("convert", v1, v2, *root, "-q")
    deb_v2 = f"{reg.host}/pdeb:pysoci"
    _pysoci("convert", images.deb, deb_v2, *root, "-q")
    return PysociBuilt(
        v1,
        _v1_index_via_fallback_tag(reg, "ptar", images.tarl_manifest),
        v2,
        _v2_index(reg, "ptar", "pysoci"),
        created,
        deb_v2,
    )


# ------------------------------------------------------------------ formats, both ways


def test_ztocs_agree_on_checkpoints_and_uncompressed_size(
    images: Images, soci_built: SociBuilt, pysoci_built: PysociBuilt
) -> None:
    """Same layers, two builders: the same spans (checkpoints and span digests byte for byte),
    the same entries (every field), and the same uncompressed size, soci's: where Go's
    archive/tar stops reading (past the end-of-archive blocks, not the record padding):
    267441664 of the Debian layer's 267448320-byte tar. pysoci's zTOC blob is the smaller
    (its strings are shared)."""
    reg = images.reg
    soci = _ztocs_of(reg, "tarl", soci_built.tarl_v1_index)
    ours = _ztocs_of(reg, "ptar", pysoci_built.v1_index)
    sizes = {
        repo: {
            d["annotations"]["com.amazon.soci.image-layer-digest"]: d["size"]
            for d in _manifest(reg, repo, index)[1]["layers"]  # type: ignore[attr-defined]
            if d["mediaType"] == "application/octet-stream"
        }
        for repo, index in (("tarl", soci_built.tarl_v1_index), ("ptar", pysoci_built.v1_index))
    }
    base_tar = rootfs_tar().read_bytes()
    for layer, tar in ((images.base, base_tar), (images.tar, _tar_layer())):
        digest = "sha256:" + hashlib.sha256(layer.blob).hexdigest()
        s, p = soci[digest], ours[digest]
        assert sizes["ptar"][digest] < sizes["tarl"][digest]
        assert s.uncompressed_archive_size == p.uncompressed_archive_size == _go_archive_end(tar)
        assert s.uncompressed_archive_size < len(tar)
        assert s.compressed_archive_size == p.compressed_archive_size == len(layer.blob)
        assert (s.span_digests, s.max_span_id) == (p.span_digests, p.max_span_id)
        if layer is images.base:  # gzip checkpoints: byte for byte
            assert s.checkpoints == p.checkpoints
        else:  # a TarZinfo flatbuffer: the same fields (the builders lay them out apart)
            sz, pz = (decode_tar_zinfo(z.checkpoints) for z in (s, p))
            assert (sz.version, sz.span_size, sz.size) == (pz.version, pz.span_size, pz.size)
            assert (sz.version, sz.size) == (2, len(layer.blob))
        assert len(s.files) > 5 and list(s.files) == list(p.files)
    base = "sha256:" + hashlib.sha256(images.base.blob).hexdigest()
    assert (soci[base].uncompressed_archive_size, len(base_tar)) == (267441664, 267448320)
    # pysoci's v1 and v2 of the same image share their zTOC blobs.
    _, v1 = _manifest(reg, "ptar", pysoci_built.v1_index)
    _, v2 = _manifest(reg, "ptar", pysoci_built.v2_index)
    assert v1["layers"] == v2["layers"]


def test_v2_images_name_their_index_where_soci_looks(
    images: Images, soci_built: SociBuilt, pysoci_built: PysociBuilt
) -> None:
    """soci >= 0.16 reads the index digest from the platform manifest's annotations (a digest
    without a size: it logs `size of descriptor is 0, trying to resolve it...` for every v2
    image). Both builders write it there; soci also copies it onto the manifest's entry in
    the image index, pysoci does not."""
    reg = images.reg
    for repo, tag, index, copied in (
        ("tarl", "soci-pf", _v2_index(reg, "tarl", "soci-pf"), True),
        ("ptar", "pysoci", pysoci_built.v2_index, False),
    ):
        _, top = _manifest(reg, repo, tag)
        (entry,) = [
            m
            for m in top["manifests"]  # type: ignore[attr-defined]
            if m.get("artifactType") != "application/vnd.amazon.soci.index.v2+json"
        ]
        _, manifest = _manifest(reg, repo, entry["digest"])
        assert manifest["annotations"]["com.amazon.soci.index-digest"] == index  # type: ignore[index]
        on_entry = entry.get("annotations", {}).get("com.amazon.soci.index-digest")
        assert on_entry == (index if copied else None), (repo, entry)


def test_containerd_gives_implied_directories_the_unpack_time(images: Images) -> None:
    """The baseline the trees are compared with: containerd's applier makes a directory the
    tar layer only implies when it unpacks the layer, so its mtime is the time of the unpack
    (pysoci: the layer's newest mtime; soci: year 1)."""
    full = _entries(images.full_trees[images.tarl])
    window = _applied_window(images)
    for path in IMPLICIT:
        assert full[path][4] in window, (path, full[path][4], images.applied)


def test_soci_prefetch_artifacts_parse_in_pysoci(images: Images, soci_built: SociBuilt) -> None:
    """soci's `--prefetch-file` makes one prefetch artifact per layer holding a listed file,
    which pysoci's index and artifact parsers read as soci wrote it: listed after the zTOCs,
    `{"version":"1.0","prefetch_spans":[{"start_span":A,"end_span":B}]}` (no priority),
    B = the span of the file's offset + size. soci v0.16.1 matches the names the zTOC keeps
    raw, so a file of a layer whose tar names start with "./" (the Debian layer, as
    `tar -C dir .` writes it) is never found: soci says so and writes no artifact for it."""
    reg = images.reg
    tar_digest = "sha256:" + hashlib.sha256(images.tar.blob).hexdigest()
    ztoc = _ztocs_of(reg, "tarl", soci_built.tarl_v1_index)[tar_digest]
    data = next(f for f in ztoc.files if f.name == "opt/explicit/data")
    zinfo = decode_zinfo(
        ztoc.compression_algorithm,
        ztoc.checkpoints,
        compressed_size=ztoc.compressed_archive_size,
        uncompressed_size=ztoc.uncompressed_archive_size,
    )
    want = (
        zinfo.span_of(data.uncompressed_offset),
        # soci: the span of offset + size (one past the file's last byte)
        zinfo.span_of(data.uncompressed_offset + data.uncompressed_size),
    )
    assert want == (0, 3)  # 12 MiB from near the layer's start, 4 MiB spans
    indexes = [("tarl", soci_built.tarl_v1_index), ("tarl", _v2_index(reg, "tarl", "soci-pf"))]
    artifacts = set()
    for repo, index in indexes:
        code, raw_index = _registry_get(reg, f"{repo}/manifests/{index}", MANIFEST_TYPES)
        assert code == 200
        parsed = parse_soci_index(raw_index)
        assert len(parsed.ztocs) == 2 and len(parsed.prefetches) == 1
        _, manifest = _manifest(reg, repo, index)
        assert manifest["layers"][-1]["mediaType"] == MEDIA_TYPE_PREFETCH  # type: ignore[index]
        base = "sha256:" + hashlib.sha256(images.base.blob).hexdigest()
        assert parsed.prefetch_for_layer(base) is None
        desc = parsed.prefetch_for_layer(tar_digest)
        assert desc is not None
        raw = _blob(reg, repo, desc.digest)
        assert json.loads(raw) == {
            "version": "1.0",
            "prefetch_spans": [{"start_span": want[0], "end_span": want[1]}],
        }
        artifact = parse_prefetch(raw, tar_digest)
        assert [(s.start_span, s.end_span, s.priority) for s in artifact.spans] == [(*want, 0)]
        artifacts.add(desc.digest)
    assert len(artifacts) == 1, "create (v1) and convert (v2) write the same artifact"
    for output in (soci_built.create_pf_output, soci_built.convert_pf_output):
        assert "prefetch file usr/bin/python3.11 not found in any layer" in output


# ---------------------------------------------------------------- soci → pysoci (1.6)


def _pysoci_pull_and_check(
    rig: tuple[Pysoci, Containerd],
    images: Images,
    ref: str,
    full_ref: str,
    *,
    workload_baseline: int | None = None,
    tree: bool = True,
) -> tuple[int, str]:
    """nerdctl pull through pysoci, the workload (fetched bytes of the base layer), then the
    tree against the full unpack; the images are removed again. Returns the fetched bytes
    of the base layer after the workload, and pysoci's log of this pull."""
    pysoci, cd = rig
    base = "sha256:" + hashlib.sha256(images.base.blob).hexdigest()
    served = [lid for lid, s in layer_statuses(pysoci.root).items() if s.get("digest") == base]
    assert not served, f"the last test's image removal left {served} mounted"
    log_start = pysoci.log.stat().st_size
    nerd = ["--snapshotter", "soci", "--insecure-registry"]
    try:
        cd.nerdctl(*nerd, "pull", ref)
        out = cd.ctr(
            "run",
            "--rm",
            "--snapshotter",
            "soci",
            ref,
            _cid("workload"),
            "/usr/bin/python3",
            "-c",
            WORKLOAD,
        ).stdout
        assert out.strip() == "ready"
        status = layer_status(pysoci.root, base)
        fetched = int(status["fetchedSize"])
        assert 0 < fetched < status["size"] / 2, status
        if workload_baseline is not None:
            assert fetched == workload_baseline, "the same reads fetch the same spans"
        if tree:
            lines = cd.ctr(*_tree_run(ref)).stdout.splitlines()
            implicit: dict[str, object] = (
                {p: M2_NS for p in IMPLICIT} if full_ref == images.tarl else {}
            )
            _assert_tree(images.full_trees[full_ref], lines, "pysoci", implicit)
        content = cd.ctr("content", "ls", "-q").stdout.split()
        layers = [images.base] + ([images.tar] if full_ref == images.tarl else [])
        log = pysoci.log.read_text()[log_start:]
        for layer in layers:
            digest = "sha256:" + hashlib.sha256(layer.blob).hexdigest()
            assert digest not in content, f"containerd downloaded {digest}"
            assert f"layer {digest} served lazily" in log
        assert "LAZY MOUNT FAILED" not in log
        return fetched, log
    finally:
        cd.ctr("image", "rm", "--sync", ref, check=False)


@pytest.fixture(scope="module")
def baseline_fetch(
    rig: tuple[Pysoci, Containerd], images: Images, pysoci_built: PysociBuilt
) -> int:
    """What the workload fetches of the base layer through pysoci's own index."""
    fetched, _ = _pysoci_pull_and_check(rig, images, pysoci_built.deb_v2, images.deb, tree=False)
    return fetched


def test_soci_v1_index_served_by_pysoci(
    rig: tuple[Pysoci, Containerd], images: Images, soci_built: SociBuilt, baseline_fetch: int
) -> None:
    """soci's v1 index of `deb`, found by pysoci through the referrers fallback tag (the
    registry answers the referrers API with 404)."""
    reg_log_start = images.reg.log.stat().st_size
    _, log = _pysoci_pull_and_check(
        rig, images, images.deb, images.deb, workload_baseline=baseline_fetch
    )
    assert f"SOCI index {soci_built.deb_v1_index}, found by referrers" in log
    access = images.reg.log.read_text()[reg_log_start:]
    hexpart = images.deb_manifest.split(":")[1]
    assert re.search(rf'"GET /v2/deb/referrers/sha256:{hexpart}[^"]*" 404', access), access[-2000:]
    assert f'"GET /v2/deb/manifests/sha256-{hexpart}' in access


def test_soci_v2_image_served_by_pysoci(
    rig: tuple[Pysoci, Containerd], images: Images, soci_built: SociBuilt, baseline_fetch: int
) -> None:
    _, log = _pysoci_pull_and_check(
        rig, images, soci_built.deb_v2, images.deb, workload_baseline=baseline_fetch
    )
    index = _v2_index(images.reg, "deb", "soci")
    assert f"SOCI index {index}, found by v2-annotation" in log


def test_soci_v1_index_with_prefetch_and_a_tar_layer_served_by_pysoci(
    rig: tuple[Pysoci, Containerd], images: Images, soci_built: SociBuilt
) -> None:
    """soci's zTOC of an uncompressed layer ends its archive before the blob's end (the
    record padding): pysoci serves it, and the index's prefetch artifact is no obstacle."""
    _, log = _pysoci_pull_and_check(rig, images, images.tarl, images.tarl)
    assert f"SOCI index {soci_built.tarl_v1_index}, found by referrers" in log


def test_soci_v2_image_with_prefetch_and_a_tar_layer_served_by_pysoci(
    rig: tuple[Pysoci, Containerd], images: Images, soci_built: SociBuilt
) -> None:
    _, log = _pysoci_pull_and_check(rig, images, soci_built.tarl_v2, images.tarl)
    assert f"SOCI index {_v2_index(images.reg, 'tarl', 'soci-pf')}, found by v2-annotation" in log


def test_pysoci_mount_of_a_soci_image_and_its_status(
    tmp: Path, images: Images, soci_built: SociBuilt
) -> None:
    """`pysoci mount` serves soci's v2 image without containerd, and `pysoci status --root`
    of that mount's root shows its lazy layer and what was fetched."""
    root, target, config = tmp / "mount-root", tmp / "mnt", tmp / "mount.toml"
    target.mkdir()
    config.write_text(pysoci_config())
    out = _pysoci(
        "mount", soci_built.deb_v2, str(target), "--root", str(root), "--config", str(config)
    )
    try:
        assert "SOCI index" in out and "lazy" in out
        assert (target / "etc" / "debian_version").read_text().strip()
        status = json.loads(_pysoci("status", "--root", str(root), "--json"))
        (image,) = status["images"]
        assert image["image"] == soci_built.deb_v2 and image["mount"] == str(target)
        (layer,) = image["layers"]
        base = "sha256:" + hashlib.sha256(images.base.blob).hexdigest()
        assert layer["digest"] == base and layer["mode"] == "lazy"
        assert 0 < layer["fetchedBytes"] < layer["totalBytes"] == len(images.base.blob)
        text = _pysoci("status", "--root", str(root))
        assert f"{soci_built.deb_v2} (pysoci mount at {target})" in text
    finally:
        _pysoci("unmount", str(target), "--root", str(root))


# ---------------------------------------------------------------- pysoci → soci (1.7)


def _soci_pull_and_check(
    node: SociNode, images: Images, ref: str, while_pulled: Callable[[], None] = lambda: None
) -> str:
    """nerdctl pull through soci-snapshotter-grpc, a nerdctl run of the workload, the tree
    (ctr run: nerdctl would bind-mount /etc/hosts and friends) against the full unpack, then
    `while_pulled`; the image is removed again. Returns soci's log of this pull."""
    start = node.log_size()
    nerd = ["--snapshotter", "soci", "--insecure-registry"]
    try:
        node.nerdctl(*nerd, "pull", ref)
        out = node.nerdctl(
            *nerd, "run", "--rm", "--net", "none", ref, "/usr/bin/python3", "-c", WORKLOAD
        ).stdout
        assert out.strip() == "ready"
        tree = node.ctr(*_tree_run(ref)).stdout.splitlines()
        implicit: dict[str, object] = {p: GO_ZERO_TIME_NS for p in IMPLICIT}
        _assert_tree(images.full_trees[images.tarl], tree, "soci", implicit)
        content = node.ctr("content", "ls", "-q").stdout.split()
        for layer in (images.base, images.tar):
            digest = "sha256:" + hashlib.sha256(layer.blob).hexdigest()
            assert digest not in content, f"containerd 1.7 downloaded {digest}"
        while_pulled()
        return node.log_since(start)
    finally:
        node.ctr("image", "rm", "--sync", ref, check=False)


def _assert_prepared_lazily(log: str) -> None:
    """soci mounted both layers (base and tar) remotely, and fell back for none."""
    prepared = [line for line in log.splitlines() if PREPARED in line]
    assert len(prepared) == 2, log[-3000:]
    errors = [line for line in log.splitlines() if '"level":"error"' in line]
    assert not errors, errors[:5]
    assert "failed to prepare remote snapshot" not in log


def _soci_cli_reads(node: SociNode, images: Images, index: str) -> None:
    """`soci index list/info` and `soci ztoc info` on what soci-snapshotter-grpc fetched of a
    pysoci index (`soci rebuild-db` records what its content store holds; it needs the image
    in containerd, so this runs while the image is pulled)."""
    node.soci("rebuild-db")
    assert index in node.soci("index", "list").stdout
    _, manifest = _manifest(images.reg, "ptar", index)
    assert json.loads(node.soci("index", "info", index).stdout) == manifest
    names = {
        "sha256:" + hashlib.sha256(images.base.blob).hexdigest(): "usr/bin/python3.11",
        "sha256:" + hashlib.sha256(images.tar.blob).hexdigest(): "opt/explicit/data",
    }
    for desc in manifest["layers"]:  # type: ignore[attr-defined]
        info = node.soci("ztoc", "info", desc["digest"]).stdout
        assert names[desc["annotations"]["com.amazon.soci.image-layer-digest"]] in info


def _assert_own_shim(node: SociNode, ref: str) -> None:
    """containerd 1.7 runs the shim built with it, not Debian's
    /usr/bin/containerd-shim-runc-v2 (first on the system PATH)."""
    assert gotools.CONTAINERD_VERSION in node.ctr("version").stdout
    name = "shim-check"
    try:
        node.nerdctl(
            "--snapshotter",
            "soci",
            "run",
            "-d",
            "--name",
            name,
            "--net",
            "none",
            ref,
            "sleep",
            "60",
        )
        shims = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                exe = os.readlink(f"/proc/{pid}/exe")
            except OSError:
                continue
            if b"-address" in argv and str(node.address).encode() in argv:
                shims.append(exe)
        assert shims and set(shims) == {str(gotools.CONTAINERD_SHIM)}, shims
    finally:
        node.nerdctl("rm", "-f", name, check=False)


def test_pysoci_v2_image_served_by_soci_by_default(
    node: SociNode, images: Images, pysoci_built: PysociBuilt
) -> None:
    """A soci node with soci's default config finds pysoci's SOCI-enabled image (v2)."""
    if node.soci_v1:
        node.start_snapshotter(soci_v1=False)
    ref = pysoci_built.v2_ref

    def while_pulled() -> None:
        _assert_own_shim(node, ref)
        # soci's own limit: `rebuild-db` registers only indexes with a subject (v1; v0.16.1
        # soci/artifacts.go, addNewArtifacts), so a v2 index the snapshotter fetched — pysoci's
        # or soci's own — is not listed. (pysoci's v2 shares its zTOCs with its v1, which
        # `soci ztoc info` reads: test_pysoci_v1_index_needs_soci_v1_enabled.)
        node.soci("rebuild-db")
        assert pysoci_built.v2_index not in node.soci("index", "list").stdout

    log = _soci_pull_and_check(node, images, ref, while_pulled)
    _assert_prepared_lazily(log)
    assert pysoci_built.v2_index in log


def test_pysoci_v1_index_needs_soci_v1_enabled(
    node: SociNode, images: Images, pysoci_built: PysociBuilt
) -> None:
    """soci >= 0.16 looks up v1 indexes only with `[pull_modes.soci_v1] enable = true`:
    without it, pysoci's `create` + `push` output is pulled and unpacked in full; with it,
    soci finds it through the referrers fallback tag and mounts both layers lazily."""
    node.start_snapshotter(soci_v1=False)
    start = node.log_size()
    try:
        node.nerdctl("--snapshotter", "soci", "--insecure-registry", "pull", pysoci_built.v1_ref)
        log = node.log_since(start)
        assert PREPARED not in log
        content = node.ctr("content", "ls", "-q").stdout.split()
        for layer in (images.base, images.tar):
            assert "sha256:" + hashlib.sha256(layer.blob).hexdigest() in content
    finally:
        node.ctr("image", "rm", "--sync", pysoci_built.v1_ref, check=False)
    node.start_snapshotter(soci_v1=True)
    reg_log_start = images.reg.log.stat().st_size
    log = _soci_pull_and_check(
        node,
        images,
        pysoci_built.v1_ref,
        lambda: _soci_cli_reads(node, images, pysoci_built.v1_index),
    )
    _assert_prepared_lazily(log)
    assert pysoci_built.v1_index in log
    access = images.reg.log.read_text()[reg_log_start:]
    hexpart = images.tarl_manifest.split(":")[1]
    assert re.search(rf'"GET /v2/ptar/referrers/sha256:{hexpart}[^"]*" 404', access)
    assert re.search(rf'"GET /v2/ptar/manifests/sha256-{hexpart} [^"]*" 200', access)


def test_pysoci_create_says_where_it_stored(tmp: Path, pysoci_built: PysociBuilt) -> None:
    assert f"stored in {tmp / 'pysoci-build' / 'content'};" in pysoci_built.create_output
