"""The bundled nightly example's demo data is a rolling window: a run triggered today with its defaults finds its
day, whatever today is."""

import datetime as dt

from lepton_tasks.config.specs import find_spec
from lepton_tasks.orchestration import pipeline
from lepton_tasks.tools.demo_data import SENSOR_FIRST_DAY, ensure_example_data


def test_sensor_demo_data_reaches_today_and_a_default_run_of_today_reads_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LEPTON_DATA_ROOT", str(tmp_path))
    landing = ensure_example_data("lepton_sensors", tmp_path, rows=50)
    today = dt.datetime.now(dt.UTC).date().isoformat()
    assert (landing / SENSOR_FIRST_DAY / "readings.parquet").is_file()
    assert (landing / today / "readings.parquet").is_file()

    ctx = pipeline.context(find_spec("lepton_sensors"), f"manual__{today}", {}, ds=today)  # the form's defaults
    assert pipeline.missing_days(ctx) == []
    assert pipeline.ingest(ctx).rows == 50


def test_topping_up_keeps_the_days_already_written(tmp_path):
    landing = ensure_example_data("lepton_sensors", tmp_path, rows=50)
    first = landing / SENSOR_FIRST_DAY / "readings.parquet"
    written = first.stat().st_mtime_ns
    first.with_name("marker").write_text("a run read this day")
    (landing / "2026-11-20" / "readings.parquet").unlink()  # a day that has not landed yet
    ensure_example_data("lepton_sensors", tmp_path, rows=50)
    assert first.stat().st_mtime_ns == written and (landing / "2026-11-20" / "readings.parquet").is_file()
