"""The startup benchmark's report: a Markdown table, the targets, and a PNG chart.

`python -m bench.report [--publish]` re-renders from bench/out/startup.json; `--publish` copies
the table and chart to bench/results/ (committed; bench/out is not).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
RESULTS = HERE / "results"
MB = 1_000_000
MODES = ("overlayfs", "pysoci")


def _med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _span(xs: Sequence[float], unit: str = "s", scale: float = 1.0, digits: int = 2) -> str:
    if not xs:
        return "–"
    m = _med(xs) / scale
    if len(xs) == 1:
        return f"{m:.{digits}f} {unit}"
    return f"{m:.{digits}f} {unit} ({min(xs) / scale:.{digits}f}–{max(xs) / scale:.{digits}f})"


def summarize(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per network × image × mode with the medians and the physical limit."""
    rows: list[dict[str, Any]] = []
    for network, rate_bits in data["networks"].items():
        rate = rate_bits / 8
        for image, info in data.get("images", {}).items():
            read = data.get("read", {}).get(image, {})
            bytes_read = read.get("fetched_at_ready", 0)
            per_mode: dict[str, dict[str, Any]] = {}
            for mode in MODES:
                runs = [
                    r
                    for r in data["runs"]
                    if r["image"] == image
                    and r["network"] == network
                    and r["mode"] == mode
                    and not r["error"]
                ]
                failed = sum(
                    1
                    for r in data["runs"]
                    if r["image"] == image
                    and r["network"] == network
                    and r["mode"] == mode
                    and r["error"]
                )
                if not runs and not failed:
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
                    "needed": needed,
                    "limit": limit,
                }
            base = per_mode.get("overlayfs")
            for row in per_mode.values():
                row["ratio"] = (
                    _med(row["ready"]) / _med(base["ready"])
                    if base and base["ready"] and row["ready"]
                    else float("nan")
                )
                row["bytes_read"] = bytes_read
                rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| network | image | mode | time to ready, s: median (min–max) | pysoci / overlayfs "
        "| pull step, s | MB at ready | MB total | warm start, s | physical limit, s "
        "| ready / limit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ready = _med(r["ready"])
        cells = [
            r["network"],
            r["image"],
            r["mode"] + (f" ({r['failed']} failed)" if r["failed"] else ""),
            _span(r["ready"], "").strip() + f" ×{r['n']}",
            f"{r['ratio']:.2f}" if r["mode"] != "overlayfs" else "1",
            f"{_med(r['pull']):.2f}",
            f"{_med(r['at_ready']) / MB:.1f}",
            f"{_med(r['total']) / MB:.1f}",
            f"{_med(r['warm']):.2f}",
            f"{r['limit']:.2f}",
            f"{ready / r['limit']:.2f}" if r["limit"] == r["limit"] else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(data: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    out = ["| target | network | value | met |", "|---|---|---|---|"]

    def add(name: str, network: str, value: float, limit: float) -> None:
        ok = "yes" if value <= limit else "**no**"
        out.append(f"| {name} | {network} | {value:.2f} (≤ {limit}) | {ok} |")

    for r in rows:
        if r["mode"] != "pysoci" or not r["ready"]:
            continue
        if r["image"] == "ml":
            add("ml: pysoci / overlayfs time to ready", r["network"], r["ratio"], 0.25)
        if r["image"] == "python":
            add("python: pysoci / overlayfs time to ready", r["network"], r["ratio"], 1.05)
        if r["bytes_read"]:
            add(
                f"{r['image']}: bytes at ready / bytes read",
                r["network"],
                _med(r["at_ready"]) / r["bytes_read"],
                1.5,
            )
        if r["limit"] == r["limit"]:
            add(
                f"{r['image']}: pysoci time to ready / physical limit",
                r["network"],
                _med(r["ready"]) / r["limit"],
                1.5,
            )
    return "\n".join(out)


def images_table(data: dict[str, Any]) -> str:
    lines = [
        "| image | layers | compressed | uncompressed | bytes read (spans touched) |",
        "|---|---|---|---|---|",
    ]
    for name, info in data.get("images", {}).items():
        read = data.get("read", {}).get(name, {}).get("fetched_at_ready", 0)
        share = f" ({100 * read / info['compressed']:.1f} %)" if read else ""
        lines.append(
            f"| {name} | {len(info['layers'])} | {info['compressed'] / MB:.0f} MB "
            f"| {info['uncompressed'] / MB:.0f} MB | {read / MB:.1f} MB{share} |"
        )
    return "\n".join(lines)


def chart(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["image"], r["network"]) for r in rows}, key=lambda g: (g[0], g[1]))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) + 2), 4.5))
    width = 0.38
    colors = {"overlayfs": "#8c8c8c", "pysoci": "#2b7bba"}
    for k, mode in enumerate(MODES):
        xs, ys, lo, hi, limits = [], [], [], [], []
        for g, (image, network) in enumerate(groups):
            r = next((r for r in rows if (r["image"], r["network"], r["mode"]) == (
                image, network, mode)), None)  # fmt: skip
            if r is None or not r["ready"]:
                continue
            m = _med(r["ready"])
            xs.append(g + (k - 0.5) * width)
            ys.append(m)
            lo.append(m - min(r["ready"]))
            hi.append(max(r["ready"]) - m)
            limits.append(r["limit"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, color=colors[mode], label=mode)
        for x, y, lim in zip(xs, ys, limits, strict=True):
            ax.annotate(f"{y:.1f}", (x, y), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")  # fmt: skip
            if lim == lim:
                ax.hlines(lim, x - width / 2, x + width / 2, colors="black", linestyles="dotted")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{i}\n{n}" for i, n in groups])
    ax.set_ylabel("time to ready, s (median, min–max)")
    ax.set_title(title, fontsize=10)
    ax.plot([], [], "k:", label="physical limit")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(data: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    m = data.get("machine", {})
    head = (
        f"Measured {data.get('date', '?')} on {m.get('cores', '?')} cores of "
        f"{m.get('cpu', '?')}, {m.get('memory_bytes', 0) / 2**30:.0f} GiB, kernel "
        f"{m.get('kernel', '?')}, {m.get('containerd', '')}; registry behind tc tbf + "
        f"{data.get('latency_s', 0) * 1000:.0f} ms per request."
    )
    return (
        "\n\n".join([head, images_table(data), table(rows), "Targets:", targets(data, rows)]) + "\n"
    )


def write(data: dict[str, Any], out: Path, *, publish: bool = False) -> None:
    rows = summarize(data)
    md = markdown(data, rows)
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
