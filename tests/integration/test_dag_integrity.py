"""Every DAG imports cleanly, is scheduled explicitly, retries, has owner and tags, and parses cheaply; a bad
spec is one import error while the other pipelines still load."""

import json
import subprocess
import sys

import pytest

from lepton_tasks.config.settings import REPO_ROOT
from lepton_tasks.tools.airflow_env import AirflowEnv

HEAVY = ("torch", "dask", "distributed", "mlflow", "great_expectations", "pandas", "pyarrow", "onnx")

PARSE = """
import sys, json
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(sys.argv[1])
heavy = [m for m in {heavy!r} if m in sys.modules]
print(json.dumps({{"errors": {{k: str(v) for k, v in bag.import_errors.items()}}, "heavy": heavy,
    "dags": {{d.dag_id: {{"schedule": str(d.schedule), "owner": d.owner, "tags": sorted(d.tags),
        "retries": [t.retries for t in d.tasks], "max_active_runs": d.max_active_runs, "catchup": d.catchup,
        "register_upstream": sorted(d.task_dict["register"].upstream_task_ids) if "register" in d.task_dict else None,
        "register_rule": str(d.task_dict["register"].trigger_rule).lower() if "register" in d.task_dict else None,
        "doc": bool(d.doc_md), "undocumented_tasks": [t.task_id for t in d.tasks if not t.doc_md],
        "outlets": {{t.task_id: [a.uri for a in t.outlets] for t in d.tasks if t.outlets}}}}
        for d in bag.dags.values()}}}}))
"""


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    env = AirflowEnv.sqlite(tmp_path_factory.mktemp("parse"))
    done = subprocess.run([sys.executable, "-c", PARSE.format(heavy=HEAVY), str(REPO_ROOT / "dags")],
                          env=env.env(), capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1]), env


def test_one_dag_per_bundled_spec_imports_without_errors(parsed):
    result, _ = parsed
    assert result["errors"] == {} and set(result["dags"]) == {
        "lepton_mnist1d", "lepton_house_prices", "lepton_house_prices_resmlp", "lepton_sensors",
        "lepton_sensors_warehouse",
        "lepton_mnist1d_score", "lepton_sensors_score",  # the consumers of specs with `score:`
        "lepton_sensors_warehouse_approval"}  # and the gate of a spec with `promotion: {approval: required}`


def test_every_dag_is_scheduled_retried_owned_tagged_and_documented(parsed):
    for dag_id, dag in parsed[0]["dags"].items():  # an approval run is started by its night, never scheduled
        assert dag["schedule"] not in ("None", "") or dag_id.endswith("_approval"), dag_id
        assert dag["owner"] and dag["owner"] != "airflow", dag_id
        assert dag["tags"] and dag["doc"], dag_id
        assert max(dag["retries"]) >= 1, dag_id
    nightly = parsed[0]["dags"]["lepton_mnist1d"]
    assert nightly["schedule"] == "0 2 * * *" and nightly["max_active_runs"] == 1 and nightly["catchup"] is False
    pipelines = [dag for dag in parsed[0]["dags"].values() if dag["register_upstream"] is not None]
    assert len(pipelines) == 5
    for dag in pipelines:  # a failed stage never reaches register, so never moves `champion`
        assert dag["register_rule"].endswith("all_success")
        assert dag["register_upstream"] == ["compress", "drift", "ingest", "merge", "shard", "train", "validate"]
    for dag in parsed[0]["dags"].values():
        assert dag["undocumented_tasks"] == []
    assert nightly["outlets"] == {"validate": ["x-lepton://lepton_mnist1d/validated-data"],
                                  "publish_champion": ["models:/lepton-mnist1d@champion"]}
    assert "lepton_mnist1d.champion" in parsed[0]["dags"]["lepton_mnist1d_score"]["schedule"]
    scoring = parsed[0]["dags"]["lepton_sensors_score"]["schedule"]  # on the champion Asset and its own cron
    assert "lepton_sensors.champion" in scoring and "0 6 * * *" in scoring
    gate = parsed[0]["dags"]["lepton_sensors_warehouse_approval"]  # decisions side by side, champion published
    assert gate["schedule"] == "None" and gate["max_active_runs"] > 1
    assert gate["outlets"] == {"publish_champion": ["models:/lepton-sensors-warehouse@champion"]}
    houses = parsed[0]["dags"]["lepton_house_prices"]
    assert houses["schedule"] == "30 2 * * *" and houses["owner"] == "data-engineering"


def test_parsing_imports_no_heavy_library_and_opens_no_database(parsed):
    result, env = parsed
    assert result["heavy"] == []
    assert not (env.home / "airflow.db").exists()  # the parse never touched the metadata DB


def test_ruff_airflow_rules_are_clean():
    ruff = str(REPO_ROOT / ".venv" / "bin" / "ruff")
    done = subprocess.run([ruff, "check", "--select", "AIR", "dags", "lepton_tasks"],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stdout


def test_a_param_out_of_bounds_is_refused_by_airflow_naming_it(tmp_path):
    env = AirflowEnv.sqlite(tmp_path)
    env.migrate()
    for date, conf, named in [("2026-01-01", {"num_shards": 0}, "param num_shards"),
                              ("2026-01-02", {"model_kind": "rnn"}, "param model_kind")]:
        done = env.airflow("dags", "test", "lepton_mnist1d", date, "-c", json.dumps(conf), check=False)
        assert done.returncode != 0 and named in (done.stdout + done.stderr)
    assert env.runs() == set()  # refused before any task ran: no run folder


def test_a_bad_spec_is_an_import_error_naming_it_and_the_other_pipelines_still_load(tmp_path):
    import shutil

    from lepton_tasks.config.settings import PIPELINES_DIR

    specs = tmp_path / "pipelines"
    specs.mkdir()
    shutil.copy(PIPELINES_DIR / "lepton_mnist1d.yaml", specs)
    (specs / "broken.yaml").write_text((PIPELINES_DIR / "lepton_house_prices.yaml").read_text()
                                       .replace("name: lepton_house_prices", "name: broken")
                                       .replace("num_shards: 4", "num_shards: -1"))
    env = AirflowEnv.sqlite(tmp_path)
    env.migrate()
    extra = {"LEPTON_PIPELINES_DIR": str(specs)}
    env.airflow("dags", "reserialize", **extra)  # parse and store, as the dag-processor does
    listed = json.loads(env.airflow("dags", "list", "-o", "json", **extra).stdout.strip().splitlines()[-1])
    reported = env.airflow("dags", "list-import-errors", "-o", "json", check=False, **extra)  # exits 1: there are
    errors = json.loads(reported.stdout.strip().splitlines()[-1])
    assert [d["dag_id"] for d in listed] == ["lepton_mnist1d", "lepton_mnist1d_score"]
    assert len(errors) == 1 and "broken.yaml" in errors[0]["error"]
    assert "field 'training.num_shards': Input should be greater than or equal to 1" in errors[0]["error"]
