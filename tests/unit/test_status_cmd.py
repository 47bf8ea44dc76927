"""`pysoci status`: joining the snapshot store with the layer status files, and printing."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from snapshotter import labels
from snapshotter.cli import status_cmd
from snapshotter.cli.main import main
from snapshotter.mountinfo import mount_table, overlay_lowerdirs, unescape
from snapshotter.service.store import Kind, SnapshotRecord

REF = "reg.example/app:v1"
LAZY = "sha256:" + "a" * 64
NOZTOC = "sha256:" + "b" * 64
PLAIN = "sha256:" + "c" * 64
GONE = "sha256:" + "d" * 64


def record(
    i: int, digest: str, *, remote: bool, layer_dir: str | None, **labels: str
) -> SnapshotRecord:
    return SnapshotRecord(
        id=i,
        name=f"sha256:chain{i}",
        parent="",
        parent_id=None,
        kind=Kind.COMMITTED,
        created_at=0,
        updated_at=0,
        labels={
            "containerd.io/snapshot/remote/stargz.reference": REF,
            "containerd.io/snapshot/remote/stargz.digest": digest,
            **labels,
        },
        remote=remote,
        layer_dir=layer_dir,
        size=0 if remote else 4096,
    )


def sample(root: Path) -> list[status_cmd.ImageStatus]:
    records = [
        record(1, LAZY, remote=True, layer_dir=str(root / "fuse" / "aaaa")),
        record(2, NOZTOC, remote=False, layer_dir=str(root / "layers" / "sha256-bbb")),
        record(3, PLAIN, remote=False, layer_dir=None),
        record(4, GONE, remote=True, layer_dir=str(root / "fuse" / "dddd")),
        record(
            5,
            NOZTOC,
            remote=False,
            layer_dir=str(root / "layers" / "x"),
            **{labels.LOCAL_REASON: "lazy mount failed: zTOC does not match"},
        ),
        SnapshotRecord(6, "active", "", None, Kind.ACTIVE, 0, 0, {}),
    ]
    statuses = {
        "aaaa": {
            "digest": LAZY,
            "size": 1000,
            "fetchedSize": 250,
            "fetchedPercent": 25.0,
            "state": "fetching",
            "error": "",
            "spansFetched": 1,
            "spansTotal": 4,
            "readErrors": 0,
        },
        "eeee": {
            "digest": "sha256:" + "e" * 64,
            "size": 10,
            "fetchedSize": 10,
            "state": "complete",
        },
    }
    return status_cmd.build(records, statuses, root)


def test_layers_grouped_by_image_with_mode_and_reason(tmp_path: Path) -> None:
    images = sample(tmp_path)
    assert [i.image for i in images] == [REF, status_cmd.UNKNOWN_IMAGE]
    lazy, noztoc, plain, gone, failed = images[0].layers
    assert (lazy.mode, lazy.state, lazy.fetchedBytes, lazy.totalBytes) == (
        "lazy",
        "fetching",
        250,
        1000,
    )
    assert noztoc.mode == "local" and noztoc.reason == status_cmd.REASON_BY_PYSOCI
    assert plain.reason == status_cmd.REASON_BY_CONTAINERD
    assert gone.state == "unavailable" and gone.error
    assert failed.reason == "lazy mount failed: zTOC does not match"
    assert images[0].totals() == (250, 1000)
    (orphan,) = images[1].layers
    assert orphan.layerId == "eeee" and orphan.state == "complete"


def test_render(tmp_path: Path) -> None:
    out = io.StringIO()
    status_cmd.render(sample(tmp_path), out)
    text = out.getvalue()
    assert f"{REF}  (2 of 5 layers lazy, 250 B / 1000 B fetched, 25.0%)" in text
    assert "sha256:aaaaaaaaaaaa  lazy   [#####...............]  25.0%" in text
    assert "unpacked by pysoci" in text and "unpacked by containerd" in text
    assert "unavailable" in text
    empty = io.StringIO()
    status_cmd.render([], empty)
    assert "no images" in empty.getvalue()


def test_json_and_watch_until_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    frames = [sample(tmp_path), sample(tmp_path)]
    frames[1][0].layers[0].state = "complete"
    frames[1][0].layers[3].state = "complete"
    calls: list[Path] = []

    def collect(root: Path) -> list[status_cmd.ImageStatus]:
        calls.append(root)
        return frames[min(len(calls), 2) - 1]

    monkeypatch.setattr(status_cmd, "collect", collect)
    assert main(["status", "--root", str(tmp_path), "--json", "--watch", "--interval", "0"]) == 0
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(docs) == 2 and len(calls) == 2
    assert docs[0]["images"][0]["layers"][0]["fetchedPercent"] == 25.0


def test_not_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--root", str(tmp_path)]) == 1
    assert "no pysoci state" in capsys.readouterr().err
    (tmp_path / "metadata.db").touch()
    assert not status_cmd.is_pysoci_mount(tmp_path / "fuse")
    assert main(["status", "--root", str(tmp_path)]) == 1
    assert "data plane is not running" in capsys.readouterr().err


def test_mountinfo_unescape() -> None:
    assert unescape(r"/var/lib/with\040space") == "/var/lib/with space"
    assert unescape(r"/tab\011and\134backslash") == "/tab\tand\\backslash"
    assert unescape("/plain") == "/plain"
    assert unescape(r"/bytes\377") == os.fsdecode(b"/bytes\xff")  # not UTF-8: kept as is


def test_mountinfo_lines(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "36 25 0:32 / /var/lib/with\\040space rw,relatime - fuse.pysoci pysoci ro,user_id=0\n"
        "40 36 0:33 / /run/c/rootfs rw - overlay overlay rw,lowerdir=/l/a\\054b:/l/c,upperdir=/u\n"
        "41 36 0:34 / /run/d rw - overlay overlay rw,lowerdir+=/l/x,lowerdir+=/l/y\n"
        "broken line\n"
    )
    fuse, overlay, plus = mount_table(str(info))
    assert (fuse.mount_point, fuse.fstype, fuse.device) == (
        "/var/lib/with space",
        "fuse.pysoci",
        "0:32",
    )
    assert overlay_lowerdirs(overlay) == ["/l/a,b", "/l/c"]
    assert overlay_lowerdirs(plus) == ["/l/x", "/l/y"]


def test_pysoci_mount_roots_show_their_layers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A `pysoci mount` root has no metadata.db: its images are found from
    ROOT/mounts/<id>/state.json and their layers from that mount's own status files.
    (A real FUSE mount cannot be made here without root: the mountinfo check is stubbed; the
    interop suite runs the real `pysoci mount` + `pysoci status`.)"""
    live, gone = tmp_path / "mounts" / "1111", tmp_path / "mounts" / "2222"
    (live / "fuse" / ".status").mkdir(parents=True)
    (gone / "fuse").mkdir(parents=True)
    (live / "state.json").write_text(json.dumps({"dir": "/mnt/app", "pid": 1, "ref": REF}))
    (gone / "state.json").write_text(json.dumps({"dir": "/mnt/old", "pid": 2, "ref": "x/y:z"}))
    (live / "fuse" / ".status" / "aaaa.json").write_text(
        json.dumps({"digest": LAZY, "size": 1000, "fetchedSize": 500, "state": "fetching"})
    )
    monkeypatch.setattr(status_cmd, "is_pysoci_mount", lambda p: p == live / "fuse")
    assert main(["status", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{REF} (pysoci mount at /mnt/app)  (1 of 1 layers lazy, 500 B / 1000 B" in out
    assert "sha256:aaaaaaaaaaaa  lazy   [##########..........]  50.0%" in out
    assert "x/y:z (pysoci mount at /mnt/old): its server is gone" in out
    assert "pysoci unmount /mnt/old" in out
    assert main(["status", "--root", str(tmp_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(i["image"], i["mount"]) for i in doc["images"]] == [
        (REF, "/mnt/app"),
        ("x/y:z", "/mnt/old"),
    ]
    assert doc["images"][0]["layers"][0]["fetchedBytes"] == 500
    # With a daemon store too, whose daemon is down: the mounts are shown, the daemon noted.
    (tmp_path / "metadata.db").touch()
    assert main(["status", "--root", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "data plane is not running" in captured.err and REF in captured.out
