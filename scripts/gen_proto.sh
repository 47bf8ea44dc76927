#!/usr/bin/env bash
# Generate snapshotter/_proto/ from proto/ (the one documented command; `make proto` runs it).
#   scripts/gen_proto.sh [OUT_DIR]     OUT_DIR defaults to snapshotter/_proto
# Messages (*_pb2.py + .pyi stubs) and the gRPC service (*_pb2_grpc.py) come from
# grpc_tools.protoc in the virtualenv; imports are rewritten to live under snapshotter._proto.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=${1:-snapshotter/_proto}

protos=(
  containerd/types/mount.proto
  containerd/services/snapshots/v1/snapshots.proto
)

rm -rf "$out"
mkdir -p "$out"
"$PY" -m grpc_tools.protoc -I proto \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "${protos[@]}"

# protoc writes `from containerd.x import y`; the package lives under snapshotter._proto.
find "$out" -name '*.py' -o -name '*.pyi' | sort | while read -r f; do
  sed -i -E 's/^from containerd(\.[A-Za-z0-9_.]+)? import /from snapshotter._proto.containerd\1 import /' "$f"
done

printf '"""Generated from proto/ by scripts/gen_proto.sh; do not edit."""\n' > "$out/__init__.py"
find "$out" -mindepth 1 -type d | sort | while read -r d; do
  : > "$d/__init__.py"
done
