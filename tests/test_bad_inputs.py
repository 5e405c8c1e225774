"""A corpus of malformed inputs, each run through the real stages: a clear error in the right stage naming the
file, column or param, a failed summary without a bare traceback, and nothing registered."""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from lepton_tasks.config.specs import parse_spec
from lepton_tasks.core.storage import read_json
from lepton_tasks.orchestration import pipeline
from tests.conftest import MNIST_SPEC, mnist_frame

# the MNIST-1D pipeline, reading any format (its bundled spec reads Parquet only)
SPEC = parse_spec(MNIST_SPEC.path.read_text().replace("format: parquet", "format: null"), MNIST_SPEC.path)


def _frame() -> pd.DataFrame:
    return mnist_frame(300, seed=3)


def _csv(landing: Path, name: str, text: str | bytes) -> str:
    path = landing / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def _good_csv_text() -> str:
    return _frame().to_csv(index=False)


def _parquet(landing: Path, frame: pd.DataFrame, name: str = "data.parquet") -> str:
    frame.to_parquet(landing / name, index=False)
    return str(landing / name)


def truncated_parquet(d):
    path = Path(_parquet(d, _frame()))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return str(path)


def wrong_magic_bytes(d):
    return _csv(d, "data.parquet", _good_csv_text())


def ragged_rows(d):
    lines = _good_csv_text().splitlines()
    lines[5] = ",".join(lines[5].split(",")[:-3])
    return _csv(d, "data.csv", "\n".join(lines) + "\n")


def wrong_delimiter(d):
    return _csv(d, "data.csv", _frame().to_csv(index=False, sep=";"))


def mixed_types_in_a_column(d):
    frame = _frame().astype({"x_07": object})
    frame.loc[120, "x_07"] = "abc"
    return _csv(d, "data.csv", frame.to_csv(index=False))


def all_null_column(d):
    return _csv(d, "data.csv", _frame().assign(x_03=None).to_csv(index=False))


def duplicate_column_names(d):
    text = _good_csv_text()
    header, rest = text.split("\n", 1)
    return _csv(d, "data.csv", header.replace("x_01", "x_00", 1) + "\n" + rest)


def inf_values(d):
    frame = _frame()
    frame.loc[10, "x_12"] = float("inf")
    return _parquet(d, frame)


def nan_values(d):
    frame = _frame()
    frame.loc[11, "x_13"] = float("nan")
    return _parquet(d, frame)


def out_of_range_values(d):
    frame = _frame()
    frame.loc[12, "x_14"] = 1e6
    return _parquet(d, frame)


def zero_row_file(d):
    return _csv(d, "data.csv", _good_csv_text().split("\n", 1)[0] + "\n")


def one_row_file(d):
    return _parquet(d, _frame().head(1))


def label_never_seen(d):
    frame = _frame()
    frame.loc[5, "label"] = 11
    return _parquet(d, frame)


def huge_single_cell(d):
    text = _good_csv_text()
    header, first, rest = text.split("\n", 2)
    return _csv(d, "data.csv", f"{header}\n{first.rsplit(',', 1)[0]},{'9' * (3 << 20)}\n{rest}")


def non_utf8_text(d):
    return _csv(d, "data.csv", _good_csv_text().encode().replace(b",3\n", b",caf\xe9\n", 1))  # a Latin-1 label


def empty_file(d):
    return _csv(d, "data.csv", b"")


def missing_source(d):
    return str(d / "nowhere.parquet")


def unknown_placeholder(d):
    return "landing/{date}/*.csv"


def yesterday_never_landed(d):
    """A source templated on the date, two-day window: today's partition is there, yesterday's is not."""
    import datetime as dt

    today = d / dt.date.today().isoformat()
    today.mkdir()
    _parquet(today, _frame())
    return str(d / "{ds}" / "*.parquet")


def path_escaping_the_data_root(d):
    return "../../../etc"


def symlink_loop(d):
    os.symlink(d / "loop-b", d / "loop-a")
    os.symlink(d / "loop-a", d / "loop-b")
    return str(d / "loop-a")


def schema_differs_between_files(d):
    _parquet(d, _frame(), "a.parquet")
    _parquet(d, _frame().rename(columns={"x_00": "signal_0"}), "b.parquet")
    return str(d)


def renamed_column(d):
    return _parquet(d, _frame().rename(columns={"label": "digit"}))


