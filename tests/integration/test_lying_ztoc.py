"""A lying zTOC with real containerd, docker-registry, FUSE and pysoci's two processes.

Whoever may push to a repository can attach a SOCI index v1 (a referrer) to an image in it.
Here such an index's zTOC has its checkpoint windows XOR-ed: its span digests still match the
layer's compressed bytes, so before pysoci proved the windows it served wrong bytes of every
compressible file, silently. The tests check the layer is blocked instead (EIO, `pysoci
status`, the metric, the log naming the zTOC and index), that its next Prepare unpacks it
locally, that an honest image sharing the layer digest is not affected, and that a lie no read
can see (the last checkpoint's window) is caught by the background pass.

Each image's layers sit on a chain of their own (containerd prepares a layer only when its
chain is new), and the layer read is text: it compresses, so a wrong window changes bytes.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from snapshotter.content.indexing import iter_soci_index_descriptors
from snapshotter.content.layout import OciLayout
from snapshotter.soci import index as soci_index
from snapshotter.soci import oci
from snapshotter.soci.zinfo import CHECKPOINT_SIZE, HEADER_SIZE, WINDOW_SIZE
from snapshotter.soci.ztoc import decode_ztoc, encode_ztoc
from tests.fixtures.containerd import Containerd, Pysoci, layer_statuses, start_containerd
from tests.fixtures.images import Layer, files_tar, write_image
from tests.fixtures.pysoci_config import pysoci_config
from tests.fixtures.registry import Registry, start_registry

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PYSOCI = str(Path(sys.executable).with_name("pysoci"))
SPAN = "64KiB"


def text(seed: int, size: int) -> bytes:
    """Compressible bytes (random words): deflate refers back into its window all the time."""
    rng = random.Random(seed)
    words = [
        bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randrange(2, 9))) for _ in range(500)
    ]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choices(words, k=12)) + b"\n"
    return bytes(out[:size])


DATA = text(1, 3 << 20)
DATA_LAYER = Layer.from_tar(files_tar({"data/text": DATA}))
DATA_DIGEST = "sha256:" + hashlib.sha256(DATA_LAYER.blob).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Rig:
    reg: Registry
    pysoci: Pysoci
    cd: Containerd
    tmp: Path
    port: int

    def metric(self, name: str, **labels: str) -> float:
        body = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10).text
        for family in text_string_to_metric_families(body):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return 0.0

    def push(self, name: str, layers: list[Layer]) -> str:
        write_image(self.tmp / "src" / name, "v1", layers)
        ref = f"{self.reg.host}/{name}:v1"
        subprocess.run(
            ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{self.tmp}/src/{name}:v1",
             f"docker://{ref}"],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        return ref

    def push_lying_index(self, ref: str, checkpoints: Callable[[int], Iterable[int]]) -> str:
        """Build a v1 index of `ref`, XOR the windows of the data layer's `checkpoints(n)`
        (n: how many it has), push it as `ref`'s referrer; the lying zTOC's digest."""
        build = self.tmp / "build" / ref.rsplit("/", 1)[1].replace(":", "-")
        subprocess.run(
            [PYSOCI, "create", ref, "--plain-http", "--root", str(build), "--span-size", SPAN,
             "--min-layer-size", "1KiB", "-q"],
            check=True, capture_output=True, timeout=600,
        )  # fmt: skip
        store = OciLayout.open(build / "content")
        ((desc, _),) = list(iter_soci_index_descriptors(store))
        raw = json.loads(store.read_blob(desc.digest, max_size=4 << 20))
        lying = ""
        for entry in raw["layers"]:
            if entry["annotations"].get(soci_index.ANNOTATION_IMAGE_LAYER_DIGEST) != DATA_DIGEST:
                continue
            ztoc = decode_ztoc(store.read_blob(entry["digest"], max_size=64 << 20))
            blob = bytearray(bytes(ztoc.checkpoints))
            count = int.from_bytes(blob[:4], "little")
            for cp in checkpoints(count):
                at = HEADER_SIZE + cp * CHECKPOINT_SIZE + CHECKPOINT_SIZE - WINDOW_SIZE
                for i in range(at, at + WINDOW_SIZE):
                    blob[i] ^= 0x5A
            data = encode_ztoc(dataclasses.replace(ztoc, checkpoints=bytes(blob)))
            lying = entry["digest"] = store.write_blob(data)
            entry["size"] = len(data)
        assert lying
        body = json.dumps(raw).encode()
        store.remove_manifest(desc.digest)
        store.add_manifest(
            oci.Descriptor(
                desc.media_type, store.write_blob(body), len(body), artifact_type=desc.artifact_type
            )
        )
        subprocess.run(
            [PYSOCI, "push", ref, "--plain-http", "--root", str(build)],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        return lying

    def rpull(self, ref: str) -> None:
        self.cd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "soci", ref)

    def remove(self, ref: str) -> None:
        self.cd.ctr("image", "rm", "--sync", ref)
        deadline = time.monotonic() + 60
        while self.cd.ctr("snapshots", "--snapshotter", "soci", "ls").stdout.count("\n") > 1:
            assert time.monotonic() < deadline, "containerd's GC did not remove the snapshots"
            time.sleep(0.2)

    def lazy_dir(self, ztoc_digest: str) -> Path:
        lid = f"{DATA_DIGEST.split(':')[1][:24]}-{ztoc_digest.split(':')[1][:12]}"
        path = self.pysoci.root / "fuse" / lid
        assert path.is_dir(), (lid, sorted(layer_statuses(self.pysoci.root)))
        return path

    def log(self) -> str:
        return self.pysoci.log.read_text()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("lying-ztoc")
    reg = start_registry(tmp / "registry")
    certs = tmp / "certs.d" / reg.host
    certs.mkdir(parents=True)
    (certs / "hosts.toml").write_text(f'server = "http://{reg.host}"\n')
    port = free_port()
    config = tmp / "pysoci.toml"
    config.write_text(
        pysoci_config(
            f'metrics_address = "127.0.0.1:{port}"\nlog_format = "text"\n'
            "[background_fetch]\nsilence_period_msec = 100\nfetch_period_msec = 50\n"
            f'[registry]\nconfig_path = "{tmp / "certs.d"}"\n'
        )
    )
    # Socket-activated, as the shipped units run it: containerd's calls wait across restarts.
    pysoci = Pysoci(
        tmp / "pysoci", tmp / "pysoci.sock", tmp / "pysoci.log", config, socket_activated=True
    )
    pysoci.start()
    cd = start_containerd(tmp / "cd", tmp / "pysoci.sock")
    try:
        yield Rig(reg, pysoci, cd, tmp, port)
    finally:
        cd.stop()
        pysoci.stop_all()
        reg.stop()


def bottom(name: str) -> Layer:
    """A small layer of its own under the data layer: a chain only this image has."""
    return Layer.from_tar(files_tar({f"etc/{name}": name.encode()}))


def read_all(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_lying_windows_give_eio_then_a_local_unpack_and_spare_an_honest_image(
    rig: Rig,
) -> None:
    liar = rig.push("liar", [bottom("liar"), DATA_LAYER])
    lying = rig.push_lying_index(liar, lambda n: range(1, n))
    before = rig.metric("pysoci_layers_rejected_total", stage="foreground")
    rig.rpull(liar)
    lazy = rig.lazy_dir(lying)
    with pytest.raises(OSError) as err:
        read_all(lazy / "data" / "text")
    assert err.value.errno == errno.EIO
    # From now on every read fails, even of bytes never fetched.
    with open(lazy / "data" / "text", "rb") as f, pytest.raises(OSError) as err:
        f.seek(len(DATA) - 10)
        f.read(10)
    assert err.value.errno == errno.EIO
    status = layer_statuses(rig.pysoci.root)[lazy.name]
    assert status["state"] == "rejected" and lying in str(status["error"])
    shown = subprocess.run(
        [PYSOCI, "status", "--root", str(rig.pysoci.root)], capture_output=True, text=True
    ).stdout
    assert "rejected" in shown
    assert rig.metric("pysoci_layers_rejected_total", stage="foreground") == before + 1
    assert f"REJECTED zTOC {lying}" in rig.log()
    assert json.loads((rig.pysoci.root / "rejected-ztocs.json").read_text())

    # An honest image with the same layer digest (its own index, its own chain) is served
    # right, lazily: nothing the lying zTOC inflated reaches it.
    honest = rig.push("honest", [bottom("honest"), DATA_LAYER])
    subprocess.run(
        [PYSOCI, "create", honest, "--plain-http", "--root", str(rig.tmp / "build-honest"),
         "--span-size", SPAN, "--min-layer-size", "1KiB", "-q"],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    subprocess.run(
        [PYSOCI, "push", honest, "--plain-http", "--root", str(rig.tmp / "build-honest")],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    rig.rpull(honest)
    served = [
        lid
        for lid, st in layer_statuses(rig.pysoci.root).items()
        if st.get("digest") == DATA_DIGEST and lid != lazy.name
    ]
    assert len(served) == 1
    assert read_all(rig.pysoci.root / "fuse" / served[0] / "data" / "text") == DATA

    # The liar's next Prepare (a new pull after the images were removed) unpacks it locally.
    rig.cd.ctr("image", "rm", "--sync", honest)
    rig.remove(liar)
    rig.rpull(liar)
    assert f"its zTOC {lying}" in rig.log() and "is NOT served lazily" in rig.log()
    local = rig.pysoci.root / "layers" / DATA_DIGEST.replace(":", "-")
    assert read_all(local / "data" / "text") == DATA
    assert lazy.name not in layer_statuses(rig.pysoci.root)
    assert rig.metric("pysoci_lazy_mount_fallbacks_total", reason="ztoc_rejected") >= 1
    rig.remove(liar)


def test_the_background_pass_catches_the_last_window(rig: Rig) -> None:
    """No read's run ends at the last checkpoint, so only the complete layer proves it."""
    ref = rig.push("last", [bottom("last"), DATA_LAYER])
    lying = rig.push_lying_index(ref, lambda n: [n - 1])
    before = rig.metric("pysoci_layers_rejected_total", stage="background")
    rig.rpull(ref)
    lazy = rig.lazy_dir(lying)
    deadline = time.monotonic() + 120
    while layer_statuses(rig.pysoci.root)[lazy.name].get("state") != "rejected":
        assert time.monotonic() < deadline, layer_statuses(rig.pysoci.root)[lazy.name]
        time.sleep(0.2)
    assert rig.metric("pysoci_layers_rejected_total", stage="background") == before + 1
    with pytest.raises(OSError) as err:
        read_all(lazy / "data" / "text")
    assert err.value.errno == errno.EIO
    rig.remove(ref)


