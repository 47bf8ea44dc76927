"""Log formatting for the daemon: JSON lines (or text), context fields, credential redaction.

Lines about one image, layer or snapshot carry it as a field. Set it for a block of work —
it follows trio tasks spawned inside and `trio.from_thread`/`to_thread` calls:

    with log_context(image=str(ref), layer=digest, snapshot=key):
        ...

or for one line: `log.info("...", extra={"layer": digest})`. Credentials (Authorization
headers, `user:password@` in URLs, token parameters, passwords in JSON) are redacted from
every line, whatever the formatter.

Formatting runs under the logging handler's lock, which every thread that logs needs, and a
message may carry client input (a snapshot key, a filter): a message, field or traceback
longer than `MAX_FIELD_CHARS` is cut in its middle first (`[… N characters cut …]`), and
every redaction pattern runs in linear time (each can start a match only where a run of its
characters begins, and none has nested or overlapping quantifiers), so a line costs
O(`MAX_FIELD_CHARS`) whatever the input.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Final, TextIO

CONTEXT_FIELDS: Final = ("image", "layer", "snapshot")
FORMATS: Final = ("text", "json")
REDACTED: Final = "<redacted>"
MAX_FIELD_CHARS: Final = 8192
"""Longest message or field kept whole; longer ones keep their first and last halves."""
MAX_EXCEPTION_CHARS: Final = 32768
"""Longest traceback kept whole (its last lines, the exception itself, are kept)."""
QUIET_LOGGERS: Final = ("httpx", "httpcore", "pyfuse3")
"""Libraries whose info lines would log every request (and URLs) at the daemon's level."""

_context: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar(
    "pysoci_log_context", default=()
)


@contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """Add fields (None or "" are skipped) to every log line of this block."""
    merged = {**dict(_context.get()), **{k: str(v) for k, v in fields.items() if v}}
    token = _context.set(tuple(merged.items()))
    try:
        yield
    finally:
        _context.reset(token)


def current_context() -> Mapping[str, str]:
    """The fields `log_context` set for the running code."""
    return dict(_context.get())


# ------------------------------------------------------------------------------ redaction


def _authorization(m: re.Match[str]) -> str:
    scheme = m.group(2)
    return f"{m.group(1)}{scheme + ' ' if scheme else ''}{REDACTED}"


_REDACTIONS: Final[tuple[tuple[re.Pattern[str], Any], ...]] = (
    # Authorization: Bearer xyz / 'authorization': 'Basic xyz' / Proxy-Authorization=...
    (
        re.compile(
            r"(?i)((?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?)"
            r"(?:(bearer|basic|token|negotiate)\s+)?[^\s\"',}]+"
        ),
        _authorization,
    ),
    # scheme://user:password@host. The look-behind lets a scheme start only where a run of
    # scheme characters starts: without it, every letter of a long run of letters and digits
    # starts a match that scans to the run's end (quadratic).
    (
        re.compile(r"(?i)(?<![a-z0-9+.-])([a-z][a-z0-9+.-]*://)[^/\s:@\"']+:[^/\s@\"']*@"),
        r"\1" + REDACTED + "@",
    ),
    # ?access_token=... &password=...
    (
        re.compile(
            r"(?i)([?&;](?:access_token|refresh_token|token|password|passwd|secret|"
            r"client_secret|sig|signature)=)[^&\s\"']+"
        ),
        r"\1" + REDACTED,
    ),
    # "password": "...", 'auth': '...', identitytoken="..." (the closing quote is not needed:
    # a value cut short by `_shorten` is redacted too)
    (
        re.compile(
            r"(?i)([\"']?\b(?:password|passwd|secret|auth|identitytoken|registrytoken|"
            r"access_token|refresh_token|token)[\"']?\s*[:=]\s*[\"'])[^\"']+"
        ),
        r"\1" + REDACTED,
    ),
)


_TOKEN_END: Final = re.compile(r"[\s\"',;&}]")


def _redact_whole(text: str) -> str:
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


def redact(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    """`text` with anything that looks like a credential replaced by `<redacted>`; longer
    than `limit` characters, its middle is cut out first (and said so)."""
    if len(text) <= limit:
        return _redact_whole(text)
    half = limit // 2
    head, tail = text[:half], text[len(text) - half :]
    # The tail starts in the middle of a token: it is dropped (up to the first delimiter),
    # so that the end of a secret whose keyword was cut away is not kept.
    boundary = _TOKEN_END.search(tail)
    tail = tail[boundary.start() :] if boundary else ""
    cut = len(text) - len(head) - len(tail)
    return f"{_redact_whole(head)} [… {cut} characters cut …]{_redact_whole(tail)}"


# ----------------------------------------------------------------------------- formatters

_STANDARD_ATTRS: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


class ContextFilter(logging.Filter):
    """Copies the `log_context` fields onto each record (an `extra=` value wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Always keeps the record."""
        for key, value in _context.get():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, context fields, extras."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON, credentials redacted."""
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key in _STANDARD_ATTRS or key.startswith("_") or key in out:
                continue
            out[key] = _jsonable(value)
        if record.exc_info:
            out["exception"] = redact(self.formatException(record.exc_info), MAX_EXCEPTION_CHARS)
        elif record.exc_text:
            out["exception"] = redact(record.exc_text, MAX_EXCEPTION_CHARS)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def _jsonable(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact(str(value))


class TextFormatter(logging.Formatter):
    """`time level logger: message [image=… layer=… snapshot=…]`, credentials redacted."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """The classic line plus the context fields that are set."""
        line = super().format(record)
        fields = " ".join(
            f"{k}={getattr(record, k)}" for k in CONTEXT_FIELDS if getattr(record, k, None)
        )
        if fields:
            head, nl, tail = line.partition("\n")
            line = f"{head} [{fields}]{nl}{tail}"
        return redact(line, MAX_EXCEPTION_CHARS if record.exc_info else MAX_FIELD_CHARS)


def configure_logging(level: str | int, fmt: str = "json", stream: TextIO | None = None) -> None:
    """Send the root logger's records to `stream` (stderr) as `fmt` ("json" or "text")."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
