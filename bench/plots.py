"""The benchmark plots (PNG, beside the results)."""

from __future__ import annotations

from pathlib import Path

from lepton_tasks.plots import _pyplot, _save


def shard_memory(curve: list[dict], path: Path) -> Path:
    plt = _pyplot()
    fig, (rss_ax, rate_ax) = plt.subplots(1, 2, figsize=(10, 4))
    rows = [p["rows"] / 1e6 for p in curve]
    for key, label in (("stage", "Lepton shard stage (Dask, 2 workers)"), ("baseline", "pyarrow by hand")):
        rss_ax.plot(rows, [p[f"{key}_peak_rss"] / 2**20 for p in curve], marker="o", label=label)
        rate_ax.plot(rows, [p[f"{key}_rows_per_s"] / 1e6 for p in curve], marker="o", label=label)
    rss_ax.set(title="Peak RSS (whole process tree)", xlabel="rows (millions)", ylabel="MiB")
    rate_ax.set(title="Throughput", xlabel="rows (millions)", ylabel="million rows/s")
    rss_ax.legend(fontsize="small")
    return _save(fig, path)


def train_scaling(scaling: list[dict], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    shards = [p["shards"] for p in scaling]
    ax.plot(shards, [p["wall_s"] for p in scaling], marker="o", label="train stage wall time")
    ax.plot(shards, [scaling[0]["wall_s"] * n for n in shards], ls="--", label="N x one shard")
    ax.set(title="Train stage: N shards on min(N, 2) workers", xlabel="shards", ylabel="seconds")
    ax.legend(fontsize="small")
    return _save(fig, path)


def scale(curve: list[dict], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = [p["rows"] for p in curve]
    ax.plot(rows, [p["total_s"] for p in curve], marker="o", label="whole run")
    ax.plot(rows, [curve[0]["total_s"] * r / rows[0] for r in rows], ls="--", label="linear from 1x")
    ax.set(title="Whole-run cost as data grows", xlabel="rows", ylabel="seconds", xscale="log", yscale="log")
    ax.legend(fontsize="small")
    return _save(fig, path)


def merge_grid(grid: list[dict], path: Path) -> Path:
    plt = _pyplot()
    shards = sorted({p["shards"] for p in grid})
    rounds = sorted({p["rounds"] for p in grid})
    gap = [[next(p["gap"] for p in grid if p["shards"] == s and p["rounds"] == r) * 100 for r in rounds]
           for s in shards]
    fig, ax = plt.subplots(figsize=(6, 4))
    image = ax.imshow(gap, cmap="RdYlGn_r", vmin=-2, vmax=10)
    for i, row in enumerate(gap):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=8)
    ax.set(xticks=range(len(rounds)), xticklabels=rounds, yticks=range(len(shards)), yticklabels=shards,
           xlabel="merge rounds (2 local epochs each)", ylabel="shards",
           title="Central minus merged accuracy (points)")
    fig.colorbar(image, ax=ax)
    return _save(fig, path)
