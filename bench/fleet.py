"""Fleet benchmark: N nodes (1, 3, 5) start the same SOCI image through one shared mirror.

Each node is a network namespace with its own containerd 1.6 and `pysoci serve`
(tests/fixtures/fleet.py); the origin docker-registry sits behind a byte-counting proxy and the
mirror in front of it. For each mirror kind and node count, with an empty mirror cache and
fresh nodes, all nodes at once: `ctr-remote image rpull --snapshotter soci`, `ctr run` of the
workload (time to ready), then pysoci's background fill until every lazy layer is complete
(time to complete). Reported: origin bytes / the image's compressed size (all nodes together,
manifests and zTOCs included), and the per-node times.

    python -m bench.fleet [--nodes 1,3,5] [--mirrors nginx-slice,registry-proxy] [--image python]

Writes bench/out/fleet.json and bench/out/fleet.md. Root only; not part of the test run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import images
from tests.fixtures.fleet import Fleet, FleetImage, MirrorKind, pull_and_run, push_layout, run_all

OUT = Path(__file__).resolve().parent / "out"
MIRRORS: dict[str, str] = {
    "nginx-slice": "nginx 1.22, proxy_cache + slice 1m (caches byte ranges)",
    "registry-proxy": "docker-registry 2.8 in proxy mode (pull-through cache of whole blobs)",
    "none": "no mirror: every node pulls from the origin",
}


def measure(f: Fleet, image: FleetImage, nodes: int, workload: list[str]) -> dict[str, Any]:
    """One run: a fresh mirror cache, `nodes` fresh nodes started at once."""
    f.start_mirror()
    try:
        for _ in range(nodes):
            f.add_node()
        f.reset_counts()
        started = time.monotonic()
        runs = run_all(f.nodes, lambda n: pull_and_run(n, image.soci, workload, f"bench-{n.index}"))
        wall = time.monotonic() - started
        origin = f.origin_bytes()
        assert f.counted is not None
        requests = f.counted.stats.requests
    finally:
        f.close_nodes()
    ready = [r.ready_seconds for r in runs]
    complete = [r.complete_seconds for r in runs]
    return {
        "nodes": nodes,
        "origin_bytes": origin,
        "origin_requests": requests,
        "ratio": origin / image.compressed_size,
        "ready_seconds": ready,
        "complete_seconds": complete,
        "ready_median": statistics.median(ready),
        "complete_median": statistics.median(complete),
        "wall_seconds": wall,
        "outputs_ok": all(workload_ok(r.output) for r in runs),
    }


def workload_ok(output: str) -> bool:
    return any(images.WORKLOADS["python"].is_ready(line) for line in output.splitlines())


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Fleet: {result['image']} ({result['compressed_size'] / 1e6:.1f} MB compressed)",
        "",
        f"{result['when']}, {result['machine']}. All nodes start at once; a run ends when every",
        "node's container printed its ready line and its lazy layers are complete (background",
        "fill done, whole-layer digests checked). Origin bytes include manifests and zTOCs.",
        "",
        "| mirror | nodes | origin bytes / image size | origin MB | time to ready per node, s "
        "(median; each) | time to complete, s (median) |",
        "|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        each = ", ".join(f"{s:.2f}" for s in run["ready_seconds"])
        lines.append(
            f"| {run['mirror']} | {run['nodes']} | {run['ratio']:.3f} |"
            f" {run['origin_bytes'] / 1e6:.1f} | {run['ready_median']:.2f} ({each}) |"
            f" {run['complete_median']:.2f} |"
        )
    lines += ["", "Mirrors:", ""]
    lines += [f"- `{m}`: {MIRRORS[m]}" for m in result["mirrors"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="1,3,5", help="node counts (default 1,3,5)")
    parser.add_argument(
        "--mirrors", default="nginx-slice,registry-proxy", help=f"of {', '.join(MIRRORS)}"
    )
    parser.add_argument("--image", default="python", choices=sorted(images.WORKLOADS))
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--keep", type=Path, help="work in this directory and keep it (logs of every node)"
    )
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.nodes.split(",")]
    mirrors = args.mirrors.split(",")
    for m in mirrors:
        if m not in MIRRORS:
            parser.error(f"unknown mirror {m!r}")
    workload = list(images.WORKLOADS[args.image].args)
    runs: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        if args.keep is not None:
            work = args.keep
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pysoci-fleet-")))
        layout = work / "layout"
        _, layers = images.write_layout(layout, args.image)
        size = sum(layer.size for layer in layers)
        for mirror in mirrors:
            kind: MirrorKind = mirror  # type: ignore[assignment]
            f = Fleet(work / f"{mirror}-{time.strftime('%H%M%S')}", kind)
            try:
                f.open()
                image = push_layout(f, layout, args.image, f"fleet/{args.image}", work, size)
                for n in counts:
                    images.log(f"fleet: {mirror}, {n} node(s)")
                    run = {"mirror": mirror, **measure(f, image, n, workload)}
                    images.log(
                        f"  origin {run['origin_bytes'] / 1e6:.1f} MB = {run['ratio']:.3f}x;"
                        f" ready {run['ready_median']:.2f} s; complete"
                        f" {run['complete_median']:.2f} s"
                    )
                    runs.append(run)
            finally:
                f.close()
    result = {
        "image": args.image,
        "compressed_size": size,
        "mirrors": mirrors,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.node()}, {platform.machine()}",
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "fleet.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if all(r["outputs_ok"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
