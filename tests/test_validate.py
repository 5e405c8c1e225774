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
