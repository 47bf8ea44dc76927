"""snapshotter/_proto/ is exactly what scripts/gen_proto.sh makes of proto/ (not stale)."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _files(d: Path) -> set[str]:
    return {
        str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    out = tmp_path / "_proto"
    subprocess.run(
        [str(REPO / "scripts" / "gen_proto.sh"), str(out)],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
        cwd=REPO,
    )
    committed = REPO / "snapshotter" / "_proto"
    assert _files(out) == _files(committed), "files differ: run scripts/gen_proto.sh"
    stale = [
        f for f in sorted(_files(out)) if not filecmp.cmp(out / f, committed / f, shallow=False)
    ]
    assert not stale, f"stale generated code {stale}: run scripts/gen_proto.sh (make proto)"


def test_wire_names_match_containerd() -> None:
    from snapshotter._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
    from snapshotter._proto.containerd.types import mount_pb2

    svc = pb.DESCRIPTOR.services_by_name["Snapshots"]
    assert svc.full_name == "containerd.services.snapshots.v1.Snapshots"
    rpcs = ["Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "List", "Usage"]
    assert [m.name for m in svc.methods] == [*rpcs, "Cleanup"]
    assert svc.methods_by_name["List"].server_streaming
    assert mount_pb2.Mount.DESCRIPTOR.full_name == "containerd.types.Mount"
    numbers = {
        "PrepareSnapshotRequest": {"snapshotter": 1, "key": 2, "parent": 3, "labels": 4},
        "CommitSnapshotRequest": {"snapshotter": 1, "name": 2, "key": 3, "labels": 4},
        "UpdateSnapshotRequest": {"snapshotter": 1, "info": 2, "update_mask": 3},
        "ListSnapshotsRequest": {"snapshotter": 1, "filters": 2},
        "UsageResponse": {"size": 1, "inodes": 2},
        "Info": {"name": 1, "parent": 2, "kind": 3, "created_at": 4, "updated_at": 5, "labels": 6},
    }
    for msg, fields in numbers.items():
        desc = pb.DESCRIPTOR.message_types_by_name[msg]
        assert {f.name: f.number for f in desc.fields} == fields
    assert {v.name: v.number for v in pb.Kind.DESCRIPTOR.values} == {
        "UNKNOWN": 0, "VIEW": 1, "ACTIVE": 2, "COMMITTED": 3,
    }  # fmt: skip
    m = mount_pb2.Mount.DESCRIPTOR
    assert {f.name: f.number for f in m.fields} == {
        "type": 1,
        "source": 2,
        "target": 3,
        "options": 4,
    }
