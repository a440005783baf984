"""Trinity's loss terms beside the objective: + kl_coef x KL(policy, reference) - entropy_coef x entropy, each
aggregated over the response tokens of every sequence of the step (a pair's chosen and rejected alike) as
`algorithm.loss_agg_mode` says (Trinity's `dp_actor`; the config's Trinity version decides which terms are on:
`config.folds.fold_regularizers`).

Both are normalised by the whole step's counts (tokens, or sequences), so micro-batches and processes add up to one
full-batch step: Trinity with `fix_actor_microbatch_loss_scale`. The KL is Trinity's per-token estimator
(`losses.kl_penalty`) of the policy's log-prob against the reference's log-prob of the same token; its reference
values come per token from the reference pass (`reference.TokenStore`).
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from . import losses as L
from ..config.schema import AlgorithmConfig
from ..data.batching import by_slot


def add_terms(objective, algorithm: AlgorithmConfig, trinity_metrics: bool):
    """`objective` with the KL and entropy terms `algorithm` turns on, and their metrics under Trinity's names
    (`actor/kl_loss`, `actor/entropy_loss`: the aggregates before their coefficients); unchanged when both are off.
    `trinity_metrics`: log the entropy term's aggregate even at weight 0, as Trinity 0.2+ logs it for DPO."""
    kl_name, kl_coef = algorithm.kl_loss_fn, algorithm.kl_loss_fn_args.kl_coef
    entropy_coef, mode = algorithm.entropy_loss_fn_args.entropy_coef, algorithm.loss_agg_mode
    # Unset (a config built in code, not through the loader, which resolves them): off.
    with_kl, with_entropy = kl_name not in (None, "none") and bool(kl_coef), bool(entropy_coef)
    log_entropy = with_entropy or (with_kl and trinity_metrics)
    if not (with_kl or log_entropy):
        return objective
    entropy_stat = "entropy_grad" if with_entropy else "entropy"
    k = objective.sequences
    stats = (*objective.stats, *(("kl",) if with_kl else ()), *((entropy_stat,) if log_entropy else ()), "tokens")
    inner = objective.compute

    def compute(policy, reference, totals):
        losses, metrics = inner(policy, reference, totals)
        if with_kl:
            kl = aggregate(policy["kl"], policy["tokens"], totals, k, mode)
            losses = losses + kl_coef * kl
            metrics["actor/kl_loss"] = kl.detach()
        if log_entropy:
            entropy = aggregate(policy[entropy_stat], policy["tokens"], totals, k, mode)
            losses = losses - entropy_coef * entropy
            metrics["actor/entropy_loss"] = entropy.detach()
        return losses, metrics

    metrics = (*objective.metrics, *(("actor/kl_loss",) if with_kl else ()),
               *(("actor/entropy_loss",) if log_entropy else ()))
    return dataclasses.replace(
        objective, stats=tuple(dict.fromkeys(stats)), metrics=metrics, compute=compute,
        kl=functools.partial(L.kl_penalty, kl_name) if with_kl else None,
        uniform_grad=objective.uniform_grad and not (with_kl or with_entropy))


def aggregate(sums: torch.Tensor, tokens: torch.Tensor, totals: dict, k: int, mode: str) -> torch.Tensor:
    """Each example's share [n] of a per-token quantity's step aggregate, from its sequences' sums and token
    counts [k * n]: the shares' mean over the step's examples is the aggregate. `token-mean`: all the step's
    response tokens weigh alike (sum / the step's tokens); `seq-mean-token-sum`: the mean of the sequences' sums;
    `seq-mean-token-mean`: the mean of the sequences' token means."""
    per_seq = by_slot(sums, k)
    if mode == "token-mean":
        step_tokens = sum(totals[f"tokens/{s}"] for s in range(k))
        return per_seq.sum(0) * totals["examples"] / max(step_tokens, 1)
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / by_slot(tokens, k).clamp(min=1.0)
    return per_seq.sum(0) / k
