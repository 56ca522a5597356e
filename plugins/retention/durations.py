"""Retention durations and calendar arithmetic (years, months, days; fiscal-year close)."""

from __future__ import annotations

import calendar
import functools
import re
from dataclasses import dataclass
from datetime import date, timedelta

_PATTERN = re.compile(r"^\s*(\d+)\s*(day|days|month|months|year|years)\s*$")
MAX_YEARS = 100  # beyond this a duration is a typo, not a policy


class DurationError(ValueError):
    pass


@dataclass(frozen=True)
class Duration:
    amount: int
    unit: str  # "days" | "months" | "years"

    def __str__(self) -> str:
        unit = self.unit[:-1] if self.amount == 1 else self.unit
        return f"{self.amount} {unit}"

    @functools.lru_cache(maxsize=1 << 14)  # asked for every rule of every row: the same days over and over
    def after(self, start: date) -> date:
        """The last day covered by this duration counted from `start` (kept through that day)."""
        if self.unit == "days":
            return start + timedelta(days=self.amount)
        months = self.amount * (12 if self.unit == "years" else 1)
        return add_months(start, months)


    def before(self, end: date) -> date:
        """The earliest start whose period still covers `end`: starts before it have expired."""
        if self.unit == "days":
            return end - timedelta(days=self.amount)
        return add_months(end, -self.amount * (12 if self.unit == "years" else 1))


def parse_duration(text) -> Duration:
    match = _PATTERN.match(str(text)) if text is not None else None
    if not match:
        raise DurationError(
            f"{text!r} is not a duration; write '<number> days', '<number> months' or '<number> years'"
        )
    amount, unit = int(match.group(1)), match.group(2)
    unit = unit if unit.endswith("s") else unit + "s"
    years = amount / {"days": 365, "months": 12, "years": 1}[unit]
    if years > MAX_YEARS:
        raise DurationError(f"{text!r} is longer than {MAX_YEARS} years, which no policy means")
    return Duration(amount, unit)


def add_months(start: date, months: int) -> date:
    """Calendar months; the 29th-31st clamp to the end of a shorter month (29 Feb + 1y = 28 Feb)."""
    index = start.month - 1 + months
    year, month = start.year + index // 12, index % 12 + 1
    day = min(start.day, calendar.monthrange(year, month)[1])
    return date(year, month, day)


def fiscal_year_close(day: date, close_month: int, close_day: int) -> date:
    """The close of the fiscal year that contains `day`."""
    close = _clamped(day.year, close_month, close_day)
    return close if day <= close else _clamped(day.year + 1, close_month, close_day)


def _clamped(year: int, month: int, day: int) -> date:
    return date(year, month, min(day, calendar.monthrange(year, month)[1]))


def parse_month_day(text) -> tuple[int, int]:
    try:
        month, day = (int(part) for part in str(text).split("-"))
        _clamped(2001, month, day)
        if day > calendar.monthrange(2000, month)[1]:
            raise ValueError
    except ValueError:
        raise DurationError(f"{text!r} is not a month-day; write it as MM-DD, e.g. \"12-31\"") from None
    return month, day


def parse_as_of(text: str) -> date:
    """A user-given as-of date, with a message that says how to write it."""
    try:
        return date.fromisoformat(text)
    except (TypeError, ValueError):
        raise DurationError(f"as-of date {text!r} is not a date; write it as YYYY-MM-DD, e.g. 2026-11-27") from None
