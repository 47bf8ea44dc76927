"""Metrics, `pysoci status` and JSON logs of a real `pysoci serve` after a lazy pull.

A small two-layer image: a 3 MiB gzip layer with a zTOC (served lazily) and a tiny layer
without one (unpacked by pysoci). ctr-remote pulls it through containerd; a read through the
FUSE mount stands in for a container reading a file (no runc needed).
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.containerd import Containerd, Pysoci, lazy_layer_id, start_containerd
from tests.fixtures.images import Layer, files_tar, write_image
from tests.fixtures.pysoci_config import pysoci_config
from tests.fixtures.registry import Registry, free_port, start_registry

pytestmark = pytest.mark.integration

PYSOCI = str(Path(sys.executable).with_name("pysoci"))
BIG = random.Random(5).randbytes(3 << 20)


@pytest.fixture(scope="module")
def rig(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Registry, Pysoci, Containerd, str, int]]:
    tmp = tmp_path_factory.mktemp("observability")
    reg = start_registry(tmp / "registry")
    certs = tmp / "certs.d" / reg.host
    certs.mkdir(parents=True)
    (certs / "hosts.toml").write_text(f'server = "http://{reg.host}"\n')
    port = free_port()
    config = tmp / "pysoci.toml"
    config.write_text(
        pysoci_config(
            f'metrics_address = "127.0.0.1:{port}"\nlog_format = "json"\n'
            "[background_fetch]\ndisable = true\n"
            f'[registry]\nconfig_path = "{tmp / "certs.d"}"\n'
        )
    )
    layers = [
        Layer.from_tar(files_tar({"data/big": BIG, "etc/hello": b"hello\n"})),
        Layer.from_tar(files_tar({"etc/small": b"small\n"})),
    ]
    write_image(tmp / "src", "v1", layers)
    plain, soci = f"{reg.host}/obs:v1", f"{reg.host}/obs:soci"
    subprocess.run(
        ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{tmp}/src:v1", f"docker://{plain}"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    subprocess.run(
        [
            PYSOCI,
            "convert",
            plain,
            soci,
            "--plain-http",
            "--root",
            str(tmp / "build"),
            "-q",
            "--min-layer-size",
            "1MiB",
            "--span-size",
            "256KiB",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    pysoci = Pysoci(tmp / "pysoci", tmp / "pysoci.sock", tmp / "pysoci.log", config)
    pysoci.start()
    cd = start_containerd(tmp / "cd", tmp / "pysoci.sock")
    try:
        yield reg, pysoci, cd, soci, port
    finally:
        cd.stop()
        pysoci.stop_all()
        reg.stop()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def status(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYSOCI, "status", "--root", str(root), *args], capture_output=True, text=True, timeout=60
    )


def test_metrics_status_and_logs_after_a_lazy_pull(
    rig: tuple[Registry, Pysoci, Containerd, str, int],
) -> None:
    _, pysoci, cd, ref, port = rig
    before = scrape(port)
    assert ("pysoci_layers_mounted", ()) in before
    cd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "soci", ref)

    big = Layer.from_tar(files_tar({"data/big": BIG, "etc/hello": b"hello\n"}))
    digest = "sha256:" + hashlib.sha256(big.blob).hexdigest()
    lazy_dir = pysoci.root / "fuse" / lazy_layer_id(pysoci.root, digest)
    assert lazy_dir.is_dir()
    with open(lazy_dir / "data" / "big", "rb") as f:  # what a container would do
        f.seek(1 << 20)
        assert f.read(4096) == BIG[1 << 20 : (1 << 20) + 4096]

    after = scrape(port)
    fetched = after[("pysoci_layer_fetched_bytes", (("layer", digest),))]
    total = after[("pysoci_layer_total_bytes", (("layer", digest),))]
    assert 0 < fetched < total == len(big.blob)
    assert after[("pysoci_layers_mounted", ())] == 1
    on_demand = ("pysoci_span_fetches_total", (("kind", "on_demand"),))
    assert after[on_demand] > before.get(on_demand, 0)
    assert after[("pysoci_span_fetch_bytes_total", (("kind", "on_demand"),))] > 0
    assert after[("pysoci_span_fetch_duration_seconds_count", (("kind", "on_demand"),))] > 0
    for op in ("lookup", "open", "read"):
        assert after[("pysoci_fuse_operations_total", (("operation", op),))] > 0, op
    # The image's small layer has no zTOC: pysoci unpacked it, and counted why.
    fallback = ("pysoci_lazy_mount_fallbacks_total", (("reason", "no_ztoc"),))
    assert after.get(fallback, 0) == before.get(fallback, 0) + 1

    # pysoci status: the image, its lazy layer with a percentage, the local one with a reason.
    res = status(pysoci.root)
    assert res.returncode == 0, res.stderr
    assert ref in res.stdout
    lazy_line = next(line for line in res.stdout.splitlines() if digest[7:19] in line)
    assert " lazy " in lazy_line and "%" in lazy_line and "[#" in lazy_line, res.stdout
    assert " local " in res.stdout and "unpacked by pysoci: no zTOC" in res.stdout, res.stdout

    res = status(pysoci.root, "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    image = next(i for i in doc["images"] if i["image"] == ref)
    modes = {layer["digest"]: layer for layer in image["layers"]}
    assert modes[digest]["mode"] == "lazy" and modes[digest]["state"] == "fetching"
    assert 0 < modes[digest]["fetchedBytes"] < modes[digest]["totalBytes"]
    assert 0 < modes[digest]["fetchedPercent"] < 100
    assert [layer["mode"] for layer in image["layers"]] == ["lazy", "local"]
    assert image["layers"][1]["reason"]

    # Logs: one JSON object per line, the span fetches tagged with their layer.
    records = [
        json.loads(line) for line in pysoci.log.read_text().splitlines() if line.startswith("{")
    ]
    assert len(records) > 10
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any(r.get("layer") == digest for r in records)
    # The remote-snapshot hook's lines name the image, the layer and the snapshot.
    lazy_line = next(r for r in records if "served lazily" in r["message"])
    assert lazy_line["image"] == ref and lazy_line["layer"] == digest, lazy_line
    assert lazy_line["snapshot"].startswith("default/") and "extract-" in lazy_line["snapshot"]


def test_image_without_index_is_local_by_containerd(
    rig: tuple[Registry, Pysoci, Containerd, str, int], tmp_path: Path
) -> None:
    reg, pysoci, cd, _, _ = rig
    write_image(tmp_path / "src", "v1", [Layer.from_tar(files_tar({"etc/plain": b"plain\n"}))])
    plain = f"{reg.host}/plain:v1"
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--dest-tls-verify=false",
            f"oci:{tmp_path}/src:v1",
            f"docker://{plain}",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    cd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "soci", plain)
    res = status(pysoci.root, "--json")
    assert res.returncode == 0, res.stderr
    image = next(i for i in json.loads(res.stdout)["images"] if i["image"] == plain)
    (layer,) = image["layers"]
    assert layer["mode"] == "local" and "unpacked by containerd" in layer["reason"]
    assert "unpacked by containerd" in status(pysoci.root).stdout


def test_status_when_the_daemon_is_not_running(tmp_path: Path) -> None:
    res = status(tmp_path)
    assert res.returncode == 1 and "no pysoci state" in res.stderr
    (tmp_path / "metadata.db").touch()
    (tmp_path / "fuse").mkdir()
    res = status(tmp_path)
    assert res.returncode == 1 and "data plane is not running" in res.stderr, res.stderr
