"""Shard: split the validated stage on a Dask cluster into N Parquet shards plus a held-out split.

Deterministic given the seed and the data, whatever the partitioning:
- a row is held out when a seeded hash of its global row number falls under `eval_fraction`; with a
  `select_fraction` (greedy soup), the next slice of hash values, that share of the remaining rows, becomes a
  selection split: held out from training too, so that a choice among models never looks at the held-out rows;
- by default the remaining rows of each label are dealt round-robin to the shards, so every shard gets the same
  label mix (a regression target has one stratum: rows are dealt in order);
- with `shard_by` (a column), data that lives apart stays apart: one shard per value of the column (the values in
  sorted order), or, with more values than `num_shards`, each value hashed into one of `num_shards` shards;
  shards keep their natural sizes and label mixes.
Two passes over the data, one partition (whole Parquet row groups, planned from the footers) in memory per worker
at a time: count (the training rows per label, from the label column alone), then write (each partition writes
and hashes its slice of every shard, and returns its training rows' statistics, which fit the feature encoder).
The partitions are read with pyarrow on the workers, not through dask.dataframe: its import (0.5-0.75 s) was paid
by the task, the scheduler and every worker of a fresh cluster, and sharding needs none of it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from lepton_tasks.config.specs import PipelineSpec
from lepton_tasks.core import store
from lepton_tasks.core.errors import ShardError
from lepton_tasks.core.storage import (
    ParquetPartition,
    atomic_dir,
    combined_sha256,
    parquet_dictionary_columns,
    parquet_metadata,
    parquet_partitions,
    read_json,
    sha256_file,
)
from lepton_tasks.data.manifests import ShardInfo, ShardManifest, WarmStart
from lepton_tasks.infra.cluster import release_worker_memory
from lepton_tasks.ml.features import fit, label_codes, merge_stats, partition_stats

EVAL_NAME = "eval"
SELECT_NAME = "select"  # rows a choice among trained models is made on (greedy soup), apart from `eval`
NULL_KEY = "__null__"  # the shard_by key of rows where that column is missing


def _row_hash(row_numbers: np.ndarray, seed: int) -> np.ndarray:
    """A SplitMix64 hash of (seed, global row number), as a float in [0, 1): seeded and order-free."""
    with np.errstate(over="ignore"):
        z = row_numbers.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def held_out_mask(row_numbers: np.ndarray, seed: int, eval_fraction: float) -> np.ndarray:
    """Seeded, order-free choice of held-out rows."""
    return _row_hash(row_numbers, seed) < eval_fraction


def split_masks(row_numbers: np.ndarray, seed: int, eval_fraction: float,
                select_fraction: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(held out, selection): the selection split is `select_fraction` of the rows not held out, drawn from the
    same hash, so the held-out rows are those of a run without one."""
    unit = _row_hash(row_numbers, seed)
    held_out = unit < eval_fraction
    return held_out, ~held_out & (unit < eval_fraction + select_fraction * (1 - eval_fraction))


def _strata(frame, spec: PipelineSpec) -> tuple[np.ndarray, list]:
    """Each row's stratum as an index into the returned keys: its label (classification; labels equal under
    `label_key` share one), or one stratum for all (regression). Factorised, so no Python call per row."""
    if spec.target.task == "regression":
        return np.zeros(len(frame), dtype=np.int64), [0]
    return label_codes(frame[spec.target.column])


def _key_codes(values) -> tuple[np.ndarray, list[str]]:
    """Each row's shard_by value as an index into the returned keys (text, as labels compare: `label_key`;
    missing values are the key NULL_KEY)."""
    return label_codes(values, missing=NULL_KEY)


def _count_partition(partition: ParquetPartition, spec: PipelineSpec, seed: int, eval_fraction: float,
                     shard_by: str | None = None, select_fraction: float = 0.0) -> tuple[dict, dict]:
    """Per-stratum and (with `shard_by`) per-key counts of one partition's training rows (the first pass, which
    reads the label column, and the `shard_by` one, only)."""
    table = partition.read(list(dict.fromkeys([spec.target.column, *([shard_by] if shard_by else [])])))
    if table.num_rows != partition.rows:
        raise ShardError(f"'{partition.path}' holds {table.num_rows} rows in row groups {list(partition.row_groups)}"
                         f" where its footer said {partition.rows}: the validated stage changed while sharding")
    frame = table.to_pandas()
    held_out, selected = split_masks(np.arange(partition.start, partition.start + partition.rows), seed,
                                     eval_fraction, select_fraction)
    training = ~held_out & ~selected
    codes, keys = _strata(frame, spec)
    counts = np.bincount(codes[training], minlength=len(keys))
    key_counts = {}
    if shard_by is not None:
        key_codes, key_names = _key_codes(frame[shard_by])
        per_key = np.bincount(key_codes[training], minlength=len(key_names))
        key_counts = {key: int(n) for key, n in zip(key_names, per_key, strict=True) if n}
    return {key: int(n) for key, n in zip(keys, counts, strict=True) if n}, key_counts


