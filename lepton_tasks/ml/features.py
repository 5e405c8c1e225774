"""Features: turn a pipeline's columns into the model's float matrix, the same way on every shard.

FedAvg averages parameters, so every shard must encode its rows identically: fills, scales and category lists
are fitted once, on the training rows of all shards (statistics gathered partition by partition on the Dask
cluster during `shard`), and saved in the shard manifest. `train`, `merge`, `compress` and `register` all
encode through the same `Encoder`.

- numeric: nulls filled (training mean, zero, or a constant), then standardised when the spec says so;
- categorical: one-hot over the most frequent categories; the rest share an `__other__` column; nulls become
  `__missing__` (or the most frequent category); a category never seen in training encodes as all zeros;
- target: class index (classification) or the value itself (regression; its mean and std are kept so the
  model can learn on a unit scale and still predict in the target's units).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from lepton_tasks.config.specs import PipelineSpec
from lepton_tasks.core.errors import ShardError

OTHER, MISSING = "__other__", "__missing__"


def label_key(value) -> str:
    """Labels compare as text, so 3, 3.0 and "3" are one class."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    return str(value.item() if isinstance(value, np.generic) else value)


def label_codes(values, missing: str | None = None) -> tuple[np.ndarray, list[str]]:
    """Each value's `label_key` as an index into the returned keys (distinct, sorted); missing values are the key
    `missing` when given. Factorised: `label_key` runs once per distinct value, not once per row (per row it was
    most of loading a shard's or the held-out split's rows)."""
    import pandas as pd

    codes, uniques = pd.factorize(values, use_na_sentinel=False)
    raw = [missing if missing is not None and pd.isna(value) else label_key(value) for value in uniques]
    keys = sorted(set(raw))
    position = {key: index for index, key in enumerate(keys)}
    return np.array([position[key] for key in raw], dtype=np.int64)[codes], keys


@dataclass
class ColumnEncoding:
    """How one source column becomes one (numeric) or several (one-hot) model inputs."""

    name: str
    kind: str  # "numeric" or "categorical"
    fill: float | str | None = None
    mean: float = 0.0
    std: float = 1.0
    categories: list[str] = field(default_factory=list)
    other: bool = False  # categories beyond the kept ones share one column

    @property
    def outputs(self) -> list[str]:
        if self.kind == "numeric":
            return [self.name]
        return [f"{self.name}={c}" for c in self.categories] + ([f"{self.name}={OTHER}"] if self.other else [])


