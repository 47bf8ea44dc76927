"""Recorded starts kept under ROOT/prefetch: round trip, a complete start not replaced by a
cut-short one, bounded in count and bytes, malformed files ignored."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from snapshotter.prefetch.record import (
    DONE,
    QUIET,
    RECORDING,
    UNMOUNTED,
    ImageRecording,
    LayerRecording,
    RecordingFormatError,
    parse_recordings,
)
from snapshotter.prefetch.store import RecordingStore

M1, M2, M3 = ("sha256:" + c * 64 for c in "123")
L1, L2 = ("sha256:" + c * 64 for c in "ab")
Z1, Z2 = ("sha256:" + c * 64 for c in "cd")


def rec(
    layer: str = L1, ztoc: str = Z1, spans: tuple[int, ...] = (3, 4, 0), **kw: object
) -> LayerRecording:
    return LayerRecording(
        layer_digest=layer,
        ztoc_digest=ztoc,
        num_spans=10,
        spans=spans,
        files=("usr/bin/x",),
        **kw,  # type: ignore[arg-type]
    )


def test_round_trip(tmp_path: Path) -> None:
    store = RecordingStore(tmp_path / "prefetch")
    assert store.load(M1) is None and store.all() == []
    layer = rec(state=DONE, reason=QUIET, started=100.0, last_read=104.5, span_bytes=7)
    assert store.save(M1, "r.example/app:1", layer, now=200.0)
    assert store.save(M1, "r.example/app:1", rec(L2, Z2, (1,)), now=201.0)
    image = store.load(M1)
    assert image is not None and image.image_ref == "r.example/app:1"
    assert [x.layer_digest for x in image.layers] == [L1, L2]
    assert image.layer(L1) == layer and image.layer(L1).duration == 4.5  # type: ignore[union-attr]
    assert store.layer(M1, L1, Z1) == layer
    assert store.layer(M1, L1, Z2) is None  # spans of another zTOC mean nothing
    assert parse_recordings(image.to_bytes(), max_size=1 << 20) == [image]
    assert oct(store.path(M1).stat().st_mode & 0o777) == "0o600"


def test_a_cut_short_start_does_not_replace_a_whole_one(tmp_path: Path) -> None:
    store = RecordingStore(tmp_path)
    whole = rec(state=DONE, reason=QUIET, started=1.0)
    assert store.save(M1, "", whole, now=1.0)
    assert not store.save(
        M1, "", rec(spans=(1,), state=DONE, reason=UNMOUNTED, started=2.0), now=2.0
    )
    assert not store.save(M1, "", rec(spans=(1,), state=RECORDING, started=2.0), now=2.0)
    assert store.layer(M1, L1, Z1) == whole
    newer = rec(spans=(8,), state=DONE, reason=QUIET, started=3.0)
    assert store.save(M1, "", newer, now=3.0)
    assert store.layer(M1, L1, Z1) == newer


def test_bounded_oldest_images_go(tmp_path: Path) -> None:
    store = RecordingStore(tmp_path, max_images=2)
    for i, m in enumerate((M1, M2, M3)):
        store.save(m, "", rec(), now=float(i))
        os.utime(store.path(m), ns=(i * 10**9, i * 10**9))
    assert store.load(M1) is None
    assert store.load(M2) is not None and store.load(M3) is not None
    small = RecordingStore(tmp_path / "small", max_bytes=4096)
    big = LayerRecording(L1, Z1, 5000, spans=tuple(range(5000)))
    assert not small.save(M1, "", big, now=0.0)  # over the byte bound: not kept
    assert small.load(M1) is None


def test_malformed_files_are_ignored(tmp_path: Path) -> None:
    store = RecordingStore(tmp_path)
    store.save(M1, "", rec(), now=0.0)
    store.path(M2).write_text("{not json")
    other = json.loads(store.path(M1).read_text())
    store.path(M3).write_text(json.dumps(other))  # a file that records another image
    assert store.load(M2) is None and store.load(M3) is None
    assert store.load(M1) is not None


@pytest.mark.parametrize(
    "change",
    [
        {"spans": [1, 1]},
        {"spans": [10]},
        {"spans": [-1]},
        {"spans": ["1"]},
        {"num_spans": 0},
        {"state": "weird"},
        {"ztoc_digest": "sha256:xyz"},
        {"started": float("nan")},
        {"span_bytes": -1},
        {"files": [1]},
    ],
)
def test_layer_recording_validated(change: dict[str, object]) -> None:
    raw = rec().to_json()
    raw.update(change)
    with pytest.raises(RecordingFormatError):
        LayerRecording.from_json(raw)


def test_image_recording_validated() -> None:
    ok = ImageRecording(M1, "x", 0.0, (rec(),)).to_json()
    with pytest.raises(RecordingFormatError):
        ImageRecording.from_json(dict(ok, version=2))
    with pytest.raises(RecordingFormatError):
        ImageRecording.from_json(dict(ok, layers=[rec().to_json(), rec().to_json()]))
    with pytest.raises(RecordingFormatError):
        parse_recordings(b"x" * 100, max_size=10)
    assert parse_recordings(json.dumps({"recordings": [ok]}).encode(), max_size=1 << 20)[0].layers