def corrupt_gzip_csv(d):
    good = gzip.compress(_good_csv_text().encode())
    return _csv(d, "data.csv.gz", good[: len(good) // 3])


def malformed_json_lines(d):
    return _csv(d, "data.jsonl", '{"x_00": 1.0, "label": 3}\n{"x_00": 2.0, "label": \n')


def no_data_files_at_all(d):
    _csv(d, "README.txt", "nothing to see")
    return str(d)


def glob_matching_nothing(d):
    _csv(d, "sales-2026-01.txt", "not a match")
    return str(d / "sales-*.csv")


def string_for_a_number_param(d):
    return _parquet(d, _frame())


CASES = [  # (builder, extra params, failing stage, what the message must say)
    (truncated_parquet, {}, "ingest", r"cannot read '.*data.parquet' as parquet"),
    (wrong_magic_bytes, {}, "ingest", r"cannot read '.*data.parquet' as parquet.*magic"),
    (ragged_rows, {}, "ingest", r"cannot read '.*data.csv' as csv: .*Expected 41 columns, got 38"),
    (wrong_delimiter, {}, "ingest", r"data.csv' lacks column\(s\) .*looks delimited by ';'"),
    (mixed_types_in_a_column, {}, "ingest", r"column 'x_07' of source file '.*data.csv' is numeric .* 'abc'"),
    (all_null_column, {}, "validate", r"expect_column_values_to_not_be_null on column 'x_03'"),
    (duplicate_column_names, {}, "ingest", r"data.csv' has duplicate column names \['x_00'\]"),
    (inf_values, {}, "validate", r"expect_column_values_to_be_between on column 'x_12'"),
    (nan_values, {}, "validate", r"expect_column_values_to_not_be_null on column 'x_13'"),
    (out_of_range_values, {}, "validate", r"expect_column_values_to_be_between on column 'x_14'.*1000000"),
    (zero_row_file, {}, "ingest", r"data.csv' holds no data rows"),
    (one_row_file, {}, "validate", r"expect_table_row_count_to_be_between"),
    (label_never_seen, {}, "validate", r"expect_column_values_to_be_in_set on column 'label'.*11"),
    (huge_single_cell, {}, "ingest", r"cannot read '.*data.csv' as csv: .*straddl"),
    (non_utf8_text, {}, "ingest", r"column 'label' of source file '.*data.csv' is not valid UTF-8 text"),
    (empty_file, {}, "ingest", r"data.csv' is empty \(0 bytes\)"),
    (missing_source, {}, "ingest", r"nowhere.parquet' does not exist"),
    (path_escaping_the_data_root, {}, "ingest", r"param 'source_uri' \('../../../etc'\) .* outside the data root"),
    (symlink_loop, {}, "ingest", r"loop-a' is a symlink that loops or points nowhere"),
    (schema_differs_between_files, {}, "ingest", r"b.parquet' has schema .*unlike the first file's"),
    (renamed_column, {}, "ingest", r"data.parquet' lacks column\(s\) \['label'\]"),
    (corrupt_gzip_csv, {}, "ingest", r"cannot read '.*data.csv.gz' as csv"),
    (malformed_json_lines, {}, "ingest", r"cannot read '.*data.jsonl' as jsonl"),
    (no_data_files_at_all, {}, "ingest", r"holds no CSV, Parquet or JSON-lines file"),
    (glob_matching_nothing, {}, "ingest", r"no file matches '.*landing/sales-\*\.csv'"),
    (unknown_placeholder, {}, "params", r"param 'source_uri': .*unknown placeholder\(s\) \['date'\]"),
    (yesterday_never_landed, {"window_days": 2}, "wait",
     r"no data for 1 day\(s\) of the window ending .*\d{4}-\d{2}-\d{2} \(.*/\d{4}-\d{2}-\d{2}/\*\.parquet\)"),
    (string_for_a_number_param, {"num_shards": "four"}, "params", r"param 'num_shards': Input should be a valid"),
    (string_for_a_number_param, {"eval_fraction": 1.5}, "params", r"param 'eval_fraction': Input should be less"),
]


FAST = {"num_shards": 2, "merge_rounds": 1, "local_epochs": 1, "hidden_size": 8, "model_kind": "mlp"}


def _run_until_failure(data_root: Path, source: str, extra: dict) -> tuple[str, str, dict]:
    """Run every stage, register included, in order as the DAG does; return (failed stage, message, summary)."""
    try:
        ctx = pipeline.context(SPEC, "bad-input", {"source_uri": source, **FAST, **extra})
    except Exception as err:  # the params are refused before any stage (Airflow refuses them at trigger)
        return "params", str(err), {}
    try:
        pipeline.run_in_process(ctx, last="register")
    except Exception:
        report = pipeline.report(ctx)
        failed = report["failed_stage"]
        return failed, report["stages"][failed]["error"], report["stages"][failed]
    raise AssertionError(f"{source} went through every stage, register included, without an error")


def _registered(tracking_uri: str) -> list:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri).search_model_versions()


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> str:
    """One real MLflow store for the corpus (migrated once): every case must leave it without a model."""
    store = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    assert _registered(store) == []
    return store


@pytest.mark.parametrize("build, extra, stage, message", CASES, ids=[f"{c[0].__name__}-{i}" for i, c in
                                                                     enumerate(CASES)])
def test_each_malformed_input_fails_clearly_in_its_stage_and_registers_nothing(data_root, build, extra, stage,
                                                                               message, mlflow_store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)  # where register would write
    landing = data_root / "landing"
    landing.mkdir()
    source = build(landing)
    failed, error, summary = _run_until_failure(data_root, source, extra)
    assert failed == stage and re.search(message, error, re.S), error
    assert "traceback" not in summary  # a named, expected failure, not a crash
    if stage != "params":
        assert summary["status"] == "failed"
        report = read_json(data_root / "lepton_mnist1d" / "bad-input" / "report.json")
        assert report["mlflow"] == {} and report["stages"]["register"]["status"] == "not_run"
    assert _registered(mlflow_store) == []  # the run went for register and got nowhere near it


def test_the_corpus_is_at_least_twenty_distinct_inputs():
    assert len({build.__name__ for build, *_ in CASES}) >= 20
