"""Preference losses: pure functions of sequence log-probs returning per-pair losses and per-pair metrics.

Inputs are fp32 tensors of shape [B] (one entry per pair): policy and reference log-probs of the chosen and the
rejected response, each a sum over response tokens. Outputs: the per-pair loss [B] and a dict of per-pair metric
tensors [B] under the names TRL logs, so that callers can sum them over micro-batches and ranks and divide by the
global pair count.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_sigmoid(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023), with conservative DPO's label smoothing eps:

        z = beta * ((pi_c - ref_c) - (pi_r - ref_r))
        loss = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)

    At policy == reference, z = 0 and the loss is ln 2 for any eps.
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    z = beta * (chosen_ratio - rejected_ratio)
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, _reward_metrics(beta * chosen_ratio, beta * rejected_ratio, policy_chosen, policy_rejected)


def _reward_metrics(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected) -> dict[str, torch.Tensor]:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "logps/chosen": policy_chosen.detach(),
        "logps/rejected": policy_rejected.detach(),
    }


LOSSES = {"dpo": dpo_sigmoid}
