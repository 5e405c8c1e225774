"""Shard: split the validated stage on a Dask cluster into N stratified Parquet shards plus a held-out split.

Deterministic given the seed and the data, whatever the partitioning:
- a row is held out when a seeded hash of its global row number falls under `eval_fraction`;
- the remaining rows of each label are dealt round-robin to the shards, so every shard gets the same label mix
  (a regression target has one stratum: rows are dealt in order).
Two passes over the data, one partition in memory per worker at a time: count (rows and labels per partition,
and the training rows' statistics that fit the feature encoder), then write (each partition writes its slice of
every shard).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lepton_tasks.errors import ShardError
from lepton_tasks.features import fit, label_key, merge_stats, partition_stats
from lepton_tasks.specs import PipelineSpec
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
    encoder: dict  # features.Encoder, fitted on the training rows (or the champion's, on a warm start)
    warm_start: dict | None = None  # {"version", "weights"} of the champion round 1 starts from; None: scratch

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


def _strata(frame, spec: PipelineSpec) -> tuple[np.ndarray, list]:
    """Each row's stratum as an index into the returned keys: its label (classification; labels equal under
    `label_key` share one), or one stratum for all (regression). Factorised, so no Python call per row."""
    if spec.target.task == "regression":
        return np.zeros(len(frame), dtype=np.int64), [0]
    codes, uniques = pd.factorize(frame[spec.target.column], use_na_sentinel=False)
    raw_keys = [label_key(value) for value in uniques]
    keys = sorted(set(raw_keys))
    key_index = np.array([keys.index(k) for k in raw_keys], dtype=np.int64)
    return key_index[codes], keys


def _count_partition(frame, spec: PipelineSpec, seed: int, eval_fraction: float, start: int) -> tuple[dict, dict]:
    """Per-stratum counts and encoder statistics of one partition's training rows (the first pass)."""
    rows = np.arange(start, start + len(frame))
    training = ~held_out_mask(rows, seed, eval_fraction)
    codes, keys = _strata(frame, spec)
    counts = np.bincount(codes[training], minlength=len(keys))
    return ({key: int(n) for key, n in zip(keys, counts, strict=True) if n},
            partition_stats(frame[training], spec))


def _write_partition(frame, index: int, start: int, offsets: dict, out_dir: str, num_shards: int,
                     spec: PipelineSpec, seed: int, eval_fraction: float) -> list[tuple[str, str, dict]]:
    """Write one partition's slice of every shard and of the held-out split (the second pass)."""
    rows = np.arange(start, start + len(frame))
    held_out = held_out_mask(rows, seed, eval_fraction)
    codes, keys = _strata(frame, spec)
    shard_of = np.full(len(frame), -1)
    train_index = np.flatnonzero(~held_out)
    train_codes = codes[train_index]
    for code, key in enumerate(keys):
        members = train_index[train_codes == code]
        shard_of[members] = (offsets.get(key, 0) + np.arange(len(members))) % num_shards
    written = []
    table = pa.Table.from_pandas(frame, preserve_index=False)  # converted once, sliced per shard
    for name, mask in [(EVAL_NAME, held_out)] + [(f"shard-{i:03d}", shard_of == i) for i in range(num_shards)]:
        if mask.any():
            path = Path(out_dir) / name / f"part-{index:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table.filter(mask), path)
            counts = np.bincount(codes[mask], minlength=len(keys))
            hist = {} if spec.target.task == "regression" else {
                str(key): int(n) for key, n in zip(keys, counts, strict=True) if n}
            written.append((name, str(path), hist, int(mask.sum())))
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
          spec: PipelineSpec, client, encoder: dict | None = None) -> ShardManifest:
    """Split the Parquet `parts` into shards on the Dask `client`; write them under `stage_dir`. The rows are
    encoded with `encoder` where given (a warm start keeps the champion's), else with one fitted here."""
    import dask
    import dask.dataframe as dd

    label, features = spec.target.column, spec.feature_columns
    frame = dd.read_parquet(parts, columns=[*features, label])
    partitions = frame.to_delayed()
    sizes = client.gather(client.compute([dask.delayed(len)(p) for p in partitions]))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    count_tasks = [dask.delayed(_count_partition)(p, spec, seed, eval_fraction, s)
                   for p, s in zip(partitions, starts, strict=True)]
    counted = client.gather(client.compute(count_tasks))
    counts = [c for c, _ in counted]
    _check_enough_rows(counts, num_shards)
    fitted = encoder or fit(spec, merge_stats([stats for _, stats in counted])).to_dict()
    offsets = _label_offsets(counts)
    with atomic_dir(stage_dir) as tmp:
        write_tasks = [
            dask.delayed(_write_partition)(p, i, s, o, str(tmp), num_shards, spec, seed, eval_fraction)
            for i, (p, s, o) in enumerate(zip(partitions, starts, offsets, strict=True))
        ]
        written = [item for part in client.gather(client.compute(write_tasks)) for item in part]
    infos = _summarise(written, Path(tmp), Path(stage_dir), num_shards)
    return ShardManifest(
        stage_dir=str(stage_dir), seed=seed, eval_fraction=eval_fraction, label_column=label,
        feature_columns=list(features), shards=infos[1:], eval=infos[0], encoder=fitted,
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
        mine = [w for w in written if w[0] == name]
        files = sorted(Path(str(p).replace(str(tmp), str(final), 1)) for _, p, _, _ in mine)
        hist: dict[str, int] = {}
        for _, _, part_hist, _ in mine:
            for key, value in part_hist.items():
                hist[key] = hist.get(key, 0) + value
        if not files:
            raise ShardError(f"{name} received no rows: lower param 'num_shards' or raise 'eval_fraction'")
        infos.append(ShardInfo(name=name, files=[str(f) for f in files], rows=sum(w[3] for w in mine),
                               label_histogram=dict(sorted(hist.items())), sha256=sha256_files(files)))
    return infos
