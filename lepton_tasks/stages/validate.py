"""Validate: run a Great Expectations 1.x suite from `expectations/` against the ingested stage.

GX is called directly (its Airflow provider conflicts with Airflow 3.3). A validation run does not raise on
failure, so this module raises `ValidationFailed` itself, naming each failed expectation and column, after it
has written the result JSON and the HTML data docs into the run folder.

Two ways to run, one result:
- in memory, when the stage's decoded size fits `Settings.validate_memory_bytes`: one pandas frame, one process;
- partition by partition on the Dask cluster otherwise: each worker checks its partition against the expectations
  whose outcome adds up across partitions (row-level ones: unexpected counts add; schema and dtype ones: every
  partition must pass), and the rest (row counts, means, uniqueness, distributions) run once over only the
  columns they name. The partition results are added up into one suite result, so the data docs and
  `result.json` describe the whole stage either way.

Speed: GX's pandas `column_values.between` is vectorised only for int64/float64 columns; on float32 (MNIST-1D's
dtype) it calls a Python function per value, ~30x slower. Value checks therefore see numeric columns upcast
(exact for float32 and ints up to 32 bits); dtype expectations see the columns as stored.

Quarantine (param `quarantine_max_fraction` > 0): when only row-level expectations fail and the failing rows are
at most that share of the data, those rows go to `quarantine/` with their reasons, the rest to `clean/`, and the
run goes on with the clean rows; table-level failures, or more failing rows, stop it.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lepton_tasks.core import store
from lepton_tasks.core.errors import BadSource, ValidationFailed
from lepton_tasks.core.storage import ParquetPartition, atomic_dir, parquet_partitions, read_json
from lepton_tasks.data.manifests import Failure, ValidationManifest

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
DOCS_DIR = "docs"
QUARANTINE_DIR = "quarantine"
CLEAN_DIR = "clean"
REASONS_COLUMN = "_lepton_quarantine_reasons"

# How an expectation's outcome on the whole stage follows from its outcomes on partitions (see module docstring).
DTYPE_EXPECTATIONS = frozenset({
    "expect_column_values_to_be_in_type_list", "expect_column_values_to_be_of_type", "expect_column_type_to_be",
})
SCHEMA_EXPECTATIONS = frozenset({
    "expect_table_columns_to_match_ordered_list", "expect_table_columns_to_match_set",
    "expect_table_column_count_to_be_between", "expect_table_column_count_to_equal", "expect_column_to_exist",
})
ROW_EXPECTATIONS = frozenset({
    "expect_column_values_to_not_be_null", "expect_column_values_to_be_null", "expect_column_values_to_be_between",
    "expect_column_values_to_be_in_set", "expect_column_values_to_not_be_in_set",
    "expect_column_value_lengths_to_be_between", "expect_column_value_lengths_to_equal",
    "expect_column_values_to_match_regex", "expect_column_values_to_not_match_regex",
    "expect_column_values_to_match_regex_list", "expect_column_values_to_not_match_regex_list",
    "expect_column_values_to_match_like_pattern", "expect_column_values_to_not_match_like_pattern",
    "expect_column_values_to_match_like_pattern_list", "expect_column_values_to_not_match_like_pattern_list",
    "expect_column_values_to_match_strftime_format", "expect_column_values_to_be_dateutil_parseable",
    "expect_column_values_to_be_json_parseable", "expect_column_values_to_match_json_schema",
    "expect_column_pair_values_a_to_be_greater_than_b", "expect_column_pair_values_to_be_equal",
    "expect_column_pair_values_to_be_in_set", "expect_multicolumn_sum_to_equal",
    "expect_select_column_values_to_be_unique_within_record",
})
COLUMN_KWARGS = ("column", "column_A", "column_B", "column_list")


@dataclass(frozen=True)
class SuiteGroups:
    """A suite's expectations (raw dicts), by how their outcome on the stage follows from its partitions'."""

    name: str
    dtype: list[dict]  # on the columns as stored, per partition
    per_partition: list[dict]  # row-level and schema: per partition, added up
    whole: list[dict]  # everything else: once, over the columns they name


def load_suite(suite_file: Path) -> dict:
    """The suite's JSON from `expectations/`, checked by GX (an `ExpectationSuite` builds from it)."""
    import great_expectations as gx

    try:
        raw = read_json(suite_file)
        gx.ExpectationSuite(name=raw["name"], expectations=copy.deepcopy(raw["expectations"]))
        return raw
    except FileNotFoundError:
        raise BadSource(f"expectation suite '{suite_file}' does not exist") from None
    except (KeyError, TypeError, ValueError) as err:
        raise BadSource(f"expectation suite '{suite_file}' is malformed: {err}") from err


