"""Lazy filesystem benchmarks: cold reads, warm reads, background fill rate, daemon memory.

Run as root with `python -m bench.lazyfs` (`make bench-lazyfs`). Everything runs on 127.0.0.1:
a docker-registry on a free port behind the fault proxy (tests/fixtures/fault_proxy.py, in this
process), which adds 10 ms before every response, caps the bandwidth and counts the bytes it
serves. Every figure is a ratio against a baseline measured in the same run; cold runs start
from an empty pysoci root and dropped page caches.

1. Cold read: the debootstrap rootfs (minbase + python3) as one gzip layer, converted with
   `pysoci convert`, mounted with `pysoci mount` (background fetcher off); time
   `chroot DIR python3 -c "import json, sqlite3, email"`. Bytes fetched / bytes of the files
   the workload opens (strace of the same command on the extracted tree), and time vs the same
   command on the extracted tree (ext4, warm and cold page cache) and vs a full pull (download
   the layer through the same proxy, extract it, run).
2. Warm sequential read of every file of the layer through FUSE (after a full background fill,
   page cache dropped) vs the extracted tree on ext4.
3. Background fill rate (silence period 0) vs the proxy's bandwidth cap.
4. Serving process RSS with a 100 000-file layer mounted, after mount and after a full walk,
   vs the same process serving a 10-file layer; the mount's time and its first read.
5. zTOCs of 100 000 and 1 000 000 entries: decode + tree build time and the memory the
   tree keeps per entry, each in a fresh process.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import json
import os
import platform
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapshotter.soci.zinfo import decode_zinfo
from snapshotter.soci.ztoc import Ztoc, decode_ztoc
from tests.fixtures.debootstrap import rootfs_tar
from tests.fixtures.fault_proxy import FaultProxy
from tests.fixtures.images import GZIP_LAYER, Layer, write_image
from tests.fixtures.registry import Registry, start_registry

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
OUT = HERE / "out"
PYSOCI = str(Path(sys.executable).with_name("pysoci"))
WORKLOAD = "import json, sqlite3, email; print('ready')"
LATENCY = 0.010
MB = 1_000_000
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


# --- results ------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table."""

    measure: str
    value: str
    baseline: str = ""
    ratio: str = ""
    target: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def step(self, name: str, fn: Callable[[], None]) -> None:
        """Run one step; a failure becomes a row of the table, not the end of the run."""
        t0 = time.perf_counter()
        print(f"== {name}", file=sys.stderr, flush=True)
        try:
            fn()
        except Exception as e:
            tb = traceback.format_exc()
            print(tb, file=sys.stderr, flush=True)
            self.data.setdefault("errors", {})[name] = tb
            self.rows.append(Row(f"{name}: FAILED", f"{type(e).__name__}: {e}"[:300]))
        print(f"   {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    def markdown(self) -> str:
        lines = ["| measure | value | baseline | ratio | target |", "|---|---|---|---|---|"]
        for r in self.rows:
            cells = [r.measure, r.value, r.baseline, r.ratio, r.target]
            cells = [c.replace("|", "\\|").replace("\n", " ") for c in cells]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def fmt_s(xs: list[float]) -> str:
    return f"{median(xs):.2f} s" + (f" ({min(xs):.2f}–{max(xs):.2f})" if len(xs) > 1 else "")


def mb(n: float) -> str:
    return f"{n / MB:.1f} MB"


# --- machine helpers ----------------------------------------------------------------------------


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def run(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> str:
    res = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])}... exited {res.returncode}: {res.stderr[-2000:]}")
    return res.stdout


def run_workload(root: Path) -> float:
    """Seconds of `chroot ROOT python3 -c WORKLOAD` (checks it prints ready)."""
    t0 = time.perf_counter()
    out = run("chroot", str(root), "/usr/bin/python3", "-c", WORKLOAD, env=ENV)
    dt = time.perf_counter() - t0
    if out.strip() != "ready":
        raise RuntimeError(f"workload printed {out!r}")
    return dt


def read_tree(root: Path) -> tuple[int, int, float]:
    """Read every regular file under root (sorted walk, 1 MiB reads): files, bytes, seconds."""
    buf = bytearray(1 << 20)
    files = total = 0
    t0 = time.perf_counter()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if not os.path.isfile(path) or os.path.islink(path):
                continue
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    total += n
            files += 1
    return files, total, time.perf_counter() - t0


def walk_lstat(root: Path) -> int:
    n = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))
            n += 1
    return n


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0])
    return out


# --- registry, images, mounts -------------------------------------------------------------------


