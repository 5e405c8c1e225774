import pytest
import torch

from lepton_tasks.merge import fedavg, fedavg_files
from lepton_tasks.models import ModelShape, init_weights, load_checkpoint, save_checkpoint


def test_fedavg_is_exactly_the_sample_weighted_mean():
    torch.manual_seed(0)
    states = [{"w": torch.randn(3, 4), "b": torch.randn(4)} for _ in range(3)]
    rows = [100, 300, 600]
    merged = fedavg(states, rows)
    for key in ("w", "b"):
        expected = (states[0][key] * 0.1 + states[1][key] * 0.3 + states[2][key] * 0.6)
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6)


def test_fedavg_of_identical_models_is_that_model_and_equal_weights_is_the_mean():
    state = init_weights(ModelShape("mlp", 40, 10, 16), seed=1)
    merged = fedavg([state, state], [5, 7])
    assert all(torch.equal(merged[k], state[k]) for k in state)
    a, b = {"w": torch.zeros(2)}, {"w": torch.ones(2) * 4}
    assert torch.equal(fedavg([a, b], [1, 1])["w"], torch.full((2,), 2.0))


def test_fedavg_refuses_mismatched_models_and_bad_weights():
    with pytest.raises(ValueError, match="other tensors"):
        fedavg([{"w": torch.zeros(1)}, {"v": torch.zeros(1)}], [1, 1])
    with pytest.raises(ValueError, match="positive sum"):
        fedavg([{"w": torch.zeros(1)}], [0])


def test_fedavg_files_reads_checked_checkpoints_and_is_deterministic(tmp_path):
    shape = ModelShape("cnn", 40, 10, 8)
    records = []
    for i in range(2):
        path = tmp_path / f"s{i}.safetensors"
        records.append({"path": str(path), "sha256": save_checkpoint(path, init_weights(shape, i), {}),
                        "rows": 10 * (i + 1)})
    sha_a = fedavg_files(records, tmp_path / "a.safetensors", {"round": "1"})
    sha_b = fedavg_files(records, tmp_path / "b.safetensors", {"round": "1"})
    assert sha_a == sha_b
    merged, meta = load_checkpoint(tmp_path / "a.safetensors", sha_a)
    assert meta == {"round": "1"} and set(merged) == set(init_weights(shape, 0))
