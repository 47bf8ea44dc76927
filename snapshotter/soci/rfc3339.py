"""RFC 3339 timestamps as Go's `time.RFC3339Nano` writes them (the zTOC's `mod_time`).

Formatting is always in UTC: `2006-01-02T15:04:05.999999999Z`, trailing zeros of the
fraction trimmed and no fraction at all when it is zero. Calendar arithmetic is done here
(proleptic Gregorian, astronomical year numbering) rather than with `datetime`, so any
integer number of seconds formats without crashing; years outside 0..9999 are written the
way Go's `Time.Format` writes them (`-0005`, `12345`) and parsed back by this module.
"""

from __future__ import annotations

import functools
import re

from snapshotter.errors import TimestampError

_NANOS_PER_SECOND = 1_000_000_000
_SECONDS_PER_DAY = 86_400
# 0000-03-01 is day 0 of the 400-year era arithmetic; 1970-01-01 is 719468 days later.
_EPOCH_SHIFT_DAYS = 719_468
_DAYS_PER_ERA = 146_097

_RFC3339 = re.compile(
    r"(-?[0-9]{4,18})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]+))?([Zz]|[+-][0-9]{2}:[0-9]{2})",
    re.ASCII,
)


def _civil_from_days(days: int) -> tuple[int, int, int]:
    """(year, month, day) of a day count since 1970-01-01."""
    z = days + _EPOCH_SHIFT_DAYS
    era = z // _DAYS_PER_ERA
    doe = z - era * _DAYS_PER_ERA
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (1 if month <= 2 else 0), month, day


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Day count since 1970-01-01 of a proleptic Gregorian date."""
    y = year - 1 if month <= 2 else year
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (month - 3 if month > 2 else month + 9) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * _DAYS_PER_ERA + doe - _EPOCH_SHIFT_DAYS


def _days_in_month(year: int, month: int) -> int:
    if month == 2:
        leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
        return 29 if leap else 28
    return 30 if month in (4, 6, 9, 11) else 31


@functools.lru_cache(maxsize=1024)
def format_rfc3339_nano(seconds: int, nanos: int) -> str:
    """Format seconds since the Unix epoch plus nanoseconds like Go's RFC3339Nano in UTC.

    `nanos` outside 0..999999999 is folded into `seconds` (as Go's `time.Unix` does).
    """
    if not 0 <= nanos < _NANOS_PER_SECOND:
        carry, nanos = divmod(nanos, _NANOS_PER_SECOND)
        seconds += carry
    days, secs = divmod(seconds, _SECONDS_PER_DAY)
    year, month, day = _civil_from_days(days)
    hour, rem = divmod(secs, 3600)
    minute, second = divmod(rem, 60)
    year_text = f"-{-year:04d}" if year < 0 else f"{year:04d}"
    text = f"{year_text}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}"
    if nanos:
        text += "." + f"{nanos:09d}".rstrip("0")
    return text + "Z"


def parse_rfc3339_nano(text: str) -> tuple[int, int]:
    """Parse an RFC 3339 timestamp into (seconds since the Unix epoch, nanoseconds).

    Accepts any UTC offset, fractions of any length (truncated to nanoseconds, as Go does)
    and the years `format_rfc3339_nano` writes. Raises TimestampError when malformed.
    """
    m = _RFC3339.fullmatch(text)
    if m is None:
        raise TimestampError(f"malformed RFC 3339 timestamp {text[:64]!r}")
    year = int(m[1])
    month, day, hour, minute, second = (int(m[i]) for i in range(2, 7))
    if not 1 <= month <= 12 or not 1 <= day <= _days_in_month(year, month):
        raise TimestampError(f"RFC 3339 timestamp {text!r}: date out of range")
    if hour > 23 or minute > 59 or second > 59:
        raise TimestampError(f"RFC 3339 timestamp {text!r}: time of day out of range")
    fraction = m[7] or ""
    nanos = int(fraction[:9].ljust(9, "0")) if fraction else 0
    zone = m[8]
    offset = 0
    if zone not in ("Z", "z"):
        off_hour, off_minute = int(zone[1:3]), int(zone[4:6])
        if off_hour > 23 or off_minute > 59:
            raise TimestampError(f"RFC 3339 timestamp {text!r}: UTC offset out of range")
        offset = (off_hour * 3600 + off_minute * 60) * (-1 if zone[0] == "-" else 1)
    days = _days_from_civil(year, month, day)
    seconds = days * _SECONDS_PER_DAY + hour * 3600 + minute * 60 + second - offset
    return seconds, nanos
