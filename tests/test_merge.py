import pytest
import torch

from lepton_tasks.data.manifests import ShardInfo
from lepton_tasks.ml.models import ModelShape, evaluate, init_weights, load_checkpoint, load_model, save_checkpoint
from lepton_tasks.ml.strategies.fedavg import fedavg
from lepton_tasks.stages.merge import merge

SHAPE = ModelShape("mlp", 40, 10, 8)


def _record(path, state, **extra):
    return {"path": str(path), "sha256": save_checkpoint(path, state, {}), **extra}


def test_greedy_soup_merge_starts_from_the_best_model_and_never_scores_below_it(tmp_path):
    torch.manual_seed(0)
    features, targets = torch.randn(300, 40), torch.randint(0, 10, (300,))
    states = [init_weights(SHAPE, seed) for seed in range(3)]
    final_round = [_record(tmp_path / f"shard-{i:03d}.safetensors", s, shard=f"shard-{i:03d}", rows=100, epochs=[],
                           round=1) for i, s in enumerate(states)]
    merged_rounds = [_record(tmp_path / "merged.safetensors", fedavg(states, [100] * 3))]
    shards = [ShardInfo(f"shard-{i:03d}", [], 100, {"0": 60, "1": 40}, "-") for i in range(3)]
    held_out = torch.randn(200, 40), torch.randint(0, 10, (200,))  # what the soup is reported on, never chosen on
    manifest = merge([final_round], merged_rounds, SHAPE, held_out, tmp_path / "merge", "accuracy", 1,
                     [str(c) for c in range(10)], shards, "greedy_soup", select_data=(features, targets))

    def score(state):
        return evaluate(load_model(SHAPE, state), SHAPE, features, targets)["accuracy"]

    candidates = {"merged": load_checkpoint(tmp_path / "merged.safetensors")[0],
                  **{c["shard"]: s for c, s in zip(final_round, states, strict=True)}}
    best = max(candidates, key=lambda name: (score(candidates[name]), -list(candidates).index(name)))
    assert manifest.strategy == "greedy_soup" and manifest.soup[0] == best
    assert score(load_checkpoint(manifest.merged_path)[0]) >= score(candidates[best])
    soup = load_model(SHAPE, load_checkpoint(manifest.merged_path)[0])
    assert manifest.merged_score == evaluate(soup, SHAPE, *held_out)["accuracy"]  # reported on the held-out rows
    _, meta = load_checkpoint(manifest.merged_path, manifest.merged_sha256)
    assert meta["strategy"] == "greedy_soup" and len(manifest.round_scores) == 1
    assert {p.rsplit("/", 1)[-1] for p in manifest.plots} == {"training_curves.png", "shard_mix.png",
                                                              "confusion_matrix.png"}


def test_greedy_soup_refuses_to_choose_without_a_selection_split(tmp_path):
    state = init_weights(SHAPE, 0)
    final_round = [_record(tmp_path / "shard-000.safetensors", state, shard="shard-000", rows=10, epochs=[], round=1)]
    merged_rounds = [_record(tmp_path / "merged.safetensors", state)]
    shards = [ShardInfo("shard-000", [], 10, {"0": 10}, "-")]
    eval_data = torch.randn(20, 40), torch.randint(0, 10, (20,))
    with pytest.raises(ValueError, match="selection split"):
        merge([final_round], merged_rounds, SHAPE, eval_data, tmp_path / "merge", "accuracy", 1,
              [str(c) for c in range(10)], shards, "greedy_soup")
