# pysoci in a container. For now this packages the `pysoci` CLI (index building and
# inspection); the snapshotter daemon and its DaemonSet set-up (privileged, /dev/fuse, host
# paths) come with the daemon.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv zlib1g ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md /src/
COPY snapshotter /src/snapshotter
RUN python3 -m venv /opt/pysoci && /opt/pysoci/bin/pip install --no-cache-dir /src
ENV PATH=/opt/pysoci/bin:$PATH
ENTRYPOINT ["pysoci"]
