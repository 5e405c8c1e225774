"""The champion snapshot a run takes once and every retry reads back."""

import json

from lepton_tasks.champion import SNAPSHOT, snapshot

SAVED = {"model_name": "m", "version": "3", "mlflow_run_id": "r", "weights": "w", "encoder": "e",
         "params": {"hidden_size": "16"}, "profile": None}


def test_a_retry_reads_the_snapshot_its_run_took_without_asking_the_registry(tmp_path):
    (tmp_path / SNAPSHOT).write_text(json.dumps({"champion": SAVED, "unusable": None}))
    found = snapshot("http://127.0.0.1:9", "m", tmp_path)  # nothing listens there: the registry is not asked
    assert found.champion.version == "3" and found.unusable is None and found.note == "champion version 3"


def test_no_usable_champion_is_read_back_with_its_reason(tmp_path):
    (tmp_path / SNAPSHOT).write_text(json.dumps({"champion": None, "unusable": "its files are gone"}))
    found = snapshot("http://127.0.0.1:9", "m", tmp_path)
    assert found.champion is None and found.note == "no usable champion: its files are gone"


def test_a_snapshot_written_before_unusable_champions_were_recorded_still_reads(tmp_path):
    (tmp_path / SNAPSHOT).write_text(json.dumps(SAVED))
    assert snapshot("http://127.0.0.1:9", "m", tmp_path).champion.mlflow_run_id == "r"
