"""The lazy layer filesystem: one FUSE mount, one top-level directory per layer."""
