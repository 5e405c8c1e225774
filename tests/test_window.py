"""Date-templated sources: which URIs a run reads, what ingest records, what is missing, and the scaffold's
profile over every day that exists."""

import datetime as dt

import pytest

from lepton_tasks.config.specs import parse_spec
from lepton_tasks.core.errors import BadSource, SpecError
from lepton_tasks.data.sources import missing
from lepton_tasks.data.windows import check_template, resolve
from lepton_tasks.stages.ingest import ingest
from lepton_tasks.tools.backfill import nights
from lepton_tasks.tools.demo_data import write_sensor_day
from lepton_tasks.tools.new_pipeline import every_day

DS = dt.date(2026, 3, 1)


def test_a_window_is_the_days_ending_with_ds_oldest_first_across_a_month_end():
    days = resolve("landing/{yyyy}/{mm}/{dd}/events-{ds_nodash}.parquet", DS, 3)
    assert [d.day for d in days] == ["2026-02-27", "2026-02-28", "2026-03-01"]
    assert days[0].uri == "landing/2026/02/27/events-20260227.parquet"
    assert resolve("landing/static.csv", DS, 3)[0].uri == "landing/static.csv"  # untemplated: as given


def test_unknown_placeholders_and_broken_braces_are_refused_naming_the_uri():
    with pytest.raises(ValueError, match=r"unknown placeholder\(s\) \['date'\]"):
        check_template("landing/{date}/x.csv")
    with pytest.raises(ValueError, match="landing/{ds"):
        check_template("landing/{ds/x.csv")
    spec = """
name: t
source: {uri: "landing/{day}/*.csv"}
features: {a: numeric}
target: {column: y, task: regression}
expectations: mnist1d.json
"""
    with pytest.raises(SpecError, match=r"field 'source.uri'.*unknown placeholder"):
        parse_spec(spec, __import__("pathlib").Path("t.yaml"))


def test_ingest_reads_only_the_window_and_records_each_file_with_its_checksum(tmp_path):
    landing = tmp_path / "landing" / "sensors"
    for day in ("2026-11-09", "2026-11-10", "2026-11-11", "2026-11-12"):
        write_sensor_day(landing, day, rows=50)
    manifest = ingest("landing/sensors/{ds}/*.parquet", tmp_path, tmp_path / "stage", ds=dt.date(2026, 11, 11),
                      window_days=2)
    assert [w["day"] for w in manifest.window] == ["2026-11-10", "2026-11-11"] and manifest.rows == 100
    files = [f for w in manifest.window for f in w["files"]]
    assert [f["path"].split("/")[-2] for f in files] == ["2026-11-10", "2026-11-11"]
    assert all(len(f["sha256"]) == 64 and f["rows"] == 50 for f in files)


def test_missing_days_are_named_and_ingest_fails_naming_them(tmp_path):
    write_sensor_day(tmp_path / "landing" / "sensors", "2026-11-11", rows=20)
    days = resolve("landing/sensors/{ds}/*.parquet", dt.date(2026, 11, 12), 3)
    assert [d.day for d in missing(days, tmp_path)] == ["2026-11-10", "2026-11-12"]
    with pytest.raises(BadSource, match=r"no data for 2 of the 3 day\(s\).*2026-11-10: .*2026-11-12: "):
        ingest("landing/sensors/{ds}/*.parquet", tmp_path, tmp_path / "stage", ds=dt.date(2026, 11, 12),
               window_days=3)
    assert not (tmp_path / "stage").exists()  # nothing half written
    with pytest.raises(BadSource, match="templated on the run's date, but the run has none"):
        ingest("landing/sensors/{ds}/*.parquet", tmp_path, tmp_path / "stage")


def test_backfill_nights_are_the_schedule_ticks_dated_in_the_range():
    ticks = nights("0 3 * * *", dt.date(2026, 11, 10), dt.date(2026, 11, 12))
    assert [t.isoformat() for t in ticks] == [f"2026-11-{d}T03:00:00+00:00" for d in (10, 11, 12)]
    assert len(nights("0 3 * * 1", dt.date(2026, 11, 1), dt.date(2026, 11, 30))) == 5  # Mondays only


def test_the_scaffold_profiles_every_day_that_exists():
    assert every_day("landing/{yyyy}/{mm}/{ds}/*.parquet") == "landing/*/*/*/*.parquet"
    with pytest.raises(SpecError, match="unknown placeholder"):
        every_day("landing/{when}/*.csv")
