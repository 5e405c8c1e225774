import numpy as np
import pytest

from lepton_tasks.errors import ValidationFailed
from lepton_tasks.validate import validate
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

    from lepton_tasks.validate import REASONS_COLUMN

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
