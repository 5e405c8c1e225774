"""The benchmark plots (PNG, beside the results)."""

from __future__ import annotations

import statistics
from pathlib import Path

from lepton_tasks.plots import _pyplot, _save


def shard_memory(curve: list[dict], path: Path) -> Path:
    """Peak RSS and throughput of the shard stage and its pyarrow baseline as rows grow (medians of the repeats)."""
    plt = _pyplot()
    fig, (rss_ax, rate_ax) = plt.subplots(1, 2, figsize=(10, 4))
    rows = [p["rows"] / 1e6 for p in curve]
    for key, label in (("stage", "Lepton shard stage (Dask, 2 workers, start included)"),
                       ("baseline", "pyarrow by hand")):
        rss_ax.plot(rows, [p[f"{key}_peak_rss"] / 2**20 for p in curve], marker="o", label=label)
        rate_ax.plot(rows, [statistics.median(p[f"{key}_rows_per_s"]) / 1e6 for p in curve], marker="o", label=label)
    rss_ax.set(title="Peak RSS (whole process tree)", xlabel="rows (millions)", ylabel="MiB")
    rate_ax.set(title="Throughput", xlabel="rows (millions)", ylabel="million rows/s")
    rss_ax.legend(fontsize="small")
    return _save(fig, path)
