"""Time to ready: containerd's overlayfs, pysoci and the real soci, side by side, cold.

Run as root: `python -m bench.startup` (`make bench`). Images come from bench/images.py (built
locally, cached in /var/cache/pysoci-bench); the registry runs in a network namespace behind a
veth shaped with tc tbf and a proxy adding 10 ms per request and counting bytes (bench/netns.py).

For every network rate × image, cold runs rotate through the modes (the mode that goes first
rotates too). A cold run starts a fresh node — a fresh containerd (empty root and state) and a
fresh snapshotter daemon (empty root) — drops the page cache, then times from the start of
the pull to the first output line of the container that says it is ready:

- `overlayfs`:     containerd 1.6's own snapshotter: `ctr image pull --plain-http REF:plain`,
                   then `ctr run REF:plain`;
- `pysoci`:        `ctr-remote image rpull --plain-http --snapshotter soci REF:soci` (the image
                   indexed by `pysoci convert`), then `ctr run --snapshotter soci REF:soci`
                   (containerd 1.6, pysoci with its default configuration);
- `pysoci+prefetch`: a first cold node pulls `REF:soci` and runs the workload (pysoci records
                   its start), `pysoci prefetch push` publishes the recording as SOCI
                   prefetch artifacts (`REF:soci-prefetch`); each cold run is then a fresh
                   node (no recording of its own) pulling that, as `pysoci`.
- `soci`:          the real soci-snapshotter-grpc v0.16.1 with containerd v1.7.35 (both built
                   from the Go module proxy by scripts/go-tools.sh):
                   `nerdctl --snapshotter soci pull REF:soci-v2` (the image indexed by the real
                   `soci convert`, a SOCI v2 index, what a soci v0.16 node finds by default),
                   then `ctr run --snapshotter soci` (containerd 1.7's ctr); soci's defaults,
                   plus a resolver mirror entry saying the registry speaks plain HTTP;
- `soci+prefetch`: the same on `REF:soci-v2-prefetch`, converted with `soci convert
                   --prefetch-files-json` from the files the workload reads (bench/filelist.py;
                   the fewest of them that map to the same spans, bench/soci_prefetch.py: soci
                   leaks memory per file), and soci's `[prefetch] enable = true` (off by
                   default in v0.16) with `mount_timeout_sec = 900` (soci prefetches inside
                   the mount; past the default 30 s the mount fails and containerd pulls the
                   whole layer: bench/nodes.py).

Bytes are the proxy's count of response-body bytes served: `at ready` when the ready line
appeared, `total` when the container has exited (postgres: stopped) — for the lazy modes that
is NOT the whole image: both daemons' background fetchers wait 30 s of quiet, which no run
here reaches. The daemon (pysoci: `pysoci serve` and the `pysoci data-plane run` it starts,
a process of its own that outlives serve — every node stops both; soci: soci-snapshotter-grpc)
is sampled from the pull to the container's exit (bench/usage.py): CPU seconds and peak RSS,
summed and per process.
After each cold run the same image is run once more on the same node (`warm`: everything
local and in the page cache).

Once per image, `bytes read` = the compressed bytes of the spans the workload touched: a pysoci
run with background fetching off and no read-ahead, summing the layers' `fetchedSize`. The
physical limit of a mode = bytes it must move / link rate + its warm time (overlayfs: the whole
compressed image; the lazy modes: the bytes read). That run's spans are also told apart by
why they were fetched (bench/gating.py): what the header checks of gated entries cost.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import queue
import shutil
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import filelist, gating, images, ocipush, soci_prefetch, usage
from bench.netns import ShapedRegistry
from bench.nodes import (
    SOCI_VERSION,
    Node,
    PysociNode,
    SociNode,
    cleanup_dir,
    go_tools,
    runc_root,
)

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
RESULTS = HERE / "results"
WORK = Path(os.environ.get("PYSOCI_BENCH_WORK", "/var/tmp/pysoci-bench"))
PYSOCI = str(Path(sys.executable).with_name("pysoci"))
NETWORKS = {"1gbit": 1_000_000_000, "200mbit": 200_000_000}
READY_TIMEOUT = 900.0


@dataclass(frozen=True)
class Mode:
    name: str
    node: str
    """`pysoci`: containerd 1.6 + pysoci serve; `soci`: containerd 1.7 + soci-snapshotter-grpc."""
    tag: str
    """The tag pulled (bench.startup.publish pushes or converts it)."""
    lazy: bool
    """Pulled and run with the `soci` proxy snapshotter (else containerd's overlayfs)."""
    prefetch: bool = False


MODE_SPECS = {
    m.name: m
    for m in (
        Mode("overlayfs", "pysoci", "plain", False),
        Mode("pysoci", "pysoci", "soci", True),
        Mode("pysoci+prefetch", "pysoci", "soci-prefetch", True, prefetch=True),
        Mode("soci", "soci", "soci-v2", True),
        Mode("soci+prefetch", "soci", "soci-v2-prefetch", True, prefetch=True),
    )
}
MODES = tuple(MODE_SPECS)


@dataclass(frozen=True)
class ImageDefaults:
    networks: tuple[str, ...] = tuple(NETWORKS)
    runs: int = 5


# The seeds' scale costs minutes per overlayfs run: 3 runs at 1 Gbit/s are enough for it.
IMAGE_DEFAULTS = {"ml-large": ImageDefaults(networks=("1gbit",), runs=3)}
IMAGES = ("python", "ml", "postgres", "ml-large")


def log(msg: str) -> None:
    print(f"[startup {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def run(*args: str, timeout: float = 900, env: dict[str, str] | None = None) -> str:
    res = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:5])}... exited {res.returncode}: {res.stderr[-2000:]}")
    return res.stdout


