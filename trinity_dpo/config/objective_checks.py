"""The objective's settings, checked when the config loads: the loss types each `policy_loss_fn` has, and each
combination TRL refuses, refused in one line with TRL's reason. The losses themselves are in `objective/losses.py`,
which takes its names from here.
"""
from __future__ import annotations

import logging

from ..errors import ConfigError
from .kto_checks import refuse_kto_weights, validate_kto
from .reward_checks import validate_reward_model
from .schema import AlgorithmConfig

log = logging.getLogger(__name__)

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The f-DPO reparameterisation leaves a beta log Z(x) term that cancels only in the chosen - rejected difference,
# so TRL allows another f-divergence only for the losses built on that difference.
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
# These sort the batch's log-ratios, so a pair's loss depends on the other pairs of its micro-batch (as in TRL,
# where it depends on the other pairs of its device batch).
SORTING_LOSS_TYPES = ("aot", "aot_unpaired")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_objective(algorithm: AlgorithmConfig) -> None:
    """The objective's settings, each refused in one line as TRL refuses it (`ConfigError`)."""
    fn, args = algorithm.policy_loss_fn, algorithm.policy_loss_fn_args
    _check((fn == "sft") == (algorithm.algorithm_type == "sft"),
           f"algorithm.policy_loss_fn: {fn!r} does not go with algorithm_type {algorithm.algorithm_type!r} (sft trains "
           "with policy_loss_fn sft; dpo with dpo, simpo, cpo or orpo)")
    _check((fn == "reward_model") == (algorithm.algorithm_type == "reward_model"),
           f"algorithm.policy_loss_fn: {fn!r} does not go with algorithm_type {algorithm.algorithm_type!r} (a reward "
           "model trains with policy_loss_fn reward_model, the only loss of algorithm_type reward_model)")
    key = "algorithm.policy_loss_fn_args."
    if fn == "reward_model":
        return validate_reward_model(algorithm)
    _check(args.center_rewards_coefficient is None, f"{key}center_rewards_coefficient applies to algorithm_type "
           "reward_model only")
    if fn == "kto" or algorithm.algorithm_type == "kto":  # KTO's settings: kto_checks.py
        return validate_kto(algorithm)
    refuse_kto_weights(algorithm)
    types = [args.loss_type] if isinstance(args.loss_type, str) else args.loss_type
    allowed = DPO_LOSS_TYPES if fn == "dpo" else CPO_LOSS_TYPES if fn == "cpo" else ("sigmoid",)
    _check(args.beta > 0, f"{key}beta must be > 0, got {args.beta}")
    _check(0 <= args.label_smoothing < 0.5, f"{key}label_smoothing must be in [0, 0.5), got {args.label_smoothing}")
    _check(bool(types), f"{key}loss_type: name at least one loss type")
    for t in types:
        _check(t in allowed, f"{key}loss_type: {t!r} is not a loss type of policy_loss_fn {fn!r}; choose from "
               f"{', '.join(allowed)}" + ("" if fn == "dpo" else " (the loss types of dpo need policy_loss_fn: dpo)"))
    _check(fn == "dpo" or len(types) == 1, f"{key}loss_type: a list of loss types (MPO) needs policy_loss_fn: dpo")
    _check(args.loss_weights is None or len(args.loss_weights) == len(types),
           f"{key}loss_weights must have the same length as loss_type when combining multiple losses: got "
           f"{len(args.loss_weights or [])} weights for {len(types)} loss types")
    _check(args.ld_alpha is None or 0 <= args.ld_alpha <= 1, f"{key}ld_alpha must be in [0, 1], got {args.ld_alpha}")
    if args.f_divergence_type != "reverse_kl":
        _check(set(types) <= set(F_DIVERGENCE_LOSS_TYPES),
               f"{key}f_divergence_type: {args.f_divergence_type!r} is only supported for the loss types "
               f"{', '.join(sorted(F_DIVERGENCE_LOSS_TYPES))} (the f-DPO reparameterisation cancels only in the "
               "chosen - rejected difference); use reverse_kl with these losses")
    _check(not (args.use_weighting and set(types) & set(SORTING_LOSS_TYPES)),
           f"{key}use_weighting: WPO weighting is not implemented for 'aot' or 'aot_unpaired', because those losses "
           "sort samples, which would misalign per-pair weights")
    _check(not (args.use_weighting and "sft" in types),
           f"{key}use_weighting with loss_type sft: TRL weighs the batch-mean SFT term per pair, which depends on "
           "the whole batch at once; this tool does not reproduce it")
    _check("exo_pair" not in types or args.label_smoothing > 0,
           f"{key}label_smoothing must be greater than 0.0 when using 'exo_pair' loss (the EXO paper recommends 1e-3)")
    _check(fn == "dpo" or not (args.ld_alpha is not None or args.use_weighting or args.loss_weights
                               or args.f_divergence_type != "reverse_kl"),
           f"{key}ld_alpha, use_weighting, loss_weights and f_divergence_type apply to policy_loss_fn: dpo only")
    _check(args.cpo_alpha is None or fn in ("cpo", "simpo"), f"{key}cpo_alpha applies to policy_loss_fn cpo/simpo")
    _refuse_unread(fn, types, args)
    if "sigmoid" in types and args.label_smoothing and fn == "dpo":
        log.info("label_smoothing %.3g with loss_type sigmoid: conservative DPO, as in Trinity-RFT (TRL 1.16's "
                 "sigmoid ignores label_smoothing)", args.label_smoothing)


def _refuse_unread(fn: str, types: list[str], args) -> None:
    """A loss setting given a value other than its default where the objective never reads it, refused in one
    line (Trinity hands the arguments to the loss's constructor, which takes only its own)."""
    simpo = fn == "simpo" or (fn == "cpo" and "simpo" in types)
    readers = {"gamma": (0.5, simpo, "policy_loss_fn simpo, or cpo with loss_type simpo"),
               "discopop_tau": (0.05, fn == "dpo" and "discopop" in types, "loss_type discopop"),
               "f_alpha_divergence_coef": (0.5, fn == "dpo" and args.f_divergence_type == "alpha_divergence",
                                           "f_divergence_type alpha_divergence"),
               "label_smoothing": (0.0, fn not in ("orpo", "sft"), "policy_loss_fn dpo, simpo or cpo")}
    for name, (default, read, where) in readers.items():
        _check(getattr(args, name) == default or read, f"algorithm.policy_loss_fn_args.{name}: not read by "
               f"policy_loss_fn {fn} with loss_type {', '.join(types)} (it applies to {where}); remove it")
