"""KTO's settings (`algorithm.algorithm_type: kto`, TRL's `KTOTrainer`), checked when the config loads: each
combination it does not take is refused in one line. The objective itself is `objective/kto.py`.
"""
from __future__ import annotations

from ..errors import ConfigError
from .schema import AlgorithmConfig, Config

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
KL_LOSS_TYPES = ("kto",)  # those that estimate the KL baseline from mismatched completions (TRL's calculate_KL)
_KEY = "algorithm.policy_loss_fn_args."


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_kto(algorithm: AlgorithmConfig) -> None:
    """The objective's settings of a KTO config (or a KTO objective named under another algorithm_type)."""
    fn, args = algorithm.policy_loss_fn, algorithm.policy_loss_fn_args
    _check(fn == "kto" and algorithm.algorithm_type == "kto", f"algorithm.policy_loss_fn: {fn!r} does not go with "
           f"algorithm_type {algorithm.algorithm_type!r} (algorithm_type kto trains with policy_loss_fn kto, its only "
           "loss)")
    types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    _check(len(types) == 1 and types[0] in KTO_LOSS_TYPES, f"{_KEY}loss_type: {types!r} is not a loss type of KTO; "
           f"choose one of {', '.join(KTO_LOSS_TYPES)}")
    _check(args.beta > 0, f"{_KEY}beta must be > 0, got {args.beta}")
    for name in ("desirable_weight", "undesirable_weight"):
        _check(getattr(args, name) >= 0, f"{_KEY}{name} must be >= 0, got {getattr(args, name)}")
    _check(algorithm.kl_loss_fn in (None, "none"), f"algorithm.kl_loss_fn: {algorithm.kl_loss_fn} adds Trinity's KL "
           "term to the loss, which KTO does not take: KTO's loss holds its own KL baseline; remove it (or set "
           "algorithm.kl_loss_fn_args.kl_coef: 0)")
    given = [name for name, off in (("label_smoothing", 0.0), ("ld_alpha", None), ("use_weighting", False),
                                    ("loss_weights", None), ("f_divergence_type", "reverse_kl"),
                                    ("cpo_alpha", None), ("simpo_gamma", None), ("gamma", 0.5),
                                    ("discopop_tau", 0.05), ("f_alpha_divergence_coef", 0.5),
                                    ("center_rewards_coefficient", None))
             if getattr(args, name, off) != off]
    _check(not given, f"{_KEY}{given[0] if given else ''}: not a setting of KTO (its settings are beta, loss_type, "
           "desirable_weight and undesirable_weight)")


def refuse_kto_weights(algorithm: AlgorithmConfig) -> None:
    """The KTO weights given to another objective."""
    args = algorithm.policy_loss_fn_args
    _check((args.desirable_weight, args.undesirable_weight) == (1.0, 1.0), f"{_KEY}desirable_weight and "
           "undesirable_weight apply to algorithm_type kto only")


def check_kto_batch(cfg: Config) -> None:
    """A KL baseline needs another example's completion in the step: a step of one example would pair it with
    its own completion, and the baseline would be its own implied reward (TRL refuses a batch of 1 too)."""
    algo = cfg.algorithm
    if algo.algorithm_type != "kto":
        return
    types = [algo.policy_loss_fn_args.loss_type] if isinstance(algo.policy_loss_fn_args.loss_type, str) else \
        algo.policy_loss_fn_args.loss_type
    _check(cfg.buffer.train_batch_size > 1 or not set(types) & set(KL_LOSS_TYPES), "buffer.batch_size must be at "
           "least 2 for loss_type kto: its KL baseline pairs each example of a step with another example's "
           "completion")