def _write_partition(partition: ParquetPartition, index: int, columns: list[str], offsets: dict, out_dir: str,
                     num_shards: int, spec: PipelineSpec, seed: int, eval_fraction: float,
                     layout: KeyLayout | None, fit_encoder: bool, select_fraction: float = 0.0
                     ) -> tuple[list[tuple[str, str, dict, int, str]], dict | None]:
    """Write one partition's slice of every shard and of the held-out split (the second pass), each file hashed
    here; with `fit_encoder`, the statistics of its training rows that fit the encoder."""
    table = partition.read(columns)
    held_out, selected = split_masks(np.arange(partition.start, partition.start + len(table)), seed, eval_fraction,
                                     select_fraction)
    train_index = np.flatnonzero(~held_out & ~selected)
    frame = table.select(spec.feature_columns + [spec.target.column]).to_pandas() if fit_encoder else \
        table.select([spec.target.column]).to_pandas()
    codes, keys = _strata(frame, spec)
    shard_of = np.full(len(table), -1)
    if layout is not None:
        key_codes, key_names = _key_codes(table.column(layout.column).to_pandas())
        shard_of[train_index] = np.array([layout.shard_of[k] for k in key_names], dtype=np.int64)[
            key_codes[train_index]]
        table = table.drop_columns([layout.column]) if layout.drop_column else table
    else:
        train_codes = codes[train_index]
        for code, key in enumerate(keys):
            members = train_index[train_codes == code]
            shard_of[members] = (offsets.get(key, 0) + np.arange(len(members))) % num_shards
    written = []
    dictionary_columns = parquet_dictionary_columns(table.schema)
    splits = [(EVAL_NAME, held_out), *([(SELECT_NAME, selected)] if select_fraction else []),
              *((f"shard-{i:03d}", shard_of == i) for i in range(num_shards))]
    for name, mask in splits:
        if mask.any():
            path = Path(out_dir) / name / f"part-{index:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table.filter(mask), path, use_dictionary=dictionary_columns)
            counts = np.bincount(codes[mask], minlength=len(keys))
            hist = {} if spec.target.task == "regression" else {
                str(key): int(n) for key, n in zip(keys, counts, strict=True) if n}
            written.append((name, str(path), hist, int(mask.sum()), sha256_file(path)))
    store.put(*(Path(w[1]) for w in written))  # into the stage's attempt on a store (this worker may share no disk)
    return written, partition_stats(frame.iloc[train_index], spec) if fit_encoder else None


def _label_offsets(counts: list[dict]) -> list[dict]:
    """Exclusive running sum of per-label counts: where each partition's round-robin starts."""
    running, offsets = {}, []
    for part_counts in counts:
        offsets.append(dict(running))
        for value, count in part_counts.items():
            running[value] = running.get(value, 0) + count
    return offsets


@dataclass(frozen=True)
class KeyLayout:
    """Which shard each value of the `shard_by` column goes to."""

    column: str
    shard_of: dict[str, int]
    drop_column: bool  # the column is not a feature or the label: the shards need not carry it

    @property
    def num_shards(self) -> int:
        return max(self.shard_of.values()) + 1

    def keys_of(self, shard: int) -> list[str]:
        return [key for key, index in self.shard_of.items() if index == shard]


