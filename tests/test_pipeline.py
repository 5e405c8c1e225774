"""The code between the stages: manifests across the XCom boundary, the one graph the DAG and the in-process runner
share, the report assembled from the stage summaries. Small inputs, no cluster."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from lepton_tasks.config.specs import find_spec
from lepton_tasks.core.storage import write_json
from lepton_tasks.data.manifests import IngestManifest, MergeManifest, ShardManifest, WaitManifest
from lepton_tasks.orchestration import pipeline
from tests.manifests import every_stage

MNIST = find_spec("lepton_mnist1d")


@pytest.mark.parametrize("stage", sorted(every_stage()))
def test_every_manifest_comes_back_from_xcom_json_as_it_went(stage):
    manifest = every_stage()[stage]
    crossed = json.loads(json.dumps(manifest.to_dict()))  # what an XCom holds
    assert pipeline.MANIFESTS[stage].from_dict(crossed) == manifest


def test_nested_records_are_rebuilt_typed():
    shards = ShardManifest.from_dict(every_stage()["shard"].to_dict())
    assert shards.shards[0].keys == ["north"] and shards.eval.rows == 10
    assert shards.warm_start.version == "3" and shards.select is None


def test_a_mapping_with_a_field_the_manifest_lacks_is_refused_naming_it():
    raw = {**every_stage()["merge"].to_dict(), "merged_score": 0.9}
    with pytest.raises(TypeError, match=r"MergeManifest has no field\(s\) \['merged_score'\]"):
        MergeManifest.from_dict(raw)


def test_each_stage_takes_the_manifests_of_stages_before_it():
    order = [stage.name for stage in pipeline.GRAPH]
    for stage in pipeline.GRAPH:
        assert all(order.index(upstream) < order.index(stage.name) for upstream in stage.inputs), stage.name
    assert pipeline.STAGES == ("wait", *order) and set(pipeline.MANIFESTS) == set(pipeline.STAGES)


def test_the_dag_is_the_graph_each_task_after_its_inputs_and_the_cluster_where_it_needs_it():
    from dags.lepton_pipelines import build

    dag = build(MNIST)
    for stage in pipeline.GRAPH:
        wanted = set(stage.inputs) | ({"dask_cluster"} if stage.cluster == "after" else set())
        assert dag.get_task(stage.name).upstream_task_ids == wanted | ({"wait"} if stage.name == "ingest" else set())
        assert dag.get_task(stage.name).doc_md == stage.doc and not dag.get_task(stage.name).multiple_outputs
    assert [a.name for a in dag.get_task("validate").outlets] == ["lepton_mnist1d.validated_data"]
    assert dag.get_task("stop_dask_cluster").upstream_task_ids == {"dask_cluster", "train"}
    assert dag.get_task("report").upstream_task_ids == {"register"}


def _task_context(run_id: str = "manual__1") -> dict:
    return {"run_id": run_id, "params": {}, "dag": SimpleNamespace(dag_id="lepton_mnist1d"), "ds": "2026-11-10"}


def test_run_task_hands_the_stage_typed_manifests_and_xcom_a_mapping(data_root):
    seen = {}

    def count_rows(ctx, ingested: IngestManifest, cluster) -> WaitManifest:
        seen.update(ingested=ingested, cluster=cluster(), run_id=ctx.run_id)
        return WaitManifest(ctx.day.isoformat(), [{"rows": ingested.rows}])

    stage = pipeline.Stage("count", count_rows, WaitManifest, ("ingest",), cluster="after")
    upstream = (every_stage()["ingest"].to_dict(), {"address": "tcp://127.0.0.1:1", "kind": "local"})
    out = pipeline.run_task(stage, MNIST, _task_context(), upstream)
    assert out == {"ds": "2026-11-10", "days": [{"rows": 90}]}  # plain data for the XCom
    assert seen["ingested"] == every_stage()["ingest"] and seen["cluster"]["kind"] == "local"
    assert seen["run_id"] == "manual__1"


def test_the_report_lifts_each_manifests_figures_and_names_the_first_failed_stage(data_root):
    ctx = pipeline.context(MNIST, "reported")
    manifests = every_stage()
    for stage in ("wait", "ingest", "validate", "drift", "shard", "train"):
        write_json(ctx.summary_path(stage), {"status": "success", **manifests[stage].summary()})
    write_json(ctx.summary_path("merge"), {"status": "failed", "error": "TrainingError: boom"})
    report = pipeline.report(ctx)
    assert report["status"] == "failed" and report["failed_stage"] == "merge"
    assert report["stages"]["compress"] == {"status": "not_run"}
    assert report["metrics"] == {"rows": 90, "validate.passed": 11, "validate.failed": 1,
                                 "validate.quarantined_rows": 2, "drift.max_psi": 0.3,
                                 "shard_rows": {"shard-000": 40, "shard-001": 41}, "eval_rows": 10}
    assert json.loads(ctx.paths.report.read_text()) == report
    with pytest.raises(Exception, match="run failed at stage 'merge'"):
        pipeline.finish(ctx)


def test_summaries_show_the_figures_a_reader_of_the_log_wants():
    manifests = every_stage()
    assert manifests["train"].summary() == {"rounds": 2, "strategy": "fedprox", "final_loss": {"shard-000": 0.5},
                                            "resumed": 0, "dp_epsilon": {"shard-000": 4.0}}
    assert manifests["compress"].summary()["variants"]["onnx_int8"]["bytes"] == 1000
    assert manifests["register"].summary()["mlflow"]["model_version"] == "4"


def test_the_warm_start_is_the_champion_modules_decision_from_the_drift_manifest(data_root):
    ctx = pipeline.context(MNIST, "night", {"init_from": "champion"})
    nothing = every_stage()["drift"]
    nothing.champion, nothing.champion_unusable = None, "its weights are gone"
    start = pipeline.warm_start(ctx, nothing)
    assert start.weights is None and start.reason == "no usable champion (its weights are gone)"
    scratch = pipeline.warm_start(pipeline.context(MNIST, "night"), None)
    assert (scratch.init_from, scratch.reason) == ("scratch", "init_from is scratch")
