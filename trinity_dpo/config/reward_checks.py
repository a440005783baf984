"""The reward model's settings, checked when the config loads: what a Bradley-Terry reward model reads
(`center_rewards_coefficient`) and what it cannot take (the preference losses' options, Trinity's KL and entropy
terms, which read an LM head it does not have), each refused in one line.
"""
from __future__ import annotations

from ..errors import ConfigError
from .schema import AlgorithmConfig, LossArgs

_KEY = "algorithm.policy_loss_fn_args."
# The preference losses' settings and their defaults: any other value is a setting the reward model would ignore.
_NOT_READ = {"label_smoothing": 0.0, "loss_weights": None, "ld_alpha": None, "use_weighting": False,
             "f_divergence_type": "reverse_kl", "cpo_alpha": None, "simpo_gamma": None, "gamma": 0.5,
             "discopop_tau": 0.05, "f_alpha_divergence_coef": 0.5}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_reward_model(algorithm: AlgorithmConfig) -> None:
    """`algorithm` with policy_loss_fn reward_model: its one loss, no option of the policy losses, no extra term."""
    args: LossArgs = algorithm.policy_loss_fn_args
    types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    _check(types == ["sigmoid"], f"{_KEY}loss_type: {', '.join(map(repr, types))}: a reward model has one loss, "
           "-log sigmoid(r_chosen - r_rejected - margin) (TRL's RewardTrainer); remove loss_type")
    for name, default in _NOT_READ.items():
        _check(getattr(args, name) == default, f"{_KEY}{name} applies to the preference losses (policy_loss_fn dpo, "
               "simpo, cpo, orpo), not to a reward model; remove it")
    coef = args.center_rewards_coefficient
    _check(coef is None or coef >= 0, f"{_KEY}center_rewards_coefficient must be >= 0, got {coef}")
    _check(algorithm.kl_loss_fn in (None, "none"), f"algorithm.kl_loss_fn: {algorithm.kl_loss_fn} is a KL term of "
           "the LM head's log-probs against a reference; a reward model has neither; remove it (or set "
           "algorithm.kl_loss_fn_args.kl_coef: 0)")
    _check(not algorithm.entropy_loss_fn_args.entropy_coef, "algorithm.entropy_loss_fn_args.entropy_coef: the "
           "entropy term reads the LM head's next-token distribution, which a reward model does not have; remove it")