def group_suite(raw: dict) -> SuiteGroups:
    expectations = raw["expectations"]
    return SuiteGroups(
        name=raw["name"],
        dtype=[e for e in expectations if e["type"] in DTYPE_EXPECTATIONS],
        per_partition=[e for e in expectations if e["type"] in ROW_EXPECTATIONS | SCHEMA_EXPECTATIONS],
        whole=[e for e in expectations
               if e["type"] not in DTYPE_EXPECTATIONS | ROW_EXPECTATIONS | SCHEMA_EXPECTATIONS],
    )


class _Gx:
    """An ephemeral GX context with one dataframe asset: validates a frame against a list of expectations."""

    _local = threading.local()  # one per thread: a context is not meant for concurrent use

    @classmethod
    def here(cls) -> _Gx:
        if not hasattr(cls._local, "gx"):
            cls._local.gx = cls()
        return cls._local.gx

    def __init__(self):
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # no network from a task
        import great_expectations as gx

        self.gx = gx
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = {"globally": False}
        asset = self.context.data_sources.add_pandas("lepton").add_dataframe_asset("stage")
        self.batch = asset.add_batch_definition_whole_dataframe("whole_stage")

    def run(self, suite_name: str, expectations: list[dict], frame, result_format: str):
        """A suite validation result, or None for no expectations."""
        if not expectations:
            return None
        name = f"{suite_name}.{uuid.uuid4().hex[:8]}"
        suite = self.context.suites.add(self.gx.ExpectationSuite(name=name, expectations=copy.deepcopy(expectations)))
        definition = self.context.validation_definitions.add(
            self.gx.ValidationDefinition(name=name, data=self.batch, suite=suite))
        results = self.context.validation_results_store
        kept = set(results.list_keys())
        try:
            return definition.run(batch_parameters={"dataframe": frame}, result_format=result_format)
        finally:  # the context is reused: what a run leaves (its suite, definition and stored result) would show
            self.context.validation_definitions.delete(name)  # in every later run's data docs and slow it down
            self.context.suites.delete(name)
            for key in set(results.list_keys()) - kept:
                results.remove_key(key)


def for_value_checks(frame):
    """`frame` with float32/float16 columns as float64 and small ints as int64 (exact), so GX's vectorised
    pandas paths apply; other columns are shared, not copied."""
    upcast = {name: np.float64 if dtype.kind == "f" else np.int64 for name, dtype in frame.dtypes.items()
              if isinstance(dtype, np.dtype) and ((dtype.kind == "f" and dtype.itemsize < 8)
                                                  or (dtype.kind in "iu" and dtype.itemsize < 8))}
    return frame.astype(upcast, copy=False) if upcast else frame


def _as_stored(frame, dtype_expectations: list[dict]):
    """What dtype expectations need: on a column with a numpy dtype GX checks only the dtype, so its zero-row
    head does; an object column's values are checked one by one, so then the whole frame."""
    named = [c for c in _named_columns(dtype_expectations) if c in frame.columns]
    return frame if any(frame[c].dtype == object for c in named) else frame.head(0)


def _combine(results: list, suite_name: str, meta: dict | None = None):
    """One suite result from several (the dtype, per-partition and whole-stage groups)."""
    from great_expectations.core.expectation_validation_result import ExpectationSuiteValidationResult

    present = [r for r in results if r is not None]
    outcomes = [o for r in present for o in r.results]
    passed = sum(bool(o.success) for o in outcomes)
    statistics = {"evaluated_expectations": len(outcomes), "successful_expectations": passed,
                  "unsuccessful_expectations": len(outcomes) - passed,
                  "success_percent": 100.0 * passed / len(outcomes) if outcomes else None}
    merged_meta = {**(present[0].meta if present else {}), **(meta or {})}
    merged_meta.pop("batch_parameters", None)  # it names the in-memory frame, nothing a reader can use
    return ExpectationSuiteValidationResult(success=passed == len(outcomes), results=outcomes, suite_name=suite_name,
                                            statistics=statistics, meta=merged_meta)


