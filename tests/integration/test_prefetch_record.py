"""A recorded start published as SOCI prefetch artifacts, end to end, with a real
docker-registry, containerd 1.6 + `pysoci serve` nodes, nerdctl, and the real soci v0.16.1.

- Node A runs the workload once: its data plane records the spans and files read
  (`pysoci prefetch show`), `pysoci prefetch push` publishes them as a new SOCI-enabled tag.
- Node B (a fresh ROOT) pulls that tag: the spans are fetched right after the mount, before
  any container runs (the layer's fetched bytes, the registry's range GETs, the
  `pysoci_span_fetch_bytes_total{kind="prefetch"}` metric), and the workload then fetches
  next to nothing of its own.
- pysoci writes → soci reads: the recording published as a v1 referrer; soci-snapshotter-grpc
  (containerd 1.7, its `[prefetch] enable` on) loads and executes the artifact at the mount,
  `soci index list|info` read the index (`soci prefetch ls` lists nothing: `rebuild-db`
  registered no prefetch artifact of this index).
- soci writes → pysoci honours: `soci convert --prefetch-file` of the image; node B pulls it
  and fetches the artifact's spans of the layer holding the file without a container.

Background fetching is off on the pysoci nodes: what a layer has fetched is what was read or
prefetched.
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from snapshotter.soci.index import MEDIA_TYPE_PREFETCH, parse_prefetch, parse_soci_index
from snapshotter.soci.prefetch import runs_in_order
from tests.fixtures import soci as soci_fixture
from tests.fixtures.containerd import Containerd, Pysoci, layer_status, start_containerd
from tests.fixtures.debootstrap import rootfs_tar
from tests.fixtures.images import GZIP_LAYER, Layer, files_tar, pigz_blob, write_image
from tests.fixtures.pysoci_config import pysoci_config
from tests.fixtures.registry import Registry, start_registry
from tests.fixtures.soci import SociNode, assert_nothing_left, reap_tasks, start_soci_node
from tests.integration.test_soci_interop import (
    MANIFEST_TYPES,
    _blob,
    _manifest,
    _push_layout,
    _registry_get,
    _v1_index_via_fallback_tag,
    _v2_index,
)

PYSOCI = str(Path(sys.executable).with_name("pysoci"))
WORKLOAD = "import json, sqlite3, email; print('ready')"
BIG = "opt/pf/big"
BUILD_NS = "build"


def _pysoci(*args: str, timeout: float = 600) -> str:
    res = subprocess.run(
        [PYSOCI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert res.returncode == 0, f"pysoci {' '.join(args[:2])}: {res.stderr[-3000:]}"
    return res.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Node:
    pysoci: Pysoci
    cd: Containerd
    metrics: str

    def run_workload(self, ref: str, name: str) -> None:
        out = self.cd.ctr(
            "run", "--rm", "--snapshotter", "soci", ref, name, "/usr/bin/python3", "-c", WORKLOAD
        ).stdout
        assert out.strip() == "ready"

    def pull(self, ref: str) -> None:
        self.cd.nerdctl("--snapshotter", "soci", "--insecure-registry", "pull", ref)

    def fetched(self, digest: str) -> int:
        return int(layer_status(self.pysoci.root, digest)["fetchedSize"])

    def prefetch_bytes(self) -> float:
        text = httpx.get(f"http://{self.metrics}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith('pysoci_span_fetch_bytes_total{kind="prefetch"}'):
                return float(line.split()[-1])
        return 0.0


@dataclass
class Images:
    reg: Registry
    base: str
    extra: str
    """Layer digests: the Debian rootfs, and a layer holding BIG (names without "./")."""
    v1: str
    soci_ready: str
    """pysoci's SOCI-enabled image of v1 (no prefetch)."""


def _digest(blob: bytes) -> str:
    return "sha256:" + hashlib.sha256(blob).hexdigest()


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("prefetch-record")
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
def images(tmp: Path, registry: Registry) -> Images:
    tar = rootfs_tar().read_bytes()
    base = Layer(pigz_blob(tar, blocksize_kib=1024), GZIP_LAYER, _digest(tar))
    rng = random.Random(5)
    extra = Layer.from_tar(
        files_tar({BIG: rng.randbytes(12 << 20), "opt/pf/small": b"small\n"}), level=1
    )
    write_image(tmp / "layout", "v1", [base, extra])
    _push_layout(registry, tmp / "layout", "v1", "app")
    v1 = f"{registry.host}/app:v1"
    ready = f"{registry.host}/app:pysoci"
    _pysoci("convert", v1, ready, "--root", str(tmp / "build"), "-q")
    return Images(registry, _digest(base.blob), _digest(extra.blob), v1, ready)


