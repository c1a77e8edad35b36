"""Idle schedules: parsing and which minutes of the day a node lends its memory."""

from __future__ import annotations

from datetime import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.schedule import IdleSchedule, ScheduleError


def _minute(h: int, m: int = 0) -> int:
    return h * 60 + m


def test_spec_example_two_windows_one_past_midnight() -> None:
    """'9am-5pm, 11pm-7am' lends 9:00-16:59 and 23:00-06:59, nothing else."""
    s = IdleSchedule.parse("9am-5pm, 11pm-7am")
    assert s.is_idle(_minute(9))
    assert s.is_idle(_minute(16, 59))
    assert not s.is_idle(_minute(17))
    assert not s.is_idle(_minute(8, 59))
    assert not s.is_idle(_minute(22, 59))
    assert s.is_idle(_minute(23))
    assert s.is_idle(_minute(0))
    assert s.is_idle(_minute(6, 59))
    assert not s.is_idle(_minute(7))
    assert s.is_idle_at(time(3, 30))


def test_always_and_never() -> None:
    """'always' lends every minute, 'never' none."""
    always = IdleSchedule.parse("Always")
    never = IdleSchedule.parse("never")
    assert always.always
    assert all(always.is_idle(m) for m in range(0, 1440, 7))
    assert not any(never.is_idle(m) for m in range(0, 1440, 7))
    assert always.minutes_until_change(100) is None


def test_twenty_four_hour_clock_and_minutes() -> None:
    """'21:30-24:00' and '12am-6:15am' read as 24-hour and 12-hour times."""
    s = IdleSchedule.parse("21:30-24:00,12am-6:15am")
    assert s.is_idle(_minute(21, 30))
    assert not s.is_idle(_minute(21, 29))
    assert s.is_idle(_minute(23, 59))
    assert s.is_idle(_minute(6, 14))
    assert not s.is_idle(_minute(6, 15))
    noon = IdleSchedule.parse("12pm-1pm")
    assert noon.is_idle(_minute(12)) and not noon.is_idle(_minute(0))


def test_minutes_until_change() -> None:
    """The next flip is counted from the given minute, wrapping past midnight."""
    s = IdleSchedule.parse("9am-5pm")
    assert s.minutes_until_change(_minute(8)) == 60
    assert s.minutes_until_change(_minute(16, 30)) == 30
    assert s.minutes_until_change(_minute(23)) == 10 * 60


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("9am", "not a window"),
        ("9am-", "not a window"),
        ("13pm-2pm", "12-hour clock"),
        ("25:00-3:00", "hours run from 0 to 23"),
        ("9:75-10", "minutes above 59"),
        ("9am-9am", "starts where it ends"),
        ("0:00-24:00", "starts where it ends"),
        ("nine-five", "not a time"),
        ("24:00-3:00", "24:00 only as an end"),
    ],
)
def test_malformed_schedules_name_the_problem(text: str, fragment: str) -> None:
    """Malformed text raises ScheduleError whose message says what is wrong."""
    with pytest.raises(ScheduleError, match=fragment):
        IdleSchedule.parse(text)


@given(
    start=st.integers(0, 23),
    end=st.integers(0, 23),
    minute=st.integers(0, 1439),
)
def test_single_window_matches_interval_arithmetic(start: int, end: int, minute: int) -> None:
    """A 24-hour window 'S:00-E:00' is open exactly on [S, E) modulo a day."""
    if start == end:
        return
    s = IdleSchedule.parse(f"{start}:00-{end}:00")
    offset = (minute - start * 60) % 1440
    length = ((end - start) % 24) * 60
    assert s.is_idle(minute) == (offset < length)
