"""Every DAG imports cleanly, is scheduled explicitly, retries, has owner and tags, and parses cheaply; a bad
spec is one import error while the other pipelines still load; a param out of bounds is refused by Airflow's own
check when a run is created. Each in a process of its own, as the dag-processor parses: DagBag, then the DAG as
the scheduler holds it (serialized)."""

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

def refused(dag_id, conf):  # what DAG.create_dagrun does with a trigger's conf, on the scheduler's (serialized) DAG
    from airflow.serialization.serialized_objects import DagSerialization
    dag = DagSerialization.from_dict(DagSerialization.to_dict(bag.dags[dag_id]))
    try:
        dag.params.deep_merge(conf).validate()
    except Exception as err:
        return f"{{type(err).__name__}}: {{err}}"

confs = json.loads(sys.argv[2]) if len(sys.argv) > 2 else []
print(json.dumps({{"errors": {{k: str(v) for k, v in bag.import_errors.items()}}, "heavy": heavy,
    "refused": [refused("lepton_mnist1d", conf) for conf in confs],
    "dags": {{d.dag_id: {{"schedule": str(d.schedule), "owner": d.owner, "tags": sorted(d.tags),
        "retries": [t.retries for t in d.tasks], "max_active_runs": d.max_active_runs, "catchup": d.catchup,
        "register_upstream": sorted(d.task_dict["register"].upstream_task_ids) if "register" in d.task_dict else None,
        "register_rule": str(d.task_dict["register"].trigger_rule).lower() if "register" in d.task_dict else None,
        "doc": bool(d.doc_md), "undocumented_tasks": [t.task_id for t in d.tasks if not t.doc_md],
        "outlets": {{t.task_id: [a.uri for a in t.outlets] for t in d.tasks if t.outlets}}}}
        for d in bag.dags.values()}}}}))
"""


OUT_OF_BOUNDS = [({"num_shards": 0}, "param num_shards"), ({"model_kind": "rnn"}, "param model_kind")]


def _parse(env: AirflowEnv, confs: list[dict] | None = None, **extra: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PARSE.format(heavy=HEAVY), str(REPO_ROOT / "dags"),
                           json.dumps(confs or [])], env=env.env(**extra), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    env = AirflowEnv.sqlite(tmp_path_factory.mktemp("parse"))
    return _parse(env, [conf for conf, _ in OUT_OF_BOUNDS] + [{"num_shards": 3, "model_kind": "cnn"}]), env


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


def test_a_param_out_of_bounds_is_refused_by_airflow_naming_it(parsed):
    result, env = parsed
    *refused, accepted = result["refused"]
    for (conf, named), said in zip(OUT_OF_BOUNDS, refused, strict=True):
        assert said.startswith("ParamValidationError") and named in said, (conf, said)
    assert accepted is None


def test_a_bad_spec_is_an_import_error_naming_it_and_the_other_pipelines_still_load(tmp_path):
    import shutil

    from lepton_tasks.config.settings import PIPELINES_DIR

    specs = tmp_path / "pipelines"
    specs.mkdir()
    shutil.copy(PIPELINES_DIR / "lepton_mnist1d.yaml", specs)
    (specs / "broken.yaml").write_text((PIPELINES_DIR / "lepton_house_prices.yaml").read_text()
                                       .replace("name: lepton_house_prices", "name: broken")
                                       .replace("num_shards: 4", "num_shards: -1"))
    result = _parse(AirflowEnv.sqlite(tmp_path), LEPTON_PIPELINES_DIR=str(specs))
    assert sorted(result["dags"]) == ["lepton_mnist1d", "lepton_mnist1d_score"]
    errors = list(result["errors"].values())
    assert len(errors) == 1 and "broken.yaml" in errors[0]
    assert "field 'training.num_shards': Input should be greater than or equal to 1" in errors[0]
