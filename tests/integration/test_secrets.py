"""A secret planted in the MLflow connection shows up in no task log, report, manifest or MLflow record."""

from __future__ import annotations

import json
import uuid

import pytest

from lepton_tasks.tools.airflow_env import SMALL_CONF, AirflowEnv, TrackingServer, read_report, write_demo

pytestmark = pytest.mark.slow


def _files_holding(root, secret: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_a_planted_connection_password_never_leaks(tmp_path):
    server = TrackingServer(tmp_path / "mlflow")
    (tmp_path / "mlflow").mkdir()
    server.start()
    try:
        env = AirflowEnv.sqlite(tmp_path / "airflow")
        write_demo(env.data_root, 900)
        env.migrate()
        secret = f"planted-{uuid.uuid4().hex}"
        connection = {"conn_type": "http", "host": "127.0.0.1", "port": server.port, "login": "lepton",
                      "password": secret}
        done, run_dir = env.dags_test(SMALL_CONF, "2026-05-01T02:00:00+00:00",
                                      AIRFLOW_CONN_MLFLOW_DEFAULT=json.dumps(connection))
        report = read_report(run_dir)
        assert report["status"] == "success" and report["mlflow"]["tracking_uri"] == server.uri  # it was used
        assert secret not in done.stdout + done.stderr
        for root in (env.home / "logs", env.data_root, tmp_path / "mlflow"):
            assert _files_holding(root, secret.encode()) == [], root

        from mlflow import MlflowClient

        run = MlflowClient(server.uri).get_run(report["mlflow"]["run_id"])
        assert secret not in json.dumps({"params": run.data.params, "tags": run.data.tags})
    finally:
        server.stop()
