import json

import numpy as np
import pytest

from lepton_tasks.core.errors import ValidationFailed
from lepton_tasks.stages.validate import validate
from tests.conftest import MNIST_SPEC, mnist_frame


def _write(tmp_path, frame):
    path = tmp_path / "part-00000.parquet"
    frame.to_parquet(path, index=False)
    return [str(path)]


def test_clean_data_passes_and_writes_result_and_data_docs(tmp_path):
    manifest = validate(_write(tmp_path, mnist_frame(200)), MNIST_SPEC.spec.suite_file, tmp_path / "validate")
    assert manifest.success and manifest.failed == 0 and manifest.passed == manifest.evaluated > 100
    assert (tmp_path / "validate" / "result.json").exists()
    assert "<html" in (tmp_path / "validate" / "docs" / "index.html").read_text().lower()


def _nan(f):
    f.loc[3, "x_05"] = np.nan
    return f


def _out_of_range(f):
    f.loc[0, "x_07"] = 1e6
    return f


def _unknown_label(f):
    f.loc[1, "label"] = 11
    return f


def _inf(f):
    f.loc[2, "x_00"] = np.inf
    return f


@pytest.mark.parametrize("corrupt, expectation, column", [
    (_nan, "expect_column_values_to_not_be_null", "x_05"),
    (_out_of_range, "expect_column_values_to_be_between", "x_07"),
    (_unknown_label, "expect_column_values_to_be_in_set", "label"),
    (_inf, "expect_column_values_to_be_between", "x_00"),
    (lambda f: f.drop(columns=["x_39"]), "expect_table_columns_to_match_ordered_list", None),
    (lambda f: f.astype({"x_01": str}), "expect_column_values_to_be_in_type_list", "x_01"),
    (lambda f: f.head(0), "expect_table_row_count_to_be_between", None),
])
def test_bad_data_fails_naming_expectation_and_column(tmp_path, corrupt, expectation, column):
    with pytest.raises(ValidationFailed, match=expectation) as err:
        validate(_write(tmp_path, corrupt(mnist_frame(200))), MNIST_SPEC.spec.suite_file, tmp_path / "validate")
    if column:
        assert f"column '{column}'" in str(err.value)
    assert (tmp_path / "validate" / "docs" / "index.html").exists()  # the docs show what failed


