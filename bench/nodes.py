"""One cold node of the startup benchmark: a fresh containerd and a fresh snapshotter daemon.

- `PysociNode`: Debian's containerd 1.6 with `pysoci serve` as its `soci` proxy snapshotter
  (modes `overlayfs` — containerd's own snapshotter, pysoci idle — and `pysoci`).
- `SociNode`: containerd v1.7.35 with the real soci-snapshotter-grpc v0.16.1 as its `soci`
  proxy snapshotter (modes `soci`, `soci+prefetch`), both built from the Go module proxy by
  scripts/go-tools.sh (paths: tests/fixtures/gotools.py). Images are pulled with nerdctl,
  as soci's getting-started guide does.

Both live under one work directory, removed (mounts first) by `close()`, which stops every
daemon (pysoci: `serve` and its data plane, which outlives serve); both expose the daemon's
process ids by name (`daemon_pids`, for bench.usage), the containerd address and a `ctr`.
Containers run with a runc root inside the node's directory (`runc_root`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.fixtures import gotools
from tests.fixtures.containerd import Pysoci, start_containerd
from tests.fixtures.pysoci_config import pysoci_config

REPO = Path(__file__).resolve().parent.parent
SOCI_VERSION = gotools.SOCI_VERSION
NERDCTL = shutil.which("nerdctl") or "/usr/local/bin/nerdctl"
PYSOCI = str(Path(sys.executable).with_name("pysoci"))


def go_tools() -> tuple[Path, Path]:
    """The soci and containerd 1.7 bin directories, built by scripts/go-tools.sh if missing
    (idempotent and cached: a no-op when they are there)."""
    if gotools.missing_go_tools():
        subprocess.run([str(REPO / "scripts" / "go-tools.sh")], check=True, timeout=3600)
    gotools.require_go_tools()
    return gotools.SOCI_BIN, gotools.CONTAINERD_BIN


def _run(args: list[str], timeout: float, check: bool) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])}... exited {res.returncode}: {res.stderr[-3000:]}")
    return res


def _wait_for(path: Path, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {log.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{what} did not start: {log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def mounts_under(prefix: Path, fstype: str | None = None) -> list[str]:
    """Mount points at or below `prefix` (optionally of one filesystem type)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].replace("\\040", " ")
            sep = fields.index("-")
            if point != str(prefix) and not point.startswith(str(prefix) + "/"):
                continue
            if fstype is None or fields[sep + 1] == fstype:
                out.append(point)
    return out


def runc_root(wd: Path) -> Path:
    """runc's state of the node's containers: under the node's own directory, not runc's
    machine-wide default (where a fixed container id of another run would collide)."""
    return wd / "runc"


CONTAINER_IDS = ("cold", "warm", "record")


def cleanup_dir(wd: Path) -> None:
    """Stop what a killed run left under `wd` (its containers, a data plane serving
    `wd/pysoci`), unmount everything under it (deepest first), then remove it."""
    if runc_root(wd).is_dir():
        for cid in CONTAINER_IDS:
            subprocess.run(["runc", "--root", str(runc_root(wd)), "delete", "-f", cid],
                           capture_output=True, check=False)  # fmt: skip
    if (wd / "pysoci" / "data-plane.sock").exists():
        # the data plane outlives `pysoci serve`: stop the one of this root (by its socket)
        subprocess.run([PYSOCI, "data-plane", "stop", "--root", str(wd / "pysoci")],
                       capture_output=True, check=False, timeout=120)  # fmt: skip
    for _ in range(5):
        points = mounts_under(wd)
        if not points:
            break
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    shutil.rmtree(wd, ignore_errors=True)


def write_hosts(certs_d: Path, host: str) -> None:
    """containerd's `hosts.toml` saying `host` speaks plain HTTP."""
    d = certs_d / host
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts.toml").write_text(f'server = "http://{host}"\n[host."http://{host}"]\n')


