"""Merge strategies: how one round's shard models become the next global model; one module per strategy.

Like Flower's `strategy` package: `base.Strategy` says how a strategy changes local training, how it aggregates a
round, and whether it chooses the run's final model; each module here holds one subclass, its paper in its
docstring. Everything that names a strategy derives from `STRATEGIES`: the form's dropdown and its help, the
spec's allowed values, the local optimizer `auto` picks, the MLflow description. Adding a strategy is one module
here (a `Strategy` subclass with its name, title, summary, paper and order) and its test.

| strategy       | server update                                  | paper                                  |
|----------------|------------------------------------------------|----------------------------------------|
| `fedavg`       | sample-weighted mean                           | McMahan et al. 2017                    |
| `fedprox`      | sample-weighted mean (local proximal term)     | Li et al. 2020                         |
| `fedavgm`      | server momentum over the averaged update       | Hsu et al. 2019                        |
| `fedadam`      | server Adam over the averaged update           | Reddi et al. 2021                      |
| `scaffold`     | sample-weighted mean (local drift correction)  | Karimireddy et al. 2020                |
| `median`       | coordinate-wise median                         | Yin et al. 2018                        |
| `trimmed_mean` | coordinate-wise trimmed mean                   | Yin et al. 2018                        |
| `greedy_soup`  | sample-weighted mean; the final model a soup   | Wortsman et al. 2022                   |

Importing this package does not import torch (see `base`).
"""

from __future__ import annotations

import importlib
import pkgutil

from lepton_tasks.ml.strategies.base import State, Strategy

__all__ = ["STRATEGIES", "State", "Strategy", "for_params"]


def _discover() -> dict[str, type[Strategy]]:
    """Every `Strategy` subclass defined in a module of this package, by name, in dropdown order."""
    found: dict[str, type[Strategy]] = {}
    for module in pkgutil.iter_modules(__path__):
        imported = importlib.import_module(f"{__name__}.{module.name}")
        for value in vars(imported).values():
            if isinstance(value, type) and issubclass(value, Strategy) and "name" in vars(value) \
                    and value.__module__ == imported.__name__:
                if value.name in found:
                    raise TypeError(f"two strategies named {value.name!r}: {found[value.name]} and {value}")
                found[value.name] = value
    return dict(sorted(found.items(), key=lambda item: item[1].order))


STRATEGIES = _discover()


def for_params(params) -> Strategy:
    """The run's strategy (`params.merge_strategy`) with its settings from `params` (`RunParams`)."""
    return STRATEGIES[params.merge_strategy].from_params(params)
