"""The startup benchmark's images, built locally and cached by content in /var/cache/pysoci-bench.

- `python`: the debootstrap rootfs (minbase + python3, tests/fixtures/debootstrap.py) as one
  gzip layer; workload `python3 -c "print('ready')"`.
- `ml`: the same base layer + one layer with an ML stack installed from PyPI by this host's pip
  for CPython 3.11 (bookworm's python3) into /usr/local/lib/python3.11/dist-packages; workload:
  import jax, numpy, scipy, pandas, scikit-learn, one small computation with each, `ready`.
  TensorFlow (CPU) is in the image too but not imported: big images carry more than one job
  uses, which is the case lazy loading is for.
- `postgres`: debootstrap minbase with Debian's postgresql, a data directory initialised at
  build time; workload: the server in the foreground, ready at "database system is ready to
  accept connections".

Every layer is a single-stream gzip (`pigz -6 -n`, as `docker push` would make it, not pigz's
independent blocks). A layer's tar and blob are cached under their diff_id; a change of the
recipe (the pip requirement list, the debootstrap package list) changes the directory name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from snapshotter.content.layout import OciLayout
from snapshotter.soci import oci
from tests.fixtures.debootstrap import MIRROR, rootfs_tar

CACHE = Path(os.environ.get("PYSOCI_BENCH_CACHE", "/var/cache/pysoci-bench"))
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"]

ML_REQUIREMENTS = [
    "jax==0.4.35",
    "jaxlib==0.4.35",
    "numpy==1.26.4",
    "scipy==1.14.1",
    "pandas==2.2.3",
    "scikit-learn==1.5.2",
    "tensorflow-cpu==2.17.1",
]
PG_PACKAGES = ["python3", "postgresql"]
PG_BIN = "/usr/lib/postgresql/15/bin"
PG_DATA = "/var/lib/postgresql/bench"

ML_SCRIPT = (
    "import jax, jax.numpy as jnp, numpy as np, pandas as pd, scipy.linalg\n"
    "from sklearn.linear_model import LogisticRegression\n"
    "x = jnp.arange(64.0).reshape(8, 8)\n"
    "s = float((x @ x.T).sum())\n"
    "df = pd.DataFrame({'a': np.arange(100.0), 'b': np.arange(100) % 2})\n"
    "m = LogisticRegression().fit(df[['a']], df['b'])\n"
    "lu = scipy.linalg.lu_factor(np.eye(8) * 2.0)\n"
    "print('ready', s, round(m.score(df[['a']], df['b']), 2), flush=True)\n"
)


@dataclass(frozen=True)
class Workload:
    """How to start the container and what line means it is ready."""

    args: tuple[str, ...]
    ready: str
    """A substring of a line of the container's stdout/stderr."""
    exits: bool
    """True: the process ends by itself after the ready line (else the bench stops it)."""

    def is_ready(self, line: str) -> bool:
        """`ready` as words of the line (ctr's "... already exists" is not ready)."""
        return re.search(rf"(?<!\w){re.escape(self.ready)}(?!\w)", line) is not None


WORKLOADS: dict[str, Workload] = {
    "python": Workload(("/usr/bin/python3", "-c", "print('ready')"), "ready", True),
    "ml": Workload(("/usr/bin/python3", "-c", ML_SCRIPT), "ready", True),
    "postgres": Workload(
        tuple(
            f"/usr/sbin/runuser -u postgres -- {PG_BIN}/postgres -D {PG_DATA} "
            "-c listen_addresses= -k /tmp".split()
        ),
        "database system is ready to accept connections",
        False,
    ),
}


def _recipe_key(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:12]


def log(msg: str) -> None:
    print(f"[images] {msg}", flush=True)


# --- trees --------------------------------------------------------------------------------------


def ml_tree() -> Path:
    """A tree holding only usr/local/{lib/python3.11/dist-packages,bin} with the ML stack."""
    tree = CACHE / f"ml-tree-{_recipe_key(ML_REQUIREMENTS)}"
    if (tree / "usr/local/lib/python3.11/dist-packages/jax").is_dir():
        return tree
    tmp = tree.with_name(tree.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    site = tmp / "usr/local/lib/python3.11/dist-packages"
    log(f"pip install {' '.join(ML_REQUIREMENTS)} (a few minutes)")
    platforms = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_27_x86_64",
                 "manylinux_2_28_x86_64", "linux_x86_64"]  # fmt: skip
    cmd = ["python3", "-m", "pip", "install", "--no-cache-dir", "--target", str(site)]
    cmd += ["--no-warn-script-location", "--only-binary=:all:", "--implementation", "cp"]
    cmd += ["--python-version", "3.11"]
    for p in platforms:
        cmd += ["--platform", p]
    subprocess.run([*cmd, *ML_REQUIREMENTS], check=True, capture_output=True, timeout=3600)
    adopt_ml_site(site, tmp)
    tmp.rename(tree)
    return tree


def adopt_ml_site(site: Path, tree: Path) -> None:
    """Move pip's `bin` next to the site directory, as /usr/local/bin."""
    if (site / "bin").is_dir():
        (tree / "usr/local/bin").mkdir(parents=True, exist_ok=True)
        for f in (site / "bin").iterdir():
            f.rename(tree / "usr/local/bin" / f.name)
        (site / "bin").rmdir()


