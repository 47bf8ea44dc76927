"""The files a workload reads before it is ready: the input of every prefetch mode.

Neither snapshotter is involved: the image's layers are unpacked (in order) into a scratch root
and the workload runs there under `strace -f -y` (chroot, the image's environment, /proc, /dev
and /sys from the host, as a container sees them; only what happens after the chroot counts).
A file counts when the workload opened it for reading (not O_TRUNC, not write-only) before the
ready line appeared, it is a regular file of the image (there after unpacking, before the
workload ran), and the path is the one the kernel resolved (`-y` prints the opened fd's path,
so symlinks and relative paths after `chdir` are followed); executables run with `execve`
count too. The list keeps the order of the first open.

The same list feeds `soci convert --prefetch-files-json` (mode `soci+prefetch`) and, once pysoci
accepts soci's inputs, `pysoci convert --prefetch-from`. It is cached in
/var/cache/pysoci-bench/files/, keyed by the image manifest and the workload.

`python -m bench.filelist IMAGE` prints the list (building the image if needed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from bench import images

ENV = [*images.ENV, "HOME=/root"]
EXCLUDED = ("/proc/", "/sys/", "/dev/")
# `1234 1733220000.123456 openat(AT_FDCWD, "x", O_RDONLY|O_CLOEXEC) = 3</abs/path>`
_OPEN = re.compile(
    r"^(?P<pid>\d+) +(?P<ts>\d+\.\d+) +open(?:at2?)?\((?P<args>.*)\) += (?P<fd>\d+)<(?P<path>.*)>$"
)
_CHROOT = re.compile(r"^\d+ +\d+\.\d+ +chroot\(")
_EXEC = re.compile(r'^(?P<pid>\d+) +(?P<ts>\d+\.\d+) +execve\("(?P<path>(?:[^"\\]|\\.)*)", .* = 0$')
_UNESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|[0-7]{1,3}|.)")
_ESCAPES = {b"n": b"\n", b"t": b"\t", b"r": b"\r", b"v": b"\v", b"f": b"\f"}


def _unescape(s: str) -> str:
    """strace's C-style escapes (non-ASCII bytes as octal) back to the file name."""

    def one(m: re.Match[bytes]) -> bytes:
        e = m.group(1)
        if e[:1] == b"x":
            return bytes([int(e[1:], 16)])
        if e[:1].isdigit():
            return bytes([int(e, 8)])
        return _ESCAPES.get(e, e)

    return os.fsdecode(_UNESCAPE.sub(one, os.fsencode(s)))


def cache_path(name: str, manifest_digest: str) -> Path:
    wl = images.WORKLOADS[name]
    key = hashlib.sha256(json.dumps([wl.args, wl.ready, ENV]).encode()).hexdigest()[:12]
    return images.CACHE / "files" / f"{name}-{manifest_digest.split(':')[1][:16]}-{key}.json"


def workload_files(
    name: str, layers: list[images.LayerFile], manifest_digest: str, work: Path
) -> list[str]:
    """The image's files that workload `name` reads before ready (cached)."""
    path = cache_path(name, manifest_digest)
    if path.exists():
        files: list[str] = json.loads(path.read_text())
        return files
    root = work / "files-root"
    _remove_tree(root)
    root.mkdir(parents=True)
    try:
        members = unpack(layers, root)
        with _mounts(root):
            log, ready_at = trace(name, root, work / "files.strace")
        files = parse(log.read_text(errors="replace"), ready_at, str(root), members)
    finally:
        _remove_tree(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(files, indent=0))
    return files


def unpack(layers: list[images.LayerFile], root: Path) -> set[str]:
    """Unpack the layers in order; the absolute paths of the image's regular files (walked
    before the workload runs, so what it creates does not count)."""
    for layer in layers:
        with subprocess.Popen(["pigz", "-dc", str(layer.blob)], stdout=subprocess.PIPE) as unz:
            res = subprocess.run(
                ["tar", "-x", "--numeric-owner", "--same-owner", "-p", "-C", str(root)],
                stdin=unz.stdout,
                capture_output=True,
                check=False,
            )
        if res.returncode != 0 or unz.returncode != 0:
            raise RuntimeError(f"unpacking {layer.blob} failed: {res.stderr[-2000:]!r}")
    members: set[str] = set()
    prefix = len(str(root))
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                members.add(path[prefix:])
    return members


