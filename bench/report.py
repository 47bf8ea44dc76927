"""The startup benchmark's report: Markdown tables, the targets, and a PNG chart.

`python -m bench.report [--publish]` re-renders from bench/out/startup.json; `--publish` copies
the table and chart to bench/results/ (committed; bench/out is not).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
RESULTS = HERE / "results"
MB = 1_000_000
MODES = ("overlayfs", "pysoci", "pysoci+prefetch", "soci", "soci+prefetch")
LAZY = ("pysoci", "pysoci+prefetch", "soci", "soci+prefetch")
PEER = {"pysoci": "soci", "pysoci+prefetch": "soci+prefetch"}
CAUSES = ("data", "gated header", "file header", "other")
"""bench.gating's classes, in its order."""
"""The real soci's mode each pysoci mode is compared with (same run, image and network)."""
COLORS = {"overlayfs": "#8c8c8c", "pysoci": "#2b7bba", "pysoci+prefetch": "#12467a",
          "soci": "#e69f00", "soci+prefetch": "#a0522d"}  # fmt: skip


def _med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _span(xs: Sequence[float], digits: int = 2) -> str:
    if not xs:
        return "–"
    m = _med(xs)
    if len(xs) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ({min(xs):.{digits}f}–{max(xs):.{digits}f})"


def _ok(x: float) -> bool:
    return not math.isnan(x)


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float:
    if not a or not b or not a["ready"] or not b["ready"]:
        return float("nan")
    return _med(a["ready"]) / _med(b["ready"])


def _modes(data: dict[str, Any]) -> list[str]:
    seen = {r["mode"] for r in data["runs"]}
    return [m for m in MODES if m in seen]


def _parts(runs: list[dict[str, Any]], key: str) -> dict[str, list[float]]:
    """Per daemon process (`serve`, `data-plane`, ...): its figure in each run."""
    out: dict[str, list[float]] = {}
    for r in runs:
        for name, value in (r.get(key) or {}).items():
            out.setdefault(name, []).append(value)
    return out


