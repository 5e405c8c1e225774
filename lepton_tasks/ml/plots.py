"""The run's pictures (PNG), written next to the stage outputs and logged to MLflow by `register`.

- training curves: each shard's loss per epoch over all rounds, and the merged model's held-out metric per round;
- a confusion matrix (classification) or a residual plot (regression) of the merged model on the held-out rows;
- the compression trade-off: size against held-out metric for every variant, latency in the labels;
- each shard's rows and label mix (how far the shards differ).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lepton_tasks.data.manifests import ShardInfo


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def training_curves(rounds: list[list[dict]], epochs_per_round: int, round_scores: list[float], metric: str,
                    path: Path) -> Path:
    """Left: loss per epoch for each shard (epochs numbered across rounds). Right: merged metric per round."""
    plt = _pyplot()
    fig, (loss_ax, merged_ax) = plt.subplots(1, 2, figsize=(10, 4))
    shards = sorted({c["shard"] for r in rounds for c in r})
    for shard in shards:
        points = [((c["round"] - 1) * epochs_per_round + e["epoch"], e["loss"])
                  for r in rounds for c in r if c["shard"] == shard for e in c["epochs"]]
        if points:
            loss_ax.plot(*zip(*sorted(points), strict=True), marker=".", label=shard)
    for boundary in range(1, len(rounds)):
        loss_ax.axvline(boundary * epochs_per_round + 0.5, color="grey", lw=0.5, ls=":")
    loss_ax.set(title="Shard training loss (dotted: merges)", xlabel="epoch", ylabel="loss")
    loss_ax.legend(fontsize="small")
    merged_ax.plot(range(1, len(round_scores) + 1), round_scores, marker="o", color="black")
    merged_ax.set(title=f"Merged model, held-out {metric}", xlabel="round", ylabel=metric)
    merged_ax.set_xticks(range(1, len(round_scores) + 1))
    return _save(fig, path)


def confusion_matrix(targets: np.ndarray, predicted: np.ndarray, classes: list[str], path: Path) -> Path:
    """Counts of (true, predicted) class pairs, rows the truth."""
    plt = _pyplot()
    counts = np.zeros((len(classes), len(classes)), dtype=int)
    np.add.at(counts, (targets, predicted), 1)
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * len(classes), 1 + 0.5 * len(classes)))
    image = ax.imshow(counts, cmap="Blues")
    for (row, col), count in np.ndenumerate(counts):
        ax.text(col, row, str(count), ha="center", va="center", fontsize=7,
                color="white" if count > counts.max() / 2 else "black")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title="Merged model: confusion matrix (held-out)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path)


def residuals(targets: np.ndarray, predicted: np.ndarray, path: Path) -> Path:
    """Residual (truth - prediction) against prediction, and the residuals' histogram."""
    plt = _pyplot()
    error = targets - predicted
    fig, (scatter_ax, hist_ax) = plt.subplots(1, 2, figsize=(10, 4))
    scatter_ax.scatter(predicted, error, s=4, alpha=0.5)
    scatter_ax.axhline(0, color="black", lw=0.8)
    scatter_ax.set(title="Merged model: residuals (held-out)", xlabel="prediction", ylabel="truth - prediction")
    hist_ax.hist(error, bins=40)
    hist_ax.set(title="Residual distribution", xlabel="truth - prediction", ylabel="rows")
    return _save(fig, path)


def compression_tradeoff(variants: list[dict], chosen: str, metric: str, path: Path) -> Path:
    """Each variant (and the fp32 reference) at (bytes, metric), labelled with its p50 latency."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant in variants:
        is_chosen = variant["name"] == chosen
        ax.scatter(variant["bytes"] / 1024, variant["score"], s=80 if is_chosen else 40,
                   marker="*" if is_chosen else "o", color="crimson" if is_chosen else "steelblue")
        ax.annotate(f"{variant['name']}\n{variant['latency_p50_ms']:.3f} ms p50", (variant["bytes"] / 1024,
                    variant["score"]), textcoords="offset points", xytext=(6, 4), fontsize=7)
    ax.set(title=f"Compression trade-off (star: chosen {chosen})", xlabel="size (KiB)", ylabel=f"held-out {metric}")
    ax.set_xscale("log")
    ax.margins(x=0.25, y=0.2)  # room for the labels
    return _save(fig, path)


def shard_mix(shards: list[ShardInfo], path: Path) -> Path:
    """Each shard's rows (left) and label mix as shares (right; regression: rows only): how far shards differ."""
    plt = _pyplot()
    names = [s.name + (f" ({', '.join(s.keys[:3])}{'...' if len(s.keys) > 3 else ''})" if s.keys else "")
             for s in shards]
    labels = sorted({k for s in shards for k in s.label_histogram}, key=lambda k: (len(k), k))
    fig, (rows_ax, mix_ax) = plt.subplots(1, 2, figsize=(10, 1.5 + 0.35 * len(shards)))
    rows_ax.barh(names, [s.rows for s in shards], color="steelblue")
    rows_ax.set(title="Rows per shard", xlabel="rows")
    rows_ax.invert_yaxis()
    left = np.zeros(len(shards))
    colours = plt.get_cmap("tab20")
    for index, label in enumerate(labels):
        shares = np.array([s.label_histogram.get(label, 0) / max(s.rows, 1) for s in shards])
        mix_ax.barh(names, shares, left=left, color=colours(index % 20), label=label)
        left += shares
    mix_ax.set(title="Label mix per shard", xlabel="share of the shard's rows", xlim=(0, 1))
    mix_ax.invert_yaxis()
    if labels:
        mix_ax.legend(fontsize="x-small", ncol=min(len(labels), 10), loc="upper center", bbox_to_anchor=(0.5, -0.25))
    return _save(fig, path)
