import pytest

from lepton_tasks.config.settings import RunParams, airflow_param_specs, parse_params
from lepton_tasks.core.errors import BadParam

DEFAULTS = RunParams(source_uri="landing/x/")


def test_defaults_are_valid_and_digest_is_stable():
    assert parse_params({}, DEFAULTS) == DEFAULTS
    assert parse_params({"seed": 1}, DEFAULTS) == RunParams(source_uri="landing/x/", seed=1)
    reseeded = parse_params({"seed": 1}, DEFAULTS)
    assert DEFAULTS.digest() == RunParams(source_uri="landing/x/").digest() != reseeded.digest()


@pytest.mark.parametrize("raw, param", [
    ({"num_shards": 0}, "num_shards"),
    ({"learning_rate": -1}, "learning_rate"),
    ({"model_kind": "rnn"}, "model_kind"),
    ({"local_epochs": "many"}, "local_epochs"),
    ({"eval_fraction": 1.0}, "eval_fraction"),
    ({"no_such_param": 1}, "no_such_param"),
    ({"merge_strategy": "krum"}, "merge_strategy"),
    ({"trim_fraction": 0.5}, "trim_fraction"),
    ({"server_momentum": 1.0}, "server_momentum"),
    ({"dp_epsilon": 0}, "dp_epsilon"),
])
def test_bad_params_are_named(raw, param):
    with pytest.raises(BadParam, match=f"param '{param}'"):
        parse_params(raw, DEFAULTS)


def test_airflow_param_specs_are_typed_bounded_and_described():
    specs = airflow_param_specs(DEFAULTS)
    assert specs["num_shards"]["type"] == "integer" and specs["num_shards"]["minimum"] == 1
    assert specs["learning_rate"]["type"] == "number" and specs["learning_rate"]["exclusiveMinimum"] == 0
    assert specs["model_kind"]["enum"] == ["mlp", "cnn"]
    assert all(spec["description"] and spec["title"] for spec in specs.values())
    assert {name: spec["default"] for name, spec in specs.items()} == DEFAULTS.model_dump()


def test_dp_sgd_with_a_local_correction_is_refused_naming_both_params():
    for strategy in ("fedprox", "scaffold"):
        with pytest.raises(BadParam, match=f"'dp_epsilon' with 'merge_strategy' '{strategy}'"):
            parse_params({"dp_epsilon": 3.0, "merge_strategy": strategy}, DEFAULTS)
    assert parse_params({"dp_epsilon": 3.0, "merge_strategy": "median"}, DEFAULTS).dp_epsilon == 3.0


def test_optional_params_are_nullable_in_the_form_and_strategies_a_dropdown():
    specs = airflow_param_specs(DEFAULTS)
    assert specs["dp_epsilon"]["type"] == ["number", "null"] and specs["dp_epsilon"]["default"] is None
    assert specs["server_learning_rate"]["type"] == ["number", "null"]
    assert set(specs["merge_strategy"]["enum"]) == {"fedavg", "fedprox", "fedavgm", "fedadam", "scaffold", "median",
                                                    "trimmed_mean", "greedy_soup"}
