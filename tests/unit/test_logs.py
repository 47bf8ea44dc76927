"""JSON log lines, image/layer/snapshot context fields, and credential redaction."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from snapshotter.config import fetch_config
from snapshotter.errors import DigestMismatchError
from snapshotter.fetch.cache import DiskCache
from snapshotter.fetch.spans import SpanManager, SpanMemoryCache
from snapshotter.logs import (
    ContextFilter,
    JsonFormatter,
    TextFormatter,
    configure_logging,
    current_context,
    log_context,
    redact,
)
from tests.fixtures.range_source import BlobRangeSource, make_layer

SECRETS = ("s3cret", "dXNlcjpzM2NyZXQ=", "eyJhbGciOi.payload.sig", "tok123", "hunter2")


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger writing JSON lines to a buffer, with the context filter, like the daemon."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("pysoci.test.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, out
    finally:
        logger.removeHandler(handler)


def lines(out: io.StringIO) -> list[dict[str, object]]:
    text = out.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_one_json_object_per_line(capture: tuple[logging.Logger, io.StringIO]) -> None:
    log, out = capture
    log.info("hello %s", "world")
    log.warning("multi\nline")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    first, second, third = lines(out)
    assert first["message"] == "hello world"
    assert first["level"] == "info" and first["logger"] == "pysoci.test.logs"
    assert str(first["time"]).endswith("Z") and "T" in str(first["time"])
    assert set(first) == {"time", "level", "logger", "message"}
    assert second["message"] == "multi\nline" and second["level"] == "warning"
    assert third["level"] == "error"
    assert "ValueError: boom" in str(third["exception"])


def test_context_fields(capture: tuple[logging.Logger, io.StringIO]) -> None:
    log, out = capture
    with log_context(image="reg/app:v1", snapshot="k1"):
        log.info("image only")
        with log_context(layer="sha256:aa", snapshot=None):
            assert current_context() == {
                "image": "reg/app:v1",
                "snapshot": "k1",
                "layer": "sha256:aa",
            }
            log.info("with layer")
            log.info("extra wins", extra={"layer": "sha256:bb"})
        log.info("layer gone")
    log.info("no context")
    a, b, c, d, e = lines(out)
    assert (a["image"], a["snapshot"], a.get("layer")) == ("reg/app:v1", "k1", None)
    assert (b["image"], b["layer"], b["snapshot"]) == ("reg/app:v1", "sha256:aa", "k1")
    assert c["layer"] == "sha256:bb"
    assert "layer" not in d and d["image"] == "reg/app:v1"
    assert not {"image", "layer", "snapshot"} & set(e)


async def test_context_follows_tasks_and_threads(
    capture: tuple[logging.Logger, io.StringIO],
) -> None:
    log, out = capture

    async def child() -> None:
        log.info("in a child task")

    with log_context(layer="sha256:cc"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)
        await trio.to_thread.run_sync(log.info, "in a worker thread")
    log.info("outside")
    a, b, c = lines(out)
    assert a["layer"] == b["layer"] == "sha256:cc"
    assert "layer" not in c


async def test_span_manager_lines_carry_the_layer(
    capture: tuple[logging.Logger, io.StringIO], tmp_path: Path
) -> None:
    _, out = capture
    handler = logging.getLogger("pysoci.test.logs").handlers[0]
    spans_log = logging.getLogger("snapshotter.fetch.spans")
    spans_log.addHandler(handler)
    try:
        lay = make_layer(21, span_size=16 << 10, min_size=128 << 10)
        source = BlobRangeSource(lay.blob)
        source.corrupt_always = True
        manager = SpanManager(
            lay.digest,
            lay.ztoc,
            source,
            DiskCache(tmp_path, 1 << 30).open_layer(lay.digest, len(lay.blob)),
            memory=SpanMemoryCache(1 << 20),
            config=fetch_config(readahead_spans=0),
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            with pytest.raises(DigestMismatchError):
                await manager.read(0, 10)
            await manager.close()
    finally:
        spans_log.removeHandler(handler)
    records = [r for r in lines(out) if r["logger"] == "snapshotter.fetch.spans"]
    assert any("zTOC digests" in str(r["message"]) for r in records)
    assert all(r.get("layer") == lay.digest for r in records)


# ----------------------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("GET https://alice:s3cret@registry.example/v2/ failed", "https://<redacted>@registry"),
        ("headers={'Authorization': 'Basic dXNlcjpzM2NyZXQ='}", "'Authorization': 'Basic <red"),
        ("Authorization: Bearer eyJhbGciOi.payload.sig", "Authorization: Bearer <redacted>"),
        ("proxy-authorization=tok123 next", "proxy-authorization=<redacted> next"),
        ("GET /token?scope=repo:x:pull&access_token=tok123&service=r", "&service=r"),
        ('{"auths": {"r": {"auth": "dXNlcjpzM2NyZXQ="}}}', '"auth": "<redacted>"'),
        ('{"username": "alice", "password": "hunter2"}', '"username": "alice"'),
        ("identitytoken='tok123'", "identitytoken='<redacted>'"),
    ],
)
def test_redact(text: str, kept: str) -> None:
    out = redact(text)
    assert kept in out, out
    assert not any(s in out for s in SECRETS), out


def test_redact_keeps_ordinary_lines() -> None:
    for text in (
        "layer sha256:abcd (0123456789ab) mounted lazily at /var/lib/pysoci/fuse/0123",
        "GET http://127.0.0.1:5000/v2/app/blobs/sha256:aa: HTTP 404",
        "snapshot k: image reg.example:5000/app:v1 has no SOCI index",
    ):
        assert redact(text) == text


def test_credentials_never_logged(capture: tuple[logging.Logger, io.StringIO]) -> None:
    log, out = capture
    log.info("request headers %s", {"Authorization": "Bearer eyJhbGciOi.payload.sig"})
    log.info("mirror %s", "https://bob:hunter2@mirror.example", extra={"url": "http://a:s3cret@x"})
    try:
        raise RuntimeError("login with password='hunter2' refused")
    except RuntimeError:
        log.exception("auth failed for https://bob:hunter2@registry.example")
    text = out.getvalue()
    assert "<redacted>" in text
    assert not any(s in text for s in SECRETS), text


def test_text_format_has_context_and_redacts() -> None:
    record = logging.LogRecord(
        "x", logging.INFO, __file__, 1, "pull https://u:s3cret@r.example/v2/", None, None
    )
    with log_context(image="r.example/app:v1"):
        ContextFilter().filter(record)
    line = TextFormatter().format(record)
    assert "INFO x: pull https://<redacted>@r.example/v2/ [image=r.example/app:v1]" in line
    assert "s3cret" not in line


def test_configure_logging(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("debug", "json")
        assert len(root.handlers) == 1 and root.level == logging.DEBUG
        assert logging.getLogger("httpx").level == logging.WARNING
        with log_context(snapshot="k9"):
            logging.getLogger("snapshotter.test").info("token=%s", "'tok123'")
        configure_logging("info", "text")
        assert len(root.handlers) == 1
        logging.getLogger("snapshotter.test").info("as text")
        err = capsys.readouterr().err.splitlines()
        doc = json.loads(err[0])
        assert doc["snapshot"] == "k9" and "tok123" not in err[0]
        assert err[1].endswith("INFO snapshotter.test: as text")
        with pytest.raises(ValueError):
            configure_logging("info", "xml")
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])


@pytest.mark.timeout(120)  # a hang guard: the quadratic pattern took hours on these inputs
@pytest.mark.parametrize(
    "text",
    [
        "a1" * (1 << 19),
        "a:" * (1 << 19),
        "a://" * (1 << 18),
        "x://" + "a" * (1 << 20),
        "authorization:" + " " * (1 << 20),
        "'token'=" * (1 << 17),
    ],
)
def test_redaction_of_a_megabyte_is_linear_and_cut(text: str) -> None:
    out = redact(text)
    assert len(out) < 20_000 and "characters cut" in out
    # Every pattern on its own, on the whole text (not cut): linear too.
    from snapshotter.logs import _redact_whole

    assert len(_redact_whole(text)) > 0


def test_long_messages_keep_their_ends_and_redact_a_cut_secret() -> None:
    line = redact("password='hunter2" + "x" * 20000 + " tail end")
    assert "hunter2" not in line and line.endswith(" tail end")
    assert "[… " in line and " characters cut …]" in line