def test_an_untrusted_source_is_ignored(rig: Rig, tmp_path: Path) -> None:
    """On a node that does not trust v1 referrers (a pysoci and containerd of its own), the
    liar's index is not even looked up: containerd pulls and unpacks the image itself."""
    ref = rig.push("untrusted", [bottom("untrusted"), DATA_LAYER])
    rig.push_lying_index(ref, lambda n: range(1, n))
    config = tmp_path / "pysoci.toml"
    config.write_text(
        rig.pysoci.config.read_text().replace(f"{rig.port}", f"{free_port()}")
        + "[pull_modes.soci_v1]\nenable = false\n"
    )
    node = Pysoci(tmp_path / "root", tmp_path / "pysoci.sock", tmp_path / "pysoci.log", config)
    node.start()
    cd = None
    try:
        cd = start_containerd(tmp_path / "cd", tmp_path / "pysoci.sock")
        cd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "soci", ref)
        log = node.log.read_text()
        assert "not looking for SOCI index v1 referrers" in log
        assert "[pull_modes.soci_v1] enable = false" in log
        assert "has no SOCI index" in log
        assert layer_statuses(node.root) == {}
        assert not (node.root / "rejected-ztocs.json").exists()
    finally:
        if cd is not None:
            cd.stop()
        node.stop_all()
