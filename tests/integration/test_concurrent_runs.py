"""Two runs of one pipeline at the same time, in separate processes, sharing the data root and MLflow server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lepton_tasks.tools.airflow_env import SMALL_CONF, TrackingServer, write_demo

pytestmark = pytest.mark.slow

WHOLE_RUN = """
import json, sys
from lepton_tasks.orchestration import pipeline
from lepton_tasks.config.specs import find_spec
ctx = pipeline.context(find_spec("lepton_mnist1d"), sys.argv[1], json.loads(sys.argv[2]))
m, _ = pipeline.run_in_process(ctx)
pipeline.finish(ctx)
print(json.dumps({stage: manifest.to_dict() for stage, manifest in m.items()}))
"""


def _paths_in(value) -> list[str]:
    if isinstance(value, dict):
        return [p for v in value.values() for p in _paths_in(v)]
    if isinstance(value, list):
        return [p for v in value for p in _paths_in(v)]
    return [value] if isinstance(value, str) and value.startswith("/") else []


def _run_both(data_root: Path, tracking_uri: str) -> dict[str, dict]:
    import os

    env = {**os.environ, "LEPTON_DATA_ROOT": str(data_root), "MLFLOW_TRACKING_URI": tracking_uri,
           "LEPTON_DASK_WORKERS": "1"}
    logs = {run_id: data_root.parent / f"{run_id}.log" for run_id in ("scheduled__2026-06-01", "scheduled__2026-06-02")}
    runs = {run_id: subprocess.Popen([sys.executable, "-c", WHOLE_RUN, run_id, json.dumps(SMALL_CONF)], env=env,
                                     stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
                                     cwd=Path(__file__).parents[2])
            for run_id, log in logs.items()}
    manifests = {}
    for run_id, process in runs.items():
        out, _ = process.communicate(timeout=600)
        assert process.returncode == 0, f"{run_id} failed:\n{logs[run_id].read_text()[-4000:]}"
        manifests[run_id] = json.loads(out.strip().splitlines()[-1])
    return manifests


def _assert_same_weights(path_a: str, path_b: str) -> None:
    """Bit-equal: the determinism policy (`lepton_tasks.stages.train`) holds for concurrent runs on one machine."""
    from lepton_tasks.ml.models import load_checkpoint

    (a, _), (b, _) = load_checkpoint(Path(path_a)), load_checkpoint(Path(path_b))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].equal(b[name]), name


def test_two_concurrent_runs_keep_their_stages_checkpoints_and_mlflow_runs_apart(tmp_path):
    from mlflow import MlflowClient

    server = TrackingServer(tmp_path / "mlflow")
    (tmp_path / "mlflow").mkdir()
    server.start()
    try:
        data_root = tmp_path / "data"
        write_demo(data_root, 900)
        manifests = _run_both(data_root, server.uri)
        client = MlflowClient(server.uri)
        for run_id, found in manifests.items():
            folder = data_root / "lepton_mnist1d" / run_id
            assert json.loads((folder / "report.json").read_text())["status"] == "success"
            paths = _paths_in({k: v for k, v in found.items() if k != "ingest"})
            assert paths and all(p.startswith(str(folder)) for p in paths), run_id  # every output in its own run
            run = client.get_run(found["register"]["run_id"])
            assert run.data.tags["lepton.dag_run_id"] == run_id and run.info.status == "FINISHED"
        a, b = manifests.values()
        assert a["register"]["run_id"] != b["register"]["run_id"]
        assert {a["register"]["model_version"], b["register"]["model_version"]} == {"1", "2"}
        # same data, params and seed: both computed the same model, each in its own files
        assert a["merge"]["merged_path"] != b["merge"]["merged_path"]
        _assert_same_weights(a["merge"]["merged_path"], b["merge"]["merged_path"])
        assert a["merge"]["merged_metrics"] == b["merge"]["merged_metrics"]
    finally:
        server.stop()
