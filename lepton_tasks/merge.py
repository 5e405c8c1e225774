"""Merge: sample-weighted parameter averaging of shard checkpoints (FedAvg), then held-out evaluation."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lepton_tasks import metrics
from lepton_tasks.models import ModelShape, evaluate, load_checkpoint, load_model, predict, save_checkpoint
from lepton_tasks.storage import atomic_dir, sha256_file

log = logging.getLogger(__name__)

MERGED_FILE = "merged.safetensors"
PLOTS_DIR = "plots"


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
    """The merged model, how it and each shard model score on the held-out split, and the run's plots."""

    merged_path: str
    merged_sha256: str
    rounds: int
    eval_rows: int
    metric: str  # the one models are compared on
    merged_metrics: dict[str, float]
    shard_metrics: dict[str, dict[str, float]]
    round_scores: list[float] = field(default_factory=list)  # the merged model's metric after each round
    plots: list[str] = field(default_factory=list)

    @property
    def merged_score(self) -> float:
        return self.merged_metrics[self.metric]

    def to_dict(self) -> dict:
        return asdict(self)


def _round_state(checkpoints: list[dict]) -> dict[str, torch.Tensor]:
    states = [load_checkpoint(Path(c["path"]), c["sha256"])[0] for c in checkpoints]
    return fedavg(states, [c["rows"] for c in checkpoints])


def _plots(rounds: list[list[dict]], epochs_per_round: int, round_scores: list[float], outputs: np.ndarray,
           shape: ModelShape, targets: torch.Tensor, metric: str, classes: list[str], out: Path) -> list[Path]:
    """Training curves, and the merged model's confusion matrix or residuals from its held-out `outputs`."""
    from lepton_tasks import plots

    curves = plots.training_curves(rounds, epochs_per_round, round_scores, metric, out / "training_curves.png")
    if shape.task == "regression":
        return [curves, plots.residuals(targets.numpy(), outputs, out / "residuals.png")]
    return [curves, plots.confusion_matrix(targets.numpy(), outputs.argmax(axis=1), classes,
                                           out / "confusion_matrix.png")]


def merge(rounds: list[list[dict]], shape: ModelShape, eval_data: tuple[torch.Tensor, torch.Tensor],
          stage_dir: Path, metric: str, epochs_per_round: int, classes: list[str]) -> MergeManifest:
    """Average the last round's shard checkpoints; score merged (after every round) and shard models on the
    held-out split; draw the training curves and a confusion matrix or residual plot."""
    features, targets = eval_data
    final_round = rounds[-1]
    merged_state = _round_state(final_round)
    outputs = predict(load_model(shape, merged_state), features).numpy()  # scored and plotted from one pass
    merged_metrics = metrics.evaluate(shape.task, outputs, targets.numpy())
    round_scores = [evaluate(load_model(shape, _round_state(r)), shape, features, targets)[metric]
                    for r in rounds[:-1]] + [merged_metrics[metric]]
    stage_dir = Path(stage_dir)
    with atomic_dir(stage_dir) as tmp:
        save_checkpoint(tmp / MERGED_FILE, merged_state, {"rounds": str(len(rounds)), "kind": shape.kind})
        drawn = _plots(rounds, epochs_per_round, round_scores, outputs, shape, targets, metric, classes,
                       tmp / PLOTS_DIR)
    merged_path = stage_dir / MERGED_FILE
    shard_metrics = {
        c["shard"]: evaluate(load_model(shape, load_checkpoint(Path(c["path"]), c["sha256"])[0]), shape, features,
                             targets)
        for c in final_round
    }
    log.info("merged %s %.4f on %d held-out rows (by round: %s); shards %s", metric, merged_metrics[metric],
             len(targets), [round(v, 4) for v in round_scores],
             {k: round(v[metric], 4) for k, v in shard_metrics.items()})
    return MergeManifest(str(merged_path), sha256_file(merged_path), len(rounds), len(targets), metric,
                         merged_metrics, shard_metrics, round_scores,
                         [str(stage_dir / PLOTS_DIR / p.name) for p in drawn])
