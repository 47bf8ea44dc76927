"""CPU time and resident memory of a daemon and every process it spawned, sampled from /proc.

`pysoci serve` runs its data plane as a second long-lived process (`pysoci data-plane run`),
so a daemon is a process tree: each sample walks the tree from the root pids
(`/proc/PID/task/*/children`) and sums over every live process

- CPU: utime + stime + cutime + cstime (children that exited and were reaped count through
  their parent's c-times, so nothing is lost between samples), in seconds;
- RSS: VmRSS; the peak is the largest sum seen (every `interval`, 20 Hz by default).

The roots are named (`serve`, `data-plane`; `soci-snapshotter-grpc`): each root's own CPU
seconds and peak RSS are kept too, so a report can say which process did the work.
`mark(name)` records the CPU total at that moment (e.g. `ready`); `stop()` returns a `Usage`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Usage:
    cpu_s: float = 0.0
    """CPU seconds from `start` to `stop`."""
    marks: dict[str, float] = field(default_factory=dict)
    """CPU seconds from `start` to each mark."""
    rss_peak: int = 0
    """Bytes: the largest sum of VmRSS over the tree."""
    procs: int = 0
    """The most processes seen in the tree at once."""
    samples: int = 0
    parts_cpu_s: dict[str, float] = field(default_factory=dict)
    """Each named root's own CPU seconds from `start` to `stop` (its reaped children too)."""
    parts_rss_peak: dict[str, int] = field(default_factory=dict)
    """Each named root's own peak VmRSS."""


def tree(roots: list[int]) -> list[int]:
    """The live processes under `roots` (roots included)."""
    out: list[int] = []
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        out.append(pid)
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except OSError:
                continue
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime + cutime + cstime of `pid`, or 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): utime..cstime are fields 14..17
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Monitor:
    """Samples the process trees under `roots` in a thread until `stop()`."""

    def __init__(self, roots: Mapping[str, int], interval: float = 0.05) -> None:
        self.roots = dict(roots)
        self.interval = interval
        self.usage = Usage()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._last_cpu = 0.0
        self._parts0 = {name: cpu_seconds(pid) for name, pid in self.roots.items()}
        self._parts_last = dict(self._parts0)
        self._cpu0 = self._sample()
        self._thread = threading.Thread(target=self._loop, name="usage-monitor", daemon=True)
        self._thread.start()

    def _sample(self) -> float:
        pids = tree(list(self.roots.values()))
        cpu = sum(cpu_seconds(p) for p in pids)
        rss = sum(rss_bytes(p) for p in pids)
        parts = {name: (cpu_seconds(pid), rss_bytes(pid)) for name, pid in self.roots.items()}
        with self._lock:
            u = self.usage
            for name, (pcpu, prss) in parts.items():
                self._parts_last[name] = max(self._parts_last[name], pcpu)
                u.parts_rss_peak[name] = max(u.parts_rss_peak.get(name, 0), prss)
            u.samples += 1
            u.rss_peak = max(u.rss_peak, rss)
            u.procs = max(u.procs, len(pids))
            # A process that died unreaped between samples would make the sum dip: keep the max.
            self._last_cpu = max(self._last_cpu, cpu)
            return self._last_cpu

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def mark(self, name: str) -> None:
        cpu = self._sample()
        with self._lock:
            self.usage.marks[name] = cpu - self._cpu0

    def stop(self) -> Usage:
        self._stop.set()
        self._thread.join(5)
        cpu = self._sample()
        with self._lock:
            self.usage.cpu_s = cpu - self._cpu0
            self.usage.parts_cpu_s = {
                name: last - self._parts0[name] for name, last in self._parts_last.items()
            }
            return self.usage
