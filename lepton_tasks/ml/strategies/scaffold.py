"""SCAFFOLD: FedAvg's mean, with control variates that correct each shard's drift in local training.
Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning" (option I: a shard's
control variate is its full gradient at the round's global weights)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lepton_tasks.ml.strategies.base import State
from lepton_tasks.ml.strategies.fedavg import FedAvg

if TYPE_CHECKING:
    import torch


def control_variate(model: torch.nn.Module, batches, loss: Callable) -> State:
    """c_i = the shard's full gradient at the round's global weights (the mean over `batches` of each batch's
    gradient, weighted by its rows)."""
    import torch

    names = [name for name, p in model.named_parameters() if p.requires_grad]
    total = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in model.named_parameters() if p.requires_grad}
    rows = 0
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        loss(model(x), y).backward()
        for name, p in model.named_parameters():
            if name in total:
                total[name] += p.grad.to(torch.float64) * len(y)
        rows += len(y)
    model.zero_grad(set_to_none=True)
    return {name: (total[name] / max(rows, 1)).to(torch.float32) for name in names}


def scaffold_correction(model: torch.nn.Module, server_control: State, own_control: State) -> None:
    """The local step uses g(y) - c_i + c: add c - c_i to each parameter's gradient (before the optimizer's
    step)."""
    for name, p in model.named_parameters():
        if p.grad is not None and name in server_control:
            p.grad += (server_control[name] - own_control[name]).to(p.grad.device, p.grad.dtype)


@dataclass
class Scaffold(FedAvg):
    name = "scaffold"
    title = "SCAFFOLD"
    summary = "control variates against client drift"
    paper = "Karimireddy et al. 2020"
    order = 4
    paper_local_optimizer = "sgd"
    control_variates = True
    changes_local_training = True
