"""Parsing of byte sizes given on the command line (`4MiB`, `10MB`, `4194304`)."""

from __future__ import annotations

import argparse
import re

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1 << 10,
    "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gib": 1 << 30,
}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """A size in bytes; raises argparse.ArgumentTypeError for anything else."""
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4194304, 4MiB, 10MB)")
    return int(m.group(1)) * _UNITS[unit]


def positive_size(text: str) -> int:
    """Like parse_size, but zero is refused."""
    n = parse_size(text)
    if n <= 0:
        raise argparse.ArgumentTypeError("must be greater than zero")
    return n