def check_frame(frame, groups: SuiteGroups, expectations_on_values: list[dict], result_format: str):
    """GX over one in-memory frame: dtype expectations as stored, `expectations_on_values` on upcast values."""
    gx = _Gx.here()
    frame = frame.reset_index(drop=True)  # failing rows are reported by position
    return _combine([gx.run(groups.name, groups.dtype, _as_stored(frame, groups.dtype), result_format),
                     gx.run(groups.name, expectations_on_values, for_value_checks(frame), result_format)],
                    groups.name)


def _add_up(partition_results: list, starts: list[int]):
    """Each per-partition expectation's outcome on the whole stage, from its outcome on every partition."""
    from great_expectations.core.expectation_validation_result import ExpectationValidationResult

    outcomes = []
    for same in zip(*(r.results for r in partition_results), strict=True):
        first = same[0]
        counted = all("unexpected_count" in (o.result or {}) and "element_count" in o.result for o in same)
        if not counted:  # schema, dtype, or an expectation that raised: the stage passes when every partition does
            worst = next((o for o in same if not o.success), first)
            outcomes.append(worst)
            continue
        result = _added_counts([o.result for o in same], starts)
        mostly = first.expectation_config.kwargs.get("mostly")
        success = all(o.success for o in same) if mostly is None else _mostly_met(result, mostly)
        outcomes.append(ExpectationValidationResult(success=success, expectation_config=first.expectation_config,
                                                    result=result, meta=first.meta,
                                                    exception_info=first.exception_info))
    return outcomes


def _mostly_met(result: dict, mostly: float) -> bool:
    """GX's `mostly` on added-up counts: the share of checked (non-missing) values that passed."""
    checked = result["element_count"] - result.get("missing_count", 0)
    return not checked or (checked - result["unexpected_count"]) / checked >= mostly


def _added_counts(results: list[dict], starts: list[int]) -> dict:
    """Element, missing and unexpected counts summed; percentages, samples and failing rows for the stage."""
    element = sum(r["element_count"] for r in results)
    unexpected = sum(r["unexpected_count"] for r in results)
    has_missing = "missing_count" in results[0]
    missing = sum(r.get("missing_count", 0) for r in results)
    checked = element - missing if has_missing else element
    added = {"element_count": element, "unexpected_count": unexpected,
             "unexpected_percent": 100.0 * unexpected / checked if checked else 0.0,
             "partial_unexpected_list": [v for r in results for v in r.get("partial_unexpected_list") or []][:20]}
    if has_missing:
        added.update(missing_count=missing, missing_percent=100.0 * missing / element if element else 0.0,
                     unexpected_percent_total=100.0 * unexpected / element if element else 0.0,
                     unexpected_percent_nonmissing=added["unexpected_percent"])
    if all("unexpected_index_list" in r for r in results):  # COMPLETE: failing rows, as stage row numbers
        added["unexpected_index_list"] = [start + int(i) for r, start in zip(results, starts, strict=True)
                                          for i in r["unexpected_index_list"]]
    return added


def _named_columns(expectations: list[dict]) -> list[str]:
    names: list[str] = []
    for expectation in expectations:
        for key in COLUMN_KWARGS:
            value = expectation["kwargs"].get(key)
            for name in ([value] if isinstance(value, str) else value or []):
                if name not in names:
                    names.append(name)
    return names


def _whole_stage_frame(parts: list[str], columns: list[str], rows: int):
    """Only the named columns of the whole stage (row counts need none: an index of the right length)."""
    import pandas as pd
    import pyarrow.parquet as pq

    present = [c for c in columns if c in pq.read_schema(parts[0]).names]  # a missing one fails its expectation
    if not present:
        return pd.DataFrame(index=pd.RangeIndex(rows))
    return pq.read_table(parts, columns=present).to_pandas()


def _failures(result) -> tuple[int, list[Failure]]:
    evaluated, failures = 0, []
    for outcome in result.results:
        evaluated += 1
        if not outcome.success:
            config = outcome.expectation_config
            failures.append(Failure(
                expectation=config.type,
                column=config.kwargs.get("column"),
                unexpected_count=outcome.result.get("unexpected_count"),
                sample=[_plain(v) for v in (outcome.result.get("partial_unexpected_list") or [])[:5]],
                rows=outcome.result.get("unexpected_index_list"),
            ))
    return evaluated, failures