@dataclass
class Env:
    work: Path
    registry: Registry
    proxy: FaultProxy
    cold_cap: float
    """Bandwidth cap of the cold runs, bytes/s."""

    def config(self, name: str, text: str) -> Path:
        path = self.work / f"{name}.toml"
        path.write_text(text)
        return path

    def fresh_root(self, name: str) -> Path:
        root = self.work / "roots" / name
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        return root


@dataclass
class Image:
    repo: str
    blob_digest: str
    blob_size: int
    layout: Path

    def ref(self, host: str, tag: str = "soci") -> str:
        return f"{host}/{self.repo}:{tag}"


def push_and_convert(env: Env, layer: Layer, repo: str, *, min_layer: str = "10MiB") -> Image:
    """Write a one-layer image, push it to the registry (directly) and convert it there."""
    layout = env.work / "layouts" / repo
    write_image(layout, "v1", [layer])
    src = f"{env.registry.host}/{repo}:v1"
    run("skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{src}")
    build = env.work / "build" / repo
    run(
        PYSOCI,
        "convert",
        src,
        f"{env.registry.host}/{repo}:soci",
        "--plain-http",
        "--root",
        str(build),
        "--min-layer-size",
        min_layer,
        "-q",
    )
    digest = "sha256:" + hashlib.sha256(layer.blob).hexdigest()
    return Image(repo, digest, len(layer.blob), layout)


@dataclass
class Mounted:
    target: Path
    root: Path
    mount_s: float

    @property
    def workdir(self) -> Path:
        dirs = [p.parent for p in self.root.glob("mounts/*/state.json")]
        if len(dirs) != 1:
            raise RuntimeError(f"expected one mount under {self.root}, found {dirs}")
        return dirs[0]

    @property
    def pid(self) -> int:
        return int(json.loads((self.workdir / "state.json").read_text())["pid"])

    def status(self) -> dict[str, Any]:
        files = list(self.workdir.glob("fuse/.status/*.json"))
        if len(files) != 1:
            raise RuntimeError(f"expected one layer status, found {files}")
        return dict(json.loads(files[0].read_text()))

    @property
    def layer_dir(self) -> Path:
        dirs = [p for p in (self.workdir / "fuse").iterdir() if p.name != ".status"]
        if len(dirs) != 1:
            raise RuntimeError(f"expected one layer directory, found {dirs}")
        return dirs[0]


@contextlib.contextmanager
def mounted(env: Env, ref: str, root: Path, config: Path) -> Iterator[Mounted]:
    """`pysoci mount`, always undone (unmount; failing that, kill and lazy-unmount)."""
    target = root / "rootfs"
    target.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        run(
            PYSOCI,
            "mount",
            ref,
            str(target),
            "--plain-http",
            "--root",
            str(root),
            "--config",
            str(config),
            timeout=300,
        )
        yield Mounted(target, root, time.perf_counter() - t0)
    finally:
        res = subprocess.run(
            [PYSOCI, "unmount", str(target), "--root", str(root)], capture_output=True, text=True
        )
        if res.returncode != 0:
            print(f"unmount {target}: {res.stderr.strip()}", file=sys.stderr)
            for state in root.glob("mounts/*/state.json"):
                with contextlib.suppress(Exception):
                    os.kill(int(json.loads(state.read_text())["pid"]), 9)
            subprocess.run(["umount", "-l", str(target)], capture_output=True)
            for fuse in root.glob("mounts/*/fuse"):
                subprocess.run(["fusermount3", "-u", "-z", str(fuse)], capture_output=True)


# --- workload files (strace) --------------------------------------------------------------------


def resolve_in_root(root: Path, path: str) -> Path | None:
    """`path` as a process chrooted at `root` (cwd /) sees it, symlinks followed inside root."""
    parts = [p for p in path.split("/") if p and p != "."]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p and p != "."] + parts
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


def elf_interpreter(path: Path) -> str | None:
    """PT_INTERP of a 64-bit little-endian ELF (the loader the kernel opens itself)."""
    data = path.read_bytes()[:65536]
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return None
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        ptype, _flags, offset, _va, _pa, filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        if ptype == 3:
            return data[offset : offset + filesz].rstrip(b"\0").decode()
    return None


