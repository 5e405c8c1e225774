"""A run's data window: the source URI templated on the run's date, one URI per day.

`landing/events/{ds}/*.parquet` with `window_days: 3` and ds 2026-11-20 reads the folders of 11-18, 11-19 and
11-20 (inclusive, oldest first). Placeholders are Airflow's names for the run's date: `{ds}` (YYYY-MM-DD),
`{ds_nodash}` (YYYYMMDD), `{yyyy}`, `{mm}`, `{dd}`. A URI without any reads the same source every run.
"""

from __future__ import annotations

import datetime as dt
import re
import string
from dataclasses import asdict, dataclass

from lepton_tasks.core.errors import BadSource

PLACEHOLDERS = ("ds", "ds_nodash", "yyyy", "mm", "dd")


def placeholders(uri: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(uri) if name is not None]


def check_template(uri: str) -> str:
    """The URI, if every `{...}` in it is a known placeholder (raises ValueError naming the others)."""
    try:
        unknown = sorted({n for n in placeholders(uri) if n not in PLACEHOLDERS})
    except ValueError as err:  # an unmatched brace
        raise ValueError(f"'{uri}': {err}") from None
    if unknown:
        raise ValueError(f"'{uri}' holds unknown placeholder(s) {unknown}; allowed: "
                         f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
    return uri


def is_templated(uri: str) -> bool:
    return bool(placeholders(uri))


@dataclass(frozen=True)
class DaySource:
    """One day of a window (None for an untemplated source) and the URI that holds it."""

    day: str | None
    uri: str

    def to_dict(self) -> dict:
        return asdict(self)


def render(uri: str, day: dt.date) -> str:
    return uri.format(ds=day.isoformat(), ds_nodash=day.strftime("%Y%m%d"), yyyy=f"{day.year:04d}",
                      mm=f"{day.month:02d}", dd=f"{day.day:02d}")


def window_dates(ds: dt.date, window_days: int = 1) -> list[dt.date]:
    """The days of the window that ends with `ds`, oldest first."""
    return [ds - dt.timedelta(days=back) for back in range(window_days - 1, -1, -1)]


def resolve(uri: str, ds: dt.date, window_days: int = 1) -> list[DaySource]:
    """The URIs a run dated `ds` reads: one per day of its window, oldest first (or the URI itself)."""
    if not is_templated(uri):
        return [DaySource(None, uri)]
    return [DaySource(day.isoformat(), render(uri, day)) for day in window_dates(ds, window_days)]


def parse_ds(value: str | dt.date | dt.datetime) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        raise BadSource(f"run date '{value}' is not YYYY-MM-DD")
    return dt.date.fromisoformat(value)


def describe(sources: list[DaySource]) -> str:
    return "; ".join(f"{s.day} ({s.uri})" if s.day else s.uri for s in sources)