def _plain(value):
    return value if isinstance(value, (int, str, bool)) else str(value)


def _publish(result, suite: dict, out: Path) -> None:
    """`result.json` and the HTML data docs site (the suite's page, the result's page) under `out`."""
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    from lepton_tasks.data.data_docs import SITE_VIEWS

    (out / RESULT_FILE).write_text(json.dumps(result.describe_dict(), indent=2, default=str))
    gx = _Gx.here()
    context = gx.context
    context.suites.add(gx.gx.ExpectationSuite(name=suite["name"], expectations=copy.deepcopy(suite["expectations"]),
                                              meta=suite.get("meta", {})))
    site = f"run-{uuid.uuid4().hex[:8]}"
    context.add_data_docs_site(site_name=site, site_config={
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(out / DOCS_DIR)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder", **SITE_VIEWS["site_index_builder"]},
        "site_section_builders": SITE_VIEWS["site_section_builders"],
    })
    key = ValidationResultIdentifier(expectation_suite_identifier=ExpectationSuiteIdentifier(name=result.suite_name),
                                     run_id=result.meta.get("run_id"), batch_identifier="stage")
    context.validation_results_store.set(key, result)
    try:
        context.build_data_docs(site_names=[site])
    finally:
        context.validation_results_store.remove_key(key)  # a later run in this process builds only its own
        context.suites.delete(suite["name"])
        context.delete_data_docs_site(site)


def validate(parts: list[str], suite_file: Path, stage_dir: Path, quarantine_max_fraction: float = 0.0,
             client=None) -> ValidationManifest:
    """Check the stage's Parquet parts against the suite, in memory or (with a Dask `client`) partition by
    partition; write result + data docs; quarantine failing rows where allowed; raise if the data cannot go on."""
    suite = load_suite(suite_file)
    groups = group_suite(suite)
    result_format = "COMPLETE" if quarantine_max_fraction > 0 else "SUMMARY"  # COMPLETE lists failing rows
    source = _InMemory(parts) if client is None else _Partitioned(parts, client)
    result = source.check(groups, result_format)
    rows = source.rows
    with atomic_dir(stage_dir) as tmp:
        _publish(result, suite, tmp)
        evaluated, failures = _failures(result)
        bad_rows = _quarantine(source, failures, quarantine_max_fraction, rows, tmp) if failures else None
    manifest = ValidationManifest(
        suite=groups.name, success=not failures, evaluated=evaluated, passed=evaluated - len(failures),
        failed=len(failures), failures=failures, result_path=str(Path(stage_dir) / RESULT_FILE),
        docs_index=str(Path(stage_dir) / DOCS_DIR / "index.html"), parts=list(parts), rows=rows,
        partitions=source.partitions,
    )
    if failures and bad_rows is None:
        listed = "\n  - ".join(str(f) for f in failures)
        raise ValidationFailed(
            f"suite '{groups.name}' failed {len(failures)} of {evaluated} expectations "
            f"(data docs: {manifest.docs_index}):\n  - {listed}"
        )
    if bad_rows is not None:
        manifest.parts = [str(Path(stage_dir) / CLEAN_DIR / name) for name in source.split_names]
        manifest.quarantined_rows, manifest.quarantine_path = bad_rows, str(Path(stage_dir) / QUARANTINE_DIR)
        log.warning("quarantined %d of %d rows (%s); the run goes on with the rest", bad_rows, rows,
                    manifest.quarantine_path)
    for failure in failures:
        failure.rows = None  # row lists stay in the files, not in XCom
    log.info("suite '%s': %d/%d expectations passed over %d rows in %d partition(s)", groups.name,
             manifest.passed, evaluated, rows, source.partitions)
    return manifest


class _InMemory:
    """The whole stage as one pandas frame."""

    partitions = 1

    def __init__(self, parts: list[str]):
        import pandas as pd

        self.frame = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
        self.rows = len(self.frame)
        self.split_names: list[str] = []

    def check(self, groups: SuiteGroups, result_format: str):
        return check_frame(self.frame, groups, groups.per_partition + groups.whole, result_format)

    def split(self, reasons: dict[int, list[str]], out: Path) -> None:
        self.split_names = [_split_rows(self.frame, 0, reasons, str(out), 0)]


