"""Merge: sample-weighted parameter averaging of shard checkpoints (FedAvg), then held-out evaluation."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lepton_tasks.models import ModelShape, evaluate, load_checkpoint, load_model, save_checkpoint
from lepton_tasks.storage import atomic_dir, sha256_file

log = logging.getLogger(__name__)

MERGED_FILE = "merged.safetensors"


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Average each tensor over the models, weighted by `weights` (the shards' sample counts).

    Accumulates in float64 so the result does not depend on shard order beyond rounding of the final cast.
    """
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state, got {len(states)} states and {len(weights)} weights")
    if min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    keys = states[0].keys()
    for i, state in enumerate(states[1:], start=1):
        if state.keys() != keys:
            raise ValueError(f"state {i} has other tensors than state 0: {sorted(set(state) ^ set(keys))}")
    total = float(sum(weights))
    merged = {}
    for key in keys:
        acc = sum(state[key].to(torch.float64) * (w / total) for state, w in zip(states, weights, strict=True))
        merged[key] = acc.to(states[0][key].dtype)
    return merged


def fedavg_files(checkpoints: list[dict], out_path: Path, metadata: dict[str, str]) -> str:
    """FedAvg over checkpoint records ({"path", "sha256", "rows"}); writes `out_path`, returns its sha256."""
    states = [load_checkpoint(Path(c["path"]), c["sha256"])[0] for c in checkpoints]
    return save_checkpoint(out_path, fedavg(states, [c["rows"] for c in checkpoints]), metadata)


@dataclass
class MergeManifest:
    """The merged model and how it and each shard model score on the held-out split."""

    merged_path: str
    merged_sha256: str
    rounds: int
    eval_rows: int
    metric: str  # the one models are compared on
    merged_metrics: dict[str, float]
    shard_metrics: dict[str, dict[str, float]]

    @property
    def merged_score(self) -> float:
        return self.merged_metrics[self.metric]

    def to_dict(self) -> dict:
        return asdict(self)


def merge(final_round: list[dict], shape: ModelShape, eval_data: tuple[torch.Tensor, torch.Tensor],
          stage_dir: Path, rounds: int, metric: str) -> MergeManifest:
    """Average the last round's shard checkpoints and score merged and shard models on the held-out split."""
    features, targets = eval_data
    with atomic_dir(stage_dir) as tmp:
        fedavg_files(final_round, tmp / MERGED_FILE, {"rounds": str(rounds), "kind": shape.kind})
    merged_path = Path(stage_dir) / MERGED_FILE
    merged_state, _ = load_checkpoint(merged_path)
    shard_metrics = {
        c["shard"]: evaluate(load_model(shape, load_checkpoint(Path(c["path"]), c["sha256"])[0]), shape, features,
                             targets)
        for c in final_round
    }
    merged_metrics = evaluate(load_model(shape, merged_state), shape, features, targets)
    log.info("merged %s %.4f on %d held-out rows; shards %s", metric, merged_metrics[metric], len(targets),
             {k: round(v[metric], 4) for k, v in shard_metrics.items()})
    return MergeManifest(str(merged_path), sha256_file(merged_path), rounds, len(targets), metric, merged_metrics,
                         shard_metrics)
