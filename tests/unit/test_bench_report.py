"""bench.report and bench.usage: ratios from one run, and a daemon's CPU over its process tree."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

from bench import report, usage


def _run(mode: str, ready: float, i: int, **kw: Any) -> dict[str, Any]:
    return {
        "image": "ml", "network": "1gbit", "mode": mode, "index": i, "ready_s": ready,
        "pull_s": 1.0, "bytes_at_ready": 150_000_000, "bytes_total": 200_000_000,
        "warm_s": 1.0, "daemon_cpu_s": 4.0, "daemon_cpu_ready_s": 3.0,
        "daemon_rss_peak": 300 * 2**20, "daemon_procs": 2, "error": "", "extra": {},
    } | kw  # fmt: skip


def _data() -> dict[str, Any]:
    runs = []
    for i, (o, p, s) in enumerate([(20.0, 8.0, 10.0), (22.0, 9.0, 12.0), (21.0, 30.0, 11.0)]):
        runs += [_run("overlayfs", o, i), _run("pysoci", p, i), _run("soci", s, i)]
    runs.append(_run("soci", 0.0, 3, error="RuntimeError: boom"))
    return {
        "runs": runs,
        "read": {"ml": {"fetched_at_ready": 100_000_000}},
        "networks": {"1gbit": 1_000_000_000},
        "images": {"ml": {"compressed": 600_000_000, "uncompressed": 2e9, "layers": [{}, {}]}},
    }


def test_ratios_are_medians_of_the_same_run() -> None:
    rows = {r["mode"]: r for r in report.summarize(_data())}
    assert rows["pysoci"]["ratio"] == 9.0 / 21.0
    assert rows["pysoci"]["vs_soci"] == 9.0 / 11.0
    assert rows["soci"]["failed"] == 1 and rows["soci"]["n"] == 3
    # bytes read / link rate + the mode's median warm start
    assert rows["pysoci"]["limit"] == 100_000_000 / 125_000_000 + 1.0
    assert rows["overlayfs"]["limit"] == 600_000_000 / 125_000_000 + 1.0


def test_markdown_has_the_daemon_table_and_the_soci_target() -> None:
    data = _data()
    md = report.markdown(data, report.summarize(data))
    assert "| 1gbit | ml | pysoci | 3.00 (3.00–3.00) | 4.00 (4.00–4.00) | 200.0 | 0.0200 " in md
    assert "| ml: pysoci / soci time to ready | 1gbit | 0.82 (≤ 0.8) | **no** |" in md
    assert "| 1gbit | ml | soci (1 failed) |" in md


BURN = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c',\n"
    "    'import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.4: pass'])\n"
    "child.wait()\n"
    "time.sleep(30)\n"
)


def test_monitor_counts_cpu_of_children_that_exited() -> None:
    proc = subprocess.Popen([sys.executable, "-c", BURN])
    try:
        mon = usage.Monitor({"parent": proc.pid}, interval=0.02)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if usage.cpu_seconds(proc.pid) >= 0.4:  # the child was reaped: in cutime
                break
        u = mon.stop()
    finally:
        proc.kill()
        proc.wait()
    assert u.cpu_s >= 0.4
    assert u.procs == 2
    assert u.rss_peak > 0
    assert u.parts_cpu_s["parent"] >= 0.4  # the parent's own figure includes its reaped child
    assert 0 < u.parts_rss_peak["parent"] <= u.rss_peak
