"""`make demo`: build a sample image, index it with SOCI, and read a file through the index.

What it shows (this grows into the full lazy pull as the snapshotter lands):
1. a realistic layer (this machine's Python standard library, thousands of files) plus a
   large data file, gzip-compressed, written as an image into an OCI layout;
2. `pysoci convert` making a SOCI-enabled (v2) image of it, and `pysoci create` a v1 index;
3. `pysoci ztoc info` of the layer's zTOC;
4. `pysoci ztoc get-file` extracting one file by reading only its spans, checked against tar.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fixtures.images import Layer, tar_of_tree, write_image  # noqa: E402

OUT = ROOT / "demo-out"
PYSOCI = str(ROOT / ".venv" / "bin" / "pysoci")


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def run(*args: str, capture: bool = False) -> str:
    print("$ pysoci " + " ".join(args), flush=True)
    res = subprocess.run([PYSOCI, *args], check=True, text=True, capture_output=capture)
    return res.stdout if capture else ""


def sample_tree(dest: Path) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    shutil.copytree(
        stdlib,
        dest / "usr/lib/python3",
        symlinks=True,
        ignore=shutil.ignore_patterns("__pycache__", "site-packages", "test", "idlelib"),
    )
    data = dest / "srv/data"
    data.mkdir(parents=True)
    rng = __import__("random").Random(7)
    # Half-compressible data, so the layer spans many checkpoints.
    with open(data / "model.bin", "wb") as f:
        for _ in range(48):
            f.write(rng.randbytes(256 << 10) + bytes(256 << 10))
    (dest / "etc").mkdir()
    (dest / "etc/motd").write_text("hello from a lazily read layer\n")
    os.symlink("../usr/lib/python3", dest / "srv/python")


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    layout = OUT / "layout"

    step("1. build a sample image into an OCI layout")
    with tempfile.TemporaryDirectory() as tmp:
        sample_tree(Path(tmp))
        tar = tar_of_tree(Path(tmp))
    layer = Layer.from_tar(tar)
    manifest = write_image(layout, "demo", [layer])
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        members = t.getmembers()
    print(
        f"image {manifest.digest}\n  one layer: {len(members)} entries, "
        f"{len(tar) / 2**20:.1f} MiB tar, {len(layer.blob) / 2**20:.1f} MiB gzip"
    )

    step("2. index it: a SOCI-enabled image (v2) and a v1 index")
    run("convert", "--oci-layout", f"{layout}:demo", "demo-soci")
    run("create", "--oci-layout", f"{layout}:demo", "--quiet")
    run("index", "list", "--oci-layout", str(layout))
    if shutil.which("skopeo"):
        raw = subprocess.run(
            ["skopeo", "inspect", "--raw", f"oci:{layout}:demo-soci"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        print("skopeo inspect --raw oci:…:demo-soci (an independent reader):")
        for m in json.loads(raw)["manifests"]:
            print(f"  {m['digest']} artifactType={m.get('artifactType', '-')}")

    step("3. the layer's zTOC")
    index_json = json.loads((layout / "index.json").read_text())
    v1 = next(m for m in index_json["manifests"] if m.get("artifactType", "").endswith("v1+json"))
    index_manifest = json.loads((layout / "blobs/sha256" / v1["digest"].split(":")[1]).read_text())
    ztoc_digest = index_manifest["layers"][0]["digest"]
    ztoc_file = layout / "blobs/sha256" / ztoc_digest.split(":")[1]
    info = json.loads(run("ztoc", "info", str(ztoc_file), capture=True))
    files = info.pop("files")
    print(json.dumps(info, indent=2))
    print(f"  … and {len(files)} files, e.g.:")
    for f in files[:: max(1, len(files) // 5)][:5]:
        print(f"    {json.dumps(f)}")

    step("4. extract files through the index, reading only their spans")
    blob = layout / "blobs/sha256" / manifest_layer_hex(layout, manifest.digest)
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        for path in ("etc/motd", "usr/lib/python3/json/decoder.py", "srv/data/model.bin"):
            out = OUT / Path(path).name
            run("ztoc", "get-file", str(ztoc_file), str(blob), path, "-o", str(out), "--stats")
            expected = t.extractfile(path)
            assert expected is not None
            same = out.read_bytes() == expected.read()
            print(f"  {path}: {'identical to' if same else 'DIFFERENT FROM'} tar's extraction")
            if not same:
                return 1
    print(f"\nall outputs are in {OUT}")
    return 0


def manifest_layer_hex(layout: Path, manifest_digest: str) -> str:
    manifest = json.loads((layout / "blobs/sha256" / manifest_digest.split(":")[1]).read_text())
    return str(manifest["layers"][0]["digest"].split(":")[1])


if __name__ == "__main__":
    sys.exit(main())
