"""A new pipeline made from its source (`lepton new-pipeline`): a spec in `dags/pipelines/` and a starter
expectation suite.

The whole source is profiled (every row of every file, streamed: `lepton_tasks.data.source_profile`), the way
`ingest` reads it, so the first run on the data the pipeline was made from always passes its suite. The bounds
rule, chosen so that new nightly data does not fail the run for no reason:
- numeric `between`: the observed min and max widened by RANGE_MARGIN of their span on each side (never below 0
  for a column that never was negative; whole numbers for whole-number columns), rounded outwards;
- a heavy-tailed column (its max or min lies more than HEAVY_TAIL_FACTOR core spans beyond the 0.1%..99.9%
  quantiles) also gets `mostly: 0.999`: a new extreme in a few rows is expected there, not a broken feed;
- nulls: at most twice the observed share (none observed: none allowed); categories: every observed value
  (up to MAX_VALUE_SET distinct, with `mostly: 0.99`); the label set: every observed class.
What a person must still decide (heavy tails, rare categories, the schedule) is printed as a review list.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from lepton_tasks.config.specs import parse_spec
from lepton_tasks.core.errors import SpecError
from lepton_tasks.data.source_profile import (
    SAMPLE_ROWS,
    ColumnProfile,
    SourceProfile,
    profile_source,
    profile_table,
)
from lepton_tasks.data.sources import resolve_uri
from lepton_tasks.data.warehouse import SqlSource
from lepton_tasks.ml.features import label_key

MAX_CLASSES = 20  # an integer target with at most this many values is taken as classes
MAX_VALUE_SET = 50  # categorical columns with more values get no value-set expectation
RANGE_MARGIN = 0.1  # observed ranges are widened by this share of their span on each side
HEAVY_TAIL_FACTOR = 3.0  # extremes this many 0.1%..99.9% spans beyond those quantiles: a heavy tail
HEAVY_TAIL_MOSTLY = 0.999
RARE_SHARE = 0.001  # categories seen in fewer rows than this share are named in the review
DECIMALS = 6


@dataclass
class Scaffold:
    """What `new_pipeline` wrote and what a person should look at."""

    spec_path: Path
    suite_path: Path
    rows_profiled: int
    review: list[str] = field(default_factory=list)


def infer_task(target: ColumnProfile) -> str:
    if not target.numeric:
        return "classification"
    few = target.counts is not None and len(target.counts) <= MAX_CLASSES
    return "classification" if target.integral and few else "regression"


def _outwards(value: float, up: bool) -> float:
    """`value` rounded to DECIMALS away from the data (so the bound still holds every observed value)."""
    scale = 10 ** DECIMALS
    rounded = (math.ceil(value * scale) if up else math.floor(value * scale)) / scale
    if (rounded < value) if up else (rounded > value):  # float error in the scaling
        rounded += (1 if up else -1) / scale
    return rounded


def heavy_tailed(column: ColumnProfile) -> bool:
    q_low, q_high = column.quantile(0.001), column.quantile(0.999)
    if q_low is None or column.low is None:
        return False
    core = max(q_high - q_low, 1e-12)
    return (column.high - q_high) > HEAVY_TAIL_FACTOR * core or (q_low - column.low) > HEAVY_TAIL_FACTOR * core


def numeric_bounds(column: ColumnProfile) -> tuple[float, float]:
    """The `between` bounds of the rule in the module docstring."""
    margin = (column.high - column.low) * RANGE_MARGIN
    low, high = column.low - margin, column.high + margin
    if column.low >= 0:
        low = max(0.0, low)
    if column.integral:
        low, high = float(math.floor(low)), float(math.ceil(high))
    return _outwards(low, up=False), _outwards(high, up=True)


def _null_rule(column: ColumnProfile, rows: int) -> dict:
    share = column.nulls / rows
    if share == 0:
        return {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": column.name}}
    mostly = math.floor(max(0.0, 1 - 2 * share) * 1000) / 1000  # floored: the profiled data always passes
    return {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": column.name, "mostly": mostly}}


def _typed(column: ColumnProfile, values) -> list:
    """Value-set members as the column holds them (numbers stay numbers, booleans booleans)."""
    if column.numeric:
        return sorted(int(v) if float(v).is_integer() else float(v) for v in values)
    return sorted(values, key=label_key)


def _value_rules(column: ColumnProfile, is_target: bool) -> list[dict]:
    if column.counts is None:
        return []
    observed = _typed(column, column.counts)
    if is_target:
        return [{"type": "expect_column_distinct_values_to_be_in_set",
                 "kwargs": {"column": column.name, "value_set": observed}}]
    if len(observed) > MAX_VALUE_SET:
        return []
    return [{"type": "expect_column_values_to_be_in_set",
             "kwargs": {"column": column.name, "value_set": observed, "mostly": 0.99}}]


def _range_rule(column: ColumnProfile) -> list[dict]:
    if column.low is None:
        return []
    low, high = numeric_bounds(column)
    kwargs = {"column": column.name, "min_value": low, "max_value": high}
    if heavy_tailed(column):
        kwargs["mostly"] = HEAVY_TAIL_MOSTLY
    return [{"type": "expect_column_values_to_be_between", "kwargs": kwargs}]


def profile_suite(name: str, profile: SourceProfile, features: dict[str, str], target: str, task: str) -> dict:
    """A starter GX suite: columns present, row count, null rules, numeric ranges, category and label sets."""
    expectations = [{"type": "expect_table_row_count_to_be_between", "kwargs": {"min_value": min(10, profile.rows)}}]
    for column_name in [*features, target]:
        column = profile.columns[column_name]
        expectations.append({"type": "expect_column_to_exist", "kwargs": {"column": column_name}})
        expectations.append(_null_rule(column, profile.rows))
        categorical = (column_name == target and task == "classification") or features.get(column_name) == \
            "categorical"
        expectations += _value_rules(column, column_name == target) if categorical else _range_rule(column)
    return {"name": name, "meta": {"profiled_rows": profile.rows, "made_by": "lepton new-pipeline"},
            "expectations": expectations}


def spec_text(name: str, source: str, fmt: str | None, features: dict[str, str], target: str, task: str,
              classes: list | None, suite_file: str, window_days: int = 1, schedule: str | None = None) -> str:
    """The YAML of a new spec: every section present, defaults spelled out where a person is likely to tune."""
    sql = sql_source_arg(source)
    lines = [
        f"# Pipeline spec made by `lepton new-pipeline` from {sql.uri if sql else source}. Check it with "
        "`lepton validate-spec`.",
        f"name: {name}",
        "description: >",
        f"  {name}: shard, train one model per shard, merge, compress and register.",
        "owner: data-engineering",
        f"tags: [{name}]",
        f"schedule: {json.dumps(schedule) if schedule else 'null'}   # cron (\"0 2 * * *\") or preset (@daily); "
        "null: triggered runs only",
        "",
        "source:",
        *(_sql_source_lines(sql) if sql else [f"  uri: {json.dumps(source)}", f"  format: {fmt or 'null'}"]),
        f"  window_days: {window_days}   # "
        + ("the partition column's days" if sql else "with {ds} in the uri: the days") + " each run reads, ending "
        "with its date",
        "  wait: {timeout_minutes: 0, poke_seconds: 60}   # how long a run waits (deferred) for its days to land",
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
                 sample_rows: int = SAMPLE_ROWS, force: bool = False, window_days: int = 1,
                 schedule: str | None = None) -> Scaffold:
    """Profile `source`, then write `{pipelines_dir}/{name}.yaml` and `{expectations_dir}/{name}.json`. A source
    templated on the run's date is profiled over every day that exists (each placeholder read as `*`)."""
    spec_path, suite_path = Path(pipelines_dir) / f"{name}.yaml", Path(expectations_dir) / f"{name}.json"
    for path in (spec_path, suite_path):
        if path.exists() and not force:
            raise SpecError(f"'{path}' already exists (pass --force to overwrite it)")
    sql = sql_source_arg(source)
    if sql is not None:  # in the database: only aggregates and a sample come back
        profile = profile_table(sql, {target}, sample_rows)
    else:
        profile = profile_source(resolve_uri(every_day(source), data_root), fmt, {target}, sample_rows)
    if target not in profile.columns:
        raise SpecError(f"target column '{target}' is not in {profile.files[0]} (columns: {list(profile.columns)})")
    task = task or infer_task(profile.columns[target])
    unused = {target, sql.partition_column if sql else None}  # the day a row belongs to is no feature
    features = {c: "numeric" if p.numeric else "categorical" for c, p in profile.columns.items() if c not in unused}
    classes = _typed(profile.columns[target], profile.columns[target].counts) if task == "classification" else None
    text = spec_text(name, source, fmt, features, target, task, classes, suite_path.name, window_days, schedule)
    suite = profile_suite(name, profile, features, target, task)
    suite_path.parent.mkdir(parents=True, exist_ok=True)
    suite_path.write_text(json.dumps(suite, indent=1) + "\n")
    try:
        parse_spec(text, spec_path)  # what we write must load (it looks for the suite)
    except SpecError:
        suite_path.unlink()
        raise
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(text)
    return Scaffold(spec_path, suite_path, profile.rows, _review(profile, features, target, task, schedule))


