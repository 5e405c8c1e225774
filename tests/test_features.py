"""Feature encoding (fills, scaling, one-hot), regression training and metrics, on the house-prices example."""

import numpy as np
import pandas as pd
import pytest

from lepton_tasks.config.specs import parse_spec
from lepton_tasks.core.errors import ShardError
from lepton_tasks.ml.features import MISSING, fit, merge_stats, partition_stats
from lepton_tasks.ml.metrics import at_least_as_good, evaluate, worsening
from lepton_tasks.tools.demo_data import make_house_prices
from tests.conftest import HOUSE_SPEC, MNIST_SPEC, encoder_for, mnist_frame


def test_statistics_merged_over_partitions_equal_the_whole_frames():
    frame = make_house_prices(900, seed=3)
    spec = HOUSE_SPEC.spec
    whole = fit(spec, partition_stats(frame, spec))
    pieces = fit(spec, merge_stats([partition_stats(frame.iloc[i:i + 300], spec) for i in (0, 300, 600)]))
    for a, b in zip(whole.columns, pieces.columns, strict=True):
        assert a.categories == b.categories and a.fill == b.fill
        assert a.mean == pytest.approx(b.mean) and a.std == pytest.approx(b.std)
    assert whole.target_mean == pytest.approx(frame["price_k"].mean())


def test_numeric_columns_are_filled_and_standardised_categoricals_one_hot():
    frame = make_house_prices(2000, seed=4)
    encoder = encoder_for(frame, HOUSE_SPEC)
    x = encoder.encode_features(frame)
    assert x.dtype == np.float32 and not np.isnan(x).any() and x.shape == (2000, encoder.width)
    names = encoder.output_names
    area = x[:, names.index("area_m2")]
    assert abs(area.mean()) < 1e-3 and abs(area.std() - 1) < 1e-2
    hoods = [i for i, n in enumerate(names) if n.startswith("neighbourhood=")]
    assert len(hoods) == 10 and (x[:, hoods].sum(1) == 1).all()  # exactly one neighbourhood per row
    assert f"energy_label={MISSING}" in names  # nulls are a category of their own by default
    unseen = frame.head(1).assign(neighbourhood="atlantis")
    assert encoder.encode_features(unseen)[0, hoods].sum() == 0  # unknown category: all zeros, no error


def test_rare_categories_share_an_other_column_and_constant_fills_apply(tmp_path):
    text = HOUSE_SPEC.path.read_text().replace("one_hot_max_categories: 20",
                                                "one_hot_max_categories: 3\n  fill_values: {year_built: 1900}")
    spec = parse_spec(text, tmp_path / "houses.yaml").spec
    frame = make_house_prices(1000, seed=5)
    encoder = fit(spec, partition_stats(frame, spec))
    hood = next(c for c in encoder.columns if c.name == "neighbourhood")
    assert len(hood.categories) == 3 and hood.other and "neighbourhood=__other__" in encoder.output_names
    assert next(c for c in encoder.columns if c.name == "year_built").fill == 1900


def test_a_label_outside_the_specs_classes_is_refused_naming_it():
    frame = mnist_frame(50)
    frame.loc[3, "label"] = 42
    with pytest.raises(ShardError, match=r"\['42'\] in column 'label'"):
        encoder_for(frame, MNIST_SPEC)


def test_regression_metrics_and_which_way_is_better():
    truth = np.array([1.0, 2.0, 3.0, 4.0])
    perfect = evaluate("regression", truth.copy(), truth)
    assert perfect["r2"] == 1.0 and perfect["mae"] == 0.0
    off = evaluate("regression", truth + 1, truth)
    assert off["mae"] == pytest.approx(1.0) and off["rmse"] == pytest.approx(1.0) and off["r2"] < 1
    assert worsening("mae", 1.0, 1.5) == pytest.approx(0.5) and worsening("r2", 0.9, 0.8) == pytest.approx(0.1)
    assert at_least_as_good("mae", 0.9, 1.0) and not at_least_as_good("accuracy", 0.8, 0.9)
    assert evaluate("classification", np.eye(3), np.array([0, 1, 1]))["accuracy"] == pytest.approx(2 / 3)


def test_a_regression_shard_learns_in_the_targets_units(tmp_path):
    from lepton_tasks.core.storage import sha256_files
    from lepton_tasks.ml.models import init_weights, save_checkpoint
    from lepton_tasks.ml.tensors import load_xy, model_shape
    from lepton_tasks.stages.train import ShardJob, train_shard

    frame = make_house_prices(1500, seed=6)
    path = tmp_path / "shard.parquet"
    frame.to_parquet(path, index=False)
    encoder = encoder_for(frame, HOUSE_SPEC)
    shape = model_shape(encoder, "mlp", 32)
    start = tmp_path / "init.safetensors"
    sha = save_checkpoint(start, init_weights(shape, 0), {})
    job = ShardJob("shard-000", 1, [str(path)], len(frame), encoder.to_dict(), shape,
                   {"path": str(start), "sha256": sha}, str(tmp_path / "out.safetensors"), 15, 0.01, 64, 1, "d",
                   sha256_files([path]))
    result = train_shard(job)
    assert result["epochs"][-1]["loss"] < result["epochs"][0]["loss"]

    from lepton_tasks.ml.models import evaluate as score
    from lepton_tasks.ml.models import load_checkpoint, load_model

    x, y = load_xy([str(path)], encoder)
    metrics = score(load_model(shape, load_checkpoint(tmp_path / "out.safetensors")[0]), shape, x, y)
    assert metrics["r2"] > 0.6 and metrics["mae"] < pd.Series(y.numpy()).std()  # predicts in k EUR, not z-scores