@contextlib.contextmanager
def _chroot_mounts(root: Path) -> Iterator[None]:
    mounted: list[Path] = []
    try:
        for fstype, where in (("proc", "proc"), ("tmpfs", "dev/shm")):
            target = root / where
            target.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-t", fstype, fstype, str(target)], check=True)
            mounted.append(target)
        yield
    finally:
        for target in reversed(mounted):
            subprocess.run(["umount", "-l", str(target)], check=False)


def postgres_tree() -> Path:
    """debootstrap minbase + postgresql, with a data directory at PG_DATA."""
    tree = CACHE / f"pg-rootfs-{_recipe_key(PG_PACKAGES)}"
    if (tree / PG_DATA.lstrip("/") / "PG_VERSION").exists():
        return tree
    tmp = tree.with_name(tree.name + ".tmp")
    if not (tmp / PG_BIN.lstrip("/") / "postgres").exists():
        shutil.rmtree(tmp, ignore_errors=True)
        log("debootstrap minbase + postgresql (a few minutes)")
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(PG_PACKAGES)}",
             "bookworm", str(tmp), MIRROR],
            check=True, capture_output=True, timeout=3600,
        )  # fmt: skip
    shutil.rmtree(tmp / PG_DATA.lstrip("/"), ignore_errors=True)
    with _chroot_mounts(tmp):
        subprocess.run(
            ["chroot", str(tmp), "/usr/sbin/runuser", "-u", "postgres", "--",
             f"{PG_BIN}/initdb", "-D", PG_DATA, "-A", "trust", "-E", "UTF8",
             "--locale", "C.UTF-8"],
            check=True, capture_output=True, timeout=600,
        )  # fmt: skip
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for f in (tmp / junk).glob("*"):
            if f.is_file():
                f.unlink()
    tmp.rename(tree)
    return tree


# --- layers and images --------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerFile:
    blob: Path
    digest: str
    size: int
    diff_id: str
    tar_size: int


def tar_tree(tree: Path, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    subprocess.run(
        ["tar", "--format=posix", "--xattrs", "--numeric-owner", "--sort=name",
         "-C", str(tree), "-cf", str(tmp), "."],
        check=True, capture_output=True,
    )  # fmt: skip
    tmp.rename(out)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def gzip_layer(tar: Path) -> LayerFile:
    """The tar's gzip blob, cached under the tar's diff_id."""
    diff_id = _sha256_file(tar)
    meta = CACHE / "layers" / (diff_id.split(":")[1] + ".json")
    blob = meta.with_suffix(".tar.gz")
    if meta.exists() and blob.exists():
        m = json.loads(meta.read_text())
        return LayerFile(blob, m["digest"], m["size"], diff_id, m["tar_size"])
    meta.parent.mkdir(parents=True, exist_ok=True)
    tmp = blob.with_name(blob.name + ".tmp")
    with open(tar, "rb") as src, open(tmp, "wb") as dst:
        subprocess.run(["pigz", "-6", "-n", "-p", "2"], stdin=src, stdout=dst, check=True)
    tmp.rename(blob)
    layer = LayerFile(blob, _sha256_file(blob), blob.stat().st_size, diff_id, tar.stat().st_size)
    meta.write_text(
        json.dumps({"digest": layer.digest, "size": layer.size, "tar_size": layer.tar_size})
    )
    return layer


def tree_layer(tree: Path, name: str) -> LayerFile:
    tar = CACHE / f"{name}.tar"
    if not tar.exists():
        log(f"tar {tree}")
        tar_tree(tree, tar)
    return gzip_layer(tar)


def image_layers(name: str) -> list[LayerFile]:
    base = gzip_layer(rootfs_tar())
    if name == "python":
        return [base]
    if name == "ml":
        tree = ml_tree()
        return [base, tree_layer(tree, tree.name)]
    if name == "postgres":
        tree = postgres_tree()
        return [tree_layer(tree, tree.name)]
    raise ValueError(f"unknown image {name!r}")


def write_layout(layout_dir: Path, name: str) -> tuple[oci.Descriptor, list[LayerFile]]:
    """Write image `name` into the OCI layout (tag = name); return its manifest and layers."""
    layers = image_layers(name)
    layout = OciLayout.open(layout_dir, create=True)
    platform = oci.host_platform()
    config = {
        "architecture": platform.architecture,
        "os": platform.os,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "config": {"Env": ENV, "Cmd": ["/bin/sh"]},
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_desc = oci.Descriptor(
        oci.MEDIA_TYPE_OCI_CONFIG, layout.write_blob(config_bytes), len(config_bytes)
    )
    descs = []
    for layer in layers:
        if not layout.has_blob(layer.digest):
            with open(layer.blob, "rb") as f:
                layout.write_blob_from_stream(
                    iter(lambda f=f: f.read(1 << 20), b""),  # type: ignore[misc]
                    expected_digest=layer.digest,
                )
        descs.append(oci.Descriptor(GZIP_LAYER, layer.digest, layer.size))
    manifest = oci.ImageManifest(config=config_desc, layers=descs)
    data = manifest.to_json_bytes()
    desc = oci.Descriptor(oci.MEDIA_TYPE_OCI_MANIFEST, layout.write_blob(data), len(data))
    layout.set_tag(name, desc)
    return desc, layers


def main() -> int:
    """Build (or find) every image: `python -m bench.images`."""
    for name in WORKLOADS:
        desc, layers = write_layout(CACHE / "layout", name)
        total = sum(layer.size for layer in layers)
        log(f"{name}: {desc.digest} {len(layers)} layers, {total / 1e6:.0f} MB compressed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
