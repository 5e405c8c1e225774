"""Each merge strategy against values worked out by hand."""

import math

import pytest
import torch

from lepton_tasks.config.settings import RunParams
from lepton_tasks.ml.models import ModelShape, init_weights
from lepton_tasks.ml.strategies import STRATEGIES, for_params
from lepton_tasks.ml.strategies.fedadam import FedAdam, fedadam
from lepton_tasks.ml.strategies.fedavg import fedavg
from lepton_tasks.ml.strategies.fedavgm import FedAvgM, fedavgm
from lepton_tasks.ml.strategies.fedprox import proximal_term
from lepton_tasks.ml.strategies.greedy_soup import greedy_soup
from lepton_tasks.ml.strategies.median import coordinate_median
from lepton_tasks.ml.strategies.scaffold import control_variate, scaffold_correction
from lepton_tasks.ml.strategies.trimmed_mean import TrimmedMean, trimmed_count, trimmed_mean


def _scalars(*values: float) -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.tensor([float(v)])} for v in values]


def test_fedavg_is_exactly_the_sample_weighted_mean():
    torch.manual_seed(0)
    states = [{"w": torch.randn(3, 4), "b": torch.randn(4)} for _ in range(3)]
    merged = fedavg(states, [100, 300, 600])
    for key in ("w", "b"):
        expected = states[0][key] * 0.1 + states[1][key] * 0.3 + states[2][key] * 0.6
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6)


def test_fedavg_of_identical_models_is_that_model_and_equal_weights_is_the_mean():
    state = init_weights(ModelShape("mlp", 40, 10, 16), seed=1)
    merged = fedavg([state, state], [5, 7])
    assert all(torch.equal(merged[k], state[k]) for k in state)
    assert torch.equal(fedavg(_scalars(0, 4), [1, 1])["w"], torch.tensor([2.0]))


def test_strategies_refuse_mismatched_models_and_bad_weights():
    with pytest.raises(ValueError, match="other tensors"):
        fedavg([{"w": torch.zeros(1)}, {"v": torch.zeros(1)}], [1, 1])
    with pytest.raises(ValueError, match="positive sum"):
        fedavg([{"w": torch.zeros(1)}], [0])
    with pytest.raises(ValueError, match="other tensors"):
        coordinate_median([{"w": torch.zeros(1)}, {"v": torch.zeros(1)}])
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean(_scalars(1, 2, 3), 0.5)


def test_coordinate_median_by_hand():
    assert coordinate_median(_scalars(1, 100, 3))["w"].item() == 3  # odd count: the middle value
    assert coordinate_median(_scalars(1, 5, 2, 100))["w"].item() == 3.5  # even: the mean of 2 and 5
    mixed = coordinate_median([{"w": torch.tensor([1.0, 9.0])}, {"w": torch.tensor([2.0, 8.0])},
                               {"w": torch.tensor([30.0, -7.0])}])
    assert mixed["w"].tolist() == [2.0, 8.0]  # each coordinate on its own


def test_trimmed_mean_by_hand():
    assert trimmed_count(8, 0.2) == 1 and trimmed_count(4, 0.2) == 0 and trimmed_count(5, 0.45) == 2
    poisoned = _scalars(1, 2, 3, 4, 5, 6, 7, 1000)
    assert trimmed_mean(poisoned, 0.2)["w"].item() == pytest.approx(4.5)  # 1 and 1000 dropped: mean of 2..7
    assert trimmed_mean(_scalars(1, 2, 3, 1000), 0.2)["w"].item() == pytest.approx(251.5)  # nothing trimmed


def test_fedavgm_by_hand():
    current = {"w": torch.tensor([0.0])}
    first, velocity = fedavgm(current, {"w": torch.tensor([1.0])}, None, learning_rate=0.5, beta=0.9)
    assert first["w"].item() == pytest.approx(0.5) and velocity["w"].item() == pytest.approx(1.0)
    second, velocity = fedavgm(first, {"w": torch.tensor([1.5])}, velocity, learning_rate=0.5, beta=0.9)
    assert velocity["w"].item() == pytest.approx(1.9) and second["w"].item() == pytest.approx(0.5 + 0.5 * 1.9)
    plain, _ = fedavgm(current, {"w": torch.tensor([0.7])}, None, learning_rate=1.0, beta=0.0)
    assert plain["w"].item() == pytest.approx(0.7)  # lr 1 and beta 0: FedAvg


def test_fedadam_by_hand():
    current = {"w": torch.tensor([0.0], dtype=torch.float64)}
    first, (m, v) = fedadam(current, {"w": torch.tensor([2.0], dtype=torch.float64)}, None, 0.01, beta1=0.9)
    assert m["w"].item() == pytest.approx(0.2) and v["w"].item() == pytest.approx(0.04)
    assert first["w"].item() == pytest.approx(0.01 * 0.2 / (0.2 + 1e-3))  # round 1: the correction is 1
    w1 = first["w"].item()
    second, (m, v) = fedadam(first, {"w": torch.tensor([w1 + 2.0], dtype=torch.float64)}, (m, v), 0.01, beta1=0.9,
                             round_number=2)
    assert m["w"].item() == pytest.approx(0.38) and v["w"].item() == pytest.approx(0.0796)
    corrected = 0.01 * math.sqrt(1 - 0.99 ** 2) / (1 - 0.9 ** 2)  # Adam's bias correction at round 2
    assert second["w"].item() == pytest.approx(w1 + corrected * 0.38 / (math.sqrt(0.0796) + 1e-3))
    assert fedadam(current, {"w": torch.tensor([2.0], dtype=torch.float64)}, None, 0.01, beta1=0.9)[0] == first