@contextlib.contextmanager
def _mounts(root: Path) -> Iterator[None]:
    mounted: list[Path] = []
    try:
        for args, where in (
            (["-t", "proc", "proc"], "proc"),
            (["--rbind", "/dev"], "dev"),
            (["--rbind", "-o", "ro", "/sys"], "sys"),
        ):
            target = root / where
            target.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", *args, str(target)], check=True, capture_output=True)
            mounted.append(target)
        yield
    finally:
        for target in reversed(mounted):
            subprocess.run(["umount", "-R", "-l", str(target)], check=False, capture_output=True)


def trace(name: str, root: Path, log: Path) -> tuple[Path, float]:
    """Run the workload under strace until its ready line; the log and the ready time."""
    wl = images.WORKLOADS[name]
    cmd = ["strace", "-f", "-qq", "-ttt", "-y", "-s", "4096", "-o", str(log),
           "-e", "trace=chroot,execve,open,openat,openat2", "-e", "status=successful",
           "chroot", str(root), *wl.args]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        env=dict(e.split("=", 1) for e in ENV),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=str(root),
        start_new_session=True,
    )
    ready: list[float] = []
    output: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            output.append(line)
            if not ready and wl.is_ready(line):
                ready.append(time.time())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 900
    while not ready and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not ready:
        reader.join(5)
    if proc.poll() is None:
        if not wl.exits or not ready:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(10)
    if not ready:
        raise RuntimeError(f"{name}: no ready line under strace: {output[-20:]}")
    return log, ready[0]


def parse(text: str, ready_at: float, root: str, members: set[str]) -> list[str]:
    """The image files opened for reading (or executed) after the chroot and up to
    `ready_at`, in first-open order (what the host's `chroot` binary opens before does not
    count)."""
    seen: dict[str, None] = {}
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if _CHROOT.match(line)), None)
    if start is None:
        raise RuntimeError("no chroot in the strace log")
    for line in lines[start + 1 :]:
        m = _OPEN.match(line)
        if m is not None:
            args = m.group("args")
            if "O_TRUNC" in args or "O_WRONLY" in args or "O_DIRECTORY" in args:
                continue
            path = _unescape(m.group("path"))
        else:
            m = _EXEC.match(line)
            if m is None:
                continue
            path = _resolve(root, _unescape(m.group("path")))
        if float(m.group("ts")) > ready_at:
            continue
        if path.startswith(root + "/"):
            path = path[len(root) :]
        if path.startswith(EXCLUDED) or path not in members:
            continue
        seen.setdefault(path, None)
    return list(seen)


def _resolve(root: str, path: str) -> str:
    """`path` (absolute inside the chroot) with its symlinks resolved inside `root`."""
    todo = [p for p in path.split("/") if p]
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        cand = "/" + "/".join([*done, part])
        try:
            target = os.readlink(root + cand)
        except OSError:
            done.append(part)
            continue
        hops += 1
        if hops > 40:
            return cand
        if target.startswith("/"):
            done = []
        todo = [p for p in target.split("/") if p] + todo
    return "/" + "/".join(done)


def _remove_tree(root: Path) -> None:
    if not root.exists():
        return
    with open("/proc/self/mountinfo") as f:
        points = [ln.split()[4] for ln in f if ln.split()[4].startswith(str(root) + "/")]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    name = args[0] if args else "python"
    desc, layers = images.write_layout(images.CACHE / "layout", name)
    files = workload_files(name, layers, desc.digest, Path("/var/tmp/pysoci-bench"))
    for f in files:
        print(f)
    print(f"{len(files)} files", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
