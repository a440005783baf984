"""Metrics a step reduces by their extreme rather than their mean (TRL's RewardTrainer logs `min_reward` and
`max_reward` of its batch): an `Objective` names them in `extrema`, each example's value is its own extreme, and the
step's is the extreme over its micro-batches and processes, so any split gives the full-batch value.
"""
from __future__ import annotations

import torch

_SIGN = {"max": 1.0, "min": -1.0}  # a minimum is kept as the maximum of the negated values: one max collective


class Extremes:
    """The running extremes of a step's metrics `extrema` ({name: 'min' or 'max'}) on `device`."""

    def __init__(self, extrema: dict[str, str], device: torch.device):
        self.names = list(extrema)
        self.signs = torch.tensor([_SIGN[extrema[k]] for k in self.names], dtype=torch.float64, device=device)
        self.values = torch.full((len(self.names),), -torch.inf, dtype=torch.float64, device=device)

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        """Fold in one micro-batch's per-example metrics."""
        if self.names:
            batch = torch.stack([(metrics[k].detach().double() * s).max() for k, s in zip(self.names, self.signs)])
            self.values = torch.maximum(self.values, batch)

    def result(self, d) -> dict[str, float]:
        """The step's extremes over every process (`d`: `distributed.Dist`); {} when the objective has none."""
        if not self.names:
            return {}
        return dict(zip(self.names, (d.all_max(self.values) * self.signs).tolist()))


def reduce(values: torch.Tensor, how: str | None) -> float:
    """A held-out set's figure of one metric's per-example `values`: its extreme `how`, or with None its mean."""
    return (values.min() if how == "min" else values.max() if how == "max" else values.mean()).item()
