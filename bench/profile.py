"""Where pysoci's time goes during a cold start: py-spy on `pysoci serve`, summarised.

`python -m bench.profile --image ml --network 1gbit` runs one cold pysoci start exactly as
bench.startup does (same namespace, shaping, proxy, images), with py-spy sampling the daemon at
200 Hz (all threads, idle samples included) from before the pull until the ready line, and
writes OUT/profile-IMAGE-NETWORK.{txt,raw}: per thread, the share of samples spent idle (waiting
for FUSE requests or the network) vs running, and the top functions by self and inclusive time.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

from bench import images
from bench.netns import ShapedRegistry
from bench.startup import NETWORKS, OUT, WORK, RunResult, cleanup_dir, cold_run, publish

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def frame_name(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    file = m.group("file")
    short = "/".join(file.split("/")[-2:]) if "/" in file else file
    return f"{m.group('func')} ({short})"


def summarize(raw: Path, top: int = 25) -> str:
    threads: Counter[str] = Counter()
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0]
        threads[re.sub(r"0x[0-9a-f]+", "", thread)] += n
        total += n
        names = [frame_name(f) for f in frames[1:]] or ["(no python frame)"]
        self_t[names[-1]] += n
        for name in set(names):
            incl[name] += n
    out = [f"{total} samples at 200 Hz (all threads; idle included)", "", "per thread:"]
    out += [f"  {n:7d}  {100 * n / total:5.1f} %  {t}" for t, n in threads.most_common()]
    out += ["", f"top {top} by self samples:"]
    out += [f"  {n:7d}  {100 * n / total:5.1f} %  {f}" for f, n in self_t.most_common(top)]
    out += ["", f"top {top} by inclusive samples:"]
    out += [f"  {n:7d}  {100 * n / total:5.1f} %  {f}" for f, n in incl.most_common(top)]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", default="ml")
    parser.add_argument("--network", default="1gbit")
    parser.add_argument("--latency", type=float, default=0.010)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / f"profile-{args.image}-{args.network}.raw"
    reg = ShapedRegistry(images.CACHE / "registry")
    try:
        reg.open()
        image = publish(reg, [args.image])[args.image]
        reg.set_latency(args.latency)
        reg.shape(NETWORKS[args.network])
        res = RunResult(args.image, args.network, "pysoci", 0)
        cold_run(reg, image, "pysoci", res, warm=False, profile=raw)
    finally:
        reg.close()
        cleanup_dir(WORK / "run")
    head = (
        f"{args.image} on {args.network}: ready {res.ready_s:.2f} s "
        f"(pull step {res.pull_s:.2f} s), "
        f"{res.bytes_at_ready / 1e6:.1f} MB in {res.requests_at_ready} requests at ready\n"
    )
    text = head + summarize(raw)
    (args.out / f"profile-{args.image}-{args.network}.txt").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
