"""Time to ready: containerd's overlayfs (full pull, then run) vs pysoci (lazy pull, then run).

Run as root: `python -m bench.startup` (`make bench`). Images come from bench/images.py (built
locally, cached in /var/cache/pysoci-bench); the registry runs in a network namespace behind a
veth shaped with tc tbf and a proxy adding 10 ms per request and counting bytes (bench/netns.py).

For every network rate × image, cold runs alternate between the modes (the mode that goes first
alternates too). A cold run starts a fresh containerd (empty root and state) and a fresh
`pysoci serve` (empty root), drops the page cache, then times from the start of the pull to the
first output line of the container that says it is ready:

- `overlayfs`: `ctr image pull --plain-http REF:plain`, then `ctr run REF:plain`;
- `pysoci`:    `ctr-remote image rpull --plain-http --snapshotter soci REF:soci`, then
               `ctr run --snapshotter soci REF:soci` (pysoci with its default configuration).

Bytes are the proxy's count of response-body bytes served: `at ready` when the ready line
appeared, `total` when the container has exited (postgres: stopped) — for pysoci that is NOT the
whole image: its background fetcher starts after 30 s of quiet, which no run here reaches.
After each cold run the same image is run once more on the same containerd (`warm`: everything
local and in the page cache).

Once per image, `bytes read` = the compressed bytes of the spans the workload touched: a pysoci
run with background fetching off and no read-ahead, summing the layers' `fetchedSize`. The
physical limit of a mode = bytes it must move / link rate + its warm time (overlayfs: the whole
compressed image; pysoci: the bytes read).
"""

from __future__ import annotations

import argparse
import contextlib
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

from bench import images
from bench.netns import ShapedRegistry
from tests.fixtures.containerd import Containerd, Pysoci, start_containerd

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
RESULTS = HERE / "results"
WORK = Path(os.environ.get("PYSOCI_BENCH_WORK", "/var/tmp/pysoci-bench"))
PYSOCI = str(Path(sys.executable).with_name("pysoci"))
NETWORKS = {"1gbit": 1_000_000_000, "200mbit": 200_000_000}
MODES = ("overlayfs", "pysoci")
READY_TIMEOUT = 900.0


