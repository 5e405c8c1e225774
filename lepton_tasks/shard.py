"""Shard: split the validated stage on a Dask cluster into N Parquet shards plus a held-out split.

Deterministic given the seed and the data, whatever the partitioning:
- a row is held out when a seeded hash of its global row number falls under `eval_fraction`;
- by default the remaining rows of each label are dealt round-robin to the shards, so every shard gets the same
  label mix (a regression target has one stratum: rows are dealt in order);
- with `shard_by` (a column), data that lives apart stays apart: one shard per value of the column (the values in
  sorted order), or, with more values than `num_shards`, each value hashed into one of `num_shards` shards;
  shards keep their natural sizes and label mixes.
Two passes over the data, one partition in memory per worker at a time: count (rows and labels per partition,
and the training rows' statistics that fit the feature encoder), then write (each partition writes its slice of
every shard).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lepton_tasks.errors import ShardError
from lepton_tasks.features import fit, label_codes, merge_stats, partition_stats
from lepton_tasks.specs import PipelineSpec
from lepton_tasks.storage import atomic_dir, parquet_dictionary_columns, sha256_files

EVAL_NAME = "eval"
NULL_KEY = "__null__"  # the shard_by key of rows where that column is missing


@dataclass
class ShardInfo:
    """One shard (or the held-out split): its files, size, label histogram and checksum."""

    name: str
    files: list[str]
    rows: int
    label_histogram: dict[str, int]
    sha256: str
    keys: list[str] | None = None  # with shard_by: the column's values this shard holds


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
    shard_by: str | None = None  # the column shards follow; None: stratified by label

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
    return label_codes(frame[spec.target.column])


def _key_codes(values) -> tuple[np.ndarray, list[str]]:
    """Each row's shard_by value as an index into the returned keys (text, as labels compare: `label_key`;
    missing values are the key NULL_KEY)."""
    return label_codes(values, missing=NULL_KEY)


def _count_partition(frame, spec: PipelineSpec, seed: int, eval_fraction: float, start: int,
                     shard_by: str | None = None) -> tuple[dict, dict, dict, int]:
    """Per-stratum counts, encoder statistics and (with `shard_by`) per-key counts of one partition's training
    rows (the first pass), and the partition's row count."""
    rows = np.arange(start, start + len(frame))
    training = ~held_out_mask(rows, seed, eval_fraction)
    codes, keys = _strata(frame, spec)
    counts = np.bincount(codes[training], minlength=len(keys))
    key_counts = {}
    if shard_by is not None:
        key_codes, key_names = _key_codes(frame[shard_by])
        per_key = np.bincount(key_codes[training], minlength=len(key_names))
        key_counts = {key: int(n) for key, n in zip(key_names, per_key, strict=True) if n}
    return ({key: int(n) for key, n in zip(keys, counts, strict=True) if n},
            partition_stats(frame[training], spec), key_counts, len(frame))


def _write_partition(frame, index: int, start: int, offsets: dict, out_dir: str, num_shards: int,
                     spec: PipelineSpec, seed: int, eval_fraction: float,
                     layout: KeyLayout | None = None) -> list[tuple[str, str, dict]]:
    """Write one partition's slice of every shard and of the held-out split (the second pass)."""
    rows = np.arange(start, start + len(frame))
    held_out = held_out_mask(rows, seed, eval_fraction)
    codes, keys = _strata(frame, spec)
    shard_of = np.full(len(frame), -1)
    train_index = np.flatnonzero(~held_out)
    if layout is not None:
        key_codes, key_names = _key_codes(frame[layout.column])
        shard_of[train_index] = np.array([layout.shard_of[k] for k in key_names], dtype=np.int64)[
            key_codes[train_index]]
        frame = frame.drop(columns=[layout.column]) if layout.drop_column else frame
    else:
        train_codes = codes[train_index]
        for code, key in enumerate(keys):
            members = train_index[train_codes == code]
            shard_of[members] = (offsets.get(key, 0) + np.arange(len(members))) % num_shards
    written = []
    table = pa.Table.from_pandas(frame, preserve_index=False)  # converted once, sliced per shard
    dictionary_columns = parquet_dictionary_columns(table.schema)
    for name, mask in [(EVAL_NAME, held_out)] + [(f"shard-{i:03d}", shard_of == i) for i in range(num_shards)]:
        if mask.any():
            path = Path(out_dir) / name / f"part-{index:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table.filter(mask), path, use_dictionary=dictionary_columns)
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
    import pyarrow.parquet as pq

    names = pq.read_schema(parts[0]).names
    if column not in names:
        raise ShardError(f"param 'shard_by' names column '{column}', which the validated data '{parts[0]}' does "
                         f"not have (columns: {', '.join(names)})")


