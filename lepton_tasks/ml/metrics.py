"""Held-out metrics per task kind, and which way is better for each.

Every model comparison (compression tolerance, champion promotion, merged vs central) goes through
`worsening`, so "better" means the same thing everywhere, in the metric's own units.
"""

from __future__ import annotations

import numpy as np

HIGHER_IS_BETTER = {"accuracy": True, "r2": True, "mae": False, "rmse": False, "mse": False}


def evaluate(task: str, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Classification: accuracy of the argmax. Regression: MSE, RMSE, MAE and R² of the predictions."""
    if task == "classification":
        return {"accuracy": float((outputs.argmax(1) == targets).mean()) if len(targets) else 0.0}
    predictions = outputs.reshape(-1).astype(np.float64)
    truth = targets.astype(np.float64)
    errors = predictions - truth
    mse = float(np.mean(errors ** 2))
    variance = float(np.var(truth))
    return {"mse": mse, "rmse": float(np.sqrt(mse)), "mae": float(np.mean(np.abs(errors))),
            "r2": 1.0 - mse / variance if variance > 0 else 0.0}


def worsening(metric: str, reference: float, value: float) -> float:
    """How much worse `value` is than `reference` (negative when better), in the metric's units."""
    return reference - value if HIGHER_IS_BETTER[metric] else value - reference


def at_least_as_good(metric: str, value: float, reference: float) -> bool:
    return worsening(metric, reference, value) <= 1e-12
