"""Time from a control-plane start to serving, with 20 lazy layers mounted (`make bench-restart`).

An image of 20 gzip layers, each with a zTOC, is pulled lazily through real containerd 1.6 and
`pysoci serve`; then, 5 times each:
- the control plane alone restarts (SIGKILL, then start): the data plane still serves the 20
  layers, the restore only asks it (what `systemctl restart pysoci` costs);
- both planes restart (SIGKILL of both, then start): the new data plane mounts the 20 layers
  again from the snapshots' labels and the zTOCs on disk, no registry needed (a node reboot,
  or a crash of the data plane).
Reported, not asserted: median and spread of "start → gRPC serving", and the restore's own
time as the log gives it. Writes bench/out/restart.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from tests.fixtures.containerd import Pysoci, start_containerd
from tests.fixtures.images import Layer, write_image
from tests.fixtures.registry import start_registry

PYSOCI = str(Path(sys.executable).with_name("pysoci"))
OUT = Path(__file__).resolve().parent / "out"
LAYERS = 20


def _layer(i: int) -> Layer:
    data = random.Random(i).randbytes(2 << 20)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo(f"layer{i:02d}/data")
        info.size, info.mtime = len(data), 1_700_000_000
        t.addfile(info, io.BytesIO(data))
    return Layer.from_tar(buf.getvalue(), level=1)


def _restore_seconds(log: Path, offset: int) -> float:
    text = log.read_bytes()[offset:].decode(errors="replace")
    found = re.findall(r"restored \d+ snapshot\(s\).*? in ([0-9.]+) s", text)
    return float(found[-1]) if found else float("nan")


def measure(runs: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="pysoci-bench-restart-") as tmp_:
        tmp = Path(tmp_)
        reg = start_registry(tmp / "registry")
        (tmp / "certs.d").mkdir()
        config = tmp / "pysoci.toml"
        config.write_text(
            f'[background_fetch]\ndisable = true\n[registry]\nconfig_path = "{tmp / "certs.d"}"\n'
        )
        pysoci = Pysoci(tmp / "root", tmp / "pysoci.sock", tmp / "pysoci.log", config,
                        socket_activated=True)  # fmt: skip
        cd = None
        try:
            layers = [_layer(i) for i in range(LAYERS)]
            write_image(tmp / "layout", "v1", layers)
            plain, ref = f"{reg.host}/restart:v1", f"{reg.host}/restart:soci"
            subprocess.run(["skopeo", "copy", "--dest-tls-verify=false",
                            f"oci:{tmp}/layout:v1", f"docker://{plain}"],
                           check=True, capture_output=True, timeout=600)  # fmt: skip
            subprocess.run([PYSOCI, "convert", plain, ref, "--root", str(tmp / "build"), "-q",
                            "--min-layer-size", "1MiB"],
                           check=True, capture_output=True, timeout=600)  # fmt: skip
            pysoci.start()
            cd = start_containerd(tmp / "cd", tmp / "pysoci.sock")
            cd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "soci", ref)
            served = subprocess.run(
                [PYSOCI, "data-plane", "status", "--root", str(pysoci.root), "--json"],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            mounted = json.loads(served.stdout)["serving"]["layers"]
            results: dict[str, list[float]] = {}
            for mode in ("control plane", "both planes"):
                starts, restores = [], []
                for _ in range(runs):
                    pysoci.stop(9)
                    if mode == "both planes":
                        pysoci.stop_data_plane(9)
                    offset = pysoci.log.stat().st_size
                    t0 = time.monotonic()
                    pysoci.start()  # returns once "pysoci serving on" is logged
                    starts.append(time.monotonic() - t0)
                    restores.append(_restore_seconds(pysoci.log, offset))
                results[f"{mode}: start to serving, s"] = starts
                results[f"{mode}: restore, s"] = restores
            return {"lazy_layers": mounted, "runs": runs, "results": results}
        finally:
            if cd is not None:
                cd.stop()
            pysoci.stop_all()
            reg.stop()


def report(doc: dict[str, object]) -> str:
    lines = [
        f"Restarts with {doc['lazy_layers']} lazy layers mounted ({doc['runs']} runs each):",
        "",
        "| measure | median | min | max |",
        "|---|---|---|---|",
    ]
    results = doc["results"]
    assert isinstance(results, dict)
    for name, values in results.items():
        lines.append(
            f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    doc = measure(args.runs)
    OUT.mkdir(exist_ok=True)
    (OUT / "restart.json").write_text(json.dumps(doc, indent=2))
    text = report(doc)
    (OUT / "restart.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
