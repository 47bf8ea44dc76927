#!/usr/bin/env bash
# One-time, idempotent set-up of everything pysoci's demo and tests need on Debian bookworm:
# Debian packages, the Python virtualenv with pysoci installed editable. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3 python3-venv python3-dev pkg-config build-essential
  fuse3 libfuse3-dev     # pyfuse3 builds against libfuse3; fusermount3 unmounts
  gzip pigz zstd tar
  flatbuffers-compiler   # flatc: independent zTOC reader generated in the tests
  umoci skopeo           # build and inspect OCI image layouts
  debootstrap            # a real Debian rootfs image for the lazy filesystem tests
  containerd runc        # the real containerd 1.6 and runtime the snapshotter serves
  stargz-snapshotter     # ctr-remote: containerd's remote-snapshot pull
  golang-github-containerd-containerd-dev  # containerd's API protos (reference for proto/)
  docker-registry        # the real registry the registry tests run against (and its proxy mode)
  nginx                  # a registry mirror caching byte ranges (slice module): fleet tests
  systemd                # systemd-analyze verify and systemd-socket-activate (unit tests)
  libisal2               # ISA-L: span inflation at about twice zlib's speed (ctypes; zlib without it)
  zlib1g-dev             # soci-snapshotter's zTOC code links libz through cgo (go-tools.sh)
  strace                 # bench/filelist.py: the files a workload reads (prefetch lists)
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: missing Debian packages (${missing[*]}); run as root or install them" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# nerdctl (a release that supports containerd 1.6), built from the Go module proxy. The
# proxy answers for the version but not for the module's version list, which
# `go install pkg@version` asks for: download the module and build it in place instead.
NERDCTL_VERSION=v1.7.7   # needs Go >= 1.21 to build
if ! command -v nerdctl >/dev/null 2>&1; then
  if ! command -v go >/dev/null 2>&1 && [[ -x /usr/local/go/bin/go ]]; then
    export PATH=$PATH:/usr/local/go/bin
  fi
  if ! command -v go >/dev/null 2>&1; then
    echo "setup: installing Debian's golang-go to build nerdctl"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends golang-go >/dev/null
  fi
  echo "setup: building nerdctl $NERDCTL_VERSION with $(go version)"
  dir=$(go mod download -json "github.com/containerd/nerdctl@$NERDCTL_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  if ! (cd "$dir" && GOFLAGS=-mod=mod go build -o /usr/local/bin/nerdctl ./cmd/nerdctl); then
    echo "setup: building nerdctl failed (it needs Go >= 1.21; Debian bookworm's golang-go is 1.19: install a newer Go, e.g. bookworm-backports' golang-1.21)" >&2
    exit 1
  fi
fi

# The real soci-snapshotter v0.16.1 and the containerd 1.7 it needs (interop tests, bench),
# under /opt/pysoci-go; cached, so this costs nothing once built.
scripts/go-tools.sh

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: $PYTHON is older than 3.11" >&2
  exit 1
fi
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.pysoci-deps
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  echo "$want" > "$stamp"
fi
