"""`lepton new-pipeline`: a spec and a starter suite profiled from a fresh CSV, which load and pass on that CSV."""

import json
import subprocess
import sys

import pytest

from lepton_tasks.config.specs import load_spec
from lepton_tasks.core.errors import SpecError
from lepton_tasks.data.source_profile import profile_source
from lepton_tasks.tools.demo_data import make_house_prices
from lepton_tasks.tools.new_pipeline import infer_task, new_pipeline


@pytest.fixture
def fresh_csv(tmp_path):
    path = tmp_path / "landing" / "flats.csv"
    path.parent.mkdir()
    make_house_prices(800, seed=9).to_csv(path, index=False)
    return path


def test_scaffolded_spec_and_suite_load_and_the_suite_passes_on_its_data(tmp_path, fresh_csv, monkeypatch):
    from lepton_tasks.stages.ingest import ingest
    from lepton_tasks.stages.validate import validate

    monkeypatch.setenv("LEPTON_EXPECTATIONS_DIR", str(tmp_path / "expectations"))
    made = new_pipeline("flats", str(fresh_csv), "price_k", tmp_path, tmp_path / "pipelines",
                        tmp_path / "expectations")
    spec = load_spec(made.spec_path).spec
    assert spec.target.task == "regression" and spec.features["neighbourhood"] == "categorical"
    assert spec.features["area_m2"] == "numeric" and "price_k" not in spec.features
    suite = json.loads(made.suite_path.read_text())
    kinds = {(e["type"], e["kwargs"].get("column")) for e in suite["expectations"]}
    assert ("expect_column_values_to_be_between", "area_m2") in kinds
    assert ("expect_column_values_to_be_in_set", "building_type") in kinds
    nulls = {e["kwargs"]["column"]: e["kwargs"].get("mostly") for e in suite["expectations"]
             if e["type"] == "expect_column_values_to_not_be_null"}
    assert nulls["area_m2"] is None and 0 < nulls["year_built"] < 1  # year_built has gaps in the data
    assert any("year_built" in note for note in made.review)
    staged = ingest(str(fresh_csv), tmp_path, tmp_path / "run" / "ingest")
    assert validate(staged.parts, spec.suite_file, tmp_path / "run" / "validate").failed == 0
    with pytest.raises(SpecError, match="already exists"):
        new_pipeline("flats", str(fresh_csv), "price_k", tmp_path, tmp_path / "pipelines", tmp_path / "expectations")


def _profiled_target(tmp_path, values: list) -> object:
    path = tmp_path / f"t{len(list(tmp_path.glob('t*.csv')))}.csv"
    path.write_text("y\n" + "\n".join(map(str, values)) + "\n")
    return profile_source(str(path), None, {"y"}).columns["y"]


def test_task_is_inferred_from_the_target_and_a_missing_target_is_named(tmp_path, fresh_csv):
    assert infer_task(_profiled_target(tmp_path, ["a", "b"])) == "classification"
    assert infer_task(_profiled_target(tmp_path, [0, 1, 2, 1])) == "classification"
    assert infer_task(_profiled_target(tmp_path, [0.5, 1.25, 3.0])) == "regression"
    assert infer_task(_profiled_target(tmp_path, list(range(30)))) == "regression"  # too many values for classes
    with pytest.raises(SpecError, match="target column 'cost' is not in .*flats.csv"):
        new_pipeline("flats", str(fresh_csv), "cost", tmp_path, tmp_path / "p", tmp_path / "e")
    assert not (tmp_path / "p").exists() and not (tmp_path / "e").exists()


