"""The whole DAG, then MLflow and report.json checked: on PostgreSQL where the suite has one (as CI does), else on
the embedded SQLite default (whose `lepton run` path `test_new_pipeline.py` runs too, on every machine). The first
run goes through `.venv/bin/lepton run` from a plain shell (as cron would run it), a worse one after it through
`airflow dags test`, then a failed one in this process (on the same databases and data root: a failure under
Airflow's scheduler is `test_nightly.py`'s, one per cause in `test_bad_inputs.py`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lepton_tasks.tools.airflow_env import SMALL_CONF, AirflowEnv, read_report, scratch_database, write_demo
from tests.conftest import postgres_url

pytestmark = pytest.mark.slow

WORSE_DATE = "2026-03-02T02:00:00+00:00"
WORSE_CONF = {**SMALL_CONF, "model_kind": "mlp", "merge_rounds": 1, "local_epochs": 1, "learning_rate": 0.0005,
              "merge_strategy": "median"}  # a strategy picked in the form reaches the merge and the registry


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def _mlflow(env: AirflowEnv):
    from mlflow import MlflowClient

    return MlflowClient(env.mlflow_uri)


def _check_good_run(env: AirflowEnv, run_dir: Path) -> dict:
    report = read_report(run_dir)
    assert report["status"] == "success" and report["failed_stage"] is None
    assert set(report["stages"]) == {"wait", "ingest", "validate", "drift", "shard", "train", "merge", "compress",
                                     "register"}
    assert "no champion" in report["stages"]["drift"]["note"]  # the first run: nothing to compare with
    assert all(s["status"] == "success" and s["seconds"] >= 0 for s in report["stages"].values())
    assert report["metrics"]["rows"] == 1500 and report["metrics"]["validate.failed"] == 0
    # 3x chance: it learns; the quality bar itself is measured in bench/
    assert len(report["metrics"]["shard_rows"]) == 2 and report["metrics"]["merged_metrics"]["accuracy"] > 0.3
    assert report["spec"]["path"].endswith("lepton_mnist1d.yaml") and len(report["spec"]["sha256"]) == 64
    assert report["metrics"]["chosen"] in report["metrics"]["variants"]
    info = report["mlflow"]
    assert info["model_name"] == "lepton-mnist1d" and info["model_version"] == "1"
    assert info["aliases"] == ["candidate", "champion"]

    client = _mlflow(env)
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["lepton.complete"] == "true"
    assert run.data.params["num_shards"] == "2"
    assert run.data.metrics["eval_accuracy"] == pytest.approx(report["metrics"]["merged_metrics"]["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(info["run_id"])}
    assert {"validation", "shards", "checkpoints", "merged", "onnx", "spec", "model", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(info["run_id"], "plots")}
    assert plots == {"plots/training_curves.png", "plots/confusion_matrix.png", "plots/compression_tradeoff.png",
                     "plots/shard_mix.png"}
    by_round = client.get_metric_history(info["run_id"], "merged_eval_accuracy_by_round")
    assert [m.step for m in by_round] == list(range(1, report["params"]["merge_rounds"] + 1))
    assert any(a.path.endswith("docs") for a in client.list_artifacts(info["run_id"], "validation"))
    tradeoff = json.loads(Path(client.download_artifacts(info["run_id"], "onnx/tradeoff.json")).read_text())
    verdicts = {row[0]: row[-1] for row in tradeoff["data"]}  # MLflow's table: columns name ... verdict
    assert tradeoff["columns"][0] == "name" and verdicts[report["metrics"]["chosen"]].startswith("chosen")
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.name == "ingested"
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{info['run_id']}'")
    assert len(children) == 2
    curve = client.get_metric_history(children[0].info.run_id, "loss")
    assert [m.step for m in curve] == list(range(1, 9))  # 2 rounds x 4 epochs
    version = client.get_model_version("lepton-mnist1d", "1")
    assert version.tags["lepton.dag_run_id"] == report["run_id"] and "FedAvg" in version.description
    tags = version.tags
    assert tags["lepton.spec"] == "lepton_mnist1d" and tags["lepton.spec_sha256"] == report["spec"]["sha256"]
    assert tags["lepton.source_uri"].rstrip("/").endswith("landing/mnist1d") and len(tags["lepton.data_sha256"]) == 64
    return report


def _check_worse_run_keeps_champion(env: AirflowEnv, good_dir: Path) -> None:
    _, run_dir = env.dags_test(WORSE_CONF, WORSE_DATE)
    report, good = read_report(run_dir), read_report(good_dir)
    assert report["metrics"]["merged_metrics"]["accuracy"] < good["metrics"]["merged_metrics"]["accuracy"]
    drift = report["stages"]["drift"]  # the same data as the champion's: no drift
    assert drift["reference"]["model_version"] == "1" and drift["max_psi"] < 0.01 and drift["alarm"] is False
    client = _mlflow(env)
    assert str(client.get_model_version_by_alias("lepton-mnist1d", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("lepton-mnist1d", "candidate").version) == "2"
    assert client.get_model_version("lepton-mnist1d", "2").description.startswith("Coordinate-wise median of 2")
    assert report["stages"]["merge"]["strategy"] == "median"


def _check_failed_run_registers_nothing(env: AirflowEnv, good_dir: Path, monkeypatch) -> None:
    from lepton_tasks.config.specs import find_spec
    from lepton_tasks.orchestration import pipeline

    before = _tree_digest(good_dir)
    monkeypatch.setenv("LEPTON_DATA_ROOT", str(env.data_root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env.mlflow_uri)
    ctx = pipeline.context(find_spec("lepton_mnist1d"), "failed", {**SMALL_CONF, "source_uri": "landing/nowhere/"})
    with pytest.raises(Exception, match="nowhere' does not exist"):  # not retried (Airflow's AirflowFailException)
        pipeline.run_in_process(ctx)
    with pytest.raises(Exception, match="run failed at stage 'ingest'"):
        pipeline.finish(ctx)
    report = read_report(ctx.paths.root)
    assert report["status"] == "failed" and report["failed_stage"] == "ingest"
    assert "nowhere' does not exist" in report["stages"]["ingest"]["error"]
    assert report["stages"]["register"]["status"] == "not_run"
    client = _mlflow(env)
    assert len(client.search_model_versions("name = 'lepton-mnist1d'")) == 2
    assert str(client.get_model_version_by_alias("lepton-mnist1d", "champion").version) == "1"
    assert _tree_digest(good_dir) == before


def test_pipeline_end_to_end(tmp_path, monkeypatch):
    url = postgres_url()
    if not url:
        _pipeline_story(AirflowEnv.sqlite(tmp_path), monkeypatch)
        return
    with scratch_database(url, "lepton_airflow", "postgresql+psycopg2") as airflow_db, \
            scratch_database(url, "lepton_mlflow", "postgresql") as mlflow_db:
        _pipeline_story(AirflowEnv(tmp_path, tmp_path / "data", airflow_db.render_as_string(hide_password=False),
                                   mlflow_db.render_as_string(hide_password=False)), monkeypatch)


def _pipeline_story(env: AirflowEnv, monkeypatch) -> None:
    """The first run from a plain shell, then a worse run and a failed one after it."""
    write_demo(env.data_root, 1500)
    env.migrate()
    _, good_dir = env.lepton_run(SMALL_CONF)
    _check_good_run(env, good_dir)
    _check_worse_run_keeps_champion(env, good_dir)
    _check_failed_run_registers_nothing(env, good_dir, monkeypatch)