class PysociNode:
    """Debian's containerd 1.6 + a fresh `pysoci serve` (default configuration + `extra`)."""

    kind = "pysoci"
    ctr_bin = "ctr"

    def __init__(self, wd: Path, pull_host: str, extra_config: str = "") -> None:
        self.wd = wd
        cleanup_dir(wd)
        wd.mkdir(parents=True)
        write_hosts(wd / "certs.d", pull_host)
        config = wd / "pysoci.toml"
        # The tests' free-space reserve: the default (10 % of the disk) would make the numbers
        # depend on how full this machine's disk is.
        config.write_text(
            pysoci_config(f'[registry]\nconfig_path = "{wd / "certs.d"}"\n', extra_config)
        )
        self.pysoci = Pysoci(wd / "pysoci", wd / "pysoci.sock", wd / "pysoci.log", config)
        self.pysoci.start()
        self.cd = start_containerd(wd / "cd", wd / "pysoci.sock")
        self.address = self.cd.address

    def ctr(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        return _run(["ctr", "--address", str(self.address), *args], timeout, check).stdout

    def pull(self, ref: str, lazy: bool, timeout: float) -> None:
        if lazy:
            _run(["ctr-remote", "--address", str(self.address), "image", "rpull", "--plain-http",
                  "--snapshotter", "soci", ref], timeout, True)  # fmt: skip
        else:
            self.ctr("image", "pull", "--plain-http", ref, timeout=timeout)

    def daemon_pids(self) -> dict[str, int]:
        """`pysoci serve` and the data plane it started (`pysoci data-plane run`, a process
        of its own that outlives serve): bench.usage sums both."""
        pids = {}
        if self.pysoci.proc is not None:
            pids["serve"] = self.pysoci.proc.pid
        dp = self.pysoci.data_plane_pid()
        if dp is not None:
            pids["data-plane"] = dp
        return pids

    def containerd_pid(self) -> int:
        return self.cd.proc.pid

    def fetched(self) -> int:
        """The lazy layers' fetchedSize sum (pysoci's status files)."""
        total = 0
        for p in (self.pysoci.root / "fuse" / ".status").glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                total += int(json.loads(p.read_text())["fetchedSize"])
        return total

    def check_lazy(self, out: Path, expected: int) -> None:
        """A run where pysoci did not serve every indexed layer lazily measures something
        else: fail it, keep the log."""
        lazy = len(list((self.pysoci.root / "fuse" / ".status").glob("*.json")))
        if lazy >= expected:
            return
        out.mkdir(parents=True, exist_ok=True)
        kept = out / f"pysoci-not-lazy-{time.strftime('%H%M%S')}.log"
        shutil.copyfile(self.pysoci.log, kept)
        raise RuntimeError(f"pysoci served {lazy} of {expected} layers lazily (its log: {kept})")

    def close(self) -> None:
        try:
            self.cd.stop()
        finally:
            try:
                self.pysoci.stop_all()
            finally:
                cleanup_dir(self.wd)


PREFETCH_MOUNT_TIMEOUT_SEC = 900


def soci_config(pull_host: str, prefetch: bool) -> str:
    """soci-snapshotter-grpc's config: its defaults, plus what the bench needs to work at all
    (the registry speaks plain HTTP on a non-loopback address) and, for `soci+prefetch`, the
    prefetch feature (off by default in v0.16) with a mount timeout long enough for it: soci
    prefetches inside the layer's mount, and with the default `mount_timeout_sec = 30` a
    prefetch that takes longer fails the mount, after which containerd downloads the whole
    layer while the prefetch goes on (ml-large at 1 Gbit/s: 161 s to ready, 5.3 GB fetched)."""
    text = (
        f'[resolver.host."{pull_host}"]\n'
        f'  [[resolver.host."{pull_host}".mirrors]]\n'
        f'    host = "http://{pull_host}"\n'
        "    insecure = true\n"
    )
    if prefetch:
        text = f"mount_timeout_sec = {PREFETCH_MOUNT_TIMEOUT_SEC}\n" + text
        text += "[prefetch]\nenable = true\n"
    return text


def containerd17_config(wd: Path, soci_socket: Path, bin_dir: Path) -> str:
    """containerd 1.7's own default config, moved into `wd`, with soci as a proxy plugin."""
    text = _run([str(bin_dir / "containerd"), "config", "default"], 60, True).stdout
    text = re.sub(r'(?m)^root = ".*"$', f'root = "{wd}/root"', text)
    text = re.sub(r'(?m)^state = ".*"$', f'state = "{wd}/state"', text)
    text, n = re.subn(
        r'(?m)^(\[grpc\]\n(?:  .*\n)*?  address = )".*"$', rf'\1"{wd}/containerd.sock"', text
    )
    if n != 1:
        raise RuntimeError("containerd 1.7's default config has no [grpc] address")
    text = re.sub(r'(?m)^(\[ttrpc\]\n(?:  .*\n)*?  address = )".*"$', r'\1""', text)
    text = re.sub(r'(?m)^(\[debug\]\n(?:  .*\n)*?  address = )".*"$', r'\1""', text)
    if not re.search(r"(?m)^\[proxy_plugins\]$", text):
        raise RuntimeError("containerd 1.7's default config has no [proxy_plugins] table")
    return re.sub(
        r"(?m)^\[proxy_plugins\]$",
        "[proxy_plugins]\n  [proxy_plugins.soci]\n"
        f'    type = "snapshot"\n    address = "{soci_socket}"\n',
        text,
    )


class SociNode:
    """containerd v1.7.35 + a fresh soci-snapshotter-grpc v0.16.1 (empty root)."""

    kind = "soci"

    def __init__(self, wd: Path, pull_host: str, prefetch: bool) -> None:
        soci_bin, cd_bin = go_tools()
        self.wd = wd
        self.pull_host = pull_host
        self.ctr_bin = str(cd_bin / "ctr")
        self.soci: subprocess.Popen[bytes] | None = None
        self.containerd: subprocess.Popen[bytes] | None = None
        cleanup_dir(wd)
        wd.mkdir(parents=True)
        write_hosts(wd / "certs.d", pull_host)
        self.root = wd / "soci"
        self.socket = wd / "soci.sock"
        self.log = wd / "soci.log"
        (wd / "soci.toml").write_text(soci_config(pull_host, prefetch))
        env = {**os.environ, "PATH": f"{cd_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        try:
            with open(self.log, "ab") as logf:
                self.soci = subprocess.Popen(
                    [str(soci_bin / "soci-snapshotter-grpc"), "--root", str(self.root),
                     "--address", str(self.socket), "--config", str(wd / "soci.toml"),
                     "--log-level", "info"],
                    stdout=logf, stderr=logf, env=env,
                )  # fmt: skip
            _wait_for(self.socket, self.soci, self.log, "soci-snapshotter-grpc")
            cdw = wd / "cd"
            cdw.mkdir()
            (cdw / "config.toml").write_text(containerd17_config(cdw, self.socket, cd_bin))
            self.cd_log = cdw / "containerd.log"
            with open(self.cd_log, "ab") as logf:
                # PATH first: containerd 1.7 finds its own containerd-shim-runc-v2 there.
                self.containerd = subprocess.Popen(
                    [str(cd_bin / "containerd"), "--config", str(cdw / "config.toml")],
                    stdout=logf, stderr=logf, env=env,
                )  # fmt: skip
            self.address = cdw / "containerd.sock"
            _wait_for(self.address, self.containerd, self.cd_log, "containerd 1.7")
        except BaseException:
            self.close()
            raise

    def ctr(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        return _run([self.ctr_bin, "--address", str(self.address), *args], timeout, check).stdout

    def pull(self, ref: str, lazy: bool, timeout: float) -> None:
        _run([NERDCTL, "--address", str(self.address), "--namespace", "default",
              "--data-root", str(self.wd / "nerdctl"), "--hosts-dir", str(self.wd / "certs.d"),
              "--snapshotter", "soci" if lazy else "overlayfs", "pull", "--quiet", ref],
             timeout, True)  # fmt: skip

    def daemon_pids(self) -> dict[str, int]:
        return {"soci-snapshotter-grpc": self.soci.pid} if self.soci is not None else {}

    def containerd_pid(self) -> int:
        assert self.containerd is not None
        return self.containerd.pid

    def fetched(self) -> int:
        return 0

    def check_lazy(self, out: Path, expected: int) -> None:
        """soci falls back to a full download of a layer it cannot mount (no index, or the
        mount timed out): such a run measures something else, fail it and keep the log."""
        lazy = len(mounts_under(self.root, "fuse.rawBridge"))
        if lazy >= expected:
            return
        out.mkdir(parents=True, exist_ok=True)
        kept = out / f"soci-not-lazy-{time.strftime('%H%M%S')}.log"
        shutil.copyfile(self.log, kept)
        raise RuntimeError(f"soci mounted {lazy} of {expected} layers lazily (its log: {kept})")

    def close(self) -> None:
        try:
            _stop(self.containerd)
        finally:
            try:
                _stop(self.soci)
            finally:
                cleanup_dir(self.wd)


Node = PysociNode | SociNode

if __name__ == "__main__":
    print(go_tools(), file=sys.stderr)
