"""`make demo`: a lazy pull, for real, on this machine.

1. builds a Debian image (debootstrap minbase + python3, cached after the first run) and
   pushes it to a local docker-registry;
2. `pysoci convert` makes a SOCI-enabled copy of it (zTOCs + a SOCI index v2);
3. starts `pysoci serve` and containerd (its `soci` proxy plugin pointing at pysoci);
4. `ctr-remote image rpull --snapshotter soci` and `ctr run` the image's python3;
5. prints what was fetched: per layer, bytes fetched lazily against the layer's size, and
   that the layer blob never entered containerd's content store;
6. pulls and runs the same image with containerd's own overlayfs snapshotter (a full pull),
   and compares the two times to ready.
Everything runs under demo-out/ and is stopped at the end.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fixtures.containerd import Pysoci, start_containerd  # noqa: E402
from tests.fixtures.debootstrap import rootfs_tar  # noqa: E402
from tests.fixtures.images import GZIP_LAYER, Layer, pigz_blob, write_image  # noqa: E402
from tests.fixtures.pysoci_config import pysoci_config  # noqa: E402
from tests.fixtures.registry import start_registry  # noqa: E402

OUT = ROOT / "demo-out"
PYSOCI = str(ROOT / ".venv" / "bin" / "pysoci")
WORKLOAD = [
    "/usr/bin/python3",
    "-c",
    "import json, sqlite3, email; print('ready: python', __import__('sys').version.split()[0])",
]


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def sh(*args: str, quiet: bool = False) -> str:
    if not quiet:
        shown = " ".join(a if len(a) < 60 else a[:57] + "..." for a in args)
        print(f"$ {shown}", flush=True)
    res = subprocess.run(args, capture_output=True, text=True, timeout=1200)
    if res.returncode != 0:
        raise SystemExit(f"demo: {args[0]} failed:\n{res.stderr[-3000:]}")
    return res.stdout


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> int:
    if subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() != "0":
        raise SystemExit("make demo needs root (containerd, FUSE, overlayfs)")
    for leftover in (OUT / "containerd" / "root", OUT / "pysoci" / "fuse"):
        subprocess.run(["umount", "-R", "-l", str(leftover)], capture_output=True)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()

    step("1. a Debian image (debootstrap minbase + python3) in a local registry")
    print("building the root filesystem (debootstrap; cached after the first run) ...", flush=True)
    tar = rootfs_tar().read_bytes()
    layer = Layer(
        pigz_blob(tar, blocksize_kib=1024), GZIP_LAYER, "sha256:" + hashlib.sha256(tar).hexdigest()
    )
    write_image(OUT / "layout", "v1", [layer])
    print(f"one layer: {mib(len(tar))} of tar, {mib(len(layer.blob))} gzip")
    registry = start_registry(OUT / "registry")
    pysoci = containerd = None
    try:
        plain, soci = f"{registry.host}/debian:v1", f"{registry.host}/debian:soci"
        sh("skopeo", "copy", "--dest-tls-verify=false", f"oci:{OUT}/layout:v1", f"docker://{plain}")

        step("2. index it: pysoci convert makes a SOCI-enabled image")
        print(
            sh(
                PYSOCI,
                "convert",
                plain,
                soci,
                "--plain-http",
                "--root",
                str(OUT / "build"),
                "--quiet",
            )
        )

        step("3. start pysoci serve and containerd (proxy plugin `soci`)")
        certs = OUT / "certs.d" / registry.host
        certs.mkdir(parents=True)
        (certs / "hosts.toml").write_text(f'server = "http://{registry.host}"\n')
        config = OUT / "pysoci.toml"
        config.write_text(
            pysoci_config(
                f'[registry]\nconfig_path = "{OUT / "certs.d"}"\n'
                # No background fetching for a while: the numbers below are what python3 read.
                "[background_fetch]\nsilence_period_msec = 600000\n"
            )
        )
        pysoci = Pysoci(OUT / "pysoci", OUT / "pysoci.sock", OUT / "pysoci.log", config)
        pysoci.start()
        containerd = start_containerd(OUT / "containerd", OUT / "pysoci.sock")
        print(
            f"pysoci: {OUT / 'pysoci.sock'} (log {OUT / 'pysoci.log'})\n"
            f"containerd: {containerd.address}"
        )

        step("4. lazy pull and run")
        t0 = time.monotonic()
        containerd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "soci", soci)
        pulled = time.monotonic() - t0
        print(f"$ ctr-remote image rpull --snapshotter soci {soci}   ({pulled:.2f} s)")
        t1 = time.monotonic()
        out = containerd.ctr("run", "--rm", "--snapshotter", "soci", soci, "demo", *WORKLOAD).stdout
        ran = time.monotonic() - t1
        print(
            f"$ ctr run --snapshotter soci {soci} demo python3 -c 'import json, sqlite3, email'"
            f"   ({ran:.2f} s)"
        )
        print(f"  container printed: {out.strip()}")
        print(f"  time from pull to ready: {pulled + ran:.2f} s")

        step("5. what was fetched")
        content = containerd.ctr("content", "ls", "-q").stdout.split()
        layer_digest = "sha256:" + hashlib.sha256(layer.blob).hexdigest()
        for path in sorted((pysoci.root / "fuse" / ".status").glob("*.json")):
            s = json.loads(path.read_text())
            print(
                f"  layer {s['digest'][:19]}…: fetched {mib(s['fetchedSize'])} of {mib(s['size'])} "
                f"({s['fetchedPercent']:.1f} %) to run python3"
            )
        if layer_digest in content:
            print(
                "  UNEXPECTED: the layer blob is in containerd's content store (it was downloaded)"
            )
            return 1
        print(
            "  the layer blob is not in containerd's content store: containerd never downloaded it"
        )

        step("6. the same image with containerd's overlayfs snapshotter (a full pull)")
        t2 = time.monotonic()
        containerd.ctr("image", "pull", "--plain-http", plain)
        full_pull = time.monotonic() - t2
        print(f"$ ctr image pull {plain}   ({full_pull:.2f} s)")
        t3 = time.monotonic()
        out = containerd.ctr("run", "--rm", plain, "demo-overlayfs", *WORKLOAD).stdout
        full_run = time.monotonic() - t3
        print(f"$ ctr run {plain} demo-overlayfs python3 ...   ({full_run:.2f} s)")
        print(f"  container printed: {out.strip()}")
        lazy, full = pulled + ran, full_pull + full_run
        print(
            f"  time from pull to ready: {full:.2f} s with overlayfs, {lazy:.2f} s with pysoci "
            f"(pysoci / overlayfs = {lazy / full:.2f}); downloaded {mib(len(layer.blob))}"
        )
    finally:
        if containerd is not None:
            containerd.stop()
        if pysoci is not None:
            pysoci.stop_all()
        registry.stop()
    print(f"\nlogs and state are in {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