def _start_node(tmp: Path, name: str) -> Iterator[Node]:
    (tmp / "certs.d").mkdir(exist_ok=True)
    config = tmp / f"{name}.toml"
    metrics = f"127.0.0.1:{_free_port()}"
    config.write_text(
        pysoci_config(
            f'metrics_address = "{metrics}"\n'
            "[background_fetch]\ndisable = true\n"
            f'[registry]\nconfig_path = "{tmp / "certs.d"}"\n'
            "[prefetch]\nquiet_period_sec = 2\n"
        )
    )
    pysoci = Pysoci(tmp / name, tmp / f"{name}.sock", tmp / f"{name}.log", config)
    pysoci.start()
    cd = start_containerd(tmp / f"cd-{name}", tmp / f"{name}.sock")
    try:
        yield Node(pysoci, cd, metrics)
    finally:
        reap_tasks(cd.ctr)
        cd.stop()
        pysoci.stop_all()


@pytest.fixture(scope="module")
def node_a(tmp: Path, images: Images) -> Iterator[Node]:
    yield from _start_node(tmp, "a")


@pytest.fixture(scope="module")
def node_b(tmp: Path, images: Images) -> Iterator[Node]:
    yield from _start_node(tmp, "b")


@dataclass
class Recorded:
    recording: dict[str, object]
    """The base layer's recording (`prefetch show --json`)."""
    fetched_by_workload: int
    push_output: str
    prefetch_ref: str


