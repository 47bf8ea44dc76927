"""pysoci: a lazy-loading containerd snapshotter for SOCI-indexed images."""

__version__ = "0.1.0"
BUILD_TOOL_IDENTIFIER = f"pysoci {__version__}"
