"""Register against a real MLflow tracking server that is stopped, restarted, and whose client is SIGKILLed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from lepton_tasks.config.specs import find_spec
from lepton_tasks.core.errors import RegistryError
from lepton_tasks.core.storage import sha256_file
from lepton_tasks.orchestration import pipeline
from lepton_tasks.tools.airflow_env import SMALL_CONF, TrackingServer, write_demo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Manifests of every stage up to compress, from the real stage functions (a run ready to register)."""
    import os

    root = tmp_path_factory.mktemp("registry")
    os.environ["LEPTON_DATA_ROOT"] = str(root / "data")
    write_demo(root / "data", 900)
    loaded = find_spec("lepton_mnist1d")
    ctx = pipeline.context(loaded, "prepared", SMALL_CONF)
    manifests, _ = pipeline.run_in_process(ctx, last="compress")
    yield root, loaded, manifests
    os.environ.pop("LEPTON_DATA_ROOT", None)


@pytest.fixture
def server(tmp_path, monkeypatch):
    tracking = TrackingServer(tmp_path)
    tracking.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.uri)
    yield tracking
    tracking.stop()


def _register(loaded, run_id: str, manifests: dict, conf: dict | None = None) -> dict:
    """The register task's manifest, as it crosses XCom."""
    ctx = pipeline.context(loaded, run_id, conf or SMALL_CONF)
    return pipeline.run_stage(ctx, "register", manifests).to_dict()


def _parent_runs(client, run_id: str):
    experiment = client.get_experiment_by_name("lepton_mnist1d")
    return client.search_runs([experiment.experiment_id], f"tags.`lepton.dag_run_id` = '{run_id}' and "
                              "tags.`mlflow.parentRunId` IS NULL") if experiment else []


def test_mlflow_down_fails_clearly_then_the_retry_registers_once(stages, server):
    from mlflow import MlflowClient

    _, loaded, manifests = stages
    server.stop()
    started = time.monotonic()
    with pytest.raises(RegistryError, match=f"MLflow at {server.uri} cannot be reached") as raised:
        _register(loaded, "nightly_1", manifests)
    assert raised.value.retryable and time.monotonic() - started < 90
    server.start()
    done = _register(loaded, "nightly_1", manifests)  # the Airflow retry
    again = _register(loaded, "nightly_1", manifests)  # a cleared task run once more
    client = MlflowClient(server.uri)
    assert done["model_version"] == again["model_version"] == "1"
    assert len(client.search_model_versions("name = 'lepton-mnist1d'")) == 1
    [parent] = _parent_runs(client, "nightly_1")
    assert parent.info.status == "FINISHED" and parent.data.tags["lepton.complete"] == "true"
    champion = client.get_model_version_by_alias("lepton-mnist1d", "champion")
    assert str(champion.version) == "1" and client.get_run(champion.run_id).data.tags["lepton.complete"] == "true"


def test_the_champion_gate_fails_closed_when_the_champion_cannot_be_rescored(stages, server):
    """No comparison on the same held-out rows, no promotion: the old recorded score is not enough."""
    from mlflow import MlflowClient

    _, loaded, manifests = stages
    client = MlflowClient(server.uri)
    first = _register(loaded, "nightly_1", manifests)
    assert first["promotion"]["outcome"] == "promoted" and "no champion yet" in first["promotion"]["reason"]
    _version_file(server, client, "1", "encoder.json").unlink()  # it can no longer turn rows into model input
    second = _register(loaded, "nightly_2", manifests)  # same model, same score: it would have been promoted
    promotion = second["promotion"]
    assert promotion["outcome"] == "not_compared" and not promotion["promoted"]
    assert "could not be re-scored on this run's held-out rows" in promotion["reason"]
    assert second["aliases"] == ["candidate"]
    assert str(client.get_model_version_by_alias("lepton-mnist1d", "champion").version) == "1"
    assert client.get_run(second["run_id"]).data.tags["lepton.promotion"] == "not_compared"


def _version_file(server: TrackingServer, client, version: str, name: str) -> Path:
    """Where the tracking server keeps a file registered with a model version (its logged model's extra_files)."""
    model_id = client.get_model_version("lepton-mnist1d", version).source.removeprefix("models:/")
    [path] = [p for p in (server.root / "artifacts").rglob(f"extra_files/{name}") if model_id in str(p)]
    return path


def test_a_champion_whose_files_are_gone_stops_nothing_and_a_person_can_replace_it(stages, server):
    """Drift and the warm start say "no usable champion" and go on from scratch; the gate still fails closed; a run
    triggered with replace_unusable_champion promotes its model in the champion's place."""
    from mlflow import MlflowClient

    _, loaded, manifests = stages
    client = MlflowClient(server.uri)
    _register(loaded, "nightly_1", manifests)
    _version_file(server, client, "1", "merged.safetensors").unlink()  # the champion's weights are gone

    night = pipeline.context(loaded, "nightly_2", {**SMALL_CONF, "init_from": "champion"})
    drifted = pipeline.drift(night, manifests["validate"])  # took the snapshot: not wedged
    assert drifted.champion is None and "champion version 1 of lepton-mnist1d cannot be read" in \
        drifted.champion_unusable
    assert drifted.note.startswith("no usable champion")
    start = pipeline.warm_start(night, drifted)
    assert start.weights is None and start.reason.startswith("no usable champion (champion version 1")
    registered = _register(loaded, "nightly_2", {**manifests, "drift": drifted},
                           {**SMALL_CONF, "init_from": "champion"})
    assert registered["promotion"]["outcome"] == "not_compared"
    tags = client.get_run(registered["run_id"]).data.tags
    assert "cannot be read" in tags["lepton.champion_unusable"]
    summary = json.loads(night.summary_path("drift").read_text())
    assert "cannot be read" in summary["champion_unusable"]

    replaced = _register(loaded, "manual_replace", manifests, {**SMALL_CONF, "replace_unusable_champion": True})
    assert replaced["promotion"]["outcome"] == "replaced_unusable" and "champion" in replaced["aliases"]
    assert client.get_model_version_by_alias("lepton-mnist1d", "champion").version == replaced["model_version"]