@dataclass
class Encoder:
    """Fitted encoding of a pipeline's features and target."""

    columns: list[ColumnEncoding]
    target: str
    task: str
    classes: list[str] = field(default_factory=list)
    target_mean: float = 0.0
    target_std: float = 1.0

    @property
    def output_names(self) -> list[str]:
        return [name for column in self.columns for name in column.outputs]

    @property
    def width(self) -> int:
        return len(self.output_names)

    @property
    def source_columns(self) -> list[str]:
        return [c.name for c in self.columns]

    def encode_features(self, frame, out: np.ndarray | None = None) -> np.ndarray:
        """The float32 model input of a pandas frame holding the source columns, into `out` (rows x width; a new
        array when not given). Columns are encoded one at a time (at most one is ever held in float64: a shard of
        millions of rows would otherwise hold every column three times over) into a column-major scratch array,
        then copied once, transposed: a strided write per column into the row-major result, and pandas' fillna,
        took most of loading the held-out split."""
        by_column = np.empty((self.width, len(frame)), dtype=np.float32)
        start = 0
        for column in self.columns:
            values = frame[column.name]
            if column.kind == "numeric":
                numbers = values.astype("float64").to_numpy()
                nulls = np.isnan(numbers)
                if nulls.any():
                    numbers = np.where(nulls, column.fill, numbers)
                by_column[start] = (numbers - column.mean) / column.std
                start += 1
            else:
                codes, keys = label_codes(values, missing=column.fill)
                keys = np.array(keys, dtype=object)
                for category in column.categories:
                    by_column[start] = (keys == category)[codes]
                    start += 1
                if column.other:
                    by_column[start] = (~np.isin(keys, column.categories))[codes]
                    start += 1
        if out is None:
            return np.ascontiguousarray(by_column.T)
        out[...] = by_column.T
        return out

    def encode_target(self, values) -> np.ndarray:
        """Class indices (int64) or target values (float32) of a pandas series."""
        if self.task == "regression":
            return values.astype("float64").to_numpy().astype(np.float32)
        codes, keys = label_codes(values)
        self.check_labels(keys)
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[key] for key in keys], dtype=np.int64)[codes]

    def check_labels(self, labels) -> None:
        unknown = sorted(set(labels) - set(self.classes))
        if unknown:
            raise ShardError(f"label(s) {unknown[:5]} in column '{self.target}' are not among the spec's "
                             f"target.classes {self.classes}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> Encoder:
        return cls(**{**raw, "columns": [ColumnEncoding(**c) for c in raw["columns"]]})


def partition_stats(frame, spec: PipelineSpec) -> dict:
    """Sums, counts and category counts of one partition's training rows: what `fit` needs, mergeable."""
    stats: dict = {"rows": len(frame), "numeric": {}, "categorical": {}}
    for name, kind in spec.features.items():
        values = frame[name]
        if kind == "numeric":
            numbers = values.astype("float64")
            present = numbers.dropna()
            stats["numeric"][name] = [len(present), float(present.sum()), float((present ** 2).sum())]
        else:
            stats["categorical"][name] = _key_counts(values, missing=MISSING)
    target = frame[spec.target.column]
    if spec.target.task == "regression":
        numbers = target.astype("float64").dropna()
        stats["target"] = [len(numbers), float(numbers.sum()), float((numbers ** 2).sum())]
    else:
        stats["target"] = _key_counts(target)
    return stats


def _key_counts(values, missing: str | None = None) -> dict[str, int]:
    """Rows per `label_key` (missing values under `missing`, if given): counted per distinct raw value first,
    so `label_key` runs once per value, not once per row."""
    import pandas as pd

    counts: dict[str, int] = {}
    for raw, count in values.value_counts(dropna=False).items():
        key = missing if missing is not None and pd.isna(raw) else label_key(raw)
        counts[key] = counts.get(key, 0) + int(count)
    return counts


def merge_stats(parts: list[dict]) -> dict:
    """Add up `partition_stats` of many partitions."""
    total: dict = {"rows": 0, "numeric": {}, "categorical": {}, "target": None}
    for part in parts:
        total["rows"] += part["rows"]
        for name, sums in part["numeric"].items():
            total["numeric"][name] = [a + b for a, b in zip(total["numeric"].get(name, [0, 0.0, 0.0]), sums,
                                                            strict=True)]
        for name, counts in part["categorical"].items():
            merged = total["categorical"].setdefault(name, {})
            for key, count in counts.items():
                merged[key] = merged.get(key, 0) + count
        if isinstance(part["target"], list):
            total["target"] = [a + b for a, b in zip(total["target"] or [0, 0.0, 0.0], part["target"], strict=True)]
        else:
            merged = total["target"] if isinstance(total["target"], dict) else {}
            for key, count in part["target"].items():
                merged[key] = merged.get(key, 0) + count
            total["target"] = merged
    return total


def _mean_std(count: int, total: float, squares: float) -> tuple[float, float]:
    if count == 0:
        return 0.0, 1.0
    mean = total / count
    std = float(np.sqrt(max(squares / count - mean * mean, 0.0)))
    return mean, (std if std > 1e-12 else 1.0)


def fit(spec: PipelineSpec, stats: dict) -> Encoder:
    """The encoder for `spec`, fitted on the merged training-row statistics."""
    prep = spec.preprocessing
    columns = []
    for name, kind in spec.features.items():
        if kind == "numeric":
            count, total, squares = stats["numeric"][name]
            if count == 0:
                raise ShardError(f"numeric column '{name}' has no values in the training rows (all null)")
            mean, std = _mean_std(count, total, squares)
            fill = prep.fill_values.get(name, mean if prep.fill_numeric == "mean" else 0.0)
            columns.append(ColumnEncoding(name, kind, float(fill), mean if prep.standardize else 0.0,
                                          std if prep.standardize else 1.0))
        else:
            counts = stats["categorical"][name]
            ranked = sorted(counts, key=lambda k: (-counts[k], k))
            if name in prep.fill_values:
                fill = label_key(prep.fill_values[name])
            elif prep.fill_categorical == "most_frequent":
                fill = next((k for k in ranked if k != MISSING), MISSING)
            else:
                fill = MISSING
            kept = ranked[:prep.one_hot_max_categories]
            columns.append(ColumnEncoding(name, kind, fill, categories=sorted(kept),
                                          other=len(ranked) > len(kept)))
    encoder = Encoder(columns, spec.target.column, spec.target.task)
    if spec.target.task == "regression":
        encoder.target_mean, encoder.target_std = _mean_std(*stats["target"])
    else:
        encoder.classes = [label_key(c) for c in spec.target.classes]
        encoder.check_labels(stats["target"])
    return encoder
