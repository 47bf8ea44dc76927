"""The startup benchmark's images, built locally and cached by content in /var/cache/pysoci-bench.

- `python`: the debootstrap rootfs (minbase + python3, tests/fixtures/debootstrap.py) as one
  gzip layer; workload `python3 -c "print('ready')"`.
- `ml`: the same base layer + one layer with an ML stack installed from PyPI by this host's pip
  for CPython 3.11 (bookworm's python3) into /usr/local/lib/python3.11/dist-packages; workload:
  import jax, numpy, scipy, pandas, scikit-learn, one small computation with each, `ready`.
  TensorFlow (CPU) is in the image too but not imported: big images carry more than one job
  uses, which is the case lazy loading is for.
- `ml-large`: the seeds' scale (about 3 GB compressed): the same base layer + one layer with
  torch (its default PyPI build, with the CUDA 12 runtime wheels nvidia-* that make it big),
  triton and transformers, every package pinned (the whole dependency closure, `--no-deps`);
  workload: `import torch, transformers`, one forward pass of a tiny BERT built from a config
  (no download), `ready`. This layer is reproducible to the byte from its recipe: fixed mtimes,
  .pyc compiled by bookworm's own python3 after the mtimes are fixed, a tar without atime/ctime.
  Its tree and tar (about 12 GB) are deleted once the blob is cached.
- `postgres`: debootstrap minbase with Debian's postgresql, a data directory initialised at
  build time; workload: the server in the foreground, ready at "database system is ready to
  accept connections".

Every layer is a single-stream gzip (`pigz -6 -n`, as `docker push` would make it, not pigz's
independent blocks) of a tar named as docker names it (`usr/bin/x`, no `./`, no root entry).
A layer's tar and blob are cached under their diff_id; a change of the recipe (the pip
requirement list, the debootstrap package list) changes the directory name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from snapshotter.content.layout import OciLayout
from snapshotter.soci import oci
from tests.fixtures.debootstrap import MIRROR, debian_rootfs

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
# The whole closure (resolved once with `pip install --dry-run --report`), installed --no-deps.
ML_LARGE_REQUIREMENTS = [
    "torch==2.5.1",
    "triton==3.1.0",
    "nvidia-cublas-cu12==12.4.5.8",
    "nvidia-cuda-cupti-cu12==12.4.127",
    "nvidia-cuda-nvrtc-cu12==12.4.127",
    "nvidia-cuda-runtime-cu12==12.4.127",
    "nvidia-cudnn-cu12==9.1.0.70",
    "nvidia-cufft-cu12==11.2.1.3",
    "nvidia-curand-cu12==10.3.5.147",
    "nvidia-cusolver-cu12==11.6.1.9",
    "nvidia-cusparse-cu12==12.3.1.170",
    "nvidia-nccl-cu12==2.21.5",
    "nvidia-nvjitlink-cu12==12.4.127",
    "nvidia-nvtx-cu12==12.4.127",
    "sympy==1.13.1",
    "mpmath==1.3.0",
    "networkx==3.6.1",
    "jinja2==3.1.6",
    "markupsafe==3.0.4",
    "fsspec==2026.9.0",
    "filelock==4.3.1",
    "typing-extensions==4.16.0",
    "transformers==4.46.3",
    "tokenizers==0.20.3",
    "safetensors==0.8.0",
    "huggingface-hub==0.36.2",
    "hf-xet==1.8.0",
    "numpy==1.26.4",
    "packaging==26.4",
    "pyyaml==6.0.4",
    "regex==2026.11.19",
    "requests==2.34.2",
    "certifi==2026.10.19.post1",
    "charset-normalizer==3.5.3",
    "idna==3.20",
    "urllib3==2.8.0",
    "tqdm==4.70.1",
]
FIXED_MTIME = 1730419200  # 2024-11-01T00:00:00Z: every file of a reproducible layer
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
ML_LARGE_SCRIPT = (
    "import torch, transformers\n"
    "torch.manual_seed(0)\n"
    "cfg = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,\n"
    "                              num_attention_heads=2, intermediate_size=64)\n"
    "model = transformers.BertModel(cfg).eval()\n"
    "with torch.no_grad():\n"
    "    out = model(torch.arange(16).reshape(2, 8)).last_hidden_state\n"
    "print('ready', torch.__version__, transformers.__version__, tuple(out.shape), flush=True)\n"
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
    "ml-large": Workload(("/usr/bin/python3", "-c", ML_LARGE_SCRIPT), "ready", True),
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


PIP_PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_27_x86_64",
                 "manylinux_2_28_x86_64", "manylinux1_x86_64", "linux_x86_64"]  # fmt: skip


def ml_large_tree(tree: Path) -> None:
    """pip-install the pinned torch + transformers closure into `tree`, reproducibly."""
    site = tree / "usr/local/lib/python3.11/dist-packages"
    log(f"pip install {len(ML_LARGE_REQUIREMENTS)} pinned packages, torch with CUDA wheels "
        "(about 3 GB from PyPI; several minutes)")  # fmt: skip
    cmd = ["python3", "-m", "pip", "install", "--no-cache-dir", "--no-deps", "--no-compile",
           "--target", str(site), "--no-warn-script-location", "--only-binary=:all:",
           "--implementation", "cp", "--python-version", "3.11"]  # fmt: skip
    for p in PIP_PLATFORMS:
        cmd += ["--platform", p]
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    env["TMPDIR"] = str(CACHE)  # the wheels (3 GB) do not fit a small /tmp
    subprocess.run([*cmd, *ML_LARGE_REQUIREMENTS], check=True, capture_output=True,
                   timeout=7200, env=env)  # fmt: skip
    adopt_ml_site(site, tree)
    # pip leaves wall-clock mtimes: fix them, then compile with the image's own python3
    # (timestamp pycs of the fixed mtimes are valid in the image), then fix the new files'.
    fix_mtimes(tree)
    subprocess.run(
        ["/usr/bin/python3", "-m", "compileall", "-q", "-j", "0", "--invalidation-mode",
         "timestamp", str(site)],
        check=False, capture_output=True, timeout=3600, env=env,
    )  # fmt: skip
    fix_mtimes(tree)


def fix_mtimes(tree: Path, mtime: int = FIXED_MTIME) -> None:
    """Every entry under `tree` (not following symlinks) gets `mtime`."""
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in [*dirnames, *filenames]:
            os.utime(os.path.join(dirpath, name), (mtime, mtime), follow_symlinks=False)
    os.utime(tree, (mtime, mtime))


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


def tar_tree(tree: Path, out: Path, *, reproducible: bool = False) -> None:
    """A POSIX tar of `tree` whose member names are as docker and buildkit write them
    (`usr/bin/x`: no `./` prefix, no entry for the root; soci's `--prefetch-files` finds no
    file in a layer named the other way). `reproducible`: owners 0/0 and no atime/ctime
    records, so the tar depends only on the tree's content and mtimes."""
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)  # a fresh machine has no bench cache yet
    cmd = ["tar", "--format=posix", "--xattrs", "--numeric-owner", "--sort=name"]
    if reproducible:
        cmd += ["--pax-option=delete=atime,delete=ctime", "--owner=0", "--group=0"]
    subprocess.run(
        [*cmd, "-C", str(tree), "-cf", str(tmp), "--", *sorted(os.listdir(tree))],
        check=True,
        capture_output=True,
    )
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


