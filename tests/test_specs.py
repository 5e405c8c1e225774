"""Pipeline specs: the bundled ones load; each kind of bad spec gets its own error naming file and field."""

import subprocess
import sys
from pathlib import Path

import pytest

from lepton_tasks.config.settings import PIPELINES_DIR
from lepton_tasks.config.specs import find_spec, load_all, parse_spec, spec_files
from lepton_tasks.core.errors import SpecError

MINIMAL = """
name: tiny
source: {uri: landing/tiny.csv}
features: {a: numeric, b: categorical}
target: {column: y, task: regression}
expectations: mnist1d.json
"""


def test_every_bundled_spec_loads_with_its_values_as_the_param_defaults():
    loaded, errors = load_all(PIPELINES_DIR)
    assert errors == {} and {s.name for s in loaded} == {"lepton_mnist1d", "lepton_house_prices",
                                                        "lepton_house_prices_resmlp", "lepton_sensors",
                                                        "lepton_sensors_warehouse"}
    mnist = find_spec("lepton_mnist1d").spec
    defaults = mnist.run_defaults()
    assert (defaults.model_kind, defaults.num_shards, defaults.merge_rounds) == ("cnn", 4, 8)
    assert defaults.source_uri == mnist.source.uri and mnist.metric == "accuracy"
    houses = find_spec("lepton_house_prices").spec
    assert houses.target.task == "regression" and houses.metric == "r2"
    assert "categorical" in houses.features.values() and houses.schedule == "30 2 * * *"
    sensors = find_spec("lepton_sensors").spec  # the nightly example: a date-templated source, warm start
    nightly = sensors.run_defaults()
    assert "{ds}" in nightly.source_uri and (nightly.window_days, nightly.init_from) == (1, "champion")
    assert nightly.wait_timeout_minutes == sensors.source.wait.timeout_minutes == 120
    assert sensors.score is not None and sensors.score_dag_id == "lepton_sensors_score"
    warehouse = find_spec("lepton_sensors_warehouse").spec  # a SQL source: the form names it, the spec holds it
    assert warehouse.source.sql.conn_id == "lepton_warehouse" and warehouse.source.sql.partition_column == "day"
    assert warehouse.run_defaults().source_uri == "sql://lepton_warehouse/sensor_readings"


def test_a_minimal_spec_gets_defaults_for_everything_else(tmp_path):
    spec = parse_spec(MINIMAL, tmp_path / "tiny.yaml").spec
    assert spec.schedule is None and spec.owner == "lepton" and spec.registered_model_name == "tiny"
    assert spec.run_defaults().model_kind == "mlp" and spec.preprocessing.standardize


@pytest.mark.parametrize("change, field, allowed", [
    (("target: {column: y, task: regression}\n", ""), "target", "Field required"),
    (("b: categorical}", "b: categorical, y: numeric}"), "", "target column 'y' is also listed under 'features'"),
    (("features: {a: numeric, b: categorical}",
      "features: {a: numeric, b: categorical}\npreprocessing: {fill_values: {c: 0}}"),
     "", "fill_values names column 'c', which is not in 'features'"),
    (("b: categorical", "b: text"), "features.b", "Input should be 'numeric' or 'categorical'"),
    (("name: tiny", "name: tiny\nschedule: '0 25 * * *'"), "schedule", "neither a cron expression nor"),
    (("name: tiny", "name: tiny\ntraining: {num_shards: -2}"), "training.num_shards", "greater than or equal to 1"),
    (("name: tiny", "name: tiny\ntraining: {model_kind: rnn}"), "training.model_kind", "'mlp' or 'cnn'"),
    (("name: tiny", "name: tiny\ntraining: {num_shards: four}"), "training.num_shards", "valid integer"),
    (("name: tiny", "name: tiny\nmerge: {rounds: 3}"), "merge.rounds", "Extra inputs are not permitted"),
    (("task: regression", "task: classification"), "", "target.classes must list every label"),
    (("name: tiny", "name: tiny\ncompression: {metric: accuracy}"), "", "not one of r2, mae, rmse, mse"),
    (("name: tiny", "name: tiny\ntraining: {model_kind: cnn}"), "", "all must be numeric"),
    (("expectations: mnist1d.json", "expectations: nope.json"), "expectations", "suite 'nope.json' not found"),
])
def test_each_bad_spec_names_the_file_the_field_and_what_is_allowed(tmp_path, change, field, allowed):
    text = MINIMAL.replace(*change)
    assert text != MINIMAL
    with pytest.raises(SpecError) as raised:
        parse_spec(text, tmp_path / "tiny.yaml")
    message = str(raised.value)
    assert "tiny.yaml" in message and allowed in message
    if field:
        assert f"field '{field}'" in message


def test_bad_yaml_and_a_duplicate_name_are_errors_of_their_own_file_only(tmp_path):
    (tmp_path / "a.yaml").write_text(MINIMAL)
    (tmp_path / "b.yaml").write_text(MINIMAL)  # same name as a.yaml
    (tmp_path / "c.yaml").write_text("name: [unclosed")
    loaded, errors = load_all(tmp_path)
    assert [s.path.name for s in loaded] == ["a.yaml"]
    assert "'tiny' is already the name of" in str(errors[tmp_path / "b.yaml"])
    assert "not valid YAML" in str(errors[tmp_path / "c.yaml"])


def test_a_task_parses_its_own_spec_only_and_gets_the_spec_the_whole_parse_would_pick(tmp_path):
    (tmp_path / "a.yaml").write_text(MINIMAL)  # names 'tiny' too, and sorts first
    (tmp_path / "tiny.yaml").write_text(MINIMAL.replace("b: categorical", "b: numeric"))
    (tmp_path / "c.yaml").write_text("name: [unclosed")
    everything, errors = load_all(tmp_path)
    assert [s.path.name for s in everything] == ["tiny.yaml"] and set(errors) == {tmp_path / "a.yaml",
                                                                                  tmp_path / "c.yaml"}
    assert "'tiny' is already the name of" in str(errors[tmp_path / "a.yaml"])
    own, none = load_all(tmp_path, only="tiny")  # as Airflow parses the DAG file to run a task of 'tiny'
    assert none == {} and [(s.path, s.spec.features["b"]) for s in own] == [(tmp_path / "tiny.yaml", "numeric")]
    (tmp_path / "b.yaml").write_text(MINIMAL.replace("name: tiny", "name: other"))
    parsed = [(loaded, {path: str(err) for path, err in errors.items()})
              for loaded, errors in (load_all(tmp_path, only="other"), load_all(tmp_path))]
    assert parsed[0] == parsed[1] and len(parsed[0][0]) == 2  # no file named after it: every spec is parsed


def _lepton(*args: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([str(Path(sys.executable).parent / "lepton"), *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_validate_spec_command_checks_files_without_airflow(tmp_path):
    done = _lepton("validate-spec")
    assert done.returncode == 0 and f"{len(spec_files())} valid, 0 invalid" in done.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(MINIMAL.replace("name: tiny", "name: tiny\ntraining: {num_shards: 0}"))
    done = _lepton("validate-spec", str(bad), str(PIPELINES_DIR / "lepton_mnist1d.yaml"))
    assert done.returncode == 1 and "field 'training.num_shards'" in done.stdout and "1 valid, 1 invalid" in done.stdout