def stable_bucket(key: str, buckets: int) -> int:
    """The same bucket for the same key in every process and run (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % buckets


def key_layout(column: str, key_counts: list[dict], num_shards: int, spec: PipelineSpec) -> KeyLayout:
    """One shard per value of `column` (sorted) where they are at most `num_shards`, else values hashed into
    `num_shards` shards; a ShardError where a hashed shard would be empty."""
    keys = sorted({key for counts in key_counts for key in counts})
    if not keys:
        raise ShardError(f"param 'shard_by' column '{column}' has no training rows")
    if len(keys) <= num_shards:
        shard_of = {key: index for index, key in enumerate(keys)}
    else:
        shard_of = {key: stable_bucket(key, num_shards) for key in keys}
        empty = sorted(set(range(num_shards)) - set(shard_of.values()))
        if empty:
            raise ShardError(f"param 'shard_by' column '{column}': its {len(keys)} values hashed into 'num_shards'="
                             f"{num_shards} shards leave shard(s) {empty} empty; lower 'num_shards'")
    keep = column in spec.features or column == spec.target.column
    return KeyLayout(column, shard_of, drop_column=not keep)


def _check_shard_by(parts: list[str], column: str) -> None:

    names = parquet_metadata(parts[0]).schema.to_arrow_schema().names
    if column not in names:
        raise ShardError(f"param 'shard_by' names column '{column}', which the validated data '{parts[0]}' does "
                         f"not have (columns: {', '.join(names)})")


def shard(parts: list[str], stage_dir: Path, num_shards: int, eval_fraction: float, seed: int,
          spec: PipelineSpec, client, warm_start: WarmStart | None = None, shard_by: str | None = None,
          select_fraction: float = 0.0) -> ShardManifest:
    """Split the Parquet `parts` into shards on the Dask `client`; write them under `stage_dir`. The rows are
    encoded with the champion's encoder on a warm start (`warm_start.encoder`), else with one fitted here. With
    `shard_by`, shards follow that column's values; with `select_fraction`, a selection split is set apart too
    (see the module docstring)."""
    label, features = spec.target.column, spec.feature_columns
    encoder = read_json(Path(warm_start.encoder)) if warm_start and warm_start.encoder else None
    columns = [*features, label]
    if shard_by is not None:
        _check_shard_by(parts, shard_by)
        columns += [] if shard_by in columns else [shard_by]
    partitions = parquet_partitions(parts)
    counted = client.gather(client.map(_count_partition, partitions, spec=spec, seed=seed,
                                       eval_fraction=eval_fraction, shard_by=shard_by,
                                       select_fraction=select_fraction, pure=False))
    counts = [c for c, _ in counted]
    layout = key_layout(shard_by, [k for _, k in counted], num_shards, spec) if shard_by else None
    shards_made = layout.num_shards if layout else num_shards
    _check_enough_rows(counts, shards_made)
    offsets = _label_offsets(counts)
    with atomic_dir(stage_dir) as tmp:
        written_parts = client.gather([
            client.submit(_write_partition, partition, index, columns, offsets[index], str(tmp), shards_made, spec,
                          seed, eval_fraction, layout, encoder is None, select_fraction, pure=False)
            for index, partition in enumerate(partitions)])
        written = [item for part, _ in written_parts for item in part]
        fitted = encoder or fit(spec, merge_stats([stats for _, stats in written_parts])).to_dict()
    release_worker_memory(client)  # train loads its shards on these workers next
    splits = [EVAL_NAME, *([SELECT_NAME] if select_fraction else [])]
    infos = _summarise(written, Path(tmp), Path(stage_dir), splits + [f"shard-{i:03d}" for i in range(shards_made)])
    held, shards = infos[:len(splits)], infos[len(splits):]
    if layout is not None:
        for index, info in enumerate(shards):
            info.keys = layout.keys_of(index)
    return ShardManifest(
        stage_dir=str(stage_dir), seed=seed, eval_fraction=eval_fraction, label_column=label,
        feature_columns=list(features), shards=shards, eval=held[0], encoder=fitted, shard_by=shard_by,
        select=held[1] if select_fraction else None, warm_start=warm_start,
    )


def _check_enough_rows(counts: list[dict], num_shards: int) -> None:
    train_rows = sum(sum(c.values()) for c in counts)
    if train_rows < num_shards:
        raise ShardError(f"only {train_rows} training rows for param 'num_shards'={num_shards}: "
                         "every shard needs at least one row")


def _summarise(written: list, tmp: Path, final: Path, names: list[str]) -> list[ShardInfo]:
    """Gather per-partition results into one ShardInfo per split named, in that order, with final paths."""
    infos = []
    for name in names:
        mine = sorted((Path(str(path).replace(str(tmp), str(final), 1)), hist, rows, digest)
                      for written_name, path, hist, rows, digest in written if written_name == name)
        if not mine:
            raise ShardError(f"{name} received no rows: lower param 'num_shards' or raise 'eval_fraction'")
        histogram: dict[str, int] = {}
        for _, part_hist, _, _ in mine:
            for key, value in part_hist.items():
                histogram[key] = histogram.get(key, 0) + value
        infos.append(ShardInfo(name=name, files=[str(path) for path, _, _, _ in mine],
                               rows=sum(rows for _, _, rows, _ in mine),
                               label_histogram=dict(sorted(histogram.items())),
                               sha256=combined_sha256([digest for _, _, _, digest in mine])))
    return infos