def log(msg: str) -> None:
    print(f"[startup {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def run(*args: str, timeout: float = 900) -> str:
    res = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
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

    @property
    def compressed(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def uncompressed(self) -> int:
        return sum(layer.tar_size for layer in self.layers)


def publish(reg: ShapedRegistry, names: list[str]) -> dict[str, Image]:
    """Push every image (`:plain`) and its SOCI conversion (`:soci`) unless already there."""
    layout = images.CACHE / "layout"
    marker_path = reg.workdir / "published.json"
    marker: dict[str, str] = json.loads(marker_path.read_text()) if marker_path.exists() else {}
    out = {}
    for name in names:
        desc, layers = images.write_layout(layout, name)
        if marker.get(name) != desc.digest:
            log(f"push {name} and convert it")
            dst = f"{reg.push_host}/{name}"
            run("skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:{name}",
                f"docker://{dst}:plain", timeout=1800)  # fmt: skip
            build = WORK / "convert"
            shutil.rmtree(build, ignore_errors=True)
            run(PYSOCI, "convert", f"{dst}:plain", f"{dst}:soci", "--plain-http", "--root",
                str(build), "-q", timeout=1800)  # fmt: skip
            shutil.rmtree(build, ignore_errors=True)
            marker[name] = desc.digest
            marker_path.write_text(json.dumps(marker, indent=1))
        out[name] = Image(name, f"{reg.pull_host}/{name}", layers)
    return out


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
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Rig:
    """A fresh pysoci + containerd under one work directory (torn down by `close`)."""

    def __init__(self, reg: ShapedRegistry, wd: Path, pysoci_config: str) -> None:
        self.wd = wd
        cleanup_dir(wd)
        wd.mkdir(parents=True)
        certs = wd / "certs.d" / reg.pull_host
        certs.mkdir(parents=True)
        (certs / "hosts.toml").write_text(f'server = "http://{reg.pull_host}"\n')
        config = wd / "pysoci.toml"
        config.write_text(f'[registry]\nconfig_path = "{wd / "certs.d"}"\n{pysoci_config}')
        self.pysoci = Pysoci(wd / "pysoci", wd / "pysoci.sock", wd / "pysoci.log", config)
        self.cd: Containerd | None = None
        self.pysoci.start()
        self.cd = start_containerd(wd / "cd", wd / "pysoci.sock")

    def fetched(self) -> int:
        total = 0
        for p in (self.pysoci.root / "fuse" / ".status").glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                total += int(json.loads(p.read_text())["fetchedSize"])
        return total

    def check_lazy(self) -> None:
        """A pysoci run that served no layer lazily measures nothing: fail it, keep the log."""
        lazy = list((self.pysoci.root / "fuse" / ".status").glob("*.json"))
        if lazy:
            return
        OUT.mkdir(parents=True, exist_ok=True)
        kept = OUT / f"pysoci-not-lazy-{time.strftime('%H%M%S')}.log"
        shutil.copyfile(self.pysoci.log, kept)
        raise RuntimeError(f"pysoci served no layer lazily (its log: {kept})")

    def close(self) -> None:
        try:
            if self.cd is not None:
                self.cd.stop()
        finally:
            try:
                self.pysoci.stop_all()
            finally:
                cleanup_dir(self.wd)


def cleanup_dir(wd: Path) -> None:
    """Unmount everything under `wd` (deepest first), then remove it. runc keeps container
    state outside it, by container id: what a killed run left of ours goes too."""
    for cid in ("cold", "warm"):
        subprocess.run(
            ["runc", "--root", "/run/containerd/runc/default", "delete", "-f", cid],
            capture_output=True,
            check=False,
        )
    prefix = str(wd) + "/"
    for _ in range(5):
        mounts = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                point = line.split()[4].replace("\\040", " ")
                if point.startswith(prefix) or point == str(wd):
                    mounts.append(point)
        if not mounts:
            break
        for point in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    shutil.rmtree(wd, ignore_errors=True)


class Container:
    """`ctr run` of one workload, its output watched for the ready line."""

    def __init__(self, cd: Containerd, ref: str, cid: str, mode: str, wl: images.Workload):
        self.cd, self.cid, self.wl = cd, cid, wl
        cmd = ["ctr", "--address", str(cd.address), "run", "--rm"]
        if mode == "pysoci":
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
            self.cd.ctr("task", "kill", "-s", "SIGTERM", self.cid, check=False, timeout=30)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(wait=30)
        self.reader.join(10)

    def kill(self, wait: float = 20) -> None:
        """SIGKILL the task through containerd; kill `ctr run` itself if that does not end it."""
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.cd.ctr("task", "kill", "-s", "SIGKILL", self.cid, check=False, timeout=30)
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def pull(cd: Containerd, mode: str, image: Image) -> str:
    if mode == "overlayfs":
        ref = f"{image.repo}:plain"
        cd.ctr("image", "pull", "--plain-http", ref, timeout=READY_TIMEOUT)
    else:
        ref = f"{image.repo}:soci"
        cd.ctr_remote(
            "image", "rpull", "--plain-http", "--snapshotter", "soci", ref, timeout=READY_TIMEOUT
        )
    return ref


def start_and_wait(cd: Containerd, ref: str, cid: str, mode: str, wl: images.Workload) -> float:
    """Run the container to its ready line; the perf_counter stamp of that line."""
    c = Container(cd, ref, cid, mode, wl)
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
    wl = images.WORKLOADS[image.name]
    rig = Rig(reg, WORK / "run", pysoci_config)
    spy: subprocess.Popen[bytes] | None = None
    try:
        assert rig.cd is not None and rig.pysoci.proc is not None
        drop_caches()
        res.extra["loadavg_before"] = os.getloadavg()[0]
        if profile is not None:
            spy = start_py_spy(rig.pysoci.proc.pid, profile)
        b0, r0 = reg.bytes_served(), reg.requests()
        t0 = time.perf_counter()
        ref = pull(rig.cd, mode, image)
        res.pull_s = time.perf_counter() - t0
        c = Container(rig.cd, ref, "cold", mode, wl)
        try:
            stamp = c.wait_ready()
            res.bytes_at_ready = reg.bytes_served() - b0
            res.requests_at_ready = reg.requests() - r0
            res.ready_s = stamp - t0
            if mode == "pysoci":
                res.fetched_at_ready = rig.fetched()
                rig.check_lazy()
            if spy is not None:
                stop_py_spy(spy)
                spy = None
            c.finish()
        finally:
            c.kill()
        time.sleep(0.5)
        res.bytes_total = reg.bytes_served() - b0
        res.extra["ready_line"] = next((x for x in c.output if wl.is_ready(x)), "")
        if warm:
            t1 = time.perf_counter()
            res.warm_s = start_and_wait(rig.cd, ref, "warm", mode, wl) - t1
        return res
    finally:
        if spy is not None:
            stop_py_spy(spy)
        rig.close()


def start_py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy (from .venv) sampling `pid` at 200 Hz into collapsed stacks (`--format raw`)."""
    spy = str(Path(sys.executable).with_name("py-spy"))
    proc = subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw", "--idle",
         "--nonblocking", "--threads", "--output", str(out)],
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
    """Compressed bytes of the spans the workload touches (no background, no read-ahead)."""
    res = RunResult(image.name, network, "pysoci-read", 0)
    return cold_run(reg, image, "pysoci", res, pysoci_config=NO_BACKGROUND, warm=False)


# --- the whole benchmark ------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "containerd": run("containerd", "--version").strip(),
        "pysoci_commit": git("rev-parse", "HEAD"),
        "pysoci_dirty_files": len(git("status", "--porcelain", "snapshotter").splitlines()),
    }


def git(*args: str) -> str:
    """Read-only git queries about the code being measured."""
    res = subprocess.run(["git", "-C", str(HERE.parent), *args], capture_output=True, text=True)
    return res.stdout.strip()


def save(data: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "startup.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    tmp.rename(out / "startup.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", default="python,ml,postgres")
    parser.add_argument("--networks", default=",".join(NETWORKS))
    parser.add_argument("--runs", type=int, default=5, help="cold runs per mode")
    parser.add_argument("--latency", type=float, default=0.010, help="seconds per request")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--resume", action="store_true", help="keep runs in OUT/startup.json")
    parser.add_argument("--publish", action="store_true", help="copy table and chart to results/")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.startup needs root (network namespaces, mounts, containerd)", file=sys.stderr)
        return 2
    names = [n for n in args.images.split(",") if n]
    networks = [n for n in args.networks.split(",") if n]
    data: dict[str, Any] = {"runs": [], "read": {}}
    if args.resume and (args.out / "startup.json").exists():
        data = json.loads((args.out / "startup.json").read_text())
    data.update(
        {
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine(),
            "latency_s": args.latency,
            "networks": {n: NETWORKS[n] for n in networks},
        }
    )
    done = {(r["image"], r["network"], r["mode"], r["index"]) for r in data["runs"]}
    reg = ShapedRegistry(images.CACHE / "registry")
    try:
        reg.open()
        imgs = publish(reg, names)
        data["images"] = {
            n: {
                "compressed": i.compressed,
                "uncompressed": i.uncompressed,
                "layers": [asdict(layer) | {"blob": str(layer.blob)} for layer in i.layers],
            }
            for n, i in imgs.items()
        }
        reg.set_latency(args.latency)
        for network in networks:
            reg.shape(NETWORKS[network])
            for name in names:
                image = imgs[name]
                if name not in data["read"]:
                    log(f"{network} {name}: bytes read (no background, no read-ahead)")
                    try:
                        data["read"][name] = asdict(measure_read(reg, image, network))
                    except Exception:
                        log(traceback.format_exc())
                    save(data, args.out)
                for i in range(args.runs):
                    order = MODES if i % 2 == 0 else MODES[::-1]
                    for mode in order:
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
                            f"{res.warm_s:.2f} s {res.error[:200]}"
                        )
                        data["runs"].append(asdict(res))
                        save(data, args.out)
    finally:
        reg.close()
        cleanup_dir(WORK / "run")
    from bench import report

    report.write(data, args.out, publish=args.publish)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
