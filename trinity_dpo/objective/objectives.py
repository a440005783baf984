"""Training objectives: one object each, built from the config.

An `Objective` declares what the rest of the run must provide and turns one micro-batch's per-sequence statistics
into per-example losses and metrics:
- `sequences`: sequences per example (2 for a preference pair: chosen, then rejected; 1 for an SFT row). A
  micro-batch of n examples has k * n sequences, slot-major: sequence `slot * n + j` is slot `slot` of example j.
- `needs_reference`: whether reference statistics are computed at all (no reference pass otherwise);
  `ref_stats`: which.
- `stats`: the per-sequence statistics it reads from the policy (`STATS`), each an fp32 tensor [k * n].
- `metrics`: the names (TRL's) of the per-example metrics it returns; the loop logs their means over the step
  (those in `extrema`: their minimum or maximum).
- `compute(policy, reference, totals)`: per-example losses [n] and metrics {name: [n]}; `reference` is None when
  not needed; `totals` (`step_totals`) holds the step's global counts, so that a term TRL averages over tokens
  (an NLL, a token-weighted metric) is each example's share of that average. The loop divides the summed losses by
  the step's global example count, so micro-batches and processes add up to one full-batch step.

The math of each loss is a plain function in `losses.py` with its hand-worked test.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import losses as L
from .terms import add_terms
from ..data.batching import by_slot
from ..config.schema import AlgorithmConfig, LossArgs

Stats = dict[str, torch.Tensor]
STATS = {
    "logps": "summed log-probs of the sequence's response tokens",
    "tokens": "the number of response tokens",
    "logps_shared": "summed log-probs of the response tokens within the length all of the example's responses have",
    "prompt_logps": "summed log-probs of the prompt tokens after the first (the example's first sequence only)",
    "prompt_tokens": "how many such prompt tokens (the example's first sequence only)",
    "entropy": "summed entropy of the next-token distribution at the response tokens (no gradient)",
    "mean_logits": "summed mean-over-vocabulary logit at the response tokens (no gradient)",
    "top1": "how many response tokens are the model's top-1 prediction (no gradient)",
    "wpo": "summed log p(token) - log sum_v p_v^2 over the response tokens: WPO's weight (no gradient)",
    "entropy_grad": "the entropy's sum as `entropy`, with gradient (an entropy term in the loss)",
    "kl": "summed per-token KL estimator `Objective.kl` of the response tokens against the reference's (gradient)",
}
# A reward model's statistics: a sequence-classification model has no LM head, so none of the above (`reward.py`).
SCORE_STATS = {
    "score": "the score head's output at the sequence's last token (gradient; the LM head never runs)",
    "margin": "the example's `margin` column (data, not the model's; 0 without it), the same for each sequence",
}
_REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                   "logps/rejected", "logits/chosen", "logits/rejected")
_TOKEN_METRIC_STATS = ("tokens", "mean_logits")


@dataclass(frozen=True)
class Objective:
    """What an objective reads and how it scores; see the module docstring."""

    name: str
    sequences: int
    needs_reference: bool
    stats: tuple[str, ...]
    ref_stats: tuple[str, ...]
    metrics: tuple[str, ...]
    compute: Callable[[Stats, Optional[Stats], dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    # Figures derived from a step's (or evaluation's) means, such as perplexity: {name: f(means)}.
    derived: Callable[[dict[str, float]], dict[str, float]] = lambda means: {}
    # The loss is a sum of response-token log-probs times one step-wide factor, so every token's log-prob gets the
    # same gradient and the LM head's backward can run in its forward (`logprobs._HeadLogprobs`).
    uniform_grad: bool = False
    # Trinity's per-token KL estimator (`terms.py`), f(logp, ref) elementwise; when set, the `kl` statistic needs
    # the reference's log-prob of every response token, which the reference pass keeps.
    kl: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
    # Metrics whose step figure is their extreme over the step's examples, not their mean: {name: 'min' or 'max'}
    # (`extrema.py`; the reward model's min_reward and max_reward, as TRL logs them).
    extrema: dict[str, str] = field(default_factory=dict)
    # Whole-step hooks (KTO's, `kto.py`): `reference_plan(schedule)`, the Plan the reference pass scores in place of
    # `Schedule.first_epoch()`; `data_tables(examples)`, per-example tables from the data put beside the
    # reference's, which `compute` reads with them (labels); `before_step(model, step, context)`, a pass before a
    # step's micro-batches whose figures join the step's totals (the KL baseline).
    reference_plan: Optional[Callable] = None
    data_tables: Optional[Callable] = None
    before_step: Optional[Callable] = None


def step_totals(examples) -> dict[str, float]:
    """A step's (or held-out set's) global counts: examples, trained tokens of each sequence slot (`tokens/0`:
    chosen, or an SFT row's; `tokens/1`: rejected), and the first sequences' prompt tokens after the first
    (`prompt_tokens`)."""
    counts = [ex.target_counts() for ex in examples]
    slots = len(counts[0]) if counts else 0
    return {"examples": len(examples), **{f"tokens/{s}": sum(c[s] for c in counts) for s in range(slots)},
            "prompt_tokens": sum(len(ex.prompt_ids) - 1 for ex in examples)}


def build(algorithm: AlgorithmConfig, terms: bool = True, held_out: bool = False) -> Objective:
    """The objective `algorithm` names, with its hyper-parameters bound, and with `terms` the KL and entropy terms
    it turns on (`terms.py`; held-out figures are the objective's own). `held_out`: the objective of held-out
    figures, where it differs (KTO's: one batch that holds its own KL sequences)."""
    if algorithm.policy_loss_fn == "kto":
        from .kto import kto  # kto.py builds its Objective from this module

        objective = kto(algorithm.policy_loss_fn_args, held_out)
    else:
        objective = _objective(algorithm)
    return add_terms(objective, algorithm, trinity_metrics=algorithm.policy_loss_fn == "dpo") if terms else objective


def _objective(algorithm: AlgorithmConfig) -> Objective:
    args = algorithm.policy_loss_fn_args
    if algorithm.policy_loss_fn == "sft":
        return _sft(algorithm.loss_agg_mode)
    if algorithm.policy_loss_fn == "dpo":
        return _dpo(args)
    if algorithm.policy_loss_fn == "orpo":
        return _orpo(args)
    if algorithm.policy_loss_fn == "reward_model":
        from .reward import reward_model  # reward.py builds its Objective from this module

        return reward_model(args)
    return _cpo(args, algorithm.policy_loss_fn)


def _dpo(args: LossArgs) -> Objective:
    types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    weights = args.loss_weights or [1.0] * len(types)
    ld = args.ld_alpha is not None
    ref_stats = ("logps", "logps_shared") if ld else ("logps",)
    stats = (*ref_stats, "tokens", "mean_logits", "entropy", "top1", *(("wpo",) if args.use_weighting else ()))

    def logps(s: Stats) -> torch.Tensor:
        # LD-DPO: tokens past the shorter response's length count ld_alpha each.
        return s["logps_shared"] + args.ld_alpha * (s["logps"] - s["logps_shared"]) if ld else s["logps"]

    def compute(policy: Stats, reference: Optional[Stats], totals: dict):
        (pc, pr), (rc, rr) = by_slot(logps(policy), 2), by_slot(logps(reference), 2)
        (tc, tr), n = by_slot(policy["tokens"], 2), totals["examples"]
        chosen_nll = -by_slot(policy["logps"], 2)[0] * n / max(totals["tokens/0"], 1)
        scores = [L.f_divergence_scores(x, args.f_divergence_type, args.f_alpha_divergence_coef)
                  for x in (pc - rc, pr - rr)]
        terms = L.PairTerms(pc, pr, rc, rr, *scores, tc, tr, chosen_nll)
        total = 0.0
        for loss_type, weight in zip(types, weights):
            per_pair = L.dpo_loss(loss_type, terms, args.beta, args.label_smoothing, args.discopop_tau)
            if args.use_weighting:
                per_pair = per_pair * L.wpo_weights(*by_slot(policy["wpo"], 2), tc, tr)
            total = total + weight * per_pair
        metrics = _reward_metrics(args.beta * (pc - rc), args.beta * (pr - rr), pc, pr)
        metrics.update(_token_metrics(policy, totals, entropy=True))
        return total, metrics

    metrics = (*_REWARD_METRICS, "entropy", "mean_token_accuracy")
    return Objective("dpo", 2, True, stats, ref_stats, metrics, compute)


def _cpo(args: LossArgs, name: str) -> Objective:
    """CPO and SimPO (CPO with loss type simpo and no NLL term): no reference."""
    loss_type = (args.loss_type if isinstance(args.loss_type, str) else args.loss_type[0])
    loss_type = "simpo" if name == "simpo" else loss_type
    alpha = args.cpo_alpha if args.cpo_alpha is not None else (0.0 if name == "simpo" else 1.0)
    per_token = loss_type in ("ipo", "simpo")

    def compute(policy: Stats, reference: Optional[Stats], totals: dict):
        (sc, sr), (tc, tr) = by_slot(policy["logps"], 2), by_slot(policy["tokens"], 2)
        pc, pr = (sc / tc, sr / tr) if per_token else (sc, sr)
        per_pair = L.cpo_loss(loss_type, pc, pr, args.beta, args.label_smoothing, args.gamma)
        metrics = _reward_metrics(args.beta * pc, args.beta * pr, pc, pr)
        metrics.update(_token_metrics(policy, totals))
        if alpha:
            # TRL's NLL is the mean over all chosen response tokens of the batch: each pair adds its share.
            nll = -sc * totals["examples"] / max(totals["tokens/0"], 1)
            per_pair = per_pair + alpha * nll
            metrics["nll_loss"] = nll.detach()
        return per_pair, metrics

    metrics = (*_REWARD_METRICS, *(("nll_loss",) if alpha else ()))
    return Objective(name, 2, False, ("logps", "tokens", "mean_logits"), (), metrics, compute)


def _orpo(args: LossArgs) -> Objective:
    """ORPO: the chosen NLL over prompt and response tokens (as TRL takes it) minus beta x log sigmoid(log odds)."""

    def compute(policy: Stats, reference: Optional[Stats], totals: dict):
        (sc, sr), (tc, tr) = by_slot(policy["logps"], 2), by_slot(policy["tokens"], 2)
        pc, pr = sc / tc, sr / tr
        log_odds = L.orpo_log_odds(pc, pr)
        ratio = torch.nn.functional.logsigmoid(log_odds)
        prompt = by_slot(policy["prompt_logps"], 2)[0]
        nll = -(prompt + sc) * totals["examples"] / max(totals["prompt_tokens"] + totals["tokens/0"], 1)
        metrics = _reward_metrics(args.beta * pc, args.beta * pr, pc, pr)
        metrics.update(_token_metrics(policy, totals))
        metrics.update({"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()})
        return nll - args.beta * ratio, metrics

    metrics = (*_REWARD_METRICS, "nll_loss", "log_odds_ratio", "log_odds_chosen")
    return Objective("orpo", 2, False, ("logps", "tokens", "prompt_logps", "mean_logits"), (), metrics, compute)


def _sft(agg: str) -> Objective:
    """SFT: the NLL of the trained (assistant) tokens, aggregated as Trinity's `loss_agg_mode` says: `token-mean`
    over all of the step's trained tokens (TRL's SFT loss), `seq-mean-token-mean` (each row's token mean, averaged
    over rows) or `seq-mean-token-sum` (each row's sum, averaged)."""

    def compute(policy: Stats, reference: Optional[Stats], totals: dict):
        nll = -policy["logps"]
        if agg == "token-mean":
            losses = nll * totals["examples"] / max(totals["tokens/0"], 1)
        else:
            losses = nll / policy["tokens"].clamp(min=1.0) if agg == "seq-mean-token-mean" else nll
        per = lambda values: values.detach() * totals["examples"] / max(totals["tokens/0"], 1)  # noqa: E731
        return losses, {"entropy": per(policy["entropy"]), "mean_token_accuracy": per(policy["top1"]),
                        "nll": per(nll)}

    def derived(means: dict[str, float]) -> dict[str, float]:
        # Perplexity of the trained tokens: exp of their mean NLL (the loss itself under token-mean).
        return {"ppl": math.exp(min(means["nll"], 700.0))}

    return Objective("sft", 1, False, ("logps", "tokens", "entropy", "top1"), (),
                     ("entropy", "mean_token_accuracy", "nll"), compute, derived,
                     uniform_grad=agg != "seq-mean-token-mean")  # that one weighs each row's tokens by its length


def _reward_metrics(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected) -> dict[str, torch.Tensor]:
    """TRL's per-pair reward metrics (implicit rewards) and policy log-probs."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "logps/chosen": policy_chosen.detach(),
        "logps/rejected": policy_rejected.detach(),
    }


def _token_metrics(policy: Stats, totals: dict, entropy: bool = False) -> dict[str, torch.Tensor]:
    """Token-weighted means as TRL logs them, as each pair's share (their mean over the step is the token mean):
    the mean logit of chosen and of rejected response tokens, and with `entropy` the entropy over all response
    tokens and the share of chosen tokens that are the model's top-1 prediction."""
    n = totals["examples"]
    per = lambda values, count: values.detach() * n / max(count, 1)  # noqa: E731
    (lc, lr) = by_slot(policy["mean_logits"], 2)
    out = {"logits/chosen": per(lc, totals["tokens/0"]), "logits/rejected": per(lr, totals["tokens/1"])}
    if entropy:
        ec, er = by_slot(policy["entropy"], 2)
        out["entropy"] = per(ec + er, totals["tokens/0"] + totals["tokens/1"])
        out["mean_token_accuracy"] = per(by_slot(policy["top1"], 2)[0], totals["tokens/0"])
    return out

