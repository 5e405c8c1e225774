import pytest

from lepton_tasks.core.storage import RunPaths, atomic_dir, safe_name, sha256_files, write_json


def test_run_ids_become_safe_folder_names(tmp_path):
    assert safe_name("scheduled__2026-11-22T02:00:00+00:00") == "scheduled__2026-11-22T02-00-00-00-00"
    paths = RunPaths.of(tmp_path, "dag", "manual__x:y")
    assert paths.stage("ingest") == tmp_path / "dag" / "manual__x-y" / "ingest"


def test_atomic_dir_keeps_the_old_output_when_the_block_fails(tmp_path):
    final = tmp_path / "stage"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("half written")
        raise RuntimeError("boom")
    assert (final / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["stage"]  # no temp left behind


def test_atomic_dir_replaces_on_retry_and_checksums_follow_content(tmp_path):
    final = tmp_path / "stage"
    for text in ("one", "two"):
        with atomic_dir(final) as tmp:
            write_json(tmp / "x.json", {"v": text})
    assert "two" in (final / "x.json").read_text()
    assert sha256_files([final / "x.json"]) != sha256_files([write_json(tmp_path / "y.json", {"v": "one"})])
