"""Merge: the run's final model (the train stage's last global model under the run's merge strategy, or a greedy
soup), its held-out evaluation and the run's plots. The strategies themselves are in `strategies`."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from lepton_tasks.core.storage import atomic_dir, sha256_file
from lepton_tasks.data.manifests import MergeManifest, ShardInfo
from lepton_tasks.ml import metrics
from lepton_tasks.ml.models import ModelShape, evaluate, load_checkpoint, load_model, predict, save_checkpoint
from lepton_tasks.ml.strategies import STRATEGIES, Strategy

log = logging.getLogger(__name__)

MERGED_FILE = "merged.safetensors"
PLOTS_DIR = "plots"


def _state(record: dict) -> dict[str, torch.Tensor]:
    return load_checkpoint(Path(record["path"]), record["sha256"])[0]


def _plots(rounds: list[list[dict]], epochs_per_round: int, round_scores: list[float], outputs: np.ndarray,
           shape: ModelShape, targets: torch.Tensor, metric: str, classes: list[str], shards: list[ShardInfo],
           out: Path) -> list[Path]:
    """Training curves, each shard's size and label mix, and the merged model's confusion matrix or residuals
    from its held-out `outputs`."""
    from lepton_tasks.ml import plots

    drawn = [plots.training_curves(rounds, epochs_per_round, round_scores, metric, out / "training_curves.png"),
             plots.shard_mix(shards, out / "shard_mix.png")]
    if shape.task == "regression":
        return [*drawn, plots.residuals(targets.numpy(), outputs, out / "residuals.png")]
    return [*drawn, plots.confusion_matrix(targets.numpy(), outputs.argmax(axis=1), classes,
                                           out / "confusion_matrix.png")]


def _chosen(strategy: Strategy, final_round: list[dict], merged: dict[str, torch.Tensor], shape: ModelShape,
            select_data, metric: str):
    """The strategy's choice among the last global model and the last round's shard models, scored on the
    selection split: never on the held-out rows that the choice is reported on and the champion gate compares on."""
    from lepton_tasks.ml.metrics import HIGHER_IS_BETTER

    features, targets = select_data
    candidates = [(c["shard"], _state(c)) for c in final_round]
    return strategy.choose_final(
        merged, candidates, lambda state: evaluate(load_model(shape, state), shape, features, targets)[metric],
        HIGHER_IS_BETTER[metric])


def merge(rounds: list[list[dict]], merged_rounds: list[dict], shape: ModelShape,
          eval_data: tuple[torch.Tensor, torch.Tensor], stage_dir: Path, metric: str, epochs_per_round: int,
          classes: list[str], shards: list[ShardInfo], strategy: str = "fedavg",
          select_data: tuple[torch.Tensor, torch.Tensor] | None = None) -> MergeManifest:
    """The final model: the train stage's last global model (`merged_rounds`: one {"path", "sha256"} per round),
    or what a strategy that chooses (`greedy_soup`) makes of it and the last round's shard models on `select_data`
    (the shard stage's selection split). Score it (and the global model after every round, and each shard model) on the
    held-out split; draw the plots."""
    features, targets = eval_data
    final_round = rounds[-1]
    merged_state, soup = _state(merged_rounds[-1]), None
    chooser = STRATEGIES[strategy]()
    if chooser.select_fraction:
        if select_data is None:
            raise ValueError(f"{strategy} chooses on a selection split: shard with a select_fraction")
        merged_state, soup = _chosen(chooser, final_round, merged_state, shape, select_data, metric)
    outputs = predict(load_model(shape, merged_state), features).numpy()  # scored and plotted from one pass
    merged_metrics = metrics.evaluate(shape.task, outputs, targets.numpy())
    round_scores = [evaluate(load_model(shape, _state(r)), shape, features, targets)[metric]
                    for r in merged_rounds[:-1]] + [merged_metrics[metric]]
    stage_dir = Path(stage_dir)
    with atomic_dir(stage_dir) as tmp:
        save_checkpoint(tmp / MERGED_FILE, merged_state, {"rounds": str(len(rounds)), "kind": shape.kind,
                                                          "strategy": strategy})
        drawn = _plots(rounds, epochs_per_round, round_scores, outputs, shape, targets, metric, classes, shards,
                       tmp / PLOTS_DIR)
    merged_path = stage_dir / MERGED_FILE
    shard_metrics = {c["shard"]: evaluate(load_model(shape, _state(c)), shape, features, targets)
                     for c in final_round}
    log.info("merged (%s%s) %s %.4f on %d held-out rows (by round: %s); shards %s", strategy,
             f", soup of {soup}" if soup else "", metric, merged_metrics[metric], len(targets),
             [round(v, 4) for v in round_scores], {k: round(v[metric], 4) for k, v in shard_metrics.items()})
    return MergeManifest(str(merged_path), sha256_file(merged_path), len(rounds), len(targets), metric,
                         merged_metrics, shard_metrics, round_scores,
                         [str(stage_dir / PLOTS_DIR / p.name) for p in drawn], strategy, soup)
