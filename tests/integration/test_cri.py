"""Kubernetes' path: containerd's CRI plugin with `snapshotter = "soci"` pulls and runs a
SOCI-enabled image lazily.

The test speaks CRI (runtime.v1, as kubelet does) to a real containerd 1.6 through a small
client (tests/fixtures/cri.py); the pod uses the node's network namespace, so no CNI plugin
is needed; the pod's pause image is a static binary pushed to the local registry. pysoci runs
the way its systemd units run it: handed its listening socket as fd 3, with the unit's
capability bounding set and no_new_privs (tests/integration/test_systemd.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.containerd import Containerd, start_containerd
from tests.fixtures.cri import CriClient, generate_stubs, log_lines, write_pause_image
from tests.fixtures.debootstrap import rootfs_tar
from tests.fixtures.images import GZIP_LAYER, Layer, pigz_blob, write_image
from tests.fixtures.pysoci_config import pysoci_config
from tests.fixtures.registry import Registry, start_registry
from tests.integration.test_systemd import ActivatedPysoci

PYSOCI = str(Path(sys.executable).with_name("pysoci"))
WORKLOAD = [
    "/usr/bin/python3",
    "-c",
    "import json, os, sqlite3, email\n"
    "st = os.stat('/opt/suid')\n"
    "print(oct(st.st_mode), st.st_uid, st.st_gid, os.path.exists('/etc/issue'))\n"
    "print('ready')\n",
]


def _skopeo_copy(src: str, dst: str) -> None:
    subprocess.run(
        ["skopeo", "copy", "--dest-tls-verify=false", src, dst],
        check=True,
        capture_output=True,
        timeout=300,
    )


def _manifest_layers(ref: str) -> list[str]:
    """Layer digests of the (host's) image manifest behind `ref`."""

    def raw(r: str) -> dict[str, object]:
        out = subprocess.run(
            ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{r}"],
            check=True,
            capture_output=True,
        ).stdout
        return dict(json.loads(out))

    top = raw(ref)
    if "manifests" in top:
        first = top["manifests"][0]["digest"]  # type: ignore[index]
        top = raw(f"{ref.rsplit(':', 1)[0]}@{first}")
    return [layer["digest"] for layer in top["layers"]]  # type: ignore[attr-defined]


def _has_cap_sys_resource() -> bool:
    """Whether this process may lower oom_score_adj (CRI gives pod sandboxes -998)."""
    status = Path("/proc/self/status").read_text()
    match = re.search(r"CapEff:\s*(\w+)", status)
    assert match is not None
    return bool(int(match[1], 16) >> 24 & 1)  # CAP_SYS_RESOURCE


class Rig:
    def __init__(self, reg: Registry, pysoci: ActivatedPysoci, cd: Containerd, cri: CriClient):
        self.reg, self.pysoci, self.cd, self.cri = reg, pysoci, cd, cri


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("cri")
    reg = start_registry(tmp / "registry")
    pysoci: ActivatedPysoci | None = None
    cd: Containerd | None = None
    cri: CriClient | None = None
    try:
        certs = tmp / "certs.d"
        (certs / reg.host).mkdir(parents=True)
        # containerd 1.6 wants a [host] table besides `server` ("invalid `host` tree" otherwise).
        (certs / reg.host / "hosts.toml").write_text(
            f'server = "http://{reg.host}"\n'
            f'[host."http://{reg.host}"]\n  capabilities = ["pull", "resolve"]\n'
        )
        # The pod sandbox image.
        write_pause_image(tmp / "pause", "v1", tmp)
        pause = f"{reg.host}/pause:v1"
        _skopeo_copy(f"oci:{tmp}/pause:v1", f"docker://{pause}")

        config = tmp / "pysoci.toml"
        # No background fetching: what was fetched is what the container read.
        config.write_text(
            pysoci_config(
                f'[background_fetch]\ndisable = true\n[registry]\nconfig_path = "{certs}"\n'
            )
        )
        pysoci = ActivatedPysoci.start(tmp / "pysoci", tmp / "run" / "pysoci.sock", config, tmp)
        cd = start_containerd(
            tmp / "cd",
            pysoci.socket,
            sandbox_image=pause,
            registry_config_path=certs,
            restrict_oom_score_adj=not _has_cap_sys_resource(),
        )
        cri = CriClient.connect(cd.address, generate_stubs(tmp / "stubs", "v1"))
        yield Rig(reg, pysoci, cd, cri)
    finally:
        if cri is not None:
            cri.close()
        if cd is not None:
            cd.stop()
        if pysoci is not None:
            pysoci.stop()
        reg.stop()


def test_cri_serves_runtime_v1(rig: Rig) -> None:
    version = rig.cri.version()
    assert version.runtime_name == "containerd"
    assert version.runtime_api_version == "v1"


def test_cri_pull_and_run_lazily(rig: Rig, tmp_path: Path) -> None:
    reg, cri = rig.reg, rig.cri
    # A Debian image (one big gzip layer) and its SOCI-enabled conversion.
    tar = rootfs_tar().read_bytes()
    base = Layer(
        pigz_blob(tar, blocksize_kib=1024), GZIP_LAYER, "sha256:" + hashlib.sha256(tar).hexdigest()
    )
    # A small layer (below the min layer size: no zTOC) that pysoci unpacks itself, under
    # the unit's capability bounding set: a whiteout (mknod), a setuid file of another owner
    # (chown, fsetid).
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, mode, uid in (("etc/.wh.issue", 0o644, 0), ("opt/suid", 0o4755, 1000)):
            info = tarfile.TarInfo(name)
            info.mode, info.uid, info.gid, info.mtime = mode, uid, uid, 1_700_000_000
            info.size = 0 if ".wh." in name else 5
            t.addfile(info, io.BytesIO(b"suid\n"))
    small = Layer.from_tar(buf.getvalue())
    write_image(tmp_path / "src", "v1", [base, small])
    plain, soci = f"{reg.host}/debian:v1", f"{reg.host}/debian:soci"
    _skopeo_copy(f"oci:{tmp_path}/src:v1", f"docker://{plain}")
    subprocess.run(
        [PYSOCI, "convert", plain, soci, "--plain-http", "--root", str(tmp_path / "build"), "-q"],
        check=True,
        capture_output=True,
        timeout=600,
    )

    # What kubelet does for a pod with one container.
    logs = tmp_path / "pods"
    logs.mkdir()
    sandbox = cri.sandbox_config("lazy", logs)
    image_id = cri.pull_image(soci, sandbox)
    assert image_id.startswith("sha256:")
    pod = cri.run_pod(sandbox)
    try:
        ctr = cri.create_container(pod, sandbox, "app", soci, WORKLOAD, "app.log")
        cri.start_container(ctr)
        status = cri.wait_exited(ctr)
        assert status.exit_code == 0, log_lines(logs / "app.log")
        assert log_lines(logs / "app.log") == ["0o104755 1000 1000 False", "ready"]
    finally:
        cri.remove_pod(pod)

    # It was lazy: the layer blob never entered containerd's content store ...
    layer = _manifest_layers(soci)[0]
    content = rig.cd.ctr("-n", "k8s.io", "content", "ls", "-q").stdout.split()
    assert layer not in content
    # ... pysoci mounted it and fetched a fraction of it ...
    statuses = [
        json.loads(p.read_text()) for p in (rig.pysoci.root / "fuse" / ".status").glob("*.json")
    ]
    status_of = {s["digest"]: s for s in statuses}
    assert layer in status_of, statuses
    fetched, size = status_of[layer]["fetchedSize"], status_of[layer]["size"]
    print(f"CRI pod: fetched {fetched} of {size} bytes of the base layer ({fetched / size:.1%})")
    assert 0 < fetched < size / 2, status_of[layer]
    # ... and containerd's snapshot of it is pysoci's remote snapshot.
    snaps = rig.cd.ctr("-n", "k8s.io", "snapshots", "--snapshotter", "soci", "ls").stdout
    assert "Committed" in snaps
    log = rig.pysoci.log.read_text()
    assert f"layer {layer} served lazily" in log