def workload_files(root: Path, trace_out: Path) -> dict[str, int]:
    """Regular files the workload opens or executes in a chroot of `root`: path → size."""
    run(
        "strace",
        "-f",
        "-qq",
        "-e",
        "trace=openat,execve,chroot",
        "-o",
        str(trace_out),
        "chroot",
        str(root),
        "/usr/bin/python3",
        "-c",
        WORKLOAD,
        env=ENV,
    )
    after_chroot = False
    paths: list[str] = []
    skipped = 0
    for line in trace_out.read_text().splitlines():
        if " chroot(" in line and line.rstrip().endswith("= 0"):
            after_chroot = True
            continue
        if not after_chroot or "= -1" in line or "resumed>" in line:
            continue
        call = line.split(None, 1)[1] if line[0].isdigit() else line
        if call.startswith("openat(") or call.startswith("execve("):
            args = call.split("(", 1)[1]
            if call.startswith("openat(") and not args.startswith("AT_FDCWD"):
                skipped += 1
                continue
            start = args.index('"') + 1
            paths.append(args[start : args.index('"', start)])
    seen: dict[tuple[int, int], str] = {}
    exe = resolve_in_root(root, "/usr/bin/python3")
    interp = elf_interpreter(exe) if exe is not None else None
    for p in [*paths, *([interp] if interp else [])]:
        real = resolve_in_root(root, p)
        if real is None or not real.is_file():
            continue
        st = real.stat()
        seen.setdefault((st.st_dev, st.st_ino), str(real.relative_to(root)))
    if skipped:
        print(f"   strace: {skipped} openat relative to a dirfd not counted", file=sys.stderr)
    return {p: (root / p).stat().st_size for p in seen.values()}


def find_ztoc(build_root: Path, layer_size: int) -> Ztoc:
    """The zTOC `pysoci convert` stored in its content store for a layer of this size."""
    for blob in sorted(build_root.rglob("blobs/sha256/*")):
        if blob.stat().st_size > 64 << 20:
            continue
        data = blob.read_bytes()
        if data[:1] == b"{":
            continue
        with contextlib.suppress(Exception):
            ztoc = decode_ztoc(data)
            if ztoc.compressed_archive_size == layer_size:
                return ztoc
    raise RuntimeError(f"no zTOC for a {layer_size}-byte layer under {build_root}")


def span_floor(ztoc: Ztoc, names: list[str]) -> dict[str, int]:
    """The spans holding these files' bytes: how many, and their compressed bytes (the least a
    span-granular fetcher must download to read them whole)."""
    zinfo = decode_zinfo(
        ztoc.compression_algorithm,
        ztoc.checkpoints,
        compressed_size=ztoc.compressed_archive_size,
        uncompressed_size=ztoc.uncompressed_archive_size,
    )
    by_name = {f.name.lstrip("./").lstrip("/"): f for f in ztoc.files}
    spans: set[int] = set()
    missing = 0
    for name in names:
        f = by_name.get(name)
        if f is not None and f.type == "hardlink":
            f = by_name.get(f.linkname.lstrip("./").lstrip("/"))
        if f is None:
            missing += 1
            continue
        if f.uncompressed_size:
            spans.update(zinfo.spans_for_range(f.uncompressed_offset, f.uncompressed_size))
    compressed = 0
    for sp in spans:
        lo, hi = zinfo.compressed_bounds(sp)
        compressed += hi - lo
    return {
        "spans": len(spans),
        "spans_total": zinfo.num_spans,
        "compressed_bytes": compressed,
        "files_not_in_ztoc": missing,
    }


# --- image builders -----------------------------------------------------------------------------


def debian_layer() -> Layer:
    """The debootstrap rootfs tar as one plain gzip stream (pigz -6, no independent blocks)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tar = rootfs_tar()
    blob = CACHE / "debian-rootfs.tar.gz"
    if not blob.exists() or blob.stat().st_mtime < tar.stat().st_mtime:
        tmp = blob.with_suffix(".tmp")
        with open(tar, "rb") as src, open(tmp, "wb") as dst:
            subprocess.run(["pigz", "-6", "-n", "-c"], stdin=src, stdout=dst, check=True)
        tmp.rename(blob)
    h = hashlib.sha256()
    with open(tar, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return Layer(blob.read_bytes(), GZIP_LAYER, "sha256:" + h.hexdigest())


def many_files_layer(n: int, name: str) -> Layer:
    """A PAX tar of `n` small text files (1000 per directory), gzip'd; cached."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tar_path = CACHE / f"{name}.tar"
    if not tar_path.exists():
        rng = random.Random(n)
        words = [b"layer ", b"span ", b"ztoc ", b"checkpoint ", b"\n", b"soci "]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for i in range(n):
                d = f"d{i // 1000:04d}"
                if i % 1000 == 0:
                    info = tarfile.TarInfo(d)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
                    tar.addfile(info)
                data = b"".join(rng.choice(words) for _ in range(rng.randrange(0, 60)))
                info = tarfile.TarInfo(f"{d}/file-{i:06d}.txt")
                info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
        tmp = tar_path.with_suffix(".tmp")
        tmp.write_bytes(buf.getvalue())
        tmp.rename(tar_path)
    raw = tar_path.read_bytes()
    blob = subprocess.run(["pigz", "-6", "-n", "-c"], input=raw, capture_output=True, check=True)
    return Layer(blob.stdout, GZIP_LAYER, "sha256:" + hashlib.sha256(raw).hexdigest())