def _with_bad_rows(rows: int, bad: int):
    frame = mnist_frame(rows)
    frame.loc[: bad // 2 - 1, "x_01"] = np.nan  # not null fails
    frame.loc[bad // 2: bad - 1, "x_02"] = 99.0  # out of range
    return frame


def test_failing_rows_under_the_threshold_are_quarantined_with_reasons_and_the_rest_goes_on(tmp_path):
    import pandas as pd

    from lepton_tasks.stages.validate import REASONS_COLUMN

    manifest = validate(_write(tmp_path, _with_bad_rows(300, 6)), MNIST_SPEC.spec.suite_file, tmp_path / "v", 0.05)
    assert manifest.quarantined_rows == 6 and manifest.failed == 2 and not manifest.success
    quarantined = pd.read_parquet(manifest.quarantine_path)
    assert len(quarantined) == 6 and quarantined[REASONS_COLUMN].str.contains("x_01|x_02").all()
    assert "expect_column_values_to_not_be_null(x_01)" in quarantined[REASONS_COLUMN].iloc[0]
    clean = pd.concat(pd.read_parquet(p) for p in manifest.parts)
    assert len(clean) == 294 and clean["x_01"].notna().all() and (clean["x_02"] < 99).all()
    assert all(f.rows is None for f in manifest.failures)  # row lists stay out of XCom


def test_too_many_failing_rows_or_a_table_level_failure_still_stops_the_run(tmp_path):
    with pytest.raises(ValidationFailed, match="over param 'quarantine_max_fraction'=5.00%"):
        validate(_write(tmp_path, _with_bad_rows(300, 30)), MNIST_SPEC.spec.suite_file, tmp_path / "a", 0.05)
    renamed = mnist_frame(300).rename(columns={"x_05": "x_five"})
    with pytest.raises(ValidationFailed, match="expect_table_columns_to_match_ordered_list"):
        validate(_write(tmp_path, renamed), MNIST_SPEC.spec.suite_file, tmp_path / "b", 0.05)
    assert not (tmp_path / "a" / "quarantine").exists()


def _write_parts(tmp_path, frame, count: int) -> list[str]:
    folder = tmp_path / "stage"
    folder.mkdir(parents=True)
    paths = []
    for index, rows in enumerate(np.array_split(np.arange(len(frame)), count)):
        paths.append(str(folder / f"part-{index:05d}.parquet"))
        frame.iloc[rows].to_parquet(paths[-1], index=False)
    return paths


def _outcome(run) -> tuple:
    """What a validation concluded, comparable across the two ways of running it; and its manifest."""
    try:
        manifest = run()
    except ValidationFailed as err:
        return ("failed", str(err).split(":\n", 1)[1]), None
    return ("passed", manifest.evaluated, [str(f) for f in manifest.failures], manifest.quarantined_rows), manifest


def test_partition_by_partition_on_dask_concludes_what_one_frame_does(tmp_path, dask_client):
    import pandas as pd

    frame = mnist_frame(900)
    frame.loc[[5, 450], "x_01"] = np.nan  # failing rows in the first and the second of three partitions
    frame.loc[899, "x_02"] = 99.0  # and in the last
    parts = _write_parts(tmp_path, frame, 3)
    suite = MNIST_SPEC.spec.suite_file
    in_memory, _ = _outcome(lambda: validate(parts, suite, tmp_path / "one", 0.05))
    partitioned, many = _outcome(lambda: validate(parts, suite, tmp_path / "many", 0.05, client=dask_client))
    assert partitioned == in_memory
    assert "expect_column_values_to_not_be_null on column 'x_01': 2 unexpected" in str(partitioned)
    assert many.partitions == 3 and len(many.parts) == 3 and many.quarantined_rows == 3
    held = pd.read_parquet(many.quarantine_path)
    assert sorted(held["x_01"].isna().tolist()) == [False, True, True]  # the same three rows, wherever they were
    assert sum(len(pd.read_parquet(p)) for p in many.parts) == 897


def _suite_with(tmp_path, *extra: dict, base: bool = True) -> str:
    """The MNIST-1D suite (or an empty one) plus `extra` expectations, as a file."""
    import json

    raw = json.loads(MNIST_SPEC.spec.suite_file.read_text()) if base else {"name": "extra", "expectations": []}
    raw["expectations"] += list(extra)
    path = tmp_path / "suite.json"
    path.write_text(json.dumps(raw))
    return str(path)


def test_whole_stage_expectations_see_every_row_when_partitioned(tmp_path, dask_client):
    """Row counts, means and uniqueness do not add up over partitions: they run once over the stage."""
    frame = mnist_frame(900)
    frame["row_id"] = np.arange(900)
    suite = _suite_with(
        tmp_path,
        {"type": "expect_table_row_count_to_be_between", "kwargs": {"min_value": 900, "max_value": 900}},
        {"type": "expect_column_values_to_be_unique", "kwargs": {"column": "row_id"}},
        {"type": "expect_column_mean_to_be_between", "kwargs": {"column": "row_id", "min_value": 449,
                                                                "max_value": 450}},
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "row_id", "min_value": 0}},
        base=False,
    )
    manifest = validate(_write_parts(tmp_path / "a", frame, 3), suite, tmp_path / "v", client=dask_client)
    assert manifest.success and manifest.partitions == 3 and manifest.rows == 900 and manifest.evaluated == 4
    frame.loc[899, "row_id"] = 0  # a duplicate across partitions: no single partition sees it
    with pytest.raises(ValidationFailed, match="expect_column_values_to_be_unique on column 'row_id'"):
        validate(_write_parts(tmp_path / "b", frame, 3), suite, tmp_path / "w", client=dask_client)


