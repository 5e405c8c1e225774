"""Shard: split the validated stage on a Dask cluster into N stratified Parquet shards plus a held-out split.

Deterministic given the seed and the data, whatever the partitioning:
- a row is held out when a seeded hash of its global row number falls under `eval_fraction`;
- the remaining rows of each label are dealt round-robin to the shards, so every shard gets the same label mix.
Two passes over the data, one partition in memory per worker at a time: count (rows and labels per partition),
then write (each partition writes its slice of every shard).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lepton_tasks.errors import ShardError
from lepton_tasks.storage import atomic_dir, sha256_files

EVAL_NAME = "eval"


@dataclass
class ShardInfo:
    """One shard (or the held-out split): its files, size, label histogram and checksum."""

    name: str
    files: list[str]
    rows: int
    label_histogram: dict[str, int]
    sha256: str


@dataclass
class ShardManifest:
    """The shard stage's output."""

    stage_dir: str
    seed: int
    eval_fraction: float
    label_column: str
    feature_columns: list[str]
    shards: list[ShardInfo]
    eval: ShardInfo

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> ShardManifest:
        fields = {**raw, "shards": [ShardInfo(**s) for s in raw["shards"]], "eval": ShardInfo(**raw["eval"])}
        return cls(**fields)


def held_out_mask(row_numbers: np.ndarray, seed: int, eval_fraction: float) -> np.ndarray:
    """Seeded, order-free choice of held-out rows: a SplitMix64 hash of (seed, global row number)."""
    with np.errstate(over="ignore"):
        z = row_numbers.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < eval_fraction


def _count_partition(frame, label: str, seed: int, eval_fraction: float, start: int) -> dict:
    """Per-label counts of training rows in one partition (the first pass)."""
    rows = np.arange(start, start + len(frame))
    train_labels = frame[label].to_numpy()[~held_out_mask(rows, seed, eval_fraction)]
    values, counts = np.unique(train_labels, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist(), strict=True))


def _write_partition(frame, index: int, start: int, offsets: dict, out_dir: str, num_shards: int,
                     label: str, seed: int, eval_fraction: float) -> list[tuple[str, str, dict]]:
    """Write one partition's slice of every shard and of the held-out split (the second pass)."""
    rows = np.arange(start, start + len(frame))
    held_out = held_out_mask(rows, seed, eval_fraction)
    labels = frame[label].to_numpy()
    shard_of = np.full(len(frame), -1)
    train_index = np.flatnonzero(~held_out)
    for value in np.unique(labels[train_index]):
        members = train_index[labels[train_index] == value]
        shard_of[members] = (offsets.get(value.item(), 0) + np.arange(len(members))) % num_shards
    written = []
    for name, mask in [(EVAL_NAME, held_out)] + [(f"shard-{i:03d}", shard_of == i) for i in range(num_shards)]:
        if mask.any():
            part = frame[mask]
            path = Path(out_dir) / name / f"part-{index:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            part.to_parquet(path, index=False)
            hist = part[label].value_counts().to_dict()
            written.append((name, str(path), {str(k): int(v) for k, v in hist.items()}))
    return written


def _label_offsets(counts: list[dict]) -> list[dict]:
    """Exclusive running sum of per-label counts: where each partition's round-robin starts."""
    running, offsets = {}, []
    for part_counts in counts:
        offsets.append(dict(running))
        for value, count in part_counts.items():
            running[value] = running.get(value, 0) + count
    return offsets


def shard(parts: list[str], stage_dir: Path, num_shards: int, eval_fraction: float, seed: int,
          label: str, features: list[str], client) -> ShardManifest:
    """Split the Parquet `parts` into shards on the Dask `client`; write them under `stage_dir`."""
    import dask
    import dask.dataframe as dd

    frame = dd.read_parquet(parts, columns=list(features) + [label])
    partitions = frame.to_delayed()
    sizes = client.gather(client.compute([dask.delayed(len)(p) for p in partitions]))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    count_tasks = [dask.delayed(_count_partition)(p, label, seed, eval_fraction, s)
                   for p, s in zip(partitions, starts, strict=True)]
    counts = client.gather(client.compute(count_tasks))
    _check_enough_rows(counts, num_shards)
    offsets = _label_offsets(counts)
    with atomic_dir(stage_dir) as tmp:
        write_tasks = [
            dask.delayed(_write_partition)(p, i, s, o, str(tmp), num_shards, label, seed, eval_fraction)
            for i, (p, s, o) in enumerate(zip(partitions, starts, offsets, strict=True))
        ]
        written = [item for part in client.gather(client.compute(write_tasks)) for item in part]
    infos = _summarise(written, Path(tmp), Path(stage_dir), num_shards)
    return ShardManifest(
        stage_dir=str(stage_dir), seed=seed, eval_fraction=eval_fraction, label_column=label,
        feature_columns=list(features), shards=infos[1:], eval=infos[0],
    )


def _check_enough_rows(counts: list[dict], num_shards: int) -> None:
    train_rows = sum(sum(c.values()) for c in counts)
    if train_rows < num_shards:
        raise ShardError(f"only {train_rows} training rows for param 'num_shards'={num_shards}: "
                         "every shard needs at least one row")


def _summarise(written: list, tmp: Path, final: Path, num_shards: int) -> list[ShardInfo]:
    """Gather per-partition results into one ShardInfo per shard (held-out split first), with final paths."""
    infos = []
    for name in [EVAL_NAME] + [f"shard-{i:03d}" for i in range(num_shards)]:
        files = sorted(Path(str(p).replace(str(tmp), str(final), 1)) for n, p, _ in written if n == name)
        hist: dict[str, int] = {}
        for n, _, part_hist in written:
            if n == name:
                for key, value in part_hist.items():
                    hist[key] = hist.get(key, 0) + value
        if not files:
            raise ShardError(f"{name} received no rows: lower param 'num_shards' or raise 'eval_fraction'")
        infos.append(ShardInfo(name=name, files=[str(f) for f in files], rows=sum(hist.values()),
                               label_histogram=dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
                               sha256=sha256_files(files)))
    return infos
