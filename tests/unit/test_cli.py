"""The pysoci command, run as a user would (the installed console script)."""

from __future__ import annotations

import argparse
import io
import json
import random
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.cli.main import build_parser
from tests.fixtures.images import Layer, gzip_blob, write_image
from tests.fixtures.tars import random_tar

PYSOCI = str(Path(sys.executable).with_name("pysoci"))


def pysoci(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([PYSOCI, *args], capture_output=True, text=True)
    if ok:
        assert res.returncode == 0, res.stderr
    return res


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    tar = random_tar(random.Random(42), max_file_size=300_000, max_entries=50)
    path = tmp_path_factory.mktemp("layer") / "layer.tar.gz"
    path.write_bytes(gzip_blob(tar))
    return path, tar


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str]]:
    """Every (sub)command: its words, its parser, and the help its parent lists it with."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*path, name), sub, helps.get(name, "")
                yield from _commands(sub, (*path, name))


def test_help_texts_are_complete() -> None:
    parser = build_parser()
    commands = list(_commands(parser))
    names = {words[0] for words, _, _ in commands}
    assert {"ztoc", "create", "convert", "push", "index", "mount", "unmount", "serve"} <= names
    assert "status" in names
    for words, sub, listed_help in commands:
        assert listed_help.strip(), f"`pysoci {' '.join(words)}` has no summary in its parent"
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            what = "/".join(action.option_strings) or action.dest
            assert (action.help or "").strip(), f"`pysoci {' '.join(words)}` {what}: no help"
    # The installed script prints the same: every command is listed in the top-level help.
    top = pysoci("--help").stdout
    for name in names:
        assert name in top
    for words, _, _ in commands:
        assert f"usage: pysoci {' '.join(words)}" in " ".join(
            pysoci(*words, "--help").stdout.split()
        )


def test_ztoc_build_info_get_file(layer: tuple[Path, bytes], tmp_path: Path) -> None:
    path, tar = layer
    ztoc = tmp_path / "layer.ztoc"
    out = pysoci("ztoc", "build", str(path), "-o", str(ztoc), "--span-size", "16KiB").stdout
    digest, size, name = out.split()
    assert digest.startswith("sha256:") and int(size) == ztoc.stat().st_size and name == str(ztoc)
    info = json.loads(pysoci("ztoc", "info", str(ztoc)).stdout)
    assert info["span_size"] == 16 << 10
    assert info["size"] == ztoc.stat().st_size
    assert info["version"] == "0.9"
    assert info["num_spans"] > 3
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        members = {m.name: m for m in t.getmembers()}
        assert info["num_files"] == len(members)
        by_name = {f["filename"].rstrip("/"): f for f in info["files"]}
        for name, m in members.items():
            f = by_name[name]
            assert f["offset"] == m.offset_data
            if m.isreg():
                assert f["size"] == m.size
                assert f["start_span"] <= f["end_span"]
        assert info["num_multi_span_files"] == sum(
            1 for f in info["files"] if f["type"] == "reg" and f["end_span"] > f["start_span"]
        )
        biggest = max((m for m in members.values() if m.isreg()), key=lambda m: m.size)
    raw = subprocess.run(
        [PYSOCI, "ztoc", "get-file", str(ztoc), str(path), "/" + biggest.name],
        capture_output=True,
        check=True,
    ).stdout
    dest = tmp_path / "out"
    res = pysoci("ztoc", "get-file", str(ztoc), str(path), biggest.name, "-o", str(dest), "--stats")
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        src = t.extractfile(biggest.name)
        assert src is not None
        expected = src.read()
        assert dest.read_bytes() == expected
        assert raw == expected
    read = int(res.stderr.split()[1])
    assert read < path.stat().st_size, "get-file must read only the spans of the file"


def test_errors_are_clear_and_nonzero(layer: tuple[Path, bytes], tmp_path: Path) -> None:
    path, _ = layer
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00" * 100)
    res = pysoci("ztoc", "info", str(junk), ok=False)
    assert (
        res.returncode == 1 and res.stderr.startswith("pysoci: ") and "Traceback" not in res.stderr
    )
    ztoc = tmp_path / "z"
    pysoci("ztoc", "build", str(path), "-o", str(ztoc))
    res = pysoci("ztoc", "get-file", str(ztoc), str(path), "no/such/file", ok=False)
    assert res.returncode == 1 and "no such file" in res.stderr
    res = pysoci("ztoc", "build", str(path), "-o", str(ztoc), "--span-size", "0", ok=False)
    assert res.returncode == 2 and "greater than zero" in res.stderr
    res = pysoci("ztoc", "build", str(junk), "-o", str(ztoc), ok=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr


def test_create_convert_list_info_rm(tmp_path: Path) -> None:
    tar = random_tar(random.Random(8), max_file_size=400_000, max_entries=40)
    layout = tmp_path / "layout"
    write_image(layout, "app", [Layer.from_tar(tar)])
    pysoci(
        "convert",
        "--oci-layout",
        f"{layout}:app",
        "app-soci",
        "--min-layer-size",
        "1KiB",
        "--span-size",
        "64KiB",
    )
    res = pysoci("create", "--oci-layout", f"{layout}:app", "--min-layer-size", "1KiB")
    assert "built" in res.stdout or "reused" in res.stdout
    listing = pysoci("index", "list", "--oci-layout", str(layout)).stdout.splitlines()
    rows = [line.split() for line in listing[1:]]
    assert sorted(r[1] for r in rows) == ["v1", "v2"]
    v1 = next(r[0] for r in rows if r[1] == "v1")
    info = json.loads(pysoci("index", "info", "--oci-layout", str(layout), v1).stdout)
    assert info["config"]["mediaType"] == "application/vnd.amazon.soci.index.v1+json"
    pysoci("index", "rm", "--oci-layout", str(layout), v1)
    listing = pysoci("index", "list", "--oci-layout", str(layout)).stdout.splitlines()
    assert [line.split()[1] for line in listing[1:]] == ["v2"]
    res = pysoci("create", "--oci-layout", f"{layout}:nope", ok=False)
    assert res.returncode == 1 and "nope" in res.stderr
