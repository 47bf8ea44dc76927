"""A registry in its own network namespace, behind a shaped veth and a latency/byte-counting proxy.

    root namespace                          namespace `psbench`
    10.200.0.1 (veth psb-h) <── tc tbf ──> 10.200.0.2 (veth psb-r)
                                             :5000 docker-registry (pushes, conversion)
                                             :5001 FaultProxy → 127.0.0.1:5000 (pulls: 10 ms
                                                   before every response, counts bytes)

Both veth ends get a `tbf` root qdisc at the same rate, so the link is shaped in both directions.
The proxy runs in this process: a helper thread enters the namespace (`setns`) and starts it, so
its listening socket and every thread it spawns live there, while the caller keeps reading its
counters directly. Everything is undone by `close()` (namespace, veth, qdiscs, processes).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.fixtures.fault_proxy import FaultProxy, RequestRecord

NS = "psbench"
HOST_IF = "psb-h"
NS_IF = "psb-r"
HOST_IP = "10.200.0.1"
NS_IP = "10.200.0.2"
REGISTRY_PORT = 5000
PROXY_PORT = 5001
CLONE_NEWNET = 0x40000000


def sh(*args: str, ns: bool = False, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", "netns", "exec", NS, *args] if ns else list(args)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip()}")
    return res


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def teardown_leftovers() -> None:
    """Remove what a killed earlier run may have left (only our own names)."""
    sh("ip", "link", "del", HOST_IF, check=False)
    sh("ip", "netns", "del", NS, check=False)


@dataclass
class ShapedRegistry:
    workdir: Path
    """Registry storage lives here (kept between runs by the caller, if it likes)."""
    registry: subprocess.Popen[bytes] | None = None
    proxy: FaultProxy | None = None
    rate_bits: int = 0
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.workdir / "registry.log"

    @property
    def push_host(self) -> str:
        """Straight to the registry (pushes and conversion; shaped by tbf, no proxy)."""
        return f"{NS_IP}:{REGISTRY_PORT}"

    @property
    def pull_host(self) -> str:
        """Through the proxy: what the benchmark pulls from."""
        return f"{NS_IP}:{PROXY_PORT}"

    def open(self) -> None:
        teardown_leftovers()
        sh("ip", "netns", "add", NS)
        sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF)
        sh("ip", "link", "set", NS_IF, "netns", NS)
        sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", HOST_IF)
        sh("ip", "link", "set", HOST_IF, "up")
        sh("ip", "addr", "add", f"{NS_IP}/24", "dev", NS_IF, ns=True)
        sh("ip", "link", "set", NS_IF, "up", ns=True)
        sh("ip", "link", "set", "lo", "up", ns=True)
        self._start_registry()
        self._start_proxy()

    def _start_registry(self) -> None:
        binary = shutil.which("docker-registry")
        if binary is None:
            raise RuntimeError("docker-registry is not installed (scripts/setup.sh installs it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.workdir / "data")}},
            "http": {"addr": f"{NS_IP}:{REGISTRY_PORT}", "secret": "pysoci-bench"},
        }
        path = self.workdir / "config.yml"
        path.write_text(json.dumps(config, indent=2))
        with open(self.log, "ab") as logf:
            self.registry = subprocess.Popen(
                ["ip", "netns", "exec", NS, binary, "serve", str(path)],
                stdout=logf,
                stderr=logf,
            )
        deadline = time.monotonic() + 20
        while True:
            if self.registry.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"http://{self.push_host}/v2/", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError("docker-registry did not start") from None
                time.sleep(0.1)

    def _start_proxy(self) -> None:
        box: list[FaultProxy | BaseException] = []

        def enter_and_start() -> None:
            try:
                _setns(f"/run/netns/{NS}")
                box.append(
                    FaultProxy.start(
                        f"http://{NS_IP}:{REGISTRY_PORT}",
                        listen=NS_IP,
                        port=PROXY_PORT,
                    )
                )
            except BaseException as e:
                box.append(e)

        t = threading.Thread(target=enter_and_start, name="netns-proxy-start")
        t.start()
        t.join(30)
        if not box:
            raise RuntimeError("the proxy did not start")
        if isinstance(box[0], BaseException):
            raise box[0]
        self.proxy = box[0]

    def set_latency(self, seconds: float) -> None:
        assert self.proxy is not None
        self.proxy.set_latency(seconds)

    def shape(self, rate_bits: int) -> None:
        """tbf on both ends of the veth at `rate_bits` per second."""
        burst = max(64 * 1024, rate_bits // 8 // 250)  # about 4 ms worth
        for ns, dev in ((False, HOST_IF), (True, NS_IF)):
            sh(
                "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                "rate", str(rate_bits), "burst", str(burst), "latency", "50ms",
                ns=ns,
            )  # fmt: skip
        self.rate_bits = rate_bits

    def unshape(self) -> None:
        for ns, dev in ((False, HOST_IF), (True, NS_IF)):
            sh("tc", "qdisc", "del", "dev", dev, "root", ns=ns, check=False)
        self.rate_bits = 0

    def bytes_served(self) -> int:
        assert self.proxy is not None
        return self.proxy.stats.bytes_served

    def requests(self) -> int:
        assert self.proxy is not None
        return self.proxy.stats.requests

    def log_since(self, t: float) -> list[RequestRecord]:
        """The requests the proxy finished that started at or after `t` (time.monotonic)."""
        assert self.proxy is not None
        return [r for r in self.proxy.stats.log if r.started >= t]

    def close(self) -> None:
        if self.proxy is not None:
            with contextlib.suppress(Exception):
                self.proxy.stop()
            self.proxy = None
        if self.registry is not None:
            self.registry.terminate()
            try:
                self.registry.wait(10)
            except subprocess.TimeoutExpired:
                self.registry.kill()
                self.registry.wait()
            self.registry = None
        teardown_leftovers()