def _wait_for_recording(root: Path, timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        shown = json.loads(_pysoci("prefetch", "show", "--json", "--root", str(root)))
        layers = [layer for r in shown["recordings"] for layer in r["layers"]]
        if layers and all(layer["state"] == "done" for layer in layers):
            return shown  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, shown
        time.sleep(0.5)


@pytest.fixture(scope="module")
def recorded(node_a: Node, images: Images) -> Recorded:
    """The workload's start on node A, recorded and pushed as `app:pysoci-prefetch`."""
    node_a.pull(images.soci_ready)
    node_a.run_workload(images.soci_ready, "workload-a")
    shown = _wait_for_recording(node_a.pysoci.root)
    (image,) = shown["recordings"]
    (layer,) = image["layers"]  # the extra layer was never read: nothing recorded for it
    assert layer["layer_digest"] == images.base
    out = _pysoci(
        "prefetch", "push", images.soci_ready, "--root", str(node_a.pysoci.root), "--plain-http"
    )
    return Recorded(
        layer, node_a.fetched(images.base), out, f"{images.reg.host}/app:pysoci-prefetch"
    )


def test_the_start_is_recorded_and_shown(node_a: Node, images: Images, recorded: Recorded) -> None:
    layer = recorded.recording
    assert layer["reason"] == "quiet"
    files = layer["files"]
    assert isinstance(files, list)
    assert "usr/bin/python3.11" in files
    assert any(f.startswith("usr/lib/python3.11/json/") for f in files), files[:50]
    spans = layer["spans"]
    assert isinstance(spans, list) and spans
    # The spans read are what the workload fetched (background fetching is off); the
    # recorder counts a span to the end of its compressed bounds (the last one: the trailer).
    span_bytes = int(layer["span_bytes"])  # type: ignore[call-overload]
    assert 0.5 * recorded.fetched_by_workload < span_bytes <= recorded.fetched_by_workload + 64
    text = _pysoci("prefetch", "show", images.soci_ready, "--root", str(node_a.pysoci.root))
    assert f"layer {images.base} done (quiet): {len(spans)} of" in text
    assert "usr/bin/python3.11" in text or "more" in text


def test_push_publishes_one_artifact_per_recorded_layer(images: Images, recorded: Recorded) -> None:
    reg = images.reg
    index = _v2_index(reg, "app", "pysoci-prefetch")
    old_index = _v2_index(reg, "app", "pysoci")
    assert index != old_index
    assert f"pushed SOCI index v2 {index} (from {old_index})" in recorded.push_output
    code, raw = _registry_get(reg, f"app/manifests/{index}", MANIFEST_TYPES)
    assert code == 200
    parsed = parse_soci_index(raw)
    _, old_manifest = _manifest(reg, "app", old_index)
    _, manifest = _manifest(reg, "app", index)
    # The zTOCs as they were, then the prefetch artifact.
    assert manifest["layers"][:-1] == old_manifest["layers"]  # type: ignore[index]
    assert manifest["layers"][-1]["mediaType"] == MEDIA_TYPE_PREFETCH  # type: ignore[index]
    desc = parsed.prefetch_for_layer(images.base)
    assert desc is not None and parsed.prefetch_for_layer(images.extra) is None
    artifact = parse_prefetch(_blob(reg, "app", desc.digest), images.base)
    spans = recorded.recording["spans"]
    assert isinstance(spans, list)
    assert list(artifact.spans) == runs_in_order(spans)


def test_a_fresh_node_fetches_the_start_before_the_container(
    node_b: Node, images: Images, recorded: Recorded
) -> None:
    reg_log_start = images.reg.log.stat().st_size
    node_b.pull(recorded.prefetch_ref)
    try:
        # Every recorded span (what the workload fetched on node A, the recorder counting
        # the last span to its end: a few bytes more).
        want = min(recorded.fetched_by_workload, int(recorded.recording["span_bytes"]))  # type: ignore[call-overload]
        deadline = time.monotonic() + 60
        while node_b.fetched(images.base) < want:
            assert time.monotonic() < deadline, layer_status(node_b.pysoci.root, images.base)
            time.sleep(0.2)
        before = node_b.fetched(images.base)
        assert node_b.prefetch_bytes() >= want
        access = images.reg.log.read_text()[reg_log_start:]
        assert f"GET /v2/app/blobs/{images.base}" in access
        log = node_b.pysoci.log.read_text()
        assert "queued for prefetching" in log and "prefetch artifact" in log
        node_b.run_workload(recorded.prefetch_ref, "workload-b")
        # What the workload fetched itself: a fraction of what it fetched on node A.
        own = node_b.fetched(images.base) - before
        assert own < recorded.fetched_by_workload / 4, (own, recorded.fetched_by_workload)
    finally:
        node_b.cd.ctr("image", "rm", "--sync", recorded.prefetch_ref, check=False)


def test_pysoci_mount_prefetches_and_records(tmp: Path, images: Images, recorded: Recorded) -> None:
    """`pysoci mount` fetches the published start before anything reads, and records its own
    start in ROOT/prefetch, as a node does."""
    root, target, config = tmp / "mount-root", tmp / "mount-dir", tmp / "mount.toml"
    target.mkdir()
    config.write_text(
        pysoci_config("[background_fetch]\ndisable = true\n[prefetch]\nquiet_period_sec = 2\n")
    )
    args = ("--root", str(root), "--config", str(config), "--plain-http")
    _pysoci("mount", recorded.prefetch_ref, str(target), *args)
    try:

        def fetched() -> int:
            for path in root.glob("mounts/*/fuse/.status/*.json"):
                status = json.loads(path.read_text())
                if status["digest"] == images.base:
                    return int(status["fetchedSize"])
            raise AssertionError(f"layer {images.base} is not served")

        want = min(recorded.fetched_by_workload, int(recorded.recording["span_bytes"]))  # type: ignore[call-overload]
        deadline = time.monotonic() + 60
        while fetched() < want:  # nothing has read the mount yet
            assert time.monotonic() < deadline, fetched()
            time.sleep(0.2)
        assert _pysoci("prefetch", "show", "--json", "--root", str(root)).count("layer_digest") == 0
        out = subprocess.run(
            ["chroot", str(target), "/usr/bin/python3", "-c", WORKLOAD],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.stdout.strip() == "ready", out.stderr
        shown = _wait_for_recording(root)
        (image,) = shown["recordings"]
        (layer,) = image["layers"]  # type: ignore[index]
        assert layer["layer_digest"] == images.base
        assert "usr/bin/python3.11" in layer["files"]
    finally:
        _pysoci("unmount", str(target), "--root", str(root))


@pytest.fixture(scope="module")
def soci_node(tmp: Path, images: Images) -> Iterator[SociNode]:
    """containerd 1.7 + soci-snapshotter-grpc, SOCI v1 lookups on (`soci rebuild-db`, which
    `soci index|prefetch` read, registers only indexes with a subject: v1) and its prefetch
    on (`[prefetch] enable`, soci's default off)."""
    base_config = soci_fixture.snapshotter_config

    def with_prefetch(*, soci_v1: bool) -> str:
        return base_config(soci_v1=soci_v1) + "[prefetch]\nenable = true\n"

    patch = pytest.MonkeyPatch()
    patch.setattr(soci_fixture, "snapshotter_config", with_prefetch)
    try:
        n = start_soci_node(tmp / "soci-node", soci_v1=True)
        try:
            yield n
        finally:
            n.stop()
    finally:
        patch.undo()


def test_soci_reads_what_pysoci_pushed(
    tmp: Path, soci_node: SociNode, node_a: Node, images: Images, recorded: Recorded
) -> None:
    """The recording published as a v1 referrer (`pysoci create` + `push`, then `prefetch
    push --from` the recording exported from node A): soci-snapshotter-grpc loads the
    artifact and fetches its spans at the mount, and `soci index list|info` read pysoci's
    index as pysoci wrote it."""
    reg = images.reg
    _push_layout(reg, tmp / "layout", "v1", "appv1")
    ref = f"{reg.host}/appv1:v1"
    build = ["--root", str(tmp / "build-v1")]
    _pysoci("create", ref, *build, "-q")
    _pysoci("push", ref, *build)
    exported = tmp / "recording.json"
    exported.write_text(_pysoci("prefetch", "show", "--json", "--root", str(node_a.pysoci.root)))
    out = _pysoci("prefetch", "push", ref, "--from", str(exported), *build, "--plain-http")
    manifest_digest, _ = _manifest(reg, "appv1", "v1")
    index = _v1_index_via_fallback_tag(reg, "appv1", manifest_digest)
    assert f"pushed SOCI index v1 {index}" in out and "listed as a referrer" in out
    _, manifest = _manifest(reg, "appv1", index)
    assert manifest["subject"]["digest"] == manifest_digest  # type: ignore[index]
    prefetch = manifest["layers"][-1]  # type: ignore[index]
    assert prefetch["mediaType"] == MEDIA_TYPE_PREFETCH
    runs = len(parse_prefetch(_blob(reg, "appv1", prefetch["digest"]), images.base).spans)
    nerd = ["--snapshotter", "soci", "--insecure-registry"]
    start = soci_node.log_size()
    try:
        soci_node.nerdctl(*nerd, "pull", ref)
        deadline = time.monotonic() + 60
        loaded = f"Successfully loaded prefetch artifact with {runs} span ranges"
        while loaded not in soci_node.log_since(start):
            assert time.monotonic() < deadline, soci_node.log_since(start)[-3000:]
            time.sleep(0.2)
        assert "Failed to execute prefetch" not in soci_node.log_since(start)
        soci_node.soci("rebuild-db")
        assert index in soci_node.soci("index", "list").stdout
        assert json.loads(soci_node.soci("index", "info", index).stdout) == manifest
    finally:
        soci_node.ctr("image", "rm", "--sync", ref, check=False)


def test_pysoci_honours_soci_prefetch_files(
    soci_node: SociNode, node_b: Node, images: Images
) -> None:
    """`soci convert --prefetch-file /opt/pf/big`: node B fetches the artifact's spans of
    the layer holding it right after the pull, without a container."""
    reg = images.reg
    host = reg.host
    dst = f"{host}/app:soci-pf"
    soci_node.ctr("-n", BUILD_NS, "content", "fetch", "--plain-http", images.v1)
    soci_node.soci(
        "convert",
        "--prefetch-file",
        "/" + BIG,
        images.v1,
        dst,
        namespace=BUILD_NS,
        content_store="containerd",
    )
    soci_node.ctr("-n", BUILD_NS, "images", "push", "--plain-http", dst)
    index = parse_soci_index(
        _registry_get(reg, f"app/manifests/{_v2_index(reg, 'app', 'soci-pf')}", MANIFEST_TYPES)[1]
    )
    desc = index.prefetch_for_layer(images.extra)
    assert desc is not None
    artifact = parse_prefetch(_blob(reg, "app", desc.digest), images.extra)
    assert artifact.spans
    node_b.pull(dst)
    try:
        status = layer_status(node_b.pysoci.root, images.extra)
        size = int(status["size"])  # type: ignore[call-overload]
        deadline = time.monotonic() + 60
        while node_b.fetched(images.extra) < size * 0.9:  # BIG is nearly all of the layer
            assert time.monotonic() < deadline, layer_status(node_b.pysoci.root, images.extra)
            time.sleep(0.2)
    finally:
        node_b.cd.ctr("image", "rm", "--sync", dst, check=False)
