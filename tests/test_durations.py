from datetime import date

import pytest

from retention.durations import DurationError, fiscal_year_close, parse_as_of, parse_duration, parse_month_day


@pytest.mark.parametrize("text,start,last_day", [
    ("3 years", date(2020, 3, 15), date(2023, 3, 15)),
    ("1 year", date(2020, 2, 29), date(2021, 2, 28)),  # leap day clamps
    ("13 months", date(2022, 1, 31), date(2023, 2, 28)),
    ("0 days", date(2021, 3, 31), date(2021, 3, 31)),
    ("30 days", date(2021, 12, 15), date(2022, 1, 14)),
])
def test_duration_last_day(text, start, last_day):
    assert parse_duration(text).after(start) == last_day


@pytest.mark.parametrize("bad", ["3", "three years", "-1 years", "2 weeks", "", None, "101 years", "5000 days 1"])
def test_bad_durations_say_how_to_write_them(bad):
    with pytest.raises(DurationError, match="days|years"):
        parse_duration(bad)


def test_fiscal_year_close():
    assert fiscal_year_close(date(2015, 11, 3), 12, 31) == date(2015, 12, 31)
    assert fiscal_year_close(date(2015, 7, 1), 6, 30) == date(2016, 6, 30)
    assert fiscal_year_close(date(2015, 6, 30), 6, 30) == date(2015, 6, 30)
    # The policy's example: invoice of 2015-11-03, kept through 2025-12-31.
    assert parse_duration("10 years").after(fiscal_year_close(date(2015, 11, 3), 12, 31)) == date(2025, 12, 31)


def test_month_day_and_as_of_errors():
    assert parse_month_day("02-29") == (2, 29)
    for bad in ("02-30", "13-01", "1231"):
        with pytest.raises(DurationError, match="MM-DD"):
            parse_month_day(bad)
    with pytest.raises(DurationError, match="YYYY-MM-DD"):
        parse_as_of("27/11/2026")

