"""A pipeline's own model (`training.model: "package.module:ClassName"`): checked when its spec is checked and
before a run reads data, with errors naming the field; the bundled example (the residual MLP in `plugins/`) goes
through every stage, registers with its class, is re-scored from the registry as the gate does, and scores a batch;
every merge strategy merges it."""

from __future__ import annotations

import json

import pytest
import yaml

from lepton_tasks.config.specs import PipelineSpec, find_spec, parse_spec
from lepton_tasks.core.errors import SpecError
from lepton_tasks.ml.models import check_spec_model
from lepton_tasks.ml.strategies import STRATEGIES
from lepton_tasks.orchestration import pipeline
from lepton_tasks.tools.demo_data import ensure_example_data

OWN = find_spec("lepton_house_prices_resmlp")
SMALL = {"num_shards": 2, "merge_rounds": 2, "local_epochs": 1}


def _spec(**training) -> PipelineSpec:
    raw = yaml.safe_load(OWN.path.read_text())
    raw["training"] = {k: v for k, v in {**raw["training"], **training}.items() if v is not None}
    return parse_spec(yaml.safe_dump(raw), OWN.path).spec


@pytest.mark.parametrize(("training", "field", "said"), [
    ({"model": "tests.own_models:Nowhere"}, "training.model", "cannot import 'tests.own_models:Nowhere'"),
    ({"model": "tests.no_such_module:Linear"}, "training.model", "No module named 'tests.no_such_module'"),
    ({"model": "tests.own_models:NeedsSize", "model_kwargs": None}, "training.model", "not a torch.nn.Module"),
    ({"model": "tests.own_models:Linear", "model_kwargs": {"width": 3}}, "training.model", "unexpected keyword"),
    ({"model": "tests.own_models:WrongWidth", "model_kwargs": None}, "training.model", "returned shape (2, 2)"),
    ({"model": "tests.own_models:WithBatchNorm", "model_kwargs": None, "dp_epsilon": 3.0}, "training.dp_epsilon",
     "Opacus cannot make"),
])
def test_a_model_that_breaks_the_contract_is_refused_naming_the_field(training, field, said):
    spec = _spec(**training)
    with pytest.raises(SpecError, match=f"field '{field}'") as raised:
        check_spec_model(spec, spec.run_defaults())
    assert said in str(raised.value)


def test_a_class_path_is_checked_as_the_spec_loads():
    with pytest.raises(SpecError, match="field 'training.model'"):
        _spec(model="residual_mlp.ResidualMLP")  # no ':' before the class
    with pytest.raises(SpecError, match="model_kwargs is for a pipeline's own model"):
        _spec(model=None, model_kwargs={"width": 3})
    check_spec_model(OWN.spec, OWN.spec.run_defaults())  # the bundled example keeps the contract


def test_the_bundled_own_model_goes_through_every_stage_and_is_rebuilt_from_the_registry(data_root):
    from mlflow import MlflowClient

    from lepton_tasks.ml.champion import version_model
    from lepton_tasks.ml.models import load_checkpoint, load_model
    from lepton_tasks.ml.tensors import version_shape
    from lepton_tasks.stages.score import score

    ensure_example_data(OWN.name, data_root, 1500)
    ctx = pipeline.context(OWN, "own-model", SMALL)
    manifests, _ = pipeline.run_in_process(ctx)
    shape = manifests["train"].shape
    assert shape.kind == "lepton_models.residual_mlp:ResidualMLP" and shape.kwargs == {"width": 32, "blocks": 2,
                                                                                        "expansion": 2}
    assert manifests["merge"].merged_metrics["r2"] > 0.5  # it learned
    compress = manifests["compress"]
    assert {v.name for v in compress.variants} >= {"onnx_fp32", "onnx_pruned_fp32", "onnx_int8"}, compress.unmade
    registered = manifests["register"]
    assert "champion" in registered.aliases
    client = MlflowClient(registered.tracking_uri)
    params = client.get_run(registered.run_id).data.params
    assert params["model_class"] == shape.kind and json.loads(params["model_kwargs"]) == shape.kwargs
    version = client.get_model_version(registered.model_name, registered.model_version)
    weights, encoder, version_params = version_model(client, version, data_root / "fetched")
    rebuilt = load_model(version_shape(json.loads(encoder.read_text()), version_params), load_checkpoint(weights)[0])
    assert type(rebuilt.body).__name__ == "ResidualMLP"  # regression: the body inside Lepton's target scale
    scored = score(registered.tracking_uri, registered.model_name, [ctx.params.source_uri], data_root,
                   data_root / "scored", rows=300)
    assert scored.rows == 300 and scored.metrics["r2"] > 0.5


def test_every_merge_strategy_merges_an_own_model(data_root, dask_client, monkeypatch):
    import math

    import torch

    from lepton_tasks.ml.models import build_model, load_checkpoint

    monkeypatch.setenv("LEPTON_DASK_ADDRESS", dask_client.scheduler.address)
    ensure_example_data(OWN.name, data_root, 600)
    # sharded once, with the selection split greedy_soup chooses on (the others leave it unused)
    first = pipeline.context(OWN, "strategies", {**SMALL, "merge_strategy": "greedy_soup"})
    done, _ = pipeline.run_in_process(first, last="shard")
    for name in STRATEGIES:
        ctx = pipeline.context(OWN, f"strategy-{name}", {**SMALL, "merge_rounds": 1, "merge_strategy": name})
        manifests, _ = pipeline.run_in_process(ctx, last="merge", done=done)
        merge = manifests["merge"]
        merged, _ = load_checkpoint(merge.merged_path, merge.merged_sha256)
        own = build_model(manifests["train"].shape).state_dict()  # ResidualMLP's weights, in Lepton's target scale
        assert merge.strategy == name and merged.keys() == own.keys(), name
        assert all(bool(torch.isfinite(t).all()) for t in merged.values()) and math.isfinite(merge.merged_metrics["r2"])
