"""Times as dpiguard reads and writes them: epoch seconds inside, ISO 8601 at the edges.

* ``parse_time``: what people type (CLI options, CSV cells, objection dates): ISO date/time in a
  given zone (UTC unless told), epoch seconds, or ``now``;
* ``iso_ms`` / ``parse_iso_ms``: the ``time`` field of trace records (UTC, milliseconds, ``Z``);
* ``iso_local``: times shown to people, in the configuration's time zone;
* ``check_epoch`` / ``check_window``: validation of epoch values given to the stores.
"""

from __future__ import annotations

import calendar
import math
import time
from datetime import datetime, timezone, tzinfo
from typing import Any


def check_epoch(value: Any, what: str, *, optional: bool) -> float | None:
    if value is None:
        if optional:
            return None
        raise ValueError(f"{what} is required")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"invalid {what} {value!r}: expected epoch seconds")
    return value


def check_window(start: float | None, end: float | None) -> None:
    if start is not None and end is not None and start > end:
        raise ValueError(f"start ({start}) is after end ({end})")


def epoch_now(now: float | None) -> float:
    """``now`` validated, or the current epoch time when None."""
    return time.time() if now is None else check_epoch(now, "now", optional=False)


def fmt_epoch(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def parse_time(value: str, tz: tzinfo = timezone.utc, *, now: float | None = None) -> float:
    """What a person typed: an ISO 8601 date or date/time (in ``tz`` unless it carries an offset),
    epoch seconds, or ``now``. ValueError with an example otherwise."""
    text = str(value).strip()
    if text == "now":
        return time.time() if now is None else now
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(number) or number < 0:
            raise ValueError(f"not a date/time: {text[:40]!r}")
        return number
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not a date/time: {text[:40]!r} (use e.g. 2026-03-01 or 2026-03-01T14:30)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=tz)
    return dt.timestamp()


_last_second: tuple[int, str] = (-1, "")  # (epoch second, its formatted text): one strftime per second


def iso_ms(epoch: float | None = None) -> str:
    """The ``time`` of a trace record: UTC, milliseconds, ``Z`` (``2026-03-01T14:30:00.123Z``)."""
    global _last_second
    t = time.time() if epoch is None else epoch
    seconds = int(t)
    last = _last_second  # one tuple read: safe without a lock between threads
    if last[0] == seconds:
        text = last[1]
    else:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _last_second = (seconds, text)
    return f"{text}.{int((t - seconds) * 1000):03d}Z"


def parse_iso_ms(text: str | None) -> float | None:
    """The epoch of a :func:`iso_ms` text; None if absent or malformed."""
    if not text:
        return None
    try:
        return calendar.timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")) + float("0" + text[19:-1])
    except (ValueError, TypeError):
        return None


def iso_local(epoch: float | None, tz: tzinfo) -> str | None:
    """Epoch seconds as ISO 8601 in ``tz`` with its offset, to the second (``2026-03-01T08:30:00+01:00``);
    None stays None (an open bound). For what people read (``careteam show``)."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, tz).isoformat(timespec="seconds")
