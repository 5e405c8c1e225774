"""Extra-link targets, the run's pictures, the log summary table and the champion Asset event."""

from __future__ import annotations

import numpy as np
import pytest

from lepton_tasks.core.storage import RunPaths
from lepton_tasks.data.manifests import RegisterManifest
from lepton_tasks.ml import plots
from lepton_tasks.orchestration import result_links as links
from lepton_tasks.orchestration.pipeline import champion_event, summary_table

REGISTERED = {"tracking_uri": "http://lepton:***@mlflow.internal:5000", "experiment_id": "3", "run_id": "abc",
              "model_name": "lepton-mnist1d", "model_version": "7", "aliases": ["candidate", "champion"],
              "champion_before": "6"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_mlflow_links_point_at_the_tracking_server_without_credentials(monkeypatch):
    monkeypatch.delenv("LEPTON_MLFLOW_UI_URL", raising=False)
    assert links.mlflow_run_url(REGISTERED) == "http://mlflow.internal:5000/#/experiments/3/runs/abc"
    assert links.model_version_url(REGISTERED) == "http://mlflow.internal:5000/#/models/lepton-mnist1d/versions/7"
    assert links.mlflow_ui_base("sqlite:////data/mlflow.db") == links.DEFAULT_MLFLOW_UI  # a store has no UI
    monkeypatch.setenv("LEPTON_MLFLOW_UI_URL", "https://mlflow.example.com/")
    assert links.mlflow_run_url(REGISTERED).startswith("https://mlflow.example.com/#/")


def test_data_docs_are_found_in_the_run_folder_and_never_outside_it(tmp_path):
    run_id = "manual__2026-11-22T10:00:00+00:00"
    docs = RunPaths.of(tmp_path, "lepton_mnist1d", run_id).stage("validate") / "docs"
    docs.mkdir(parents=True)
    (docs / "index.html").write_text("<html></html>")
    (docs.parent / "result.json").write_text("{}")
    assert links.data_docs_file(tmp_path, "lepton_mnist1d", run_id, "index.html") == (docs / "index.html").resolve()
    assert links.data_docs_file(tmp_path, "lepton_mnist1d", run_id, "../result.json") is None
    assert links.data_docs_file(tmp_path, "lepton_mnist1d", "other_run", "index.html") is None
    assert links.data_docs_url("lepton_mnist1d", run_id) == (
        "/lepton/data-docs/lepton_mnist1d/manual__2026-11-22T10%3A00%3A00%2B00%3A00/index.html")


def test_the_drift_report_link_appears_once_the_run_has_a_report(tmp_path):
    run_id = "backfill__2026-11-12T03:00:00+00:00"
    assert links.drift_report_file(tmp_path, "lepton_sensors", run_id) is None  # before the drift task ran
    report = RunPaths.of(tmp_path, "lepton_sensors", run_id).stage("drift") / "report.html"
    report.parent.mkdir(parents=True)
    report.write_text("<html></html>")
    assert links.drift_report_file(tmp_path, "lepton_sensors", run_id) == report
    assert links.drift_report_url("lepton_sensors", run_id) == (
        "/lepton/drift/lepton_sensors/backfill__2026-11-12T03%3A00%3A00%2B00%3A00/report.html")


def test_dask_dashboard_link_prefers_the_configured_one(monkeypatch):
    monkeypatch.delenv("LEPTON_DASK_DASHBOARD_URL", raising=False)
    assert links.dask_dashboard_url({"dashboard_link": "http://127.0.0.1:8787/status"}) == \
        "http://127.0.0.1:8787/status"
    assert links.dask_dashboard_url(None) is None
    monkeypatch.setenv("LEPTON_DASK_DASHBOARD_URL", "http://dask.internal:8787/status")
    assert links.dask_dashboard_url({"dashboard_link": "x"}) == "http://dask.internal:8787/status"


def _epochs(shard: str, rnd: int, losses: list[float]) -> dict:
    return {"shard": shard, "round": rnd, "epochs": [{"epoch": i + 1, "loss": v} for i, v in enumerate(losses)]}


def test_plots_are_real_pngs(tmp_path):
    rounds = [[_epochs("shard-000", 1, [2.0, 1.5]), _epochs("shard-001", 1, [2.1, 1.6])],
              [_epochs("shard-000", 2, [1.2, 1.0]), _epochs("shard-001", 2, [1.3, 1.1])]]
    rng = np.random.default_rng(0)
    variants = [{"name": n, "bytes": b, "score": s, "latency_p50_ms": 0.05}
                for n, b, s in (("pytorch_fp32", 150_000, 0.95), ("onnx_int8", 45_000, 0.948))]
    drawn = [
        plots.training_curves(rounds, 2, [0.6, 0.8], "accuracy", tmp_path / "curves.png"),
        plots.confusion_matrix(rng.integers(0, 3, 50), rng.integers(0, 3, 50), ["a", "b", "c"], tmp_path / "cm.png"),
        plots.residuals(rng.normal(size=80), rng.normal(size=80), tmp_path / "residuals.png"),
        plots.compression_tradeoff(variants, "onnx_int8", "accuracy", tmp_path / "tradeoff.png"),
    ]
    for path in drawn:
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5_000, path


def test_summary_table_flattens_and_aligns():
    table = summary_table({"status": "success", "seconds": 1.23456, "shard_rows": {"shard-000": 10}})
    lines = table.splitlines()
    assert lines[0] == lines[-1] and lines[0].startswith("+-")
    assert "| shard_rows.shard-000 | 10" in table and "1.235" in table
    assert len({len(line) for line in lines}) == 1


def test_champion_event_only_when_champion_moved():
    from airflow.sdk.exceptions import AirflowSkipException

    from lepton_tasks.config.specs import find_spec
    from lepton_tasks.orchestration.pipeline import context

    night = context(find_spec("lepton_sensors"), "r", {}, ds="2026-11-12").day
    event = champion_event(night, RegisterManifest.from_dict(REGISTERED))
    assert event["model_version"] == "7" and event["ds"] == "2026-11-12"  # the night a consumer scores
    with pytest.raises(AirflowSkipException, match="champion stays at version 6"):  # skipped: no Asset event
        champion_event(night, RegisterManifest.from_dict({**REGISTERED, "aliases": ["candidate"]}))
    with pytest.raises(AirflowSkipException):  # a rerun night finds its version champion but moved nothing
        champion_event(night, RegisterManifest.from_dict(
            {**REGISTERED, "promotion": {"outcome": "rerun", "promoted": False}}))