SQL_SOURCE_FIELDS = ("conn_id", "table", "partition_column")


def sql_source_arg(source: str) -> SqlSource | None:
    """`--source 'conn_id:warehouse/table:events[/partition_column:day]'` as a SqlSource; None for files."""
    if not source.startswith("conn_id:"):
        return None
    fields = dict(part.split(":", 1) for part in source.split("/") if ":" in part)
    unknown = set(fields) - set(SQL_SOURCE_FIELDS)
    if unknown or "table" not in fields or len(fields) != source.count("/") + 1:
        raise SpecError(f"--source '{source}': a table is named 'conn_id:CONN/table:TABLE' with an optional "
                        "'/partition_column:COLUMN' (a query goes into the spec's source.query)")
    return SqlSource(fields["conn_id"], fields["table"], partition_column=fields.get("partition_column"))


def _sql_source_lines(sql: SqlSource) -> list[str]:
    lines = [f"  conn_id: {sql.conn_id}   # the Airflow connection", f"  table: {sql.table}"]
    if sql.partition_column:
        lines.append(f"  partition_column: {sql.partition_column}   # a run reads its window's days")
    return lines


def every_day(source: str) -> str:
    """The glob matching every day of a date-templated source (the source itself otherwise)."""
    from lepton_tasks.data.windows import PLACEHOLDERS, check_template

    try:
        check_template(source)
    except ValueError as err:
        raise SpecError(f"--source {err}") from None
    return source.format(**dict.fromkeys(PLACEHOLDERS, "*"))


