"""What register makes of a run's manifests before it talks to MLflow: the headline metrics and the lineage tags.
(Registering against a real tracking server, its faults and the promotion gate: tests/integration.)"""

from __future__ import annotations

from dataclasses import replace

from lepton_tasks.data.manifests import WarmStart
from lepton_tasks.infra.tracking import TAG_CHAMPION_UNUSABLE, TAG_INIT, TAG_INIT_FALLBACK, TAG_WINDOW
from lepton_tasks.stages.register import RunRecord, _lineage, summary_metrics
from tests.manifests import every_stage


def _record(**changed) -> RunRecord:
    m = every_stage()
    fields = dict(dag_id="lepton_mnist1d", run_id="nightly_1", params={"local_epochs": 1}, spec_path="/p/m.yaml",
                  spec_sha256="s" * 64, ingest=m["ingest"], validation=m["validate"], shards=m["shard"],
                  train=m["train"], merge=m["merge"], compress=m["compress"], drift=m["drift"])
    return RunRecord(**{**fields, **changed})


def test_the_parent_runs_metrics_sum_up_every_stage():
    metrics = summary_metrics(_record())
    assert {k: metrics[k] for k in ("rows_ingested", "expectations_passed", "expectations_failed",
                                    "rows_quarantined", "eval_rows", "eval_accuracy")} == {
        "rows_ingested": 90, "expectations_passed": 11, "expectations_failed": 1, "rows_quarantined": 2,
        "eval_rows": 10, "eval_accuracy": 0.9}
    assert metrics["dp_epsilon_max"] == 4.0  # the last round's, not the first's
    assert metrics["onnx_int8_bytes"] == 1000 and metrics["torch_fp32_accuracy"] == 0.9


def test_lineage_names_the_spec_the_data_its_window_and_the_champion_it_started_from():
    tags = _lineage(_record())
    assert tags[TAG_INIT] == "champion:3" and tags[TAG_WINDOW] == "2026-11-10..2026-11-10"
    assert TAG_INIT_FALLBACK not in tags and TAG_CHAMPION_UNUSABLE not in tags


def test_a_warm_start_that_fell_back_says_why_and_so_does_an_unreadable_champion():
    m = every_stage()
    fell_back = replace(m["shard"], warm_start=WarmStart("champion", "champion version 3 has hidden_size 16"))
    unreadable = replace(m["drift"], champion=None, champion_unusable="its weights are gone")
    tags = _lineage(_record(shards=fell_back, drift=unreadable))
    assert tags[TAG_INIT] == "scratch" and tags[TAG_INIT_FALLBACK] == "champion version 3 has hidden_size 16"
    assert tags[TAG_CHAMPION_UNUSABLE] == "its weights are gone"
    assert _lineage(_record(shards=replace(m["shard"], warm_start=None)))[TAG_INIT] == "scratch"


def _candidates(tmp_path, count: int):
    """`count` versions of one model in a real MLflow store (SQLite), each from its own run; none champion yet."""
    from mlflow import MlflowClient

    from lepton_tasks.data.manifests import RegisterManifest

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("gate", artifact_location=(tmp_path / "artifacts").as_uri())
    client.create_registered_model("gated")
    made = []
    for _ in range(count):
        run = client.create_run(experiment)
        version = client.create_model_version("gated", f"runs:/{run.info.run_id}/model", run.info.run_id)
        made.append(RegisterManifest(uri, experiment, run.info.run_id, "gated", str(version.version), ["candidate"],
                                     None, {"outcome": "awaiting_approval", "promoted": False, "reason": "gate"}))
    return client, made


def test_a_decision_moves_champion_only_when_approved_and_still_compared_with_the_champion_it_knew(tmp_path):
    from lepton_tasks.stages.register import decide

    client, (first, second, third) = _candidates(tmp_path, 3)
    approved = decide(first.tracking_uri, third, True, "ana", "2026-12-07T08:00:00+00:00")
    assert approved.promotion["outcome"] == "approved" and approved.promotion["promoted"] is True
    assert client.get_registered_model("gated").aliases == {"champion": 3}
    late = decide(first.tracking_uri, first, True, "bo", "2026-12-07T08:01:00+00:00")  # compared with no champion
    assert late.promotion["outcome"] == "superseded" and late.promotion["promoted"] is False
    assert "champion moved to version 3" in late.promotion["approval"]["reason"]
    rejected = decide(first.tracking_uri, second, False, "cy", "2026-12-07T08:02:00+00:00")
    timed_out = decide(first.tracking_uri, second, False, None, "2026-12-07T09:00:00+00:00")
    assert (rejected.promotion["outcome"], timed_out.promotion["outcome"]) == ("rejected", "timed_out")
    assert client.get_registered_model("gated").aliases == {"champion": 3}  # only the approval moved it
    tags = client.get_model_version("gated", "1").tags
    assert (tags["lepton.promotion"], tags["lepton.promotion.decided_by"]) == ("superseded", "bo")
    assert client.get_run(second.run_id).data.tags["lepton.promotion.decided_by"] == "(timeout)"
