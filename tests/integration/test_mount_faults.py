"""The lazy filesystem against registry faults, end to end: `pysoci mount` through the fault
proxy in front of a real registry. Reads fail cleanly (EIO) or return correct bytes — never
wrong bytes — and other layers keep being served; the layer works again once the registry
is back. Also: random reads while the background fetcher fills the layers.
"""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.fault_proxy import Fault, FaultProxy, blob_get
from tests.fixtures.images import Layer, write_image
from tests.fixtures.registry import Registry, start_registry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE, overlayfs)")
PYSOCI = str(Path(sys.executable).with_name("pysoci"))


def _layer(prefix: str, seed: int) -> tuple[bytes, dict[str, bytes]]:
    rng = random.Random(seed)
    files = {f"{prefix}/f{i}": rng.randbytes(rng.randrange(50_000, 400_000)) for i in range(24)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue(), files


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, dict[str, bytes]]]:
    tmp = tmp_path_factory.mktemp("faults")
    reg = start_registry(tmp / "registry")
    tar_a, files_a = _layer("a", 1)
    tar_b, files_b = _layer("b", 2)
    write_image(tmp / "src", "v1", [Layer.from_tar(tar_a), Layer.from_tar(tar_b)])
    ref = f"{reg.host}/faults:v1"
    subprocess.run(
        ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{tmp}/src:v1", f"docker://{ref}"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    subprocess.run(
        [
            PYSOCI,
            "convert",
            ref,
            f"{reg.host}/faults:soci",
            "--plain-http",
            "--root",
            str(tmp / "build"),
            "--min-layer-size",
            "1KiB",
            "--span-size",
            "64KiB",
            "-q",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    yield reg, {**files_a, **files_b}
    reg.stop()


@pytest.fixture
def mount(
    tmp_path: Path, image: tuple[Registry, dict[str, bytes]]
) -> Iterator[tuple[FaultProxy, Path, Path]]:
    """The image mounted through a fresh proxy; background fetching per the test's config."""
    reg, _ = image
    proxy = FaultProxy.start(reg.url)
    target = tmp_path / "rootfs"
    root = tmp_path / "root"
    try:
        yield proxy, target, root
    finally:
        subprocess.run([PYSOCI, "unmount", str(target), "--root", str(root)], capture_output=True)
        proxy.stop()


def do_mount(proxy: FaultProxy, target: Path, root: Path, config: str) -> None:
    cfg = root.parent / "config.toml"
    cfg.write_text(config + "\n[http]\nMaxRetries = 2\nMinWaitMsec = 1\nMaxWaitMsec = 20\n")
    res = subprocess.run(
        [
            PYSOCI,
            "mount",
            f"{proxy.host}/faults:soci",
            str(target),
            "--plain-http",
            "--root",
            str(root),
            "--config",
            str(cfg),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr


def read_or_eio(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as e:
        assert e.errno == 5, e  # EIO, nothing else
        return None


def test_corruption_never_reaches_a_reader(
    mount: tuple[FaultProxy, Path, Path], image: tuple[Registry, dict[str, bytes]]
) -> None:
    proxy, target, root = mount
    _, files = image
    do_mount(proxy, target, root, "[background_fetch]\ndisable = true")
    # Every ranged blob GET corrupted: reads fail, none returns wrong bytes.
    handle = proxy.add_fault(Fault(kind="corrupt", match=blob_get(ranged=True)))
    for name in ["a/f3", "b/f5"]:
        assert read_or_eio(target / name) is None
    handle.remove()
    # Corrupted once: the span is refetched and the bytes are right.
    proxy.add_fault(Fault(kind="corrupt", match=blob_get(ranged=True), times=1))
    for name in ["a/f3", "b/f5", "a/f10"]:
        assert (target / name).read_bytes() == files[name]


def test_registry_down_slow_and_truncating(
    mount: tuple[FaultProxy, Path, Path], image: tuple[Registry, dict[str, bytes]]
) -> None:
    proxy, target, root = mount
    _, files = image
    do_mount(proxy, target, root, "[background_fetch]\ndisable = true")
    assert (target / "a/f0").read_bytes() == files["a/f0"]  # cached from here on
    proxy.down(True)
    assert read_or_eio(target / "b/f20") is None  # not cached: EIO
    Path("/proc/sys/vm/drop_caches").write_text("3")  # so the next read reaches pysoci
    assert (target / "a/f0").read_bytes() == files["a/f0"]  # cached spans: still served
    proxy.down(False)
    assert (target / "b/f20").read_bytes() == files["b/f20"]  # back: works again
    proxy.set_latency(0.2)
    assert (target / "a/f15").read_bytes() == files["a/f15"]
    proxy.set_latency(0)
    proxy.add_fault(Fault(kind="truncate", match=blob_get(ranged=True), after=1000, times=2))
    got = read_or_eio(target / "b/f12")
    assert got is None or got == files["b/f12"]
    assert (target / "b/f12").read_bytes() == files["b/f12"]


def test_random_reads_while_the_background_fetcher_runs(
    mount: tuple[FaultProxy, Path, Path], image: tuple[Registry, dict[str, bytes]]
) -> None:
    proxy, target, root = mount
    _, files = image
    do_mount(proxy, target, root, "[background_fetch]\nsilence_period_msec = 0")
    proxy.set_bandwidth(4_000_000)  # slow enough that the fill overlaps the reads
    rng = random.Random(3)
    names = list(files)
    for _ in range(60):
        name = rng.choice(names)
        off = rng.randrange(len(files[name]))
        n = rng.randrange(1, 200_000)
        with open(target / name, "rb") as f:
            f.seek(off)
            assert f.read(n) == files[name][off : off + n]
    proxy.set_bandwidth(None)