# --- the steps ----------------------------------------------------------------------------------


def full_pull(env: Env, image: Image, dest: Path) -> tuple[float, float]:
    """Download the layer through the proxy to a file, then extract it: (download s, total s)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    blob = dest.with_suffix(".tar.gz")
    t0 = time.perf_counter()
    url = f"{env.proxy.url}/v2/{image.repo}/blobs/{image.blob_digest}"
    with urllib.request.urlopen(url, timeout=600) as resp, open(blob, "wb") as f:
        shutil.copyfileobj(resp, f, 1 << 20)
    t_download = time.perf_counter() - t0
    run("tar", "--numeric-owner", "-xzf", str(blob), "-C", str(dest))
    total = time.perf_counter() - t0
    blob.unlink()
    return t_download, total


def step_cold(env: Env, report: Report, image: Image, extracted: Path, repeat: int) -> None:
    proxy = env.proxy
    proxy.set_latency(LATENCY)
    cap = env.cold_cap
    proxy.set_bandwidth(cap)
    # What the workload opens, and its size.
    files = workload_files(extracted, env.work / "strace.txt")
    opened = sum(files.values())
    floor = span_floor(find_ztoc(env.work / "build" / image.repo, image.blob_size), list(files))
    # Baselines on the extracted tree (ext4): warm and cold page cache.
    run_workload(extracted)
    warm = [run_workload(extracted) for _ in range(repeat)]
    cold = []
    for _ in range(repeat):
        drop_caches()
        cold.append(run_workload(extracted))
    # Full pull through the same proxy (download to a file, then extract, as containerd does).
    pulls: list[float] = []
    downloads: list[float] = []
    pull_ready: list[float] = []
    for _ in range(repeat):
        drop_caches()
        d, total = full_pull(env, image, env.work / "pulled")
        downloads.append(d)
        pulls.append(total)
        pull_ready.append(total + run_workload(env.work / "pulled"))
    shutil.rmtree(env.work / "pulled", ignore_errors=True)
    # Lazy: empty root, dropped caches, mount, run.
    lazy = cold_lazy(env, image, repeat, "[background_fetch]\ndisable = true\n")
    no_ra = cold_lazy(
        env,
        image,
        repeat,
        "[background_fetch]\ndisable = true\n[fetch]\nreadahead_spans = 0\n",
    )
    report.data["cold"] = {
        "workload": WORKLOAD,
        "opened_files": files,
        "opened_bytes": opened,
        "span_floor": floor,
        "layer_bytes": image.blob_size,
        "ext4_warm_s": warm,
        "ext4_cold_s": cold,
        "full_pull_download_s": downloads,
        "full_pull_download_extract_s": pulls,
        "full_pull_ready_s": pull_ready,
        "lazy": lazy,
        "lazy_readahead_0": no_ra,
        "bandwidth": cap,
        "latency_s": LATENCY,
    }
    served_run, served_mount = lazy["proxy_bytes_workload"], lazy["proxy_bytes_mount"]
    fetched, requests = lazy["fetched_size"], lazy["blob_gets"]
    lazy_run, lazy_ready, lazy_mount = lazy["workload_s"], lazy["ready_s"], lazy["mount_s"]
    sr, fs = median(served_run), median(fetched)
    net = f"{cap * 8 / MB:.0f} Mbit/s, {LATENCY * 1000:.0f} ms"
    report.rows += [
        Row(
            "cold: bytes fetched during workload (proxy) / bytes of files opened",
            f"{mb(sr)} (+ {mb(median(served_mount))} at mount; {median(requests):.0f} blob GETs)",
            f"{mb(opened)} in {len(files)} files (layer {mb(image.blob_size)} gzip)",
            f"{sr / opened:.2f}",
            "",
        ),
        Row(
            "cold: bytes fetched during workload / the compressed spans holding the opened "
            "files (span-granular floor)",
            mb(sr),
            f"{mb(floor['compressed_bytes'])} ({floor['spans']} of {floor['spans_total']} "
            "4 MiB spans)",
            f"{sr / floor['compressed_bytes']:.2f}",
            "",
        ),
        Row(
            "cold: layer fetchedSize (status) / bytes of files opened",
            mb(fs),
            mb(opened),
            f"{fs / opened:.2f}",
            "",
        ),
        Row(
            f"cold: workload time, lazy mount ({net}) / ext4 cold page cache",
            fmt_s(lazy_run),
            fmt_s(cold),
            f"{median(lazy_run) / median(cold):.2f}",
            "",
        ),
        Row(
            "cold: workload time, lazy mount / ext4 warm page cache",
            fmt_s(lazy_run),
            fmt_s(warm),
            f"{median(lazy_run) / median(warm):.2f}",
            "",
        ),
        Row(
            "cold: time to ready, lazy (mount + workload) / full pull "
            "(download + extract + workload)",
            f"{fmt_s(lazy_ready)} (mount {median(lazy_mount):.2f} s)",
            f"{fmt_s(pull_ready)} (download {median(downloads):.2f} s)",
            f"{median(lazy_ready) / median(pull_ready):.2f}",
            "< 1",
        ),
        Row(
            "cold, `[fetch] readahead_spans = 0`: bytes fetched during workload / bytes opened",
            mb(median(no_ra["proxy_bytes_workload"])),
            mb(opened),
            f"{median(no_ra['proxy_bytes_workload']) / opened:.2f}",
            "",
        ),
        Row(
            "cold, `readahead_spans = 0`: workload time / with the default readahead (2)",
            fmt_s(no_ra["workload_s"]),
            fmt_s(lazy_run),
            f"{median(no_ra['workload_s']) / median(lazy_run):.2f}",
            "",
        ),
    ]


def cold_lazy(env: Env, image: Image, repeat: int, config_text: str) -> dict[str, Any]:
    """Cold runs of the workload in a lazy mount: empty root, dropped caches, mount, run."""
    proxy = env.proxy
    config = env.config("cold", config_text)
    out: dict[str, list[Any]] = {
        k: []
        for k in (
            "mount_s",
            "workload_s",
            "ready_s",
            "proxy_bytes_mount",
            "proxy_bytes_workload",
            "fetched_size",
            "blob_gets",
            "blob_requests",
        )
    }
    for i in range(repeat):
        root = env.fresh_root(f"cold{i}")
        drop_caches()
        proxy.reset_stats()
        t0 = time.perf_counter()
        with mounted(env, image.ref(proxy.host), root, config) as m:
            b0 = proxy.stats.bytes_served
            dt = run_workload(m.target)
            out["ready_s"].append(time.perf_counter() - t0)
            proxy.wait_idle()
            stats = proxy.stats
            out["mount_s"].append(m.mount_s)
            out["workload_s"].append(dt)
            out["proxy_bytes_mount"].append(b0)
            out["proxy_bytes_workload"].append(stats.bytes_served - b0)
            out["fetched_size"].append(int(m.status()["fetchedSize"]))
            out["blob_gets"].append(stats.count("GET", "blob"))
            out["blob_requests"].append(
                [
                    {"range": r.range, "bytes": r.bytes, "at": r.started, "s": r.seconds}
                    for r in stats.log
                    if r.kind == "blob"
                ]
            )
        shutil.rmtree(root, ignore_errors=True)
    return out


def fill(env: Env, image: Image, root: Path, cap: float) -> tuple[Mounted, Any, dict[str, Any]]:
    """Mount with the background fetcher on (silence 0) and wait for fetchedPercent 100.

    Returns the mount context (still mounted: the caller exits it), and the results."""
    proxy = env.proxy
    proxy.set_latency(LATENCY)
    proxy.set_bandwidth(cap)
    config = env.config("fill", "[background_fetch]\nsilence_period_msec = 0\n")
    drop_caches()
    proxy.reset_stats()
    t_start = time.monotonic()
    ctx = mounted(env, image.ref(proxy.host), root, config)
    m = ctx.__enter__()
    try:
        deadline = time.monotonic() + 60 + 10 * image.blob_size / cap
        status: dict[str, Any] = {}
        t_full = t_complete = None
        while time.monotonic() < deadline:
            status = m.status()
            now = time.monotonic()
            if t_full is None and float(status.get("fetchedPercent", 0)) >= 100:
                t_full = now
            if status.get("state") in ("complete", "error"):
                t_complete = now
                break
            time.sleep(0.02)
        if t_full is None:
            raise RuntimeError(f"layer not filled in time: {status}")
        # Then the background fetcher keeps the spans decompressed on disk ([cache]
        # keep_inflated): the warm reads start once it is done.
        t_inflated = None
        while time.monotonic() < deadline and t_complete is not None:
            status = m.status()
            if status.get("spansInflated", 0) >= status.get("spansTotal", 0):
                t_inflated = time.monotonic()
                break
            time.sleep(0.02)
        proxy.wait_idle()
        stats = proxy.stats
        ranged = [r for r in stats.log if r.kind == "blob" and r.range is not None]
        t_first = min(r.started for r in ranged)
        rate = image.blob_size / (t_full - t_first)
        res = {
            "cap": cap,
            "mount_s": m.mount_s,
            "first_range_after_s": t_first - t_start,
            "fill_s": t_full - t_first,
            "complete_after_fill_s": (t_complete - t_full) if t_complete else None,
            "inflated_after_complete_s": (
                (t_inflated - t_complete) if t_inflated and t_complete else None
            ),
            "rate": rate,
            "ratio": rate / cap,
            "bytes_served": stats.bytes_served,
            "ranged_requests": len(ranged),
            "status": status,
        }
        return m, ctx, res
    except BaseException:
        ctx.__exit__(None, None, None)
        raise


def step_fill_and_warm(
    env: Env, report: Report, image: Image, extracted: Path, cap: float, repeat: int, warm: bool
) -> None:
    root = env.fresh_root(f"fill{int(cap)}")
    m, ctx, res = fill(env, image, root, cap)
    try:
        report.data.setdefault("fill", []).append(res)
        report.rows.append(
            Row(
                f"background fill rate / link cap ({cap * 8 / MB:.0f} Mbit/s, "
                f"{LATENCY * 1000:.0f} ms per request)",
                f"{res['rate'] / MB:.1f} MB/s ({mb(image.blob_size)} in {res['fill_s']:.2f} s, "
                f"{res['ranged_requests']} requests)",
                f"{cap / MB:.1f} MB/s",
                f"{res['ratio']:.2f}",
                "≥ 0.8",
            )
        )
        if warm:
            report.step("warm read", lambda: step_warm(report, m, extracted, repeat))
    finally:
        ctx.__exit__(None, None, None)
        shutil.rmtree(root, ignore_errors=True)


def step_warm(report: Report, m: Mounted, extracted: Path, repeat: int) -> None:
    """Read every file: once right after the background work ended (fill, whole-layer check,
    spans kept decompressed on disk), then `repeat` times alternating ext4, DIR and the FUSE
    layer directory (the daemon's memory cache of inflated spans is then warm if the layer fits
    it). Page cache dropped each time."""
    drop_caches()
    first = read_tree(m.target)
    ext4: list[float] = []
    mount: list[float] = []
    layer: list[float] = []
    sizes: dict[str, tuple[int, int]] = {"first": first[:2]}
    for _ in range(repeat):
        for name, path, out in (
            ("ext4", extracted, ext4),
            ("mount", m.target, mount),
            ("layer", m.layer_dir, layer),
        ):
            drop_caches()
            files, total, dt = read_tree(path)
            sizes[name] = (files, total)
            out.append(dt)
    if len(set(sizes.values())) != 1:
        raise RuntimeError(f"the trees differ: {sizes}")
    report.data["warm"] = {
        "first_after_fill_s": first[2],
        "ext4_s": ext4,
        "mount_s": mount,
        "layer_dir_s": layer,
        "files_bytes": sizes,
        "status": m.status(),
    }
    files, total = sizes["ext4"]

    def rate(xs: list[float]) -> str:
        return f"{total / median(xs) / MB:.0f} MB/s ({fmt_s(xs)})"

    what = f"({files} files, {mb(total)}; page cache dropped)"
    report.rows += [
        Row(
            f"warm read of every file, first after the background fill {what}: "
            "pysoci mount DIR / ext4",
            rate([first[2]]),
            rate(ext4),
            f"{median(ext4) / first[2]:.2f}",
            "≥ 0.5",
        ),
        Row(
            "warm read of every file, again (daemon memory cache warm): pysoci mount DIR / ext4",
            rate(mount),
            rate(ext4),
            f"{median(ext4) / median(mount):.2f}",
            "≥ 0.5",
        ),
        Row(
            "same, through the FUSE layer directory (the overlay lowerdir path) / ext4",
            rate(layer),
            rate(ext4),
            f"{median(ext4) / median(layer):.2f}",
            "≥ 0.5",
        ),
    ]


def step_memory(env: Env, report: Report, n: int) -> None:
    config = env.config("memory", "[background_fetch]\ndisable = true\n")
    env.proxy.set_bandwidth(None)
    env.proxy.set_latency(0)
    results: dict[str, Any] = {}
    for name, count in (("small", 10), ("many", n)):
        layer = many_files_layer(count, f"files-{count}")
        image = push_and_convert(env, layer, f"files{count}", min_layer="0")
        root = env.fresh_root(f"mem-{name}")
        with mounted(env, image.ref(env.registry.host), root, config) as m:
            # The tree is built after the mount returns: the first read waits for it.
            t0 = time.perf_counter()
            first = next(p for p in sorted((m.target / "d0000").iterdir()) if p.is_file())
            first.read_bytes()
            first_read_s = time.perf_counter() - t0
            time.sleep(0.5)
            after_mount = rss_kib(m.pid)
            t0 = time.perf_counter()
            entries = walk_lstat(m.target)
            walk_s = time.perf_counter() - t0
            time.sleep(0.2)
            after_walk = rss_kib(m.pid)
        shutil.rmtree(root, ignore_errors=True)
        results[name] = {
            "files": count,
            "entries_walked": entries,
            "layer_bytes": image.blob_size,
            "mount_s": m.mount_s,
            "first_read_s": first_read_s,
            "walk_s": walk_s,
            "after_mount_kib": after_mount,
            "after_walk_kib": after_walk,
        }
    report.data["memory"] = results
    small, many = results["small"], results["many"]
    for when in ("after_mount_kib", "after_walk_kib"):
        a, b = many[when]["VmRSS"], small[when]["VmRSS"]
        label = "after mount" if when == "after_mount_kib" else "after os.walk + lstat of all"
        report.rows.append(
            Row(
                f"daemon RSS, {n} files {label}",
                f"{a / 1024:.0f} MB ({(a - b) * 1024 / n:.0f} B/file over baseline"
                + (f"; walk {many['walk_s']:.1f} s" if when == "after_walk_kib" else "")
                + ")",
                f"{b / 1024:.0f} MB (10-file layer)",
                f"{a / b:.2f}",
                "",
            )
        )
    small_ready = small["mount_s"] + small["first_read_s"]
    report.rows.append(
        Row(
            f"`pysoci mount` of the {n}-file layer, then its first read (lookups wait for the "
            "tree, built after the mount returns)",
            f"mount {many['mount_s']:.2f} s + first read {many['first_read_s']:.3f} s",
            f"mount {small['mount_s']:.2f} s + first read {small['first_read_s']:.3f} s "
            "(10-file layer)",
            f"{(many['mount_s'] + many['first_read_s']) / small_ready:.2f}",
            "",
        )
    )
    report.rows.append(
        Row(
            f"daemon peak RSS (VmHWM), {n} files",
            f"{many['after_walk_kib']['VmHWM'] / 1024:.0f} MB",
            f"{small['after_walk_kib']['VmHWM'] / 1024:.0f} MB",
            f"{many['after_walk_kib']['VmHWM'] / small['after_walk_kib']['VmHWM']:.2f}",
            "",
        )
    )


_ZTOC_PROBE = """
import ctypes, json, sys, time
from snapshotter.soci.ztoc import decode_ztoc
from snapshotter.fs.tree import build_tree
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
base = rss()
blob = open(sys.argv[1], "rb").read()
t0 = time.perf_counter()
z = decode_ztoc(blob)
t1 = time.perf_counter()
tree = build_tree(z, 3)
t2 = time.perf_counter()
n = len(z.files)
del z, blob
ctypes.CDLL(None).malloc_trim(0)
print(json.dumps({"entries": n, "inodes": len(tree), "decode_s": t1 - t0, "build_s": t2 - t1,
                  "rss_per_entry": (rss() - base) / n}))
