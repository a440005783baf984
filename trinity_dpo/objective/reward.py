"""The reward model's objective (`algorithm.algorithm_type: reward_model`): a Bradley-Terry loss on the scalar
scores a sequence-classification head gives a pair's two sequences, as TRL 1.16's `RewardTrainer` computes it.

Per pair, with r_c and r_r the chosen and rejected scores and m the row's `margin` (0 without that column):

    loss = -log sigmoid(r_c - r_r - m) + center_rewards_coefficient x (r_c + r_r)^2

TRL takes the batch mean of each part, so the per-pair sum averaged over the step's pairs is its loss, and any split
into micro-batches and processes gives the full-batch step. The scores come from the `score` statistic
(`engine/score_head.py`: the head on each sequence's last hidden state, fp32, no LM head) and the margins from the
`margin` statistic (the data's column, carried by each micro-batch).

Metrics, TRL's names: `accuracy` (pairs whose chosen scores higher), `margin` (mean r_c - r_r), `mean_reward`
(mean over both sequences' scores), and `min_reward` / `max_reward`, the step's extremes over all its scores (TRL's
batch min and max; `extrema.py` reduces them over micro-batches and processes).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..config.schema import LossArgs
from ..data.batching import by_slot

METRICS = ("accuracy", "margin", "mean_reward", "min_reward", "max_reward")
EXTREMA = {"min_reward": "min", "max_reward": "max"}


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor,
                  center_coef: Optional[float]) -> torch.Tensor:
    """Per-pair reward-model loss [n]: -log sigmoid(chosen - rejected - margin), plus center_coef x (chosen +
    rejected)^2 when a coefficient is given (TRL adds mean((r_c + r_r)^2) times it to the batch loss)."""
    loss = -F.logsigmoid(chosen - rejected - margin)
    if center_coef is not None:
        loss = loss + center_coef * (chosen + rejected) ** 2
    return loss


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each pair's share of TRL's reward metrics (their means over the step's pairs are TRL's figures; the
    min and max rewards are each pair's own extreme, reduced by `EXTREMA`)."""
    chosen, rejected = chosen.detach(), rejected.detach()
    return {"accuracy": (chosen > rejected).float(), "margin": chosen - rejected,
            "mean_reward": (chosen + rejected) / 2, "min_reward": torch.minimum(chosen, rejected),
            "max_reward": torch.maximum(chosen, rejected)}


def reward_model(args: LossArgs):
    """The reward model's `Objective`: two sequences per pair, no reference, statistics `score` and `margin`."""
    from .objectives import Objective  # objectives.build imports this module: the class is taken when called

    coef = args.center_rewards_coefficient

    def compute(policy, reference, totals):
        chosen, rejected = by_slot(policy["score"], 2)
        margin = by_slot(policy["margin"], 2)[0]
        return bradley_terry(chosen, rejected, margin, coef), pair_metrics(chosen, rejected)

    return Objective("reward_model", 2, False, ("score", "margin"), (), METRICS, compute, extrema=dict(EXTREMA))