def _review(profile: SourceProfile, features: dict[str, str], target: str, task: str,
            schedule: str | None = None) -> list[str]:
    columns = profile.columns
    where = f"in the database ({profile.files[0]})" if profile.files[0].startswith("sql://") else \
        f"of {len(profile.files)} file(s), first {profile.files[0]}"
    notes = [f"profiled all {profile.rows} rows {where}",
             f"target '{target}' taken as {task} (pass --task to change it)",
             f"features: {sum(k == 'numeric' for k in features.values())} numeric, "
             f"{sum(k == 'categorical' for k in features.values())} categorical; drop identifiers and leaks "
             "(ids, timestamps, anything known only after the target) from 'features'",
             f"numeric ranges are the observed min..max widened by {RANGE_MARGIN:.0%} of the span (the README's "
             "bounds rule): narrow them where a value outside means a broken feed"]
    heavy = [f"{c} (max {columns[c].high:.6g}, 99.9% quantile {columns[c].quantile(0.999):.6g})"
             for c, kind in features.items() if kind == "numeric" and heavy_tailed(columns[c])]
    if heavy:
        notes.append(f"heavy-tailed columns (range check allows {1 - HEAVY_TAIL_MOSTLY:.1%} of rows outside): "
                     + "; ".join(heavy))
    rare = {c: sorted(str(v) for v, n in columns[c].counts.items() if n < RARE_SHARE * profile.rows)
            for c in [*features, target] if not columns[c].numeric and columns[c].counts}
    rare = {c: values for c, values in rare.items() if values}
    if rare:
        notes.append("rare categories (fewer than 0.1% of rows; a night without them is fine, a new one is "
                     "checked with mostly 0.99): " + "; ".join(f"{c}: {v[:10]}" for c, v in rare.items()))
    nulls = [c for c, p in columns.items() if p.nulls]
    if nulls:
        notes.append(f"columns with nulls (the suite allows about twice the observed share): {nulls}")
    wide = [c for c, k in features.items() if k == "categorical" and (columns[c].counts is None
                                                                      or len(columns[c].counts) > MAX_VALUE_SET)]
    if wide:
        notes.append(f"high-cardinality categoricals (no value-set check; one-hot keeps the top 20): {wide}")
    if schedule is None:
        notes.append("schedule is null (manual runs); set a cron expression (or --schedule) for nightly runs")
    return notes
