"""The champion snapshot a run takes once and every retry reads back."""

import json

from lepton_tasks.ml.champion import SNAPSHOT, snapshot

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


def test_a_champion_fits_a_warm_start_only_with_the_same_columns_classes_and_model(tmp_path):
    """`unfit_reason` decides the warm start: the champion's own encoder and run params against this run's."""
    from lepton_tasks.config.settings import RunParams
    from lepton_tasks.ml.champion import ChampionSnapshot
    from tests.conftest import MNIST_SPEC, encoder_for, mnist_frame

    encoder = tmp_path / "encoder.json"
    encoder.write_text(json.dumps(encoder_for(mnist_frame(200)).to_dict()))
    champion = ChampionSnapshot(**{**SAVED, "encoder": str(encoder), "params": {"model_kind": "mlp",
                                                                                "hidden_size": "64"}})
    spec, params = MNIST_SPEC.spec, RunParams(source_uri="x", hidden_size=64)
    assert champion.unfit_reason(spec, params) is None
    assert "has hidden_size 64, this run 32" in champion.unfit_reason(
        spec, params.model_copy(update={"hidden_size": 32}))
    assert "is a mlp model, this run trains cnn" in champion.unfit_reason(
        spec, params.model_copy(update={"model_kind": "cnn"}))
    own = spec.model_copy(update={"training": spec.training.model_copy(
        update={"model": "tests.own_models:Linear", "model_kwargs": {"bias": False}})})
    assert "this run trains tests.own_models:Linear" in champion.unfit_reason(own, params)
    own_champion = ChampionSnapshot(**{**SAVED, "encoder": str(encoder), "params": {
        "model_kind": "mlp", "hidden_size": "64", "model_class": "tests.own_models:Linear",
        "model_kwargs": '{"bias": false}'}})
    assert own_champion.unfit_reason(own, params) is None
    other_kwargs = own.model_copy(update={"training": own.training.model_copy(update={"model_kwargs": {}})})
    assert 'has model_kwargs {"bias": false}, this run {}' in own_champion.unfit_reason(other_kwargs, params)
    fewer = spec.model_copy(update={"features": dict(list(spec.features.items())[:-1])})
    assert "trained on other columns" in champion.unfit_reason(fewer, params)