def recipe_layer(name: str, recipe: list[str], build: Callable[[Path], None]) -> LayerFile:
    """A layer built from `recipe` by `build(tree)`, cached as its gzip blob only: the tree
    and the tar are deleted once the blob and its metadata are written."""
    key = f"{name}-{_recipe_key(recipe)}"
    marker = CACHE / "layers" / f"recipe-{key}.json"
    if marker.exists():
        m = json.loads(marker.read_text())
        blob = CACHE / "layers" / (m["diff_id"].split(":")[1] + ".tar.gz")
        if blob.exists():
            return LayerFile(blob, m["digest"], m["size"], m["diff_id"], m["tar_size"])
    tree = CACHE / f"{key}-tree"
    built = tree.with_name(tree.name + ".done")
    tar = CACHE / f"{key}.tar"
    if not tar.exists():
        if not built.exists():
            shutil.rmtree(tree, ignore_errors=True)
            tree.mkdir(parents=True)
            build(tree)
            built.touch()
        log(f"tar {tree}")
        tar_tree(tree, tar, reproducible=True)
    shutil.rmtree(tree, ignore_errors=True)
    built.unlink(missing_ok=True)
    log(f"gzip {tar} ({tar.stat().st_size / 1e9:.1f} GB)")
    layer = gzip_layer(tar)
    marker.write_text(json.dumps({"diff_id": layer.diff_id, "digest": layer.digest,
                                  "size": layer.size, "tar_size": layer.tar_size}))  # fmt: skip
    tar.unlink()
    return layer


def base_layer() -> LayerFile:
    """The debootstrap rootfs (tests/fixtures/debootstrap.py) as one layer."""
    return tree_layer(debian_rootfs(), "base-rootfs")


def image_layers(name: str) -> list[LayerFile]:
    base = base_layer()
    if name == "python":
        return [base]
    if name == "ml":
        tree = ml_tree()
        return [base, tree_layer(tree, tree.name)]
    if name == "ml-large":
        return [base, recipe_layer(name, ML_LARGE_REQUIREMENTS, ml_large_tree)]
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
            with contextlib.suppress(OSError):  # a copy when the cache spans filesystems
                layout.blob_path(layer.digest).parent.mkdir(parents=True, exist_ok=True)
                os.link(layer.blob, layout.blob_path(layer.digest))
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
    names = sys.argv[1:] or list(WORKLOADS)
    for name in names:
        desc, layers = write_layout(CACHE / "layout", name)
        total = sum(layer.size for layer in layers)
        log(f"{name}: {desc.digest} {len(layers)} layers, {total / 1e6:.0f} MB compressed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
