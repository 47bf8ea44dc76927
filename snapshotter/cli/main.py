"""The `pysoci` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from snapshotter import __version__
from snapshotter.cli import (
    dataplane_cmd,
    index_cmd,
    mount_cmd,
    prefetch_cmd,
    serve_cmd,
    status_cmd,
    ztoc_cmd,
)
from snapshotter.errors import PysociError


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    parser = argparse.ArgumentParser(
        prog="pysoci",
        description=(
            "pysoci builds and inspects SOCI indexes (zTOCs: a table of contents plus gzip "
            "checkpoints per layer) so that images can be started before they are downloaded."
        ),
    )
    parser.add_argument("--version", action="version", version=f"pysoci {__version__}")
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity on stderr (default warning)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ztoc_cmd.register(sub)
    index_cmd.register(sub)
    mount_cmd.register(sub)
    serve_cmd.register(sub)
    dataplane_cmd.register(sub)
    status_cmd.register(sub)
    prefetch_cmd.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pysoci` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        code: int = args.func(args)
    except PysociError as e:
        print(f"pysoci: {e}", file=sys.stderr)
        return 1
    except ExceptionGroup as group:
        # Errors of concurrent work (several layers, several blobs) arrive grouped.
        matched, rest = group.split(PysociError)
        if rest is not None or matched is None:
            raise
        for leaf in _leaves(matched):
            print(f"pysoci: {leaf}", file=sys.stderr)
        return 1
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"pysoci: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
    return code


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


if __name__ == "__main__":
    sys.exit(main())
