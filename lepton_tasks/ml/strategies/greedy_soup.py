"""Greedy soup: rounds as FedAvg, and the final model a greedy soup of the last global model and the last round's
shard models, chosen on a selection split of the training side. Wortsman et al. 2022, "Model soups: averaging
weights of multiple fine-tuned models improves accuracy without increasing inference time" (Recipe 1)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lepton_tasks.ml.strategies.base import State
from lepton_tasks.ml.strategies.fedavg import FedAvg, fedavg


def greedy_soup(candidates: list[tuple[str, State]], score: Callable[[State], float],
                higher_is_better: bool = True) -> tuple[State, list[str]]:
    """Order the candidates by their own score, start from the best, and add each next one only when the uniform
    average with it scores at least as well. Returns the soup and its ingredients' names."""
    if not candidates:
        raise ValueError("greedy_soup needs at least one candidate")
    sign = 1.0 if higher_is_better else -1.0
    scored = sorted(((sign * score(state), index, name, state) for index, (name, state) in enumerate(candidates)),
                    key=lambda item: (-item[0], item[1]))
    best, _, first_name, first_state = scored[0]
    ingredients, names = [first_state], [first_name]
    for _, _, name, state in scored[1:]:
        tried = fedavg([*ingredients, state], [1.0] * (len(ingredients) + 1))
        tried_score = sign * score(tried)
        if tried_score >= best:
            ingredients.append(state)
            names.append(name)
            best = tried_score
    return fedavg(ingredients, [1.0] * len(ingredients)), names


@dataclass
class GreedySoup(FedAvg):
    name = "greedy_soup"
    title = "Greedy soup"
    summary = "the final model a greedy soup of the shard and merged models by their score on a selection split"
    paper = "Wortsman et al. 2022"
    order = 7
    # the share of the training side set apart to choose on: no choice ever looks at the held-out rows the
    # champion gate compares on
    select_fraction = 0.1

    def choose_final(self, merged: State, candidates: list[tuple[str, State]], score: Callable[[State], float],
                     higher_is_better: bool) -> tuple[State, list[str] | None]:
        return greedy_soup([("merged", merged), *candidates], score, higher_is_better)