def test_greedy_soup_by_hand():
    def score(state):  # peaks at w = 3
        return -(state["w"].item() - 3) ** 2

    candidates = list(zip("abcd", _scalars(2, 5, 0, 4), strict=True))
    soup, names = greedy_soup(candidates, score)
    # by own score: a (-1), d (-1), b (-4), c (-9); a+d = 3 scores 0, adding b (3.67) or c (2) scores lower
    assert names == ["a", "d"] and soup["w"].item() == pytest.approx(3.0)
    lower_is_better, names = greedy_soup(candidates, lambda s: -score(s), higher_is_better=False)
    assert names == ["a", "d"] and lower_is_better["w"].item() == pytest.approx(3.0)


def test_proximal_term_by_hand():
    model = torch.nn.Linear(2, 1, bias=True)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.copy_(torch.tensor([0.5]))
    start = [torch.zeros(1, 2), torch.tensor([0.0])]
    assert proximal_term(model, start, mu=0.5).item() == pytest.approx(0.25 * (1 + 4 + 0.25))


def test_control_variate_is_the_row_weighted_full_gradient_and_corrects_the_gradient():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    batches = [(torch.tensor([[1.0], [2.0]]), torch.zeros(2)), (torch.tensor([[3.0]]), torch.zeros(1))]
    control = control_variate(model, batches, lambda out, y: ((out.squeeze(-1) - y) ** 2).mean())
    # d/dw (w x)^2 = 2 x^2 at w = 1: 2, 8 and 18 over the three rows
    assert control["weight"].item() == pytest.approx(28 / 3)
    model.weight.grad = torch.tensor([[1.0]])
    scaffold_correction(model, {"weight": torch.tensor([[5.0]])}, {"weight": torch.tensor([[2.0]])})
    assert model.weight.grad.item() == pytest.approx(4.0)  # g - c_i + c


def test_each_strategy_aggregates_as_chosen_and_carries_its_state_across_rounds():
    states, rows = _scalars(1, 2, 3, 100), [10, 10, 10, 10]
    current = {"w": torch.tensor([0.0])}
    assert STRATEGIES["fedavg"]().aggregate(current, states, rows)["w"].item() == pytest.approx(26.5)
    assert STRATEGIES["median"]().aggregate(current, states, rows)["w"].item() == pytest.approx(2.5)
    assert TrimmedMean(trim_fraction=0.25).aggregate(current, states, rows)["w"].item() == 2.5
    server = FedAvgM(learning_rate=0.5, momentum=0.9)
    first = server.aggregate(current, _scalars(1, 1), [1, 1])
    second = server.aggregate(first, _scalars(1.5, 1.5), [1, 1])  # the momentum carried over
    assert second["w"].item() == pytest.approx(0.5 + 0.5 * 1.9)


def test_a_strategy_takes_its_settings_from_the_run_params():
    def made(**params):
        return for_params(RunParams(source_uri="x", **params))

    assert made(merge_strategy="fedadam").learning_rate == 0.01 and made(merge_strategy="fedavgm").learning_rate == 1
    assert made(merge_strategy="fedadam", server_learning_rate=0.3, server_momentum=0.5) == FedAdam(0.3, 0.5)
    assert made(merge_strategy="fedprox", fedprox_mu=0.5).proximal_mu == 0.5 and made().proximal_mu == 0.0
    assert made(merge_strategy="trimmed_mean", trim_fraction=0.1).trim_fraction == 0.1
    assert made(merge_strategy="scaffold").control_variates and not made().control_variates


def test_the_registry_is_every_strategy_module_and_the_only_list_of_names():
    """Every module of the package but `base` holds one strategy; the form, the spec and MLflow read the registry."""
    from pathlib import Path

    import lepton_tasks.ml.strategies as package
    from lepton_tasks.config.settings import airflow_param_specs

    modules = {p.stem for p in Path(package.__file__).parent.glob("*.py")} - {"__init__", "base"}
    assert {type(s()).__module__.rsplit(".", 1)[1] for s in STRATEGIES.values()} == modules
    assert list(STRATEGIES)[0] == "fedavg"  # the default first in the dropdown
    form = airflow_param_specs(RunParams(source_uri="x"))
    assert form["merge_strategy"]["enum"] == list(STRATEGIES)
    assert all(f"{name}: {s.summary}" in form["merge_strategy"]["description"] for name, s in STRATEGIES.items())
    assert "scaffold" in form["local_optimizer"]["description"] and "fedavg," not in form["local_optimizer"][
        "description"]
    assert RunParams(source_uri="x", merge_strategy="scaffold").optimizer == "sgd"
    assert RunParams(source_uri="x").optimizer == "adam"


def test_importing_the_registry_does_not_import_torch():
    """The DAG files read the registry when Airflow parses them; that parse stays free of torch."""
    import subprocess
    import sys

    code = "import sys, lepton_tasks.ml.strategies, lepton_tasks.config.settings; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"