class _Partitioned:
    """The stage as partitions of whole Parquet row groups (planned from the footers), each read and checked on a
    worker of the cluster: with pyarrow, as in memory, so neither the task, the scheduler nor the workers import
    dask.dataframe for it."""

    def __init__(self, parts: list[str], client):
        self.parts, self.client = parts, client
        self.plan = parquet_partitions(parts)
        self.partitions = len(self.plan)
        self.rows = sum(partition.rows for partition in self.plan)
        self.split_names = []

    def check(self, groups: SuiteGroups, result_format: str):
        from great_expectations.core.expectation_validation_result import ExpectationSuiteValidationResult

        checked = self.client.gather(self.client.map(_check_stored_partition, self.plan, groups=groups,
                                                     result_format=result_format, pure=False))
        added = _add_up(checked, [partition.start for partition in self.plan])
        per_partition = ExpectationSuiteValidationResult(success=all(o.success for o in added), results=added,
                                                         suite_name=groups.name, meta=checked[0].meta)
        whole_frame = _whole_stage_frame(self.parts, _named_columns(groups.whole), self.rows)
        whole = _Gx.here().run(groups.name, groups.whole, for_value_checks(whole_frame), result_format)
        return _combine([per_partition, whole], groups.name, {"lepton": {"partitions": self.partitions,
                                                                         "rows": self.rows}})

    def split(self, reasons: dict[int, list[str]], out: Path) -> None:
        futures = [self.client.submit(_split_stored_partition, partition, reasons, str(out), index, pure=False)
                   for index, partition in enumerate(self.plan)]
        self.split_names = list(self.client.gather(futures))


def _read_partition(partition: ParquetPartition):
    """A partition as a pandas frame numbered from 0, as `_InMemory` reads the whole stage."""
    return partition.read().to_pandas().reset_index(drop=True)


def _check_stored_partition(partition: ParquetPartition, groups: SuiteGroups, result_format: str):
    """One partition's suite result over the per-partition groups."""
    return check_frame(_read_partition(partition), groups, groups.per_partition, result_format)


def _split_stored_partition(partition: ParquetPartition, reasons: dict[int, list[str]], out: str, index: int) -> str:
    return _split_rows(_read_partition(partition), partition.start, reasons, out, index)


def _quarantine(source, failures: list[Failure], max_fraction: float, rows: int, out: Path) -> int | None:
    """Write failing rows (with reasons) and clean rows; the count of failing rows, or None when not allowed."""
    if max_fraction <= 0 or any(f.rows is None for f in failures):
        return None  # quarantine off, or a table-level failure (schema, row count): no row to blame
    reasons: dict[int, list[str]] = {}
    for failure in failures:
        for row in failure.rows:
            reasons.setdefault(int(row), []).append(f"{failure.expectation}({failure.column})")
    share = len(reasons) / max(1, rows)
    if share > max_fraction:
        failures.append(Failure(f"quarantine: {len(reasons)} failing rows are {share:.2%} of {rows}, over "
                                f"param 'quarantine_max_fraction'={max_fraction:.2%}", None, len(reasons)))
        return None
    source.split(reasons, out)
    return len(reasons)


def _split_rows(frame, start: int, reasons: dict[int, list[str]], out: str, index: int) -> str:
    """One partition's rows: failing ones (with reasons) to quarantine/, the rest to clean/; the part's name."""
    frame = frame.reset_index(drop=True)
    numbers = np.arange(start, start + len(frame))
    bad = np.isin(numbers, np.fromiter(reasons, dtype=np.int64, count=len(reasons)))
    quarantined = frame[bad].copy()
    quarantined[REASONS_COLUMN] = ["; ".join(reasons[int(n)]) for n in numbers[bad]]
    name = f"part-{index:05d}.parquet"
    for folder, rows in ((QUARANTINE_DIR, quarantined), (CLEAN_DIR, frame[~bad])):
        path = Path(out) / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        rows.to_parquet(path, index=False)
    store.put(*(Path(out) / folder / name for folder in (QUARANTINE_DIR, CLEAN_DIR)))  # this worker may share no disk
    return name
