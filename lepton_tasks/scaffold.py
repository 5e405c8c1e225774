"""Scaffold a new pipeline from its source: a spec in `dags/pipelines/` and a starter expectation suite.

The source is inspected the way `ingest` reads it (same formats, same fsspec URIs); a sample of its rows is
profiled into column types, null rules, value ranges and category sets. What a person must still decide
(ranges that new data may leave, category sets that may grow, the schedule) is printed as a review list.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lepton_tasks.errors import BadSource, SpecError
from lepton_tasks.features import label_key
from lepton_tasks.ingest import list_source_files, read_batches, resolve_uri
from lepton_tasks.specs import parse_spec

MAX_CLASSES = 20  # an integer target with at most this many values is taken as classes
MAX_VALUE_SET = 50  # categorical columns with more values get no value-set expectation
RANGE_MARGIN = 0.1  # observed ranges are widened by this share of their span on each side


@dataclass
class Scaffold:
    """What `new_pipeline` wrote and what a person should look at."""

    spec_path: Path
    suite_path: Path
    rows_sampled: int
    review: list[str] = field(default_factory=list)


def sample_source(uri: str, fmt: str | None, rows: int) -> tuple[pd.DataFrame, list[str]]:
    """Up to `rows` rows from the start of the source's files, and the files' names."""
    fs, files = list_source_files(uri, fmt)
    batches, taken = [], 0
    for path in files:
        for batch in read_batches(fs, path):
            batches.append(batch.to_pandas())
            taken += batch.num_rows
            if taken >= rows:
                return pd.concat(batches, ignore_index=True).head(rows), files
    if not batches:
        raise BadSource(f"source '{uri}' holds no rows to profile")
    return pd.concat(batches, ignore_index=True), files


def column_kind(values: pd.Series) -> str:
    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    return "numeric" if numeric else "categorical"


def infer_task(target: pd.Series) -> str:
    if column_kind(target) == "categorical":
        return "classification"
    present = target.dropna()
    integral = bool((present == present.round()).all())
    return "classification" if integral and present.nunique() <= MAX_CLASSES else "regression"


def _range(values: pd.Series) -> tuple[float, float]:
    low, high = float(values.min()), float(values.max())
    margin = (high - low) * RANGE_MARGIN
    return round(low - margin, 6), round(high + margin, 6)


def _null_rule(column: str, values: pd.Series) -> dict:
    share = float(values.isna().mean())
    kwargs = {"column": column} if share == 0 else {"column": column, "mostly": round(max(0.0, 1 - 2 * share), 3)}
    return {"type": "expect_column_values_to_not_be_null", "kwargs": kwargs}


def profile_suite(name: str, frame: pd.DataFrame, features: dict[str, str], target: str, task: str) -> dict:
    """A starter GX suite: columns present, row count, null rules, numeric ranges, category and label sets."""
    expectations = [{"type": "expect_table_row_count_to_be_between", "kwargs": {"min_value": 10}}]
    for column in [*features, target]:
        values = frame[column]
        expectations.append({"type": "expect_column_to_exist", "kwargs": {"column": column}})
        expectations.append(_null_rule(column, values))
        kind = "categorical" if column == target and task == "classification" else features.get(column, "numeric")
        if kind == "numeric" and values.notna().any():
            low, high = _range(values.dropna())
            expectations.append({"type": "expect_column_values_to_be_between",
                                 "kwargs": {"column": column, "min_value": low, "max_value": high}})
        elif kind == "categorical":
            observed = sorted({label_key(v) for v in values.dropna()})
            if column == target:
                expectations.append({"type": "expect_column_distinct_values_to_be_in_set",
                                     "kwargs": {"column": column, "value_set": _typed(values, observed)}})
            elif len(observed) <= MAX_VALUE_SET:
                expectations.append({"type": "expect_column_values_to_be_in_set",
                                     "kwargs": {"column": column, "value_set": _typed(values, observed),
                                                "mostly": 0.99}})
    return {"name": name, "meta": {"profiled_rows": len(frame), "made_by": "lepton new-pipeline"},
            "expectations": expectations}


def _typed(values: pd.Series, keys: list[str]) -> list:
    """Value-set members as the column holds them (numbers stay numbers)."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return [int(k) if float(k).is_integer() else float(k) for k in keys]
    return keys