def test_new_pipeline_command_prints_what_it_wrote_and_what_to_review(tmp_path, fresh_csv, monkeypatch):
    import os
    from pathlib import Path

    monkeypatch.setenv("LEPTON_EXPECTATIONS_DIR", str(tmp_path / "e"))
    env = {**os.environ, "LEPTON_PIPELINES_DIR": str(tmp_path / "p")}
    done = subprocess.run([str(Path(sys.executable).parent / "lepton"), "new-pipeline", "flat_types", "--source",
                           str(fresh_csv), "--target", "building_type"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and "review before the first run" in done.stdout
    spec = load_spec(tmp_path / "p" / "flat_types.yaml").spec
    assert spec.target.task == "classification"
    assert spec.target.classes == ["apartment", "detached", "semi_detached", "terraced"]


def _heavy_tailed_csv_files(folder, rows: int = 120_000, files: int = 4) -> None:
    """A public-data-like table written with the csv module (not by the project): a log-normal amount whose
    largest value lies past row 100,000, a rare category, a few gaps; split into `files` CSV files."""
    import csv
    import random

    rng = random.Random(5)
    folder.mkdir(parents=True)
    per_file = rows // files
    for index in range(files):
        with open(folder / f"trips-{index}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["distance_km", "amount", "payment", "tip"])
            for row in range(index * per_file, (index + 1) * per_file):
                amount = 1e6 if row == 110_000 else round(rng.lognormvariate(2.5, 1.1), 2)
                payment = "voucher" if row % 20_000 == 7 else rng.choice(["card", "cash"])
                distance = "" if row % 997 == 0 else round(rng.uniform(0.1, 30), 3)
                writer.writerow([distance, amount, payment, round(rng.uniform(0, 5), 2)])


def test_the_first_run_on_the_scaffolded_data_passes_with_heavy_tails_and_rare_categories(tmp_path, monkeypatch):
    from lepton_tasks.stages.ingest import ingest
    from lepton_tasks.stages.validate import validate

    landing = tmp_path / "landing" / "trips"
    _heavy_tailed_csv_files(landing)
    monkeypatch.setenv("LEPTON_EXPECTATIONS_DIR", str(tmp_path / "expectations"))
    made = new_pipeline("trips", str(landing / "trips-*.csv"), "tip", tmp_path, tmp_path / "pipelines",
                        tmp_path / "expectations")
    assert made.rows_profiled == 120_000  # every row of every file, not a sample of the first
    suite = {(e["type"], e["kwargs"].get("column")): e["kwargs"]
             for e in json.loads(made.suite_path.read_text())["expectations"]}
    amount = suite[("expect_column_values_to_be_between", "amount")]
    assert amount["max_value"] >= 1e6 and amount["min_value"] == 0 and amount["mostly"] == 0.999
    assert "mostly" not in suite[("expect_column_values_to_be_between", "tip")]  # not heavy-tailed: exact rule
    assert "voucher" in suite[("expect_column_values_to_be_in_set", "payment")]["value_set"]
    review = "\n".join(made.review)
    assert "heavy-tailed columns" in review and "amount" in review
    assert "rare categories" in review and "voucher" in review
    spec = load_spec(made.spec_path).spec
    staged = ingest(str(landing / "trips-*.csv"), tmp_path, tmp_path / "run" / "ingest")
    result = validate(staged.parts, spec.suite_file, tmp_path / "run" / "validate")
    assert result.failed == 0 and result.evaluated == len(suite) + 0  # every expectation ran and passed


def test_a_date_templated_source_is_profiled_over_every_day_and_each_night_passes(tmp_path, monkeypatch):
    import datetime as dt

    from lepton_tasks.stages.ingest import ingest
    from lepton_tasks.stages.validate import validate
    from lepton_tasks.tools.demo_data import write_sensor_day

    monkeypatch.setenv("LEPTON_EXPECTATIONS_DIR", str(tmp_path / "expectations"))
    days = ("2026-11-10", "2026-11-11", "2026-11-12")  # the last one after line C's pressure shift
    for day in days:
        write_sensor_day(tmp_path / "landing" / "sensors", day, rows=400)
    made = new_pipeline("sensors", "landing/sensors/{ds}/*.parquet", "fault", tmp_path, tmp_path / "pipelines",
                        tmp_path / "expectations", window_days=2, schedule="0 3 * * *")
    spec = load_spec(made.spec_path).spec
    assert (spec.source.uri, spec.source.window_days, spec.schedule) == ("landing/sensors/{ds}/*.parquet", 2,
                                                                         "0 3 * * *")
    assert "profiled all 1200 rows of 3 file(s)" in made.review[0]
    assert not any("schedule is null" in note for note in made.review)
    for day in days:
        staged = ingest(spec.source.uri, tmp_path, tmp_path / day / "ingest", ds=dt.date.fromisoformat(day))
        assert validate(staged.parts, spec.suite_file, tmp_path / day / "validate").failed == 0
