"""Three nodes behind one nginx slice-cache mirror: the origin serves the image about once.

Each node is a network namespace with its own containerd 1.6 and `pysoci serve`
(tests/fixtures/fleet.py). All three pull the same SOCI-enabled image at once through the
mirror (their hosts.toml lists it before the origin), start a container, and let pysoci's
background fill complete every lazy layer (whole-layer digest checked). The origin, behind a
byte-counting proxy, must have served at most 1.2 times the image's compressed size in all,
and each node's container must see a tree identical to the one of a full unpack (the same
image pulled with containerd's overlayfs snapshotter), without fetching anything more.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

from tests.fixtures.debootstrap import rootfs_tar
from tests.fixtures.fleet import Fleet, FleetImage, fleet, pull_and_run, push_soci_image, run_all
from tests.fixtures.images import GZIP_LAYER, Layer, pigz_blob
from tests.integration.test_containerd import TREE

NODES = 3
MAX_RATIO = 1.2
WORKLOAD = ["/usr/bin/python3", "-c", "import json, sqlite3, email; print('ready')"]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, FleetImage]]:
    tmp = tmp_path_factory.mktemp("fleet")
    with fleet(tmp) as f:
        tar = rootfs_tar().read_bytes()
        base = Layer(
            pigz_blob(tar, blocksize_kib=1024),
            GZIP_LAYER,
            "sha256:" + hashlib.sha256(tar).hexdigest(),
        )
        image = push_soci_image(f, "fleet/debian", [base], tmp / "build")
        for _ in range(NODES):
            f.add_node()
        yield f, image


def test_three_nodes_share_one_mirror(rig: tuple[Fleet, FleetImage]) -> None:
    f, image = rig
    f.reset_counts()
    runs = run_all(f.nodes, lambda n: pull_and_run(n, image.soci, WORKLOAD, f"ready-{n.index}"))
    assert all(r.output.strip() == "ready" for r in runs), runs
    origin = f.origin_bytes()
    ratio = origin / image.compressed_size
    print(f"origin bytes {origin} / image {image.compressed_size} = {ratio:.3f} for {NODES} nodes")
    assert ratio <= MAX_RATIO, (origin, image.compressed_size)
    for node in f.nodes:
        assert node.containerd is not None
        content = node.containerd.ctr("content", "ls", "-q").stdout.split()
        for layer in node.status():
            assert layer["digest"] not in content, "containerd downloaded a lazy layer"
        assert "served lazily" in node.pysoci.log.read_text()

    # A full unpack, on node 0 with containerd's own snapshotter, is the reference tree.
    ref_node = f.nodes[0]
    cd = ref_node.containerd
    assert cd is not None
    ref_node.run(lambda: cd.ctr("image", "pull", "--hosts-dir", str(ref_node.certs), image.plain))
    expected = ref_node.run(
        lambda: cd.ctr("run", "--rm", image.plain, "tree-full", "/usr/bin/python3", "-c", TREE)
    ).stdout.splitlines()
    assert len(expected) > 1000
    f.reset_counts()
    for node in f.nodes:
        ncd = node.containerd
        assert ncd is not None
        lines = node.run(
            lambda ncd=ncd, i=node.index: ncd.ctr(
                "run", "--rm", "--snapshotter", "soci", image.soci, f"tree-{i}",
                "/usr/bin/python3", "-c", TREE,
            )
        ).stdout.splitlines()  # fmt: skip
        assert lines == expected, f"node {node.index}: {len(lines)} vs {len(expected)} entries"
    assert f.origin_bytes() == 0, "the trees were read from complete layers"
