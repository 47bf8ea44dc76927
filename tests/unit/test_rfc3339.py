"""RFC 3339 helpers against datetime as the oracle (and Go's documented RFC3339Nano rules)."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapshotter.errors import FormatError, TimestampError
from snapshotter.soci.rfc3339 import format_rfc3339_nano, parse_rfc3339_nano
from snapshotter.soci.ztoc import ZERO_MOD_TIME

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
MIN_SECONDS = int((dt.datetime(1, 1, 1, tzinfo=dt.UTC) - EPOCH).total_seconds())
MAX_SECONDS = int((dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC) - EPOCH).total_seconds())


def oracle_civil(seconds: int) -> str:
    d = EPOCH + dt.timedelta(seconds=seconds)
    return f"{d.year:04d}-{d.month:02d}-{d.day:02d}T{d.hour:02d}:{d.minute:02d}:{d.second:02d}"


@pytest.mark.parametrize(
    ("seconds", "nanos", "expected"),
    [
        (0, 0, "1970-01-01T00:00:00Z"),
        (0, 500_000_000, "1970-01-01T00:00:00.5Z"),
        (0, 1, "1970-01-01T00:00:00.000000001Z"),
        (0, 120, "1970-01-01T00:00:00.00000012Z"),
        (0, 999_999_999, "1970-01-01T00:00:00.999999999Z"),
        (-1, 0, "1969-12-31T23:59:59Z"),
        (1_700_000_000, 123_000_000, "2023-11-14T22:13:20.123Z"),
        (951_782_400, 0, "2000-02-29T00:00:00Z"),
        (MIN_SECONDS, 0, ZERO_MOD_TIME),
        (253_402_300_800, 0, "10000-01-01T00:00:00Z"),
        (MIN_SECONDS - 366 * 86400, 0, "0000-01-01T00:00:00Z"),
        (MIN_SECONDS - (366 + 365) * 86400, 0, "-0001-01-01T00:00:00Z"),
        # nanos outside 0..1e9 fold into seconds, like Go's time.Unix
        (0, -1, "1969-12-31T23:59:59.999999999Z"),
        (0, 2_500_000_000, "1970-01-01T00:00:02.5Z"),
    ],
)
def test_format_known_values(seconds: int, nanos: int, expected: str) -> None:
    assert format_rfc3339_nano(seconds, nanos) == expected


def test_zero_time() -> None:
    assert parse_rfc3339_nano(ZERO_MOD_TIME) == (MIN_SECONDS, 0)
    assert MIN_SECONDS == -62_135_596_800


@settings(max_examples=400, deadline=None)
@given(st.integers(MIN_SECONDS, MAX_SECONDS), st.integers(0, 999_999_999))
def test_format_matches_datetime(seconds: int, nanos: int) -> None:
    text = format_rfc3339_nano(seconds, nanos)
    assert text.endswith("Z")
    civil, _, fraction = text[:-1].partition(".")
    assert civil == oracle_civil(seconds)
    if nanos == 0:
        assert "." not in text
    else:
        assert fraction and not fraction.endswith("0") and len(fraction) <= 9
        assert int(fraction.ljust(9, "0")) == nanos


@settings(max_examples=400, deadline=None)
@given(st.integers(-(1 << 63), (1 << 63) - 1), st.integers(0, 999_999_999))
def test_round_trip_any_int64(seconds: int, nanos: int) -> None:
    assert parse_rfc3339_nano(format_rfc3339_nano(seconds, nanos)) == (seconds, nanos)


offsets = st.integers(-(23 * 60 + 59), 23 * 60 + 59).map(
    lambda m: dt.timezone(dt.timedelta(minutes=m))
)


@settings(max_examples=300, deadline=None)
@given(
    st.datetimes(
        min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30), timezones=offsets
    )
)
def test_parse_matches_datetime_with_offsets(value: dt.datetime) -> None:
    text = value.isoformat()  # "+hh:mm" offset, microseconds when non-zero
    delta = value - EPOCH
    expected = (delta.days * 86400 + delta.seconds, delta.microseconds * 1000)
    assert parse_rfc3339_nano(text) == expected
    assert parse_rfc3339_nano(text.replace("+00:00", "Z")) == expected


def test_parse_details() -> None:
    assert parse_rfc3339_nano("1970-01-01T01:00:00+01:00") == (0, 0)
    assert parse_rfc3339_nano("1970-01-01T00:00:00-00:30") == (1800, 0)
    assert parse_rfc3339_nano("1970-01-01t00:00:00.5z") == (0, 500_000_000)
    # Go truncates fractions beyond nanoseconds
    assert parse_rfc3339_nano("1970-01-01T00:00:00.1234567891234Z") == (0, 123_456_789)
    assert parse_rfc3339_nano("2000-02-29T23:59:59.000000001Z") == (951_868_799, 1)
    assert parse_rfc3339_nano("0000-03-01T00:00:00Z")[0] == MIN_SECONDS - 306 * 86400


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1970-01-01",
        "1970-01-01T00:00:00",
        "1970-01-01 00:00:00Z",
        "70-01-01T00:00:00Z",
        "1970-1-01T00:00:00Z",
        "1970-13-01T00:00:00Z",
        "1970-00-01T00:00:00Z",
        "1970-01-32T00:00:00Z",
        "1970-01-00T00:00:00Z",
        "2001-02-29T00:00:00Z",
        "1900-02-29T00:00:00Z",
        "1970-01-01T24:00:00Z",
        "1970-01-01T00:60:00Z",
        "1970-01-01T00:00:60Z",
        "1970-01-01T00:00:00.Z",
        "1970-01-01T00:00:00+24:00",
        "1970-01-01T00:00:00+01:60",
        "1970-01-01T00:00:00+0100",
        "1970-01-01T00:00:00ZZ",
        " 1970-01-01T00:00:00Z",
        "1970-01-01T00:00:00Z\n",
        "١٩٧٠-01-01T00:00:00Z",
        "1970-01-01T00:00:00.５Z",
        "9" * 5000 + "-01-01T00:00:00Z",
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(TimestampError):
        parse_rfc3339_nano(text)
    assert issubclass(TimestampError, FormatError)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_parse_fuzz_only_timestamp_error(text: str) -> None:
    try:
        seconds, nanos = parse_rfc3339_nano(text)
    except TimestampError:
        return
    assert 0 <= nanos < 1_000_000_000
    assert isinstance(seconds, int)
