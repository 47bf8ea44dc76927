#!/usr/bin/env bash
# The real soci-snapshotter and the containerd it needs, built from the Go module proxy, for
# the interop tests and the benchmark (never put on PATH: Debian's containerd 1.6 in /usr/bin
# is what the rest of the suite uses):
#   /opt/pysoci-go/soci-v0.16.1/bin/{soci,soci-snapshotter-grpc}
#   /opt/pysoci-go/containerd-v1.7.35/bin/{containerd,ctr,containerd-shim-runc-v2}
# Idempotent and cached: a tool directory whose stamp matches its recipe is left alone, so a
# second run costs nothing; a build goes to a scratch directory and is moved in whole, so an
# interrupted build leaves nothing that looks finished. Called by scripts/setup.sh. Run as root.
# PYSOCI_GO_PREFIX moves the install (tests/fixtures/gotools.py reads the same variable).
set -euo pipefail

PREFIX=${PYSOCI_GO_PREFIX:-/opt/pysoci-go}
SOCI_VERSION=v0.16.1
# soci's `cmd` module has no tags on the proxy: this pseudo-version is the v0.16.1 commit.
SOCI_CMD_VERSION=v0.0.0-20260930233240-61147fe7c929
CONTAINERD_VERSION=v1.7.35   # soci v0.16 needs containerd >= 1.7
CONTAINERD_TAGS="no_btrfs no_devmapper no_zfs"

if ! command -v go >/dev/null 2>&1 && [[ -x /usr/local/go/bin/go ]]; then
  export PATH=$PATH:/usr/local/go/bin
fi

# module_dir MODULE@VERSION: the module's directory in the Go module cache (downloaded if missing).
module_dir() {
  local dir
  dir=$(GOFLAGS=-mod=mod go mod download -json "$1" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  if [[ -z $dir || ! -d $dir ]]; then
    echo "go-tools: go mod download $1 gave no directory" >&2
    return 1
  fi
  echo "$dir"
}

# build NAME RECIPE FUNCTION: run FUNCTION SRC BIN unless PREFIX/NAME/.recipe says RECIPE.
build() {
  local name=$1 recipe=$2 fn=$3 dest=$PREFIX/$1
  if [[ -f $dest/.recipe && $(cat "$dest/.recipe") == "$recipe" ]]; then
    return 0
  fi
  if ! command -v go >/dev/null 2>&1; then
    echo "go-tools: no Go toolchain (expected at /usr/local/go/bin/go) to build $name" >&2
    return 1
  fi
  echo "go-tools: building $name with $(go version)"
  local work start
  work=$(mktemp -d "$PREFIX/.build-$name.XXXXXX")
  start=$SECONDS
  if ! "$fn" "$work/src" "$work/out/bin"; then
    rm -rf "$work"
    echo "go-tools: building $name failed" >&2
    return 1
  fi
  echo "$recipe" > "$work/out/.recipe"
  rm -rf "$dest"
  mv "$work/out" "$dest"
  rm -rf "$work"
  echo "go-tools: built $name in $((SECONDS - start)) s"
}

build_soci() {
  local src=$1 bin=$2 root cmd
  root=$(module_dir "github.com/awslabs/soci-snapshotter@$SOCI_VERSION")
  cmd=$(module_dir "github.com/awslabs/soci-snapshotter/cmd@$SOCI_CMD_VERSION")
  # cmd/go.mod replaces the root module with `../`: lay the two out as in the repository.
  cp -r "$root" "$src"
  chmod -R u+w "$src"
  rm -rf "$src/cmd"
  cp -r "$cmd" "$src/cmd"
  chmod -R u+w "$src/cmd"
  (cd "$src/cmd" && GOFLAGS="-buildvcs=false -mod=mod" go build \
    -ldflags "-X github.com/awslabs/soci-snapshotter/version.Version=$SOCI_VERSION" \
    -o "$bin/" ./soci ./soci-snapshotter-grpc)
}

build_containerd() {
  local src=$1 bin=$2 root
  root=$(module_dir "github.com/containerd/containerd@$CONTAINERD_VERSION")
  cp -r "$root" "$src"
  chmod -R u+w "$src"
  (cd "$src" && GOFLAGS="-buildvcs=false -mod=mod" go build -tags "$CONTAINERD_TAGS" \
    -ldflags "-X github.com/containerd/containerd/version.Version=$CONTAINERD_VERSION" \
    -o "$bin/" ./cmd/containerd ./cmd/ctr ./cmd/containerd-shim-runc-v2)
}

# Several worktrees may run setup at once: one builds, the others wait and find it built.
mkdir -p "$PREFIX"
exec 9>"$PREFIX/.lock"
flock 9

build "soci-$SOCI_VERSION" "soci $SOCI_VERSION cmd $SOCI_CMD_VERSION" build_soci
build "containerd-$CONTAINERD_VERSION" "containerd $CONTAINERD_VERSION tags $CONTAINERD_TAGS" \
  build_containerd