def spec_text(name: str, source: str, fmt: str | None, features: dict[str, str], target: str, task: str,
              classes: list | None, suite_file: str) -> str:
    """The YAML of a new spec: every section present, defaults spelled out where a person is likely to tune."""
    lines = [
        f"# Pipeline spec made by `lepton new-pipeline` from {source}. Check it with `lepton validate-spec`.",
        f"name: {name}",
        "description: >",
        f"  {name}: shard, train one model per shard, merge, compress and register.",
        "owner: data-engineering",
        f"tags: [{name}]",
        "schedule: null   # a cron expression (\"0 2 * * *\") or preset (@daily); null: triggered runs only",
        "",
        "source:",
        f"  uri: {json.dumps(source)}",
        f"  format: {fmt or 'null'}",
        "",
        "features:",
        *[f"  {column}: {kind}" for column, kind in features.items()],
        "target:",
        f"  column: {target}",
        f"  task: {task}",
    ]
    if classes is not None:
        lines.append(f"  classes: {json.dumps(classes)}")
    lines += [
        "",
        "preprocessing:",
        "  standardize: true",
        "  one_hot_max_categories: 20",
        "  fill_numeric: mean          # or zero; fill_values sets a constant per column",
        "  fill_categorical: missing   # or most_frequent",
        "",
        f"expectations: {suite_file}",
        "",
        "training: {num_shards: 4, model_kind: mlp, hidden_size: 64, local_epochs: 5, learning_rate: 0.01,",
        "           batch_size: 64, eval_fraction: 0.2, seed: 42}",
        "merge: {merge_rounds: 8}",
        "compression:",
        "  prune_sparsity: 0.5",
        f"  compression_tolerance: {0.01 if task == 'classification' else 0.005}"
        f"   # worst allowed drop in {'accuracy' if task == 'classification' else 'R²'}",
        "",
        "mlflow:",
        f"  experiment: {name}",
        f"  registered_model: {name.replace('_', '-')}",
        "",
    ]
    return "\n".join(lines)


def new_pipeline(name: str, source: str, target: str, data_root: Path, pipelines_dir: Path,
                 expectations_dir: Path, fmt: str | None = None, task: str | None = None,
                 sample_rows: int = 50_000, force: bool = False) -> Scaffold:
    """Inspect `source`, then write `{pipelines_dir}/{name}.yaml` and `{expectations_dir}/{name}.json`."""
    spec_path, suite_path = Path(pipelines_dir) / f"{name}.yaml", Path(expectations_dir) / f"{name}.json"
    for path in (spec_path, suite_path):
        if path.exists() and not force:
            raise SpecError(f"'{path}' already exists (pass --force to overwrite it)")
    frame, files = sample_source(resolve_uri(source, data_root), fmt, sample_rows)
    if target not in frame.columns:
        raise SpecError(f"target column '{target}' is not in {files[0]} (columns: {list(frame.columns)})")
    task = task or infer_task(frame[target])
    features = {c: column_kind(frame[c]) for c in frame.columns if c != target}
    classes = sorted({label_key(v) for v in frame[target].dropna()}) if task == "classification" else None
    classes = _typed(frame[target], classes) if classes is not None else None
    text = spec_text(name, source, fmt, features, target, task, classes, suite_path.name)
    suite = profile_suite(name, frame, features, target, task)
    suite_path.parent.mkdir(parents=True, exist_ok=True)
    suite_path.write_text(json.dumps(suite, indent=1) + "\n")
    try:
        parse_spec(text, spec_path)  # what we write must load
    except SpecError:
        suite_path.unlink()
        raise
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(text)
    return Scaffold(spec_path, suite_path, len(frame), _review(frame, features, target, task, files))


def _review(frame: pd.DataFrame, features: dict[str, str], target: str, task: str, files: list[str]) -> list[str]:
    notes = [f"profiled {len(frame)} rows from {len(files)} file(s), first {files[0]}",
             f"target '{target}' taken as {task}" + (" (pass --task to change it)"),
             f"features: {sum(k == 'numeric' for k in features.values())} numeric, "
             f"{sum(k == 'categorical' for k in features.values())} categorical; drop identifiers and leaks "
             "(ids, timestamps, anything known only after the target) from 'features'",
             f"numeric ranges in the suite are the sample's, widened by {RANGE_MARGIN:.0%} of the span: "
             "widen them where new data may go further"]
    nulls = [c for c in frame.columns if frame[c].isna().any()]
    if nulls:
        notes.append(f"columns with nulls (the suite allows about twice the sampled share): {nulls}")
    wide = [c for c, k in features.items() if k == "categorical" and frame[c].nunique() > MAX_VALUE_SET]
    if wide:
        notes.append(f"high-cardinality categoricals (no value-set check; one-hot keeps the top 20): {wide}")
    notes.append("schedule is null (manual runs); set a cron expression for nightly runs")
    return notes