"""


def synthetic_ztoc(n: int) -> Path:
    """A zTOC of n entries shaped like a Python site-packages layer (1000 files a
    directory, names of about 50 bytes, 1 KiB files); cached."""
    path = CACHE / f"ztoc-{n}.bin"
    if path.exists():
        return path
    from snapshotter.soci.ztoc import CompressionAlgorithm, FileMetadata, encode_ztoc

    CACHE.mkdir(parents=True, exist_ok=True)
    files = []
    offset = 0
    t = "2023-11-14T22:13:20Z"
    for i in range(n):
        d = f"usr/lib/python3/dist-packages/pkg{i // 1000:04d}"
        if i % 1000 == 0:
            files.append(FileMetadata(d + "/", "dir", offset + 512, 0, mode=0o755, mod_time=t))
            offset += 512
        files.append(
            FileMetadata(
                f"{d}/module_{i:07d}.py", "reg", offset + 512, 1000, mode=0o644, mod_time=t
            )
        )
        offset += 512 + 1024
    z = Ztoc(
        "0.9",
        "bench",
        1,
        offset + 1024,
        files,
        CompressionAlgorithm.GZIP,
        0,
        ["sha256:" + "0" * 64],
        b"",
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(encode_ztoc(z))
    tmp.rename(path)
    return path


def step_ztoc(report: Report, sizes: Sequence[int]) -> None:
    """Decode + tree build time and retained memory per entry, each in a fresh process."""
    results = {}
    for n in sizes:
        path = synthetic_ztoc(n)
        out = run(sys.executable, "-c", _ZTOC_PROBE, str(path), timeout=1800)
        results[n] = json.loads(out)
    report.data["ztoc"] = results
    base = results[sizes[0]]
    for n in sizes:
        r = results[n]
        total = r["decode_s"] + r["build_s"]
        report.rows.append(
            Row(
                f"zTOC of {n} entries ({path_size(n)}): decode + tree build, daemon memory kept",
                f"{total:.2f} s (decode {r['decode_s']:.2f} + build {r['build_s']:.2f}); "
                f"{r['rss_per_entry']:.0f} B/entry",
                f"{base['decode_s'] + base['build_s']:.2f} s for {sizes[0]} entries",
                f"{total / (base['decode_s'] + base['build_s']):.2f} ({n / sizes[0]:.0f}x entries)",
                "≤ 3 s for 1M; ≤ 200 B/entry",
            )
        )


def path_size(n: int) -> str:
    p = CACHE / f"ztoc-{n}.bin"
    return mb(p.stat().st_size) if p.exists() else "?"


# --- main ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mbit", type=float, default=200, help="link cap of the cold runs")
    ap.add_argument("--fill-mbit", type=float, nargs="+", default=[200, 800])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument(
        "--only",
        nargs="+",
        choices=["cold", "fill", "memory", "ztoc"],
        default=["cold", "fill", "memory", "ztoc"],
    )
    ap.add_argument("--ztoc-entries", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench.lazyfs needs root (FUSE, overlayfs, chroot, drop_caches)")
    for tool in ("docker-registry", "skopeo", "pigz", "strace", "chroot"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    report = Report()
    report.data.update(
        machine=f"{platform.node()} {os.cpu_count()} cpu {platform.machine()}",
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    base = Path("/var/tmp")
    work = Path(tempfile.mkdtemp(prefix="pysoci-bench-", dir=base))
    with contextlib.ExitStack() as stack:
        if not args.keep:
            stack.callback(shutil.rmtree, work, True)
        registry = start_registry(work / "registry")
        stack.callback(registry.stop)
        proxy = FaultProxy.start(registry.url)
        stack.callback(proxy.stop)
        env = Env(work, registry, proxy, args.mbit * MB / 8)
        holder: dict[str, Any] = {}

        def prepare() -> None:
            layer = debian_layer()
            holder["image"] = push_and_convert(env, layer, "debian")
            extracted = work / "extracted"
            extracted.mkdir()
            run(
                "tar",
                "--numeric-owner",
                "-xzf",
                str(CACHE / "debian-rootfs.tar.gz"),
                "-C",
                str(extracted),
            )
            holder["extracted"] = extracted

        if "cold" in args.only or "fill" in args.only:
            report.step("prepare debian image", prepare)
        if "image" in holder:
            image, extracted = holder["image"], holder["extracted"]
            if "cold" in args.only:
                report.step(
                    "cold read", lambda: step_cold(env, report, image, extracted, args.repeat)
                )
            if "fill" in args.only:
                for i, mbit in enumerate(args.fill_mbit):
                    report.step(
                        f"background fill {mbit:.0f} Mbit/s",
                        functools.partial(
                            step_fill_and_warm,
                            env,
                            report,
                            image,
                            extracted,
                            mbit * MB / 8,
                            args.repeat,
                            i == 0,
                        ),
                    )
        if "memory" in args.only:
            report.step("daemon memory", lambda: step_memory(env, report, args.files))
        if "ztoc" in args.only:
            report.step("zTOC decode and tree", lambda: step_ztoc(report, args.ztoc_entries))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "lazyfs.json").write_text(json.dumps(report.data, indent=2, default=str))
    md = report.markdown()
    (OUT / "lazyfs.md").write_text(md + "\n")
    print(md)
    if args.keep:
        print(f"work directory kept: {work}", file=sys.stderr)
    return 1 if "errors" in report.data else 0


if __name__ == "__main__":
    raise SystemExit(main())
