import pandas as pd
import pytest

from lepton_tasks.core.errors import BadSource
from lepton_tasks.stages.ingest import ingest
from tests.conftest import mnist_frame


def test_parquet_and_csv_ingest_to_the_same_rows(tmp_path, mnist_parquet):
    csv = tmp_path / "landing_csv" / "data.csv"
    csv.parent.mkdir()
    pd.read_parquet(mnist_parquet).to_csv(csv, index=False)
    from_parquet = ingest(str(mnist_parquet), tmp_path, tmp_path / "run1" / "ingest")
    from_csv = ingest(str(csv.parent), tmp_path, tmp_path / "run2" / "ingest")
    assert from_parquet.rows == from_csv.rows == 600
    assert from_parquet.columns["label"] == "int64" and len(from_parquet.columns) == 41
    assert len(from_parquet.sha256) == 64 and from_parquet.parts[0].endswith("part-00000.parquet")


def test_relative_source_is_read_under_the_data_root_and_globs_work(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    for i in range(3):
        mnist_frame(100, seed=i).to_parquet(landing / f"day-{i}.parquet", index=False)
    manifest = ingest("landing/day-*.parquet", tmp_path, tmp_path / "run" / "ingest")
    assert manifest.rows == 300 and len(manifest.parts) == 3


def _missing(d):
    return d / "missing.parquet"


def _empty(d):
    (d / "empty.csv").write_bytes(b"")
    return d / "empty.csv"


def _corrupt(d):
    (d / "bad.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    return d / "bad.parquet"


def _no_data_files(d):
    (d / "notes.txt").write_text("hi")
    return d


@pytest.mark.parametrize("make_source, message", [
    (_missing, "missing.parquet' does not exist"),
    (_empty, "empty.csv' is empty"),
    (_corrupt, "cannot read '.*bad.parquet' as parquet"),
    (_no_data_files, "holds no CSV, Parquet or JSON-lines file"),
])
def test_unreadable_sources_fail_naming_the_file(tmp_path, make_source, message):
    source = make_source(tmp_path)
    with pytest.raises(BadSource, match=message):
        ingest(str(source), tmp_path, tmp_path / "run" / "ingest")
    assert not (tmp_path / "run" / "ingest").exists()  # nothing half written


def test_files_with_different_schemas_are_refused(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    mnist_frame(50).to_parquet(landing / "a.parquet", index=False)
    mnist_frame(50).rename(columns={"x_00": "x_zero"}).to_parquet(landing / "b.parquet", index=False)
    with pytest.raises(BadSource, match="b.parquet"):
        ingest(str(landing), tmp_path, tmp_path / "run" / "ingest")
