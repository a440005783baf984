"""The math of every preference loss: plain functions of per-example tensors [n], each with a hand-worked test.

Names and formulas are TRL 1.16's (`DPOTrainer` loss types, the experimental `CPOTrainer` and `ORPOTrainer`); the
one deliberate difference is `sigmoid`'s label smoothing, which is conservative DPO here as in Trinity-RFT (TRL's
`sigmoid` ignores it). `objectives.py` turns a micro-batch's per-sequence statistics into these inputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config.objective_checks import (CPO_LOSS_TYPES, DPO_LOSS_TYPES, F_DIVERGENCE_LOSS_TYPES,  # noqa: F401
                                       F_DIVERGENCES, SORTING_LOSS_TYPES)


@dataclass
class PairTerms:
    """What the DPO loss types read, per pair [n]: policy and reference log-probs (LD-DPO weighted where asked),
    their log-ratios and f-divergence scores, the responses' token counts, and `chosen_nll`: the pair's share of the
    step's mean token NLL of the chosen responses (`sft`), such that the shares' mean is that mean."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_scores: torch.Tensor
    rejected_scores: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    chosen_nll: torch.Tensor

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.policy_rejected - self.ref_rejected


def f_divergence_scores(logratios: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """f'(t) of the policy/reference ratio t = exp(logratio): the DPO score under the f-divergence `kind`
    (reverse KL: the log-ratio itself)."""
    if kind == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":  # f'(t) = log(2t / (t + 1))
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence" and abs(alpha - 1.0) >= 1e-6:  # f'(t) = (t^(alpha-1) - 1) / (alpha - 1)
        # Clamped so that exp stays finite, as TRL clamps it.
        return (torch.exp(torch.clamp((alpha - 1.0) * logratios, max=80.0)) - 1.0) / (alpha - 1.0)
    return logratios  # reverse KL, and alpha-divergence's limit at alpha = 1


def smoothed_sigmoid(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z): the sigmoid loss with labels flipped with probability eps."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def dpo_loss(loss_type: str, t: PairTerms, beta: float, label_smoothing: float = 0.0,
             discopop_tau: float = 0.05) -> torch.Tensor:
    """Per-pair loss [n] of one of TRL's `DPO_LOSS_TYPES`."""
    delta = t.chosen_scores - t.rejected_scores
    if loss_type == "sigmoid":
        return smoothed_sigmoid(beta * delta, label_smoothing)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type in ("ipo", "sigmoid_norm"):
        # Per-token scores, so that the loss does not grow with the responses' lengths.
        norm = (t.chosen_scores / t.chosen_tokens.clamp(min=1.0) - t.rejected_scores / t.rejected_tokens.clamp(min=1.0))
        return (norm - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -F.logsigmoid(beta * norm)
    if loss_type == "exo_pair":  # KL(softmax(beta * scores) || [1 - eps, eps])
        qw, ql = torch.sigmoid(beta * delta), torch.sigmoid(-beta * delta)
        return (qw * (F.logsigmoid(beta * delta) - math.log1p(-label_smoothing))
                + ql * (F.logsigmoid(-beta * delta) - math.log(label_smoothing)))
    if loss_type == "robust":  # unbiased under labels flipped with probability eps
        return (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                + label_smoothing * F.logsigmoid(-beta * delta)) / (1 - 2 * label_smoothing)
    chosen, rejected = beta * t.chosen_logratios, beta * t.rejected_logratios
    if loss_type == "nca_pair":
        return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
    if loss_type == "bco_pair":
        return -F.logsigmoid(chosen) - F.logsigmoid(-rejected)
    if loss_type == "sppo_hard":  # hard win probabilities: 1 for chosen, 0 for rejected
        return (t.chosen_logratios - 0.5 / beta) ** 2 + (t.rejected_logratios + 0.5 / beta) ** 2
    if loss_type == "aot":
        gap = (torch.sort(t.policy_chosen - t.policy_rejected).values
               - torch.sort(t.ref_chosen - t.ref_rejected).values)
        return smoothed_sigmoid(beta * gap, label_smoothing)
    if loss_type == "aot_unpaired":
        gap = torch.sort(t.chosen_logratios).values - torch.sort(t.rejected_logratios).values
        return smoothed_sigmoid(beta * gap, label_smoothing)
    if loss_type == "apo_zero":  # chosen up, rejected down
        return (1 - torch.sigmoid(chosen)) + torch.sigmoid(rejected)
    if loss_type == "apo_down":  # both down, rejected more
        return torch.sigmoid(chosen) + (1 - torch.sigmoid(chosen - rejected))
    if loss_type == "discopop":  # a blend of logistic and exponential losses, modulated by the margin
        logits = beta * delta
        mix = torch.sigmoid(logits / discopop_tau)
        return -F.logsigmoid(logits) * (1 - mix) + torch.exp(-logits) * mix
    if loss_type == "sft":
        return t.chosen_nll
    raise ValueError(f"unknown DPO loss type {loss_type!r}")


def wpo_weights(chosen_wpo: torch.Tensor, rejected_wpo: torch.Tensor, chosen_tokens: torch.Tensor,
                rejected_tokens: torch.Tensor) -> torch.Tensor:
    """WPO's pair weight [n]: the product over the two responses of exp(mean over tokens of log p(token) -
    log sum_v p_v^2), from the per-sequence sums `*_wpo` of those differences (no gradient)."""
    chosen = torch.exp(chosen_wpo / chosen_tokens.clamp(min=1.0))
    rejected = torch.exp(rejected_wpo / rejected_tokens.clamp(min=1.0))
    return (chosen * rejected).detach()


def cpo_loss(loss_type: str, chosen: torch.Tensor, rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0,
             gamma: float = 0.5) -> torch.Tensor:
    """CPO's per-pair preference loss [n] on the policy's own log-probs (summed, or per token for `ipo` and `simpo`):
    SimPO subtracts the target margin gamma / beta from the difference."""
    logits = chosen - rejected
    if loss_type == "simpo":
        return smoothed_sigmoid(beta * (logits - gamma / beta), label_smoothing)
    if loss_type == "sigmoid":
        return smoothed_sigmoid(beta * logits, label_smoothing)
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown CPO loss type {loss_type!r}")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, branching at -ln 2 to avoid cancellation."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor) -> torch.Tensor:
    """ORPO's log odds ratio [n] of the responses' per-token mean log-probs: log(p_c / (1 - p_c)) - log(p_r / (1 -
    p_r))."""
    return (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))


KL_PENALTIES = ("k1", "k2", "k3", "low_var_kl", "abs", "corrected_k3")


def kl_penalty(name: str, logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Trinity's per-token KL estimators of the policy from the reference, elementwise on log-probs [N]; with
    d = logp - ref: k1 = d, k2 = d^2 / 2, k3 = exp(-d) - 1 + d (unbiased and >= 0), low_var_kl = k3 with -d clamped
    to [-20, 20] and the result to [-10, 10], abs = |d|. `corrected_k3` weighs k3 by the policy's ratio to the
    policy that generated the data, which offline training does not have: Trinity then falls back to k3."""
    d = logp - ref
    if name == "k1":
        return d
    if name == "k2":
        return 0.5 * d.square()
    if name in ("k3", "corrected_k3"):
        return (-d).exp() - 1 + d  # exp then subtract, as Trinity: expm1 would round differently
    if name == "low_var_kl":
        x = torch.clamp(-d, min=-20, max=20)
        return torch.clamp(x.exp() - x - 1, min=-10, max=10)
    if name == "abs":
        return d.abs()
    raise ValueError(f"unknown KL penalty {name!r}")