def test_dtype_expectations_see_columns_as_stored_though_values_are_checked_upcast(tmp_path):
    """float32 columns are checked as float64 for speed (GX's vectorised path); their dtype is still float32."""
    as_stored = {"type": "expect_column_values_to_be_in_type_list", "kwargs": {"column": "x_00",
                                                                               "type_list": ["float32"]}}
    between = {"type": "expect_column_values_to_be_between", "kwargs": {"column": "x_00", "min_value": -10}}
    parts = _write(tmp_path, mnist_frame(200))
    assert validate(parts, _suite_with(tmp_path, as_stored, between, base=False), tmp_path / "a").success
    as_stored["kwargs"]["type_list"] = ["float64"]
    with pytest.raises(ValidationFailed, match="expect_column_values_to_be_in_type_list on column 'x_00'"):
        validate(parts, _suite_with(tmp_path, as_stored, between, base=False), tmp_path / "b")


def test_a_stage_over_the_memory_budget_is_validated_on_dask(data_root, monkeypatch):
    """The pipeline picks the way by the stage's decoded size (Parquet footers), against the setting."""
    from lepton_tasks.orchestration import pipeline

    landing = data_root / "landing" / "m"
    _write_parts(landing.parent, mnist_frame(600), 2)
    (landing.parent / "stage").rename(landing)
    monkeypatch.setenv("LEPTON_VALIDATE_MEMORY_BYTES", "1000")
    monkeypatch.setenv("LEPTON_DASK_WORKERS", "1")
    ctx = pipeline.context(MNIST_SPEC, "big", {"source_uri": "landing/m/"})
    validated = pipeline.validate(ctx, pipeline.ingest(ctx), lambda: None)  # no run cluster: one of its own
    summary = json.loads(ctx.summary_path("validate").read_text())
    assert validated.partitions == 2 and summary["partitions"] == 2 and validated.failed == 0


def _pages(docs):
    """Every HTML page of a data docs site, its run-specific names and times blanked."""
    import re

    blank = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{0,12}|run-[0-9a-f]{8}"
                       r"|\d{8}T\d{6}\.\d{6}Z|\d{4}-\d\d-\d\d[T ][\d:.+]+( UTC)?|'_run_time_sort': [\d.]+")
    return sorted(blank.sub("#", page.read_text()) for page in docs.rglob("*.html"))


def test_data_docs_views_compile_templates_once_and_render_what_gx_renders(tmp_path, monkeypatch):
    import tempfile

    from lepton_tasks.data import data_docs

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the cache's folder, under the temp dir
    data_docs._bytecode_cache.cache_clear()
    parts = _write(tmp_path, mnist_frame(200))
    validate(parts, MNIST_SPEC.spec.suite_file, tmp_path / "cached")
    data_docs._bytecode_cache.cache_clear()  # later tests: the machine's folder again
    compiled = list((tmp_path / "tmp").rglob("__jinja2_*.cache"))
    assert len(compiled) >= 20  # GX's page, section and component templates, compiled once for the machine
    monkeypatch.setattr(data_docs, "SITE_VIEWS", {"site_index_builder": {}, "site_section_builders": {}})
    validate(parts, MNIST_SPEC.spec.suite_file, tmp_path / "gx_own")
    assert _pages(tmp_path / "cached" / "docs") == _pages(tmp_path / "gx_own" / "docs")


def test_data_docs_show_this_validation_only_however_many_ran_before_in_the_process(tmp_path):
    """The suite's groups are validated as suites of their own in one reused GX context: neither their results
    nor an earlier validation's may reach this stage's data docs."""
    parts = _write(tmp_path, mnist_frame(200))
    for run in ("first", "second"):
        validate(parts, MNIST_SPEC.spec.suite_file, tmp_path / run)
        pages = list((tmp_path / run / "docs" / "validations").rglob("*.html"))
        assert len(pages) == 1 and pages[0].name == "stage.html", pages


def test_data_docs_are_built_without_a_template_cache_where_its_folder_cannot_be_made(tmp_path, monkeypatch):
    """A temp folder that is gone (or not writable, or not this user's): no cache, and the docs are still built."""
    import tempfile

    from lepton_tasks.data import data_docs

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))
    data_docs._bytecode_cache.cache_clear()
    try:
        assert data_docs._bytecode_cache() is None
        manifest = validate(_write(tmp_path, mnist_frame(200)), MNIST_SPEC.spec.suite_file, tmp_path / "validate")
    finally:
        data_docs._bytecode_cache.cache_clear()
    assert manifest.success and list((tmp_path / "validate" / "docs" / "validations").rglob("*.html"))