def summarize(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per network × image × mode with the medians and the physical limit."""
    rows: list[dict[str, Any]] = []
    for network, rate_bits in data["networks"].items():
        rate = rate_bits / 8
        for image, info in data.get("images", {}).items():
            read = data.get("read", {}).get(image, {})
            bytes_read = read.get("fetched_at_ready", 0)
            per_mode: dict[str, dict[str, Any]] = {}
            for mode in _modes(data):
                mine = [
                    r
                    for r in data["runs"]
                    if r["image"] == image and r["network"] == network and r["mode"] == mode
                ]
                runs = [r for r in mine if not r["error"]]
                failed = len(mine) - len(runs)
                if not mine:
                    continue
                needed = info["compressed"] if mode == "overlayfs" else bytes_read
                warm = [r["warm_s"] for r in runs if r["warm_s"] > 0]
                limit = needed / rate + _med(warm) if warm and needed else float("nan")
                per_mode[mode] = {
                    "network": network,
                    "image": image,
                    "mode": mode,
                    "n": len(runs),
                    "failed": failed,
                    "ready": [r["ready_s"] for r in runs],
                    "pull": [r["pull_s"] for r in runs],
                    "at_ready": [r["bytes_at_ready"] for r in runs],
                    "total": [r["bytes_total"] for r in runs],
                    "warm": warm,
                    "cpu": [r.get("daemon_cpu_s", 0.0) for r in runs],
                    "cpu_ready": [r.get("daemon_cpu_ready_s", 0.0) for r in runs],
                    "cpu_warm": [r.get("daemon_cpu_warm_s", 0.0) for r in runs],
                    "rss": [r.get("daemon_rss_peak", 0) for r in runs],
                    "parts_cpu": _parts(runs, "daemon_parts_cpu_s"),
                    "parts_rss": _parts(runs, "daemon_parts_rss_peak"),
                    "procs": max((r.get("daemon_procs", 0) for r in runs), default=0),
                    "needed": needed,
                    "limit": limit,
                }
            base = per_mode.get("overlayfs")
            for row in per_mode.values():
                row["ratio"] = _ratio(row, base)
                peer = PEER.get(row["mode"])
                row["vs_soci"] = _ratio(row, per_mode.get(peer)) if peer else float("nan")
                row["bytes_read"] = bytes_read
                rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| network | image | mode | time to ready, s: median (min–max) | / overlayfs "
        "| pysoci / soci | pull step, s | MB at ready | MB total | warm start, s "
        "| physical limit, s | ready / limit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ready = _med(r["ready"])
        cells = [
            r["network"],
            r["image"],
            r["mode"] + (f" ({r['failed']} failed)" if r["failed"] else ""),
            _span(r["ready"]) + f" ×{r['n']}",
            f"{r['ratio']:.2f}" if r["mode"] != "overlayfs" and _ok(r["ratio"]) else "1"
            if r["mode"] == "overlayfs" else "–",
            f"{r['vs_soci']:.2f}" if _ok(r["vs_soci"]) else "–",
            f"{_med(r['pull']):.2f}",
            f"{_med(r['at_ready']) / MB:.1f}",
            f"{_med(r['total']) / MB:.1f}",
            f"{_med(r['warm']):.2f}",
            f"{r['limit']:.2f}" if _ok(r["limit"]) else "–",
            f"{ready / r['limit']:.2f}" if _ok(r["limit"]) and r["ready"] else "–",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def daemon_table(rows: list[dict[str, Any]]) -> str:
    """CPU and memory of the snapshotter daemons, pysoci and soci side by side."""
    lines = [
        "| network | image | mode | daemon CPU s to ready | daemon CPU s to exit | MB served "
        "| CPU s per MB served | peak RSS, MiB | per process: CPU s, peak RSS MiB "
        "| CPU s of the warm start |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["mode"] not in LAZY or not r["ready"]:
            continue
        cpu, total = _med(r["cpu"]), _med(r["total"]) / MB
        parts = ", ".join(
            f"{name} {_med(xs):.2f} s, {_med(r['parts_rss'].get(name, [0])) / 2**20:.0f}"
            for name, xs in r.get("parts_cpu", {}).items()
        )
        cells = [
            r["network"],
            r["image"],
            r["mode"],
            _span(r["cpu_ready"]),
            _span(r["cpu"]),
            f"{total:.1f}",
            f"{cpu / total:.4f}" if total else "–",
            f"{_med(r['rss']) / 2**20:.0f} ({max(r['rss']) / 2**20:.0f} max)",
            parts or str(r["procs"]),
            _span(r["cpu_warm"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def causes_table(data: dict[str, Any]) -> str:
    """Why the bytes-read run fetched each span (bench/gating.py): the header checks' cost."""
    lines = [
        "| image | " + " | ".join(f"{c}: spans, MB, s" for c in CAUSES) + " | gated / all bytes |",
        "|---|" + "---|" * (len(CAUSES) + 1),
    ]
    any_row = False
    for name in data.get("images", {}):
        causes = data.get("read", {}).get(name, {}).get("extra", {}).get("spans_by_cause")
        if not causes:
            continue
        any_row = True
        total = sum(c["bytes"] for c in causes.values()) or 1
        cells = [
            f"{causes[c]['spans']:.0f}, {causes[c]['bytes'] / MB:.1f}, {causes[c]['seconds']:.2f}"
            for c in CAUSES
        ]
        gated = causes["gated header"]["bytes"] / total
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {gated:.3f} |")
    return "\n".join(lines) if any_row else ""


def targets(rows: list[dict[str, Any]]) -> str:
    """Issue 13's targets, each from ratios of one run."""
    out = ["| target | network | value | met |", "|---|---|---|---|"]

    def add(name: str, network: str, value: float, limit: float) -> None:
        if not _ok(value):
            return
        ok = "yes" if value <= limit else "**no**"
        out.append(f"| {name} | {network} | {value:.2f} (≤ {limit}) | {ok} |")

    for r in rows:
        if r["mode"] not in ("pysoci", "pysoci+prefetch") or not r["ready"]:
            continue
        image, net, mode = r["image"], r["network"], r["mode"]
        to_limit = _med(r["ready"]) / r["limit"] if _ok(r["limit"]) else float("nan")
        if mode == "pysoci+prefetch":
            if image in ("ml", "ml-large") and net == "1gbit":
                add(f"{image}: pysoci+prefetch / overlayfs", net, r["ratio"], 0.20)
            if image == "ml":
                add("ml: pysoci+prefetch / physical limit", net, to_limit, 1.3)
        if mode == "pysoci" and image == "ml" and net == "1gbit":
            add("ml: pysoci / overlayfs", net, r["ratio"], 0.30)
        if mode == "pysoci" and image in ("python", "postgres"):
            add(f"{image}: pysoci / overlayfs (no slower than 0.28–0.32)", net, r["ratio"], 0.32)
        add(f"{image}: {mode} / {PEER[mode]} time to ready", net, r["vs_soci"], 0.8)
        if r["bytes_read"]:
            add(f"{image}: {mode} bytes at ready / bytes read", net,
                _med(r["at_ready"]) / r["bytes_read"], 1.5)  # fmt: skip
    return "\n".join(out)


def images_table(data: dict[str, Any]) -> str:
    lines = [
        "| image | layers | compressed | uncompressed | bytes read (spans touched) "
        "| files read before ready | soci+prefetch: spans, MB (files given to soci) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, info in data.get("images", {}).items():
        read = data.get("read", {}).get(name, {}).get("fetched_at_ready", 0)
        share = f" ({100 * read / info['compressed']:.1f} %)" if read else ""
        files = info.get("prefetch_files", 0)
        sp = info.get("soci_prefetch") or {}
        soci = (
            f"{sp['spans']}, {sp['compressed_bytes'] / MB:.1f} MB ({sp['files_given_to_soci']})"
            if sp
            else "–"
        )
        lines.append(
            f"| {name} | {len(info['layers'])} | {info['compressed'] / MB:.0f} MB "
            f"| {info['uncompressed'] / MB:.0f} MB | {read / MB:.1f} MB{share} "
            f"| {files or '–'} | {soci} |"
        )
    return "\n".join(lines)


def chart(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image_names = list(dict.fromkeys(r["image"] for r in rows))
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(
        1, len(image_names), figsize=(max(6.0, 3.2 * len(image_names)), 4.8), squeeze=False
    )
    width = 0.8 / max(1, len(modes))
    for ax, image in zip(axes[0], image_names, strict=True):
        networks = list(dict.fromkeys(r["network"] for r in rows if r["image"] == image))
        for k, mode in enumerate(modes):
            xs, ys, lo, hi, limits = [], [], [], [], []
            for g, network in enumerate(networks):
                r = next((r for r in rows if (r["image"], r["network"], r["mode"]) == (
                    image, network, mode)), None)  # fmt: skip
                if r is None or not r["ready"]:
                    continue
                m = _med(r["ready"])
                xs.append(g + (k - (len(modes) - 1) / 2) * width)
                ys.append(m)
                lo.append(m - min(r["ready"]))
                hi.append(max(r["ready"]) - m)
                limits.append(r["limit"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, color=COLORS[mode], label=mode)
            for x, y, lim in zip(xs, ys, limits, strict=True):
                ax.annotate(f"{y:.1f}", (x, y), ha="center", va="bottom", fontsize=6,
                            xytext=(0, 2), textcoords="offset points")  # fmt: skip
                if _ok(lim):
                    ax.hlines(lim, x - width / 2, x + width / 2, colors="black",
                              linestyles="dotted")  # fmt: skip
        ax.set_xticks(range(len(networks)))
        ax.set_xticklabels(networks)
        ax.set_title(image, fontsize=10)
    axes[0][0].set_ylabel("time to ready, s (median, min–max)")
    axes[0][0].plot([], [], "k:", label="physical limit")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(data: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    m = data.get("machine", {})
    head = (
        f"Measured {data.get('date', '?')} on {m.get('cores', '?')} cores of "
        f"{m.get('cpu', '?')}, {m.get('memory_bytes', 0) / 2**30:.0f} GiB, kernel "
        f"{m.get('kernel', '?')}; pysoci {m.get('pysoci_commit', '?')[:12]} on "
        f"{m.get('containerd', '')}"
    )
    if "soci" in m:
        head += f"; {m['soci']} on {m.get('containerd_soci', '')}"
    head += f"; registry behind tc tbf + {data.get('latency_s', 0) * 1000:.0f} ms per request."
    if "elapsed_s" in data:
        head += f" The run took {data['elapsed_s'] / 60:.0f} min."
    loads = [r["extra"].get("loadavg_before", 0.0) for r in data["runs"] if r.get("extra")]
    if loads:
        head += (
            f" Load average before the cold runs: median {_med(loads):.1f}, max {max(loads):.1f}."
        )
    parts = [
        head,
        images_table(data),
        table(rows),
        "Snapshotter daemons from the pull to the container's exit (pysoci: `pysoci serve` and "
        "every process it spawned; soci: soci-snapshotter-grpc), medians:",
        daemon_table(rows),
        "Targets (issue 13):",
        targets(rows),
    ]
    causes = causes_table(data)
    if causes:
        parts += [
            "Why each span of the bytes-read run (no background fetch, no read-ahead) was "
            "fetched: data of a file the workload opened, the tar header of a gated entry "
            "(symlink, hardlink, device, setuid/setgid, capability, whiteout: checked before "
            "it is shown, issue 15), an opened file's own header in the span before its data, "
            "or none of those (bench/gating.py; seconds: the proxy's time for those requests, "
            "an upper bound):",
            causes,
        ]
    return "\n\n".join(parts) + "\n"


def write(data: dict[str, Any], out: Path, *, publish: bool = False) -> None:
    rows = summarize(data)
    md = markdown(data, rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "startup.md").write_text(md)
    png = out / "startup.png"
    try:
        chart(rows, png, f"time to ready, cold ({data.get('date', '')})")
    except ImportError:
        print("matplotlib is missing: no chart (scripts/setup.sh installs it)")
    print(md)
    if publish:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "startup.md").write_text(md)
        (RESULTS / "startup.json").write_text(json.dumps(data, indent=1))
        if png.exists():
            shutil.copy(png, RESULTS / "startup.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="render bench/out/startup.json")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--publish", action="store_true")
    args = parser.parse_args(argv)
    data = json.loads((args.out / "startup.json").read_text())
    write(data, args.out, publish=args.publish)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
