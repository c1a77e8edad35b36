"""Idle schedules: the hours of the day a provider lends its machine to Mnemo.

Grammar (case-insensitive, whitespace ignored around separators):

    schedule := "always" | "never" | window ("," window)*
    window   := time "-" time
    time     := H[:MM](am|pm)        12-hour clock, H in 1..12 ("12am" is midnight)
              | H[:MM]               24-hour clock, H in 0..24 ("24:00" only as an end)

A window is half-open, `[start, end)`, in the machine's local time (or the zone the config names);
a window whose end is earlier than its start runs past midnight ("11pm-7am"). Windows may overlap.
A window with equal ends is refused: say "always" for the whole day.

Pure: no clock is read here; callers pass the local time of day.
"""

from __future__ import annotations

import re
from datetime import datetime, time

__all__ = ["IdleSchedule", "ScheduleError"]

_MINUTES_PER_DAY = 24 * 60
_TIME = re.compile(r"^(\d{1,2})(?::(\d{2}))?\s*(am|pm)?$")


class ScheduleError(ValueError):
    """The schedule text does not follow the grammar; `str()` says which part and why."""


def _parse_time(text: str, *, is_end: bool) -> int:
    match = _TIME.match(text)
    if match is None:
        raise ScheduleError(
            f"idle_schedule: {text!r} is not a time like '9am', '9:30pm' or '21:00'"
        )
    hour, minute, half = int(match[1]), int(match[2] or 0), match[3]
    if minute > 59:
        raise ScheduleError(f"idle_schedule: {text!r} has minutes above 59")
    if half is not None:
        if not 1 <= hour <= 12:
            raise ScheduleError(f"idle_schedule: {text!r}: a 12-hour clock runs from 1 to 12")
        hour = hour % 12 + (12 if half == "pm" else 0)
    elif hour == 24 and minute == 0 and is_end:
        return _MINUTES_PER_DAY
    elif hour > 23:
        raise ScheduleError(
            f"idle_schedule: {text!r}: hours run from 0 to 23 (24:00 only as an end)"
        )
    return hour * 60 + minute


class IdleSchedule:
    """A parsed idle schedule; `is_idle(minute_of_day)` says whether the node offers capacity."""

    __slots__ = ("_open", "text")

    def __init__(self, text: str, open_minutes: bytes) -> None:
        self.text = text
        self._open = open_minutes  # one byte per minute of the day: 1 = lent to Mnemo

    @classmethod
    def parse(cls, text: str) -> IdleSchedule:
        """Parse `text`; raises `ScheduleError` naming the offending window."""
        normalized = text.strip().lower()
        if normalized in ("always", "24/7", "*"):
            return cls(text, b"\x01" * _MINUTES_PER_DAY)
        if normalized == "never":
            return cls(text, b"\x00" * _MINUTES_PER_DAY)
        if not normalized:
            raise ScheduleError("idle_schedule: empty; say 'always', 'never' or e.g. '9am-5pm'")
        minutes = bytearray(_MINUTES_PER_DAY)
        for raw in normalized.split(","):
            window = raw.strip()
            parts = [p.strip() for p in window.split("-")]
            if len(parts) != 2 or not all(parts):
                raise ScheduleError(f"idle_schedule: {window!r} is not a window like '9am-5pm'")
            start = _parse_time(parts[0], is_end=False)
            end = _parse_time(parts[1], is_end=True)
            if start == end % _MINUTES_PER_DAY:
                raise ScheduleError(
                    f"idle_schedule: {window!r} starts where it ends; say 'always' for the whole day"
                )
            if start < end:
                minutes[start:end] = b"\x01" * (end - start)
            else:  # runs past midnight
                minutes[start:] = b"\x01" * (_MINUTES_PER_DAY - start)
                minutes[:end] = b"\x01" * end
        return cls(text, bytes(minutes))

    @property
    def always(self) -> bool:
        return all(self._open)

    def is_idle(self, minute_of_day: int) -> bool:
        """True when the node lends capacity at this minute (0..1439) of its local day."""
        return self._open[minute_of_day % _MINUTES_PER_DAY] == 1

    def is_idle_at(self, local: datetime | time) -> bool:
        """`is_idle` for a local wall-clock time."""
        return self.is_idle(local.hour * 60 + local.minute)

    def minutes_until_change(self, minute_of_day: int) -> int | None:
        """Minutes until the schedule flips from the state at `minute_of_day`; None if it never does."""
        here = self._open[minute_of_day % _MINUTES_PER_DAY]
        for step in range(1, _MINUTES_PER_DAY + 1):
            if self._open[(minute_of_day + step) % _MINUTES_PER_DAY] != here:
                return step
        return None

    def __repr__(self) -> str:
        return f"IdleSchedule({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdleSchedule) and self._open == other._open

    def __hash__(self) -> int:
        return hash(self._open)