def shard(parts: list[str], stage_dir: Path, num_shards: int, eval_fraction: float, seed: int,
          spec: PipelineSpec, client, encoder: dict | None = None, shard_by: str | None = None) -> ShardManifest:
    """Split the Parquet `parts` into shards on the Dask `client`; write them under `stage_dir`. The rows are
    encoded with `encoder` where given (a warm start keeps the champion's), else with one fitted here. With
    `shard_by`, shards follow that column's values (see the module docstring)."""
    import dask
    import dask.dataframe as dd

    label, features = spec.target.column, spec.feature_columns
    columns = [*features, label]
    if shard_by is not None:
        _check_shard_by(parts, shard_by)
        columns += [] if shard_by in columns else [shard_by]
    frame = dd.read_parquet(parts, columns=columns)
    partitions = frame.to_delayed()
    sizes = _footer_sizes(frame) or client.gather(client.compute([dask.delayed(len)(p) for p in partitions]))
    starts = _starts(sizes)
    counted, counted_sizes = _count(client, partitions, starts, spec, seed, eval_fraction, shard_by)
    if counted_sizes != sizes:  # the footers disagreed with the partitions read: count again, from what was read
        starts = _starts(counted_sizes)
        counted, _ = _count(client, partitions, starts, spec, seed, eval_fraction, shard_by)
    counts = [c for c, _, _ in counted]
    layout = key_layout(shard_by, [k for _, _, k in counted], num_shards, spec) if shard_by else None
    shards_made = layout.num_shards if layout else num_shards
    _check_enough_rows(counts, shards_made)
    fitted = encoder or fit(spec, merge_stats([stats for _, stats, _ in counted])).to_dict()
    offsets = _label_offsets(counts)
    with atomic_dir(stage_dir) as tmp:
        write_tasks = [
            dask.delayed(_write_partition)(p, i, s, o, str(tmp), shards_made, spec, seed, eval_fraction, layout)
            for i, (p, s, o) in enumerate(zip(partitions, starts, offsets, strict=True))
        ]
        written = [item for part in client.gather(client.compute(write_tasks)) for item in part]
    infos = _summarise(written, Path(tmp), Path(stage_dir), shards_made)
    if layout is not None:
        for index, info in enumerate(infos[1:]):
            info.keys = layout.keys_of(index)
    return ShardManifest(
        stage_dir=str(stage_dir), seed=seed, eval_fraction=eval_fraction, label_column=label,
        feature_columns=list(features), shards=infos[1:], eval=infos[0], encoder=fitted, shard_by=shard_by,
    )


def _footer_sizes(frame) -> list[int] | None:
    """Rows per partition from the Parquet footers, as Dask plans the partitions (no data read), or None where
    Dask cannot tell them that way."""
    from dask.dataframe.dask_expr._expr import Lengths, Literal

    lengths = Lengths(frame.expr).optimize()
    return [int(n) for n in lengths.value] if isinstance(lengths, Literal) else None


def _starts(sizes: list[int]) -> list[int]:
    """Each partition's first global row number."""
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()


def _count(client, partitions: list, starts: list[int], spec: PipelineSpec, seed: int, eval_fraction: float,
           shard_by: str | None) -> tuple[list, list[int]]:
    """The first pass (`_count_partition` on each partition), and the row counts of the partitions as read."""
    import dask

    tasks = [dask.delayed(_count_partition)(p, spec, seed, eval_fraction, start, shard_by)
             for p, start in zip(partitions, starts, strict=True)]
    counted = client.gather(client.compute(tasks))
    return [c[:3] for c in counted], [c[3] for c in counted]


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
