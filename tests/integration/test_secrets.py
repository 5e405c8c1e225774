"""Secrets planted in the MLflow connection and in the store credentials of an S3 source (the standard AWS
environment) show up in no task log, XCom, report, manifest or MLflow record."""

from __future__ import annotations

import json
import uuid

import pytest

from lepton_tasks.tools.airflow_env import SMALL_CONF, AirflowEnv, TrackingServer, read_report
from lepton_tasks.tools.demo_data import write_mnist1d
from lepton_tasks.tools.s3_server import S3Store

pytestmark = pytest.mark.slow


def _files_holding(root, secret: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_planted_secrets_never_leak(tmp_path):
    from mlflow import MlflowClient

    server = TrackingServer(tmp_path / "mlflow")
    (tmp_path / "mlflow").mkdir()
    server.start()
    store = S3Store.start(tmp_path)
    try:
        env = AirflowEnv.sqlite(tmp_path / "airflow")
        env.data_root.mkdir(parents=True)
        source = store.upload(write_mnist1d(tmp_path / "outside", 900), "landing/mnist1d/part-0.parquet")
        env.migrate()
        secret = f"planted-{uuid.uuid4().hex}"
        connection = {"conn_type": "http", "host": "127.0.0.1", "port": server.port, "login": "lepton",
                      "password": secret}
        done, run_dir = env.dags_test({**SMALL_CONF, "source_uri": source}, "2026-05-01T02:00:00+00:00",
                                      AIRFLOW_CONN_MLFLOW_DEFAULT=json.dumps(connection), **store.environ())
        report = read_report(run_dir)
        assert report["status"] == "success" and report["mlflow"]["tracking_uri"] == server.uri  # it was used
        assert report["stages"]["ingest"]["window"][0]["uri"] == source  # and so was the store
        run = MlflowClient(server.uri).get_run(report["mlflow"]["run_id"])
        for planted in (secret, store.secret):
            assert planted not in done.stdout + done.stderr
            for root in (env.home, tmp_path / "mlflow"):  # task logs, XCom in the metadata DB, the run's files
                assert _files_holding(root, planted.encode()) == [], root
            assert planted not in json.dumps({"params": run.data.params, "tags": run.data.tags})
    finally:
        store.stop()
        server.stop()
