import pytest
import torch

from lepton_tasks.ml.models import ModelShape, build_model, init_weights, save_checkpoint
from lepton_tasks.stages.compress import compress, prune_global
from tests.conftest import encoder_for, mnist_frame


def test_global_pruning_zeroes_the_asked_fraction():
    model = prune_global(build_model(ModelShape("mlp", 40, 10, 64)), 0.6)
    weights = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, torch.nn.Linear)])
    assert abs((weights == 0).float().mean().item() - 0.6) < 0.01


def _compressed(tmp_path, hidden: int, rows: int):
    """`compress` of a freshly initialised MLP (tolerance 0.02, sparsity 0.3) on `rows` held-out MNIST-1D rows."""
    from lepton_tasks.ml.tensors import load_xy

    shape = ModelShape("mlp", 40, 10, hidden)
    merged = tmp_path / "merged.safetensors"
    sha = save_checkpoint(merged, init_weights(shape, 0), {})
    path = tmp_path / "eval.parquet"
    mnist_frame(rows).to_parquet(path, index=False)
    eval_data = load_xy([str(path)], encoder_for(mnist_frame(rows)))
    return compress(merged, sha, shape, eval_data, tmp_path / "c", "accuracy", 0.02, 0.3)


def test_compress_scores_every_variant_and_keeps_the_smallest_within_tolerance(tmp_path):
    manifest = _compressed(tmp_path, hidden=64, rows=300)
    by_name = {v.name: v for v in manifest.variants}
    assert set(by_name) == {"onnx_fp32", "onnx_pruned_fp32", "onnx_int8", "onnx_pruned_int8"}
    assert abs(by_name["onnx_fp32"].score - manifest.reference.score) < 1e-9
    assert by_name["onnx_int8"].bytes < by_name["onnx_fp32"].bytes / 2
    chosen = by_name[manifest.chosen]
    assert chosen.within_tolerance and chosen.score >= manifest.reference.score - 0.02
    assert chosen.not_slower and chosen.verdict.startswith("chosen")
    fp32 = by_name["onnx_fp32"]
    assert chosen.batch_latency_p50_ms <= fp32.batch_latency_p50_ms * 1.05
    assert all(chosen.bytes <= v.bytes for v in manifest.variants if v.within_tolerance and v.not_slower)
    for v in manifest.variants:  # every other variant says which rule it failed
        assert v is chosen or any(word in v.verdict for word in ("tolerance", "slower", "larger"))
    assert (tmp_path / "c" / "model.onnx").exists()
    table = manifest.tradeoff_table()
    assert table["name"][0] == "pytorch_fp32" and len(table["verdict"]) == len(manifest.variants) + 1


def test_a_variant_that_cannot_be_made_is_listed_with_why_and_the_others_compete(tmp_path, monkeypatch):
    """What an own model's op that the dynamic quantizer refuses does: the int8 variants are said to be unmade."""
    from lepton_tasks.stages import compress as stage

    def refuse(src, dst):
        raise NotImplementedError(f"no int8 kernel for an op of {src.name}")

    monkeypatch.setattr(stage, "quantize_int8", refuse)
    manifest = _compressed(tmp_path, hidden=16, rows=200)
    assert {v.name for v in manifest.variants} == {"onnx_fp32", "onnx_pruned_fp32"}
    assert set(manifest.unmade) == {"onnx_int8", "onnx_pruned_int8"}
    assert "NotImplementedError: no int8 kernel" in manifest.unmade["onnx_int8"]
    assert manifest.chosen in {"onnx_fp32", "onnx_pruned_fp32"} and (tmp_path / "c" / "model.onnx").exists()


def test_scoring_a_large_split_runs_in_bounded_calls_with_the_same_outputs(tmp_path, monkeypatch):
    import numpy as np
    import onnxruntime as ort

    from lepton_tasks.stages import compress as stage

    shape = ModelShape("mlp", 40, 10, 64)
    path = stage.export_onnx(build_model(shape), 40, tmp_path / "fp32.onnx")
    rows = np.random.default_rng(0).standard_normal((2 * stage.SCORING_ROWS + 5, 40), dtype=np.float32)
    whole = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"features": rows})[0]
    calls = []
    original = ort.InferenceSession.run
    monkeypatch.setattr(ort.InferenceSession, "run",
                        lambda self, out, feeds: calls.append(len(feeds["features"])) or original(self, out, feeds))
    chunked = stage._onnx_session(path)(rows)
    assert calls == [stage.SCORING_ROWS, stage.SCORING_ROWS, 5]
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,task", [("cnn", "classification"), ("mlp", "regression")])
def test_the_pruned_variant_is_the_pruned_models_own_export(tmp_path, kind, task):
    """The pruned ONNX is the dense export with the pruned weights put in: the same operators and weights as
    exporting the pruned model (`prune.remove` re-registers weights after biases, so their order differs), the
    same outputs, and those of the pruned model in PyTorch."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import numpy_helper

    from lepton_tasks.stages import compress as stage

    shape = ModelShape(kind, 40, 10 if task == "classification" else 1, 16, task, 3.0, 2.0)
    dense = build_model(shape).eval()
    state = {k: v.clone() for k, v in dense.state_dict().items()}
    pruned = build_model(shape)
    pruned.load_state_dict(state)
    pruned = stage.prune_global(pruned, 0.5).eval()
    exported = stage.export_onnx(dense, 40, tmp_path / "dense.onnx", slim=False)
    derived = stage.with_weights(exported, state, pruned, 40, tmp_path / "derived.onnx")
    direct = stage.export_onnx(pruned, 40, tmp_path / "direct.onnx")

    def contents(path):
        graph = onnx.load(str(path)).graph
        return ([node.op_type for node in graph.node],
                sorted(numpy_helper.to_array(t).tobytes() for t in graph.initializer))

    assert contents(derived) == contents(direct)
    rows = np.random.default_rng(0).standard_normal((64, 40), dtype=np.float32)
    derived_out, direct_out = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                               .run(None, {"features": rows})[0] for p in (derived, direct))
    np.testing.assert_array_equal(derived_out, direct_out)
    with torch.no_grad():
        np.testing.assert_allclose(derived_out, pruned(torch.from_numpy(rows)).numpy(), rtol=1e-5, atol=1e-5)