# --- registry content ---------------------------------------------------------------------------


@dataclass
class Image:
    name: str
    repo: str
    """`HOST/NAME` on the pull side (through the proxy)."""
    layers: list[images.LayerFile]
    manifest: str = ""
    manifest_desc: Any = None
    files: list[str] = field(default_factory=list)
    """What the workload reads before ready (prefetch modes only; bench/filelist.py)."""
    prefetch: dict[str, Any] = field(default_factory=dict)
    """What `:soci-v2-prefetch` prefetches (soci_prefetch_image)."""
    pysoci_prefetch: dict[str, Any] = field(default_factory=dict)
    """What the first node recorded for `:soci-prefetch` (pysoci_prefetch_image)."""

    @property
    def lazy_layers(self) -> int:
        """Layers both converters index (`--min-layer-size` 10 MiB, their default)."""
        return sum(1 for layer in self.layers if layer.size >= 10 << 20)

    @property
    def compressed(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def uncompressed(self) -> int:
        return sum(layer.tar_size for layer in self.layers)


def publish(
    reg: ShapedRegistry, names: list[str], modes: tuple[str, ...] = ("overlayfs", "pysoci")
) -> dict[str, Image]:
    """Push every image (`:plain`) and its conversions the modes pull, unless already there:
    `:soci` (`pysoci convert`), `:soci-v2` and `:soci-v2-prefetch` (the real `soci convert`)."""
    layout = images.CACHE / "layout"
    marker_path = reg.workdir / "published.json"
    marker: dict[str, str] = json.loads(marker_path.read_text()) if marker_path.exists() else {}
    tags = {MODE_SPECS[m].tag for m in modes}
    out = {}
    for name in names:
        desc, layers = images.write_layout(layout, name)
        image = Image(name, f"{reg.pull_host}/{name}", layers, desc.digest, desc)
        dst = f"{reg.push_host}/{name}"
        if marker.get(name) != desc.digest:
            log(f"push {name} and convert it with pysoci")
            run("skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:{name}",
                f"docker://{dst}:plain", timeout=3600)  # fmt: skip
            build = WORK / "convert"
            shutil.rmtree(build, ignore_errors=True)
            run(PYSOCI, "convert", f"{dst}:plain", f"{dst}:soci", "--plain-http", "--root",
                str(build), "-q", timeout=3600)  # fmt: skip
            shutil.rmtree(build, ignore_errors=True)
            marker[name] = desc.digest
            marker_path.write_text(json.dumps(marker, indent=1))
        if any(MODE_SPECS[m].prefetch for m in modes):
            image.files = filelist.workload_files(name, layers, desc.digest, WORK)
        if tags & {"soci-v2", "soci-v2-prefetch"}:  # the prefetch list is mapped on its zTOCs
            key = f"{desc.digest} soci {SOCI_VERSION}"
            if marker.get(f"{name}:soci-v2") != key:
                log(f"{name}: soci convert → :soci-v2")
                soci_convert(reg, name, desc, "soci-v2", None)
                marker[f"{name}:soci-v2"] = key
                marker_path.write_text(json.dumps(marker, indent=1))
        if "soci-v2-prefetch" in tags:
            image.prefetch = soci_prefetch_image(reg, image, marker)
            marker_path.write_text(json.dumps(marker, indent=1))
        if "soci-prefetch" in tags:  # recorded by this pysoci: never taken from the marker
            image.pysoci_prefetch = pysoci_prefetch_image(reg, image)
        out[name] = image
    return out


def pysoci_prefetch_image(reg: ShapedRegistry, image: Image) -> dict[str, Any]:
    """`:soci-prefetch`: a first cold node (containerd 1.6 + pysoci, defaults) pulls `:soci`
    and runs the workload to its end, recording its start; `pysoci prefetch push` then
    publishes the recording as SOCI prefetch artifacts in a new SOCI index of the image,
    tagged `:soci-prefetch`, which every `pysoci+prefetch` cold run pulls on a fresh node.
    Returns what `pysoci prefetch show` said was recorded."""
    wl = images.WORKLOADS[image.name]
    ref = f"{image.repo}:soci"
    node = PysociNode(WORK / "record", reg.pull_host)
    try:
        node.pull(ref, True, READY_TIMEOUT)
        start_and_wait(node, ref, "record", True, wl)
        root = str(node.pysoci.root)
        # A layer's recording ends once its reads went quiet ([prefetch] quiet_period_sec).
        deadline = time.monotonic() + 120
        while True:
            shown = json.loads(run(PYSOCI, "prefetch", "show", ref, "--root", root, "--json"))
            layers = [la for r in shown["recordings"] for la in r["layers"]]
            if layers and all(la["state"] != "recording" for la in layers):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{image.name}: the recording did not end: {layers!r:.300}")
            time.sleep(1)
        log(
            f"{image.name}: pysoci prefetch push → :soci-prefetch "
            f"({sum(len(la['spans']) for la in layers)} spans in {len(layers)} layers)"
        )
        run(PYSOCI, "prefetch", "push", ref, "--root", root, "--dst", f"{image.repo}:soci-prefetch",
            "--plain-http", timeout=1800)  # fmt: skip
        return {
            "layers": len(layers),
            "spans": sum(len(la["spans"]) for la in layers),
            "span_bytes": sum(la["span_bytes"] for la in layers),
            "files": sum(len(la["files"]) for la in layers),
        }
    finally:
        node.close()


def soci_prefetch_image(
    reg: ShapedRegistry, image: Image, marker: dict[str, str]
) -> dict[str, Any]:
    """`:soci-v2-prefetch`: `soci convert --prefetch-files-json` of the workload's files (the
    fewest that map to the same spans: bench/soci_prefetch.py), checked against what soci
    pushed. Returns what it prefetches (files, spans, compressed bytes)."""
    name = image.name
    layer_digests = [la.digest for la in image.layers]
    tocs = soci_prefetch.layer_tocs(reg.push_host, name, "soci-v2")
    ranges = soci_prefetch.ranges_of(image.files, layer_digests, tocs)
    want = soci_prefetch.expected_spans(ranges)
    cover = soci_prefetch.covering_files(ranges)
    info = {
        "files": len(image.files),
        "files_found": len(ranges),
        "files_given_to_soci": len(cover),
        "spans": sum(len(v) for v in want.values()),
        "compressed_bytes": sum(tocs[d].compressed_bytes(v) for d, v in want.items()),
    }
    key = (
        f"{image.manifest} soci {SOCI_VERSION} files "
        + hashlib.sha256("\n".join(cover).encode()).hexdigest()[:16]
    )
    if marker.get(f"{name}:soci-v2-prefetch") != key:
        log(f"{name}: soci convert → :soci-v2-prefetch ({len(image.files)} files read; "
            f"{len(cover)} of them name the same {info['spans']} spans)")  # fmt: skip
        soci_convert(reg, name, image.manifest_desc, "soci-v2-prefetch", cover)
        got = soci_prefetch.artifact_spans(reg.push_host, name, "soci-v2-prefetch")
        if got != want:
            raise RuntimeError(
                f"{name}: soci's prefetch artifacts name {sum(map(len, got.values()))} spans, "
                f"the file list maps to {info['spans']}"
            )
        marker[f"{name}:soci-v2-prefetch"] = key
    return info


def soci_convert(
    reg: ShapedRegistry, name: str, desc: Any, tag: str, files: list[str] | None
) -> None:
    """`soci convert --standalone` of the image (soci's defaults: 4 MiB spans, layers from
    10 MiB), pushed as `NAME:TAG` (a SOCI v2 image: an index of the image and its SOCI index)."""
    soci_bin, _ = go_tools()
    work = WORK / "soci-convert"
    shutil.rmtree(work, ignore_errors=True)
    src, dst, tmp = work / "in", work / "out", work / "tmp"
    tmp.mkdir(parents=True)
    src_layout = images.CACHE / "layout"
    blobs = [desc.digest]
    manifest = json.loads((src_layout / "blobs" / "sha256" / desc.digest[7:]).read_text())
    blobs += [manifest["config"]["digest"], *(la["digest"] for la in manifest["layers"])]
    for digest in blobs:
        target = src / "blobs" / "sha256" / digest[7:]
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(src_layout / "blobs" / "sha256" / digest[7:], target)
    (src / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (src / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": desc.media_type, "digest": desc.digest, "size": desc.size}]}))  # fmt: skip
    cmd = [str(soci_bin / "soci"), "convert", "--standalone", "--format", "oci-dir"]
    if files is not None:
        (work / "prefetch.json").write_text(json.dumps(files))
        cmd += ["--prefetch-files-json", str(work / "prefetch.json")]
    try:
        run_bounded([*cmd, str(src), str(dst)], {**os.environ, "TMPDIR": str(tmp)})
        ocipush.push_layout(dst, reg.push_host, name, tag)
    finally:
        shutil.rmtree(work, ignore_errors=True)


SOCI_CONVERT_RSS_LIMIT = 12 * 2**30


def run_bounded(cmd: list[str], env: dict[str, str], timeout: float = 3600) -> None:
    """Run `cmd`, killed if its RSS passes SOCI_CONVERT_RSS_LIMIT: `soci convert` with prefetch
    files does not free what it decodes per file (see bench/soci_prefetch.py), and an OOM kill
    on this shared machine could hit someone else's process."""
    log_path = WORK / "soci-convert.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    peak = 0
    while proc.poll() is None:
        peak = max(peak, usage.rss_bytes(proc.pid))
        if peak > SOCI_CONVERT_RSS_LIMIT or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            limit = SOCI_CONVERT_RSS_LIMIT / 2**30
            raise RuntimeError(
                f"{cmd[1]} stopped at {peak / 2**30:.1f} GiB RSS (limit {limit:.0f}) "
                f"or by the timeout; its output: {log_path}"
            )
        time.sleep(0.2)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(cmd[:3])} exited {proc.returncode}: {tail}")
    log(f"{' '.join(Path(c).name for c in cmd[:2])}: peak RSS {peak / 2**30:.1f} GiB")


# --- one run ------------------------------------------------------------------------------------


@dataclass
class RunResult:
    image: str
    network: str
    mode: str
    index: int
    ready_s: float = 0.0
    pull_s: float = 0.0
    bytes_at_ready: int = 0
    bytes_total: int = 0
    requests_at_ready: int = 0
    fetched_at_ready: int = 0
    """pysoci: the layers' fetchedSize sum at ready."""
    warm_s: float = 0.0
    daemon_cpu_s: float = 0.0
    """The snapshotter daemon's process tree, pull start → container exit."""
    daemon_cpu_ready_s: float = 0.0
    """The same, pull start → ready."""
    daemon_cpu_warm_s: float = 0.0
    """The same during the warm run (everything in the daemon's cache and the page cache)."""
    daemon_rss_peak: int = 0
    daemon_procs: int = 0
    daemon_parts_cpu_s: dict[str, float] = field(default_factory=dict)
    """Each daemon process's own CPU seconds (pysoci: `serve`, `data-plane`)."""
    daemon_parts_rss_peak: dict[str, int] = field(default_factory=dict)
    containerd_cpu_s: float = 0.0
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def make_node(mode: Mode, reg: ShapedRegistry, pysoci_config: str = "") -> Node:
    wd = WORK / "run"
    if mode.node == "soci":
        return SociNode(wd, reg.pull_host, prefetch=mode.prefetch)
    return PysociNode(wd, reg.pull_host, pysoci_config)


class Container:
    """`ctr run` of one workload, its output watched for the ready line."""

    def __init__(self, node: Node, ref: str, cid: str, lazy: bool, wl: images.Workload):
        self.node, self.cid, self.wl = node, cid, wl
        cmd = [node.ctr_bin, "--address", str(node.address), "run", "--rm",
               "--runc-root", str(runc_root(node.wd))]  # fmt: skip
        if lazy:
            cmd += ["--snapshotter", "soci"]
        cmd += [ref, cid, *wl.args]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.lines: queue.Queue[tuple[float, str] | None] = queue.Queue()
        self.output: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put((time.perf_counter(), raw.decode(errors="replace").rstrip()))
        self.lines.put(None)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> float:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no ready line in {timeout} s: {self.output[-20:]}")
            try:
                item = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if item is None:
                self.proc.wait(30)
                raise RuntimeError(
                    f"container exited ({self.proc.returncode}) before ready: {self.output[-30:]}"
                )
            stamp, line = item
            self.output.append(line)
            if self.wl.is_ready(line):
                return stamp

    def finish(self, timeout: float = 120) -> None:
        """Let it exit (or stop it), bounded."""
        if not self.wl.exits:
            self.node.ctr("task", "kill", "-s", "SIGTERM", self.cid, check=False, timeout=30)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(wait=30)
        self.reader.join(10)

    def kill(self, wait: float = 20) -> None:
        """SIGKILL the task through containerd; kill `ctr run` itself if that does not end it."""
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.node.ctr("task", "kill", "-s", "SIGKILL", self.cid, check=False, timeout=30)
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_and_wait(node: Node, ref: str, cid: str, lazy: bool, wl: images.Workload) -> float:
    """Run the container to its ready line; the perf_counter stamp of that line."""
    c = Container(node, ref, cid, lazy, wl)
    try:
        stamp = c.wait_ready()
        c.finish()
        return stamp
    finally:
        c.kill()


def cold_run(
    reg: ShapedRegistry,
    image: Image,
    mode: str,
    res: RunResult,
    *,
    pysoci_config: str = "",
    warm: bool = True,
    profile: Path | None = None,
) -> RunResult:
    """One cold run (and a warm one after it); `profile`: py-spy pysoci serve up to ready."""
    spec = MODE_SPECS[mode]
    wl = images.WORKLOADS[image.name]
    node = make_node(spec, reg, pysoci_config)
    spy: subprocess.Popen[bytes] | None = None
    mon: usage.Monitor | None = None
    try:
        drop_caches()
        res.extra["loadavg_before"] = os.getloadavg()[0]
        pids = node.daemon_pids()
        if profile is not None:  # serve, with --subprocesses: the data plane too
            spy = start_py_spy(next(iter(pids.values())), profile)
        cd_cpu0 = usage.cpu_seconds(node.containerd_pid())
        mon = usage.Monitor(pids)
        b0, r0 = reg.bytes_served(), reg.requests()
        m0 = time.monotonic()
        t0 = time.perf_counter()
        ref = f"{image.repo}:{spec.tag}"
        node.pull(ref, spec.lazy, READY_TIMEOUT)
        res.pull_s = time.perf_counter() - t0
        c = Container(node, ref, "cold", spec.lazy, wl)
        try:
            stamp = c.wait_ready()
            res.bytes_at_ready = reg.bytes_served() - b0
            res.requests_at_ready = reg.requests() - r0
            res.ready_s = stamp - t0
            mon.mark("ready")
            if spec.lazy:
                res.fetched_at_ready = node.fetched()
                node.check_lazy(OUT, image.lazy_layers)
            if spy is not None:
                stop_py_spy(spy)
                spy = None
            c.finish()
        finally:
            c.kill()
        time.sleep(0.5)
        res.bytes_total = reg.bytes_served() - b0
        records = reg.log_since(m0)
        res.extra |= blob_traffic(records)
        if REQUESTS_DIR is not None:
            REQUESTS_DIR.mkdir(parents=True, exist_ok=True)
            name = f"requests-{image.name}-{res.network}-{mode}-{res.index}.json"
            (REQUESTS_DIR / name).write_text(json.dumps([r.__dict__ for r in records]))
        u = mon.stop()
        mon = None
        res.daemon_cpu_s, res.daemon_cpu_ready_s = u.cpu_s, u.marks.get("ready", 0.0)
        res.daemon_rss_peak, res.daemon_procs = u.rss_peak, u.procs
        res.daemon_parts_cpu_s, res.daemon_parts_rss_peak = u.parts_cpu_s, u.parts_rss_peak
        res.containerd_cpu_s = usage.cpu_seconds(node.containerd_pid()) - cd_cpu0
        res.extra["ready_line"] = next((x for x in c.output if wl.is_ready(x)), "")
        if warm:
            mon = usage.Monitor(pids)
            t1 = time.perf_counter()
            res.warm_s = start_and_wait(node, ref, "warm", spec.lazy, wl) - t1
            res.daemon_cpu_warm_s = mon.stop().cpu_s
            mon = None
        return res
    finally:
        if mon is not None:
            mon.stop()
        if spy is not None:
            stop_py_spy(spy)
        node.close()


REQUESTS_DIR: Path | None = None
"""--keep-requests: where every cold run's request log goes (OUT/requests-*.json)."""


def blob_traffic(records: list[Any]) -> dict[str, int]:
    """Blob bytes served vs the distinct bytes they cover (a range asked twice counts once)."""
    served = 0
    ranges: dict[str, list[tuple[int, int]]] = {}
    for r in records:
        if r.kind != "blob" or r.method != "GET" or r.bytes <= 0:
            continue
        served += r.bytes
        start = 0
        if r.range and r.range.startswith("bytes="):
            with contextlib.suppress(ValueError):
                start = int(r.range[6:].split("-", 1)[0])
        ranges.setdefault(r.path, []).append((start, start + r.bytes))
    distinct = 0
    for spans in ranges.values():
        end = -1
        for a, b in sorted(spans):
            if b > end:
                distinct += b - max(a, end)
                end = b
    return {"blob_bytes": served, "blob_distinct_bytes": distinct, "blob_gets": sum(
        len(v) for v in ranges.values())}  # fmt: skip


def start_py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy (from .venv) sampling `pid` at 200 Hz into collapsed stacks (`--format raw`)."""
    spy = str(Path(sys.executable).with_name("py-spy"))
    proc = subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw", "--idle",
         "--nonblocking", "--threads", "--subprocesses", "--output", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(0.5)  # attached before the clock starts
    return proc


def stop_py_spy(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(2)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


NO_BACKGROUND = "[background_fetch]\ndisable = true\n[fetch]\nreadahead_spans = 0\n"


def measure_read(reg: ShapedRegistry, image: Image, network: str) -> RunResult:
    """Compressed bytes of the spans the workload touches (no background, no read-ahead),
    and why each was fetched (bench/gating.py: what the header checks cost)."""
    res = RunResult(image.name, network, "pysoci-read", 0)
    m0 = time.monotonic()
    cold_run(reg, image, "pysoci", res, pysoci_config=NO_BACKGROUND, warm=False)
    try:
        files = filelist.workload_files(image.name, image.layers, image.manifest, WORK)
        tocs = soci_prefetch.layer_tocs(reg.push_host, image.name, "soci")
        layers = [la.digest for la in image.layers]
        res.extra["spans_by_cause"] = gating.classify(reg.log_since(m0), tocs, layers, files)
    except Exception:  # the figure is extra: the bytes read stand without it
        log(traceback.format_exc())
    return res


# --- the whole benchmark ------------------------------------------------------------------------


def machine(modes: tuple[str, ...]) -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    out = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "containerd": run("containerd", "--version").strip(),
        "pysoci_commit": git("rev-parse", "HEAD"),
        "pysoci_dirty_files": len(git("status", "--porcelain", "snapshotter").splitlines()),
    }
    if any(MODE_SPECS[m].node == "soci" for m in modes):
        soci_bin, cd_bin = go_tools()
        out["soci"] = run(str(soci_bin / "soci"), "--version").strip()
        out["containerd_soci"] = run(str(cd_bin / "containerd"), "--version").strip()
    return out


def git(*args: str) -> str:
    """Read-only git queries about the code being measured."""
    res = subprocess.run(["git", "-C", str(HERE.parent), *args], capture_output=True, text=True)
    return res.stdout.strip()


def save(data: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "startup.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    tmp.rename(out / "startup.json")


def _csv(text: str, known: tuple[str, ...] | dict[str, Any], what: str) -> list[str]:
    items = [x for x in text.split(",") if x]
    bad = [x for x in items if x not in known]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (known: {', '.join(known)})")
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", default=",".join(IMAGES), help="comma-separated")
    parser.add_argument("--networks", default=",".join(NETWORKS),
                        help="comma-separated; an image runs on those of its defaults listed "
                        "(ml-large: 1gbit only) unless --all-networks")  # fmt: skip
    parser.add_argument("--all-networks", action="store_true")
    parser.add_argument("--modes", default=None,
                        help="comma-separated (default: all of them; pysoci+prefetch once "
                        "`pysoci prefetch` exists)")  # fmt: skip
    parser.add_argument("--runs", type=int, default=None,
                        help="cold runs per mode (default: 5; ml-large: 3)")  # fmt: skip
    parser.add_argument("--latency", type=float, default=0.010, help="seconds per request")
    parser.add_argument("--no-read", action="store_true",
                        help="skip the bytes-read measurement (no physical limit)")  # fmt: skip
    parser.add_argument("--keep-requests", action="store_true",
                        help="write each cold run's registry request log to OUT")  # fmt: skip
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--resume", action="store_true", help="keep runs in OUT/startup.json")
    parser.add_argument("--publish", action="store_true", help="copy table and chart to results/")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.startup needs root (network namespaces, mounts, containerd)", file=sys.stderr)
        return 2
    global REQUESTS_DIR
    REQUESTS_DIR = args.out if args.keep_requests else None
    names = _csv(args.images, images.WORKLOADS, "images")
    networks = _csv(args.networks, NETWORKS, "networks")
    modes = tuple(_csv(args.modes or ",".join(MODES), MODE_SPECS, "modes"))
    data: dict[str, Any] = {"runs": [], "read": {}}
    if args.resume and (args.out / "startup.json").exists():
        data = json.loads((args.out / "startup.json").read_text())
    started = time.monotonic()
    data.update(
        {
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine(modes),
            "latency_s": args.latency,
            "networks": {n: NETWORKS[n] for n in networks},
            "modes": list(modes),
        }
    )
    done = {(r["image"], r["network"], r["mode"], r["index"]) for r in data["runs"]}
    reg = ShapedRegistry(images.CACHE / "registry")
    try:
        reg.open()
        imgs = publish(reg, names, modes)
        data["images"] = data.get("images", {}) | {  # --resume keeps the other images'
            n: {
                "compressed": i.compressed,
                "uncompressed": i.uncompressed,
                "manifest": i.manifest,
                "layers": [asdict(layer) | {"blob": str(layer.blob)} for layer in i.layers],
                "prefetch_files": len(i.files),
                "soci_prefetch": i.prefetch,
                "pysoci_prefetch": i.pysoci_prefetch,
            }
            for n, i in imgs.items()
        }
        reg.set_latency(args.latency)
        for network in networks:
            reg.shape(NETWORKS[network])
            for name in names:
                defaults = IMAGE_DEFAULTS.get(name, ImageDefaults())
                if network not in defaults.networks and not args.all_networks:
                    continue
                image = imgs[name]
                if name not in data["read"] and not args.no_read:
                    log(f"{network} {name}: bytes read (no background, no read-ahead)")
                    try:
                        data["read"][name] = asdict(measure_read(reg, image, network))
                    except Exception:
                        log(traceback.format_exc())
                    save(data, args.out)
                runs = args.runs if args.runs is not None else defaults.runs
                for i in range(runs):
                    k = i % len(modes)
                    for mode in modes[k:] + modes[:k]:
                        if (name, network, mode, i) in done:
                            continue
                        res = RunResult(name, network, mode, i)
                        try:
                            cold_run(reg, image, mode, res)
                        except Exception as e:
                            res.error = f"{type(e).__name__}: {e}"[:3000]
                            log(traceback.format_exc())
                        log(
                            f"{network} {name} {mode} #{i}: ready {res.ready_s:.2f} s "
                            f"(pull {res.pull_s:.2f}), {res.bytes_at_ready / 1e6:.1f} MB at "
                            f"ready, {res.bytes_total / 1e6:.1f} MB total, warm "
                            f"{res.warm_s:.2f} s, daemon {res.daemon_cpu_s:.2f} CPU s "
                            f"(warm {res.daemon_cpu_warm_s:.2f}) "
                            f"{res.daemon_rss_peak / 2**20:.0f} MiB peak "
                            f"(load {res.extra.get('loadavg_before', 0):.1f}) {res.error[:200]}"
                        )
                        data["runs"].append(asdict(res))
                        save(data, args.out)
    finally:
        reg.close()
        cleanup_dir(WORK / "run")
    data["elapsed_s"] = data.get("elapsed_s", 0) + time.monotonic() - started
    save(data, args.out)
    from bench import report

    report.write(data, args.out, publish=args.publish)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
