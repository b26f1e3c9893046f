"""FHIR date, dateTime and instant values as ranges of UTC microseconds.

A FHIR date is a range: ``2025`` is the whole year, ``2025-02-10`` the whole day, and an instant
with milliseconds the whole millisecond. Index rows store ``[low, high]`` (inclusive, integer
microseconds since the epoch, UTC) so that both databases compare plain integers. Values without
a time zone are read as UTC.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

_RE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d{1,9}))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def to_us(dt: datetime) -> int:
    """Microseconds since the epoch of an aware datetime."""
    return (dt - EPOCH) // _US


def from_us(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def format_instant(us: int) -> str:
    """FHIR instant with microseconds and ``Z`` (as refgw writes ``meta.lastUpdated``)."""
    return from_us(us).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def http_date(us: int) -> str:
    """RFC 7231 date for Last-Modified."""
    return from_us(us).strftime("%a, %d %b %Y %H:%M:%S GMT")


def parse_range(value: str) -> tuple[int, int] | None:
    """``(low, high)`` in UTC microseconds for a FHIR date/dateTime/instant, or None if invalid."""
    m = _RE.match(value.strip())
    if not m:
        return None
    g = m.groupdict()
    try:
        year = int(g["y"])
        if g["m"] is None:
            start = datetime(year, 1, 1, tzinfo=UTC)
            end = datetime(year + 1, 1, 1, tzinfo=UTC)
            return to_us(start), to_us(end) - 1
        month = int(g["m"])
        if g["d"] is None:
            start = datetime(year, month, 1, tzinfo=UTC)
            end = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=UTC)
            return to_us(start), to_us(end) - 1
        day = int(g["d"])
        if g["H"] is None:
            start = datetime(year, month, day, tzinfo=UTC)
            return to_us(start), to_us(start + timedelta(days=1)) - 1
        tz = UTC
        if g["tz"] and g["tz"] != "Z":
            sign = 1 if g["tz"][0] == "+" else -1
            hh, mm = int(g["tz"][1:3]), int(g["tz"][4:6])
            tz = timezone(sign * timedelta(hours=hh, minutes=mm))
        hour, minute = int(g["H"]), int(g["M"])
        if g["S"] is None:
            start = datetime(year, month, day, hour, minute, tzinfo=tz)
            return to_us(start), to_us(start + timedelta(minutes=1)) - 1
        second = int(g["S"])
        frac = g["f"] or ""
        start = datetime(year, month, day, hour, minute, second, tzinfo=tz)
        if not frac:
            return to_us(start), to_us(start + timedelta(seconds=1)) - 1
        digits = frac[:6]
        micro = int(digits.ljust(6, "0"))
        low = to_us(start) + micro
        width = 10 ** (6 - len(digits)) if len(digits) < 6 else 1
        return low, low + width - 1
    except ValueError:
        return None
