"""A new pipeline from a fresh CSV, no Python written: scaffold, validate the spec, run with Airflow, registered."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from lepton_tasks.tools.airflow_env import BIN, SMALL_CONF, AirflowEnv, read_report
from lepton_tasks.tools.demo_data import make_house_prices

pytestmark = pytest.mark.slow


def _lepton(env: AirflowEnv, *args: str, **extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run([str(BIN / "lepton"), *args], env=env.env(**extra), capture_output=True, text=True,
                          timeout=900, cwd=env.home)
    output = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, f"lepton {args[0]} exited {done.returncode}:\n{output}"
    return done


def test_scaffolded_pipeline_runs_end_to_end_and_registers_a_model_with_its_lineage(tmp_path):
    env = AirflowEnv.sqlite(tmp_path)
    landing = env.data_root / "landing" / "fresh"
    landing.mkdir(parents=True)
    frame = make_house_prices(1600, seed=11).drop(columns=["rooms"])  # not the bundled example's columns
    frame.iloc[:800].to_csv(landing / "week-1.csv", index=False)
    frame.iloc[800:].to_csv(landing / "week-2.csv", index=False)
    dirs = {"LEPTON_PIPELINES_DIR": str(tmp_path / "pipelines"), "LEPTON_EXPECTATIONS_DIR": str(tmp_path / "suites")}

    made = _lepton(env, "new-pipeline", "fresh_houses", "--source", "landing/fresh/*.csv", "--target", "price_k",
                   **dirs)
    assert "fresh_houses.yaml" in made.stdout and "review before the first run" in made.stdout
    assert "1 valid, 0 invalid" in _lepton(env, "validate-spec", **dirs).stdout
    env.migrate()
    ran = _lepton(env, "run", "fresh_houses", "-c", json.dumps({**SMALL_CONF, "model_kind": "mlp"}), **dirs)
    report_path = Path(ran.stdout.strip().splitlines()[-1])  # the last line printed is the report
    report = read_report(report_path.parent)
    assert report["status"] == "success" and report["dag_id"] == "fresh_houses"
    assert report["metrics"]["metric"] == "r2" and report["metrics"]["merged_metrics"]["r2"] > 0.3
    assert set(report["metrics"]["merged_metrics"]) == {"r2", "mae", "rmse", "mse"}
    assert report["metrics"]["rows"] == 1600

    from mlflow import MlflowClient

    client = MlflowClient(env.mlflow_uri)
    version = client.get_model_version_by_alias("fresh-houses", "champion")
    spec_bytes = (tmp_path / "pipelines" / "fresh_houses.yaml").read_bytes()
    assert version.tags["lepton.spec"] == "fresh_houses"
    assert version.tags["lepton.spec_sha256"] == hashlib.sha256(spec_bytes).hexdigest()
    assert version.tags["lepton.source_uri"].endswith("landing/fresh/*.csv")
    assert version.tags["lepton.data_sha256"] == report["stages"]["ingest"]["source_sha256"]
    assert version.tags["lepton.metric"] == "r2"
    run = client.get_run(report["mlflow"]["run_id"])
    assert run.data.metrics["eval_r2"] == pytest.approx(report["metrics"]["merged_metrics"]["r2"])
    assert {"eval_mae", "onnx_int8_mae", "pytorch_fp32_r2"} <= set(run.data.metrics)