def test_a_rerun_on_changed_data_is_a_new_gated_version_and_the_champion_keeps_its_own_files(stages, server,
                                                                                              tmp_path, monkeypatch):
    """The champion's night run again over other rows: its MLflow run and version are not written again; the new
    model is a new version that goes through the gate; scoring reads the champion's own files."""
    from mlflow import MlflowClient

    from lepton_tasks.stages.score import fetch_champion

    _, loaded, manifests = stages
    client = MlflowClient(server.uri)
    first = _register(loaded, "nightly_1", manifests)
    run_files = {p: p.read_bytes() for p in (server.root / "artifacts").rglob("*") if p.is_file()}

    monkeypatch.setenv("LEPTON_DATA_ROOT", str(tmp_path / "changed"))
    write_demo(tmp_path / "changed", 700)  # the night's data changed
    changed, _ = pipeline.run_in_process(pipeline.context(loaded, "nightly_1", SMALL_CONF), last="compress")
    assert changed["merge"].merged_sha256 != manifests["merge"].merged_sha256
    again = _register(loaded, "nightly_1", changed)

    assert again["run_id"] != first["run_id"] and again["model_version"] == "2"
    assert again["promotion"]["outcome"] in ("promoted", "kept_champion")  # compared on the new held-out rows
    assert again["promotion"]["champion_score_same_data"] is not None
    assert client.get_run(again["run_id"]).data.tags["lepton.supersedes"] == first["run_id"]
    assert {p: p.read_bytes() for p in run_files} == run_files  # nothing registered before was written again
    with tempfile.TemporaryDirectory() as into:
        served = fetch_champion(server.uri, "lepton-mnist1d", Path(into))
        version = client.get_model_version_by_alias("lepton-mnist1d", "champion").version
        mine = (changed if version == "2" else manifests)["compress"].chosen_sha256
        assert served.version == version and sha256_file(served.onnx_path) == mine
    assert _register(loaded, "nightly_1", changed)["promotion"]["outcome"] == "rerun"  # and now it is a rerun


KILLABLE = """
import json, sys
from lepton_tasks.orchestration import pipeline
from lepton_tasks.config.specs import find_spec
manifests = {stage: pipeline.MANIFESTS[stage].from_dict(raw) for stage, raw in json.load(open(sys.argv[1])).items()}
ctx = pipeline.context(find_spec("lepton_mnist1d"), sys.argv[2], json.loads(sys.argv[3]))
pipeline.run_stage(ctx, "register", manifests)
"""


def test_a_register_killed_mid_run_is_closed_failed_and_never_taken_as_complete(stages, server, tmp_path):
    from mlflow import MlflowClient

    root, loaded, manifests = stages
    client = MlflowClient(server.uri)
    _register(loaded, "nightly_1", manifests)  # a champion to compare with
    saved = tmp_path / "manifests.json"
    saved.write_text(json.dumps({stage: manifest.to_dict() for stage, manifest in manifests.items()}))
    task = subprocess.Popen([sys.executable, "-c", KILLABLE, str(saved), "nightly_2", json.dumps(SMALL_CONF)],
                            cwd=Path(__file__).parents[2])
    deadline = time.monotonic() + 120
    while not _parent_runs(client, "nightly_2") and time.monotonic() < deadline and task.poll() is None:
        time.sleep(0.05)
    task.send_signal(signal.SIGKILL)
    task.wait()
    [left] = _parent_runs(client, "nightly_2")
    assert left.info.status == "RUNNING" and left.data.tags.get("lepton.complete") != "true"
    assert str(client.get_model_version_by_alias("lepton-mnist1d", "champion").version) == "1"

    done = _register(loaded, "nightly_2", manifests)  # the retry
    [parent] = _parent_runs(client, "nightly_2")
    assert parent.info.run_id == left.info.run_id and parent.info.status == "FINISHED"
    assert parent.data.tags["lepton.interrupted_attempts"] == "1" and parent.data.tags["lepton.complete"] == "true"
    assert done["model_version"] == "2"
    # the champion was re-scored on this run's held-out rows; same weights, same rows: same score, promoted
    promotion = json.loads(Path(client.download_artifacts(parent.info.run_id, "promotion.json", str(tmp_path)))
                           .read_text())
    assert promotion["champion_score_same_data"] == pytest.approx(promotion["candidate_score"])
    assert promotion["outcome"] == "promoted" and promotion["promoted"] and "on this run's held-out rows" in \
        promotion["reason"]
    assert parent.data.metrics["champion_eval_accuracy"] == pytest.approx(promotion["candidate_score"])
    for version in client.search_model_versions("name = 'lepton-mnist1d'"):
        if version.aliases:
            assert client.get_run(version.run_id).data.tags["lepton.complete"] == "true"
