"""`lepton new-pipeline`: a spec and a starter suite profiled from a fresh CSV, which load and pass on that CSV."""

import json
import subprocess
import sys

import pytest

from lepton_tasks.demo_data import make_house_prices
from lepton_tasks.errors import SpecError
from lepton_tasks.scaffold import infer_task, new_pipeline
from lepton_tasks.specs import load_spec


@pytest.fixture
def fresh_csv(tmp_path):
    path = tmp_path / "landing" / "flats.csv"
    path.parent.mkdir()
    make_house_prices(800, seed=9).to_csv(path, index=False)
    return path


def test_scaffolded_spec_and_suite_load_and_the_suite_passes_on_its_data(tmp_path, fresh_csv, monkeypatch):
    from lepton_tasks.ingest import ingest
    from lepton_tasks.validate import validate

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


def test_task_is_inferred_from_the_target_and_a_missing_target_is_named(tmp_path, fresh_csv):
    import pandas as pd

    assert infer_task(pd.Series(["a", "b"])) == "classification"
    assert infer_task(pd.Series([0, 1, 2, 1])) == "classification"
    assert infer_task(pd.Series([0.5, 1.25, 3.0])) == "regression"
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
