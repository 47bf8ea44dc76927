# pysoci's snapshotter daemon in a container, as a DaemonSet (or `docker run`) runs it on a
# node. It must run privileged, with /dev/fuse, the node's network, and the host paths it
# shares with containerd mounted at the SAME paths inside (pysoci hands containerd paths
# under /var/lib/pysoci, and its FUSE mounts there must propagate to the host: rshared).
# See README.md, "Installing on a node". The image also carries the whole `pysoci` CLI.
#
#   docker build -t pysoci .
#   docker run -d --name pysoci --privileged --network host --device /dev/fuse \
#     -v /var/lib/pysoci:/var/lib/pysoci:rshared -v /run/pysoci:/run/pysoci \
#     -v /etc/pysoci:/etc/pysoci:ro -v /etc/containerd/certs.d:/etc/containerd/certs.d:ro \
#     pysoci

# Build stage: pyfuse3 compiles against libfuse3 (no wheel on PyPI).
FROM debian:bookworm-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-dev pkg-config build-essential libfuse3-dev \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md /src/
COPY snapshotter /src/snapshotter
RUN python3 -m venv /opt/pysoci \
 && /opt/pysoci/bin/pip install --no-cache-dir /src

# Runtime: the venv (same Debian, same python3 path) plus what the daemon calls at run time:
# libfuse3 and fusermount3 (fuse3), the system libz (zlib1g) and ISA-L (libisal2), both through
# ctypes, CA roots.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 fuse3 libfuse3-3 zlib1g libisal2 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/pysoci /opt/pysoci
# Every key commented out with its default; mount the node's /etc/pysoci over it.
COPY config/config.toml /etc/pysoci/config.toml
ENV PATH=/opt/pysoci/bin:$PATH
# SIGTERM: pysoci stops serving, unmounts its FUSE tree and flushes its state.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/pysoci/bin/pysoci", "serve"]
CMD ["--address", "/run/pysoci/pysoci.sock", "--root", "/var/lib/pysoci"]
