"""Folding a config's spelling pairs that `schema.ALIASES`' tiers cannot say: LoRA's three spellings, verl's
beta1/beta2, the held-out format over the training one, and the KL and entropy terms as each Trinity version adds
them. `loader.resolve` calls these after the alias groups; each is one rule, with the reason in its docstring.
"""
from __future__ import annotations

import dataclasses
import logging

from ..errors import ConfigError
from .checks import get_field
from .schema import Config

log = logging.getLogger("trinity_dpo.config.loader")  # the loader's log lines, as before this split

_VERL_PREFIX = "trainer.trainer_config."


def fold_eval_format(cfg: Config, provided: set[str]) -> None:
    """The held-out data's format: the training data's, field by field, except where the eval buffer gives its own
    (a partial eval format kept the defaults for the rest, prompt_type and enable_thinking among them). One chat
    template renders both."""
    inputs, key = cfg.buffer.trainer_input, "buffer.trainer_input.eval_buffer.format."
    train, held = inputs.experience_buffer.format, inputs.eval_buffer.format
    for f in dataclasses.fields(train):
        if key + f.name not in provided:
            setattr(held, f.name, getattr(train, f.name))
    if key + "chat_template" in provided and held.chat_template != cfg.model.custom_chat_template:
        raise ConfigError(f"{key}chat_template: held-out rows are rendered with the model's chat template "
                          "(model.custom_chat_template, or experience_buffer.format.chat_template), as training rows "
                          "are; give it there")


_VERL_MODEL = _VERL_PREFIX + "actor_rollout_ref.model."
# model.lora field <- (Trinity's lora_configs[0] key, verl's actor_rollout_ref.model key)
_LORA_SPELLINGS = {"rank": ("lora_rank", "lora_rank"), "alpha": ("lora_alpha", "lora_alpha"),
                   "target_modules": ("target_modules", "target_modules"),
                   "exclude_modules": ("exclude_modules", "exclude_modules"), "path": ("path", "lora_adapter_path")}


def overriding(given: dict, overridden: set[str], keys: dict[str, tuple[str, ...]]) -> dict:
    """`given` (spelling -> value), or only its spellings overridden on the command line where there are any
    (`keys`: the override keys that write each spelling)."""
    mine = {k: v for k, v in given.items() if set(keys.get(k, ())) & overridden}
    return mine or given


def fold_lora(cfg: Config, provided: set[str], overridden: set[str] = frozenset()) -> None:
    """Fold Trinity's `model.lora_configs[0]` and verl's `lora_*` keys into `model.lora`. The three spellings are
    one tier: values given under two of them must agree. Unset fields take the default of the spelling that turned
    LoRA on (Trinity: rank 32, alpha 32; verl: alpha 16)."""
    entries = cfg.model.lora_configs or []
    if len(entries) > 1:
        raise ConfigError(f"model.lora_configs: {len(entries)} adapters given; one adapter is trained at a time (as "
                          "in Trinity)")
    verl_model = cfg.trainer.trainer_config.actor_rollout_ref.model
    lora = cfg.model.lora
    for name, (trinity_key, verl_key) in _LORA_SPELLINGS.items():
        given = {f"model.lora.{name}": getattr(lora, name)} if f"model.lora.{name}" in provided else {}
        if entries and f"model.lora_configs[0].{trinity_key}" in provided:
            given[f"model.lora_configs[0].{trinity_key}"] = getattr(entries[0], trinity_key)
        if _VERL_MODEL + verl_key in provided:
            given[_VERL_MODEL[len(_VERL_PREFIX):] + verl_key] = getattr(verl_model, verl_key)
        given = overriding(given, overridden, {
            f"model.lora.{name}": (f"model.lora.{name}",),
            f"model.lora_configs[0].{trinity_key}": (f"model.lora_configs.0.{trinity_key}",
                                                     f"model.lora_configs[0].{trinity_key}"),
            _VERL_MODEL[len(_VERL_PREFIX):] + verl_key: (_VERL_MODEL + verl_key,)})
        if len(set(map(repr, given.values()))) > 1:
            listing = ", ".join(f"{k}={v!r}" for k, v in given.items())
            raise ConfigError(f"conflicting values for one setting: {listing}")
        if given:
            setattr(lora, name, next(iter(given.values())))
        elif entries:
            setattr(lora, name, getattr(entries[0], trinity_key))  # Trinity's defaults, as Trinity reads an entry
    if lora.alpha is None:
        lora.alpha = 32.0 if entries else 16.0 if verl_model.lora_rank else 32.0


# Keys that only Trinity 0.2+ configs have: their presence dates a config (older ones gave DPO's beta as the trainer
# file's kl_loss_coef and had no KL term).
TRINITY_02_KEYS = ("algorithm.policy_loss_fn", "algorithm.kl_loss_fn", "algorithm.entropy_loss_fn")


def fold_regularizers(cfg: Config, dated: list[str]) -> None:
    """The KL and entropy terms as the config's Trinity version would add them, into `kl_loss_fn` (a name or
    'none'), `kl_loss_fn_args.kl_coef` and `entropy_loss_fn_args.entropy_coef` (numbers), with the reason logged.

    Trinity 0.2+ adds kl_coef x KL to DPO with `kl_loss_fn` k2 and kl_coef 0.001 when unset, and its config check
    turns `none` into k2; a config without 0.2+ keys (`dated`: those it has) is older, and no version before had a
    KL term."""
    algo = cfg.algorithm
    kl_args, entropy_args = algo.kl_loss_fn_args, algo.entropy_loss_fn_args
    if algo.algorithm_type == "dpo" and algo.policy_loss_fn == "dpo" and dated:
        if algo.kl_loss_fn in (None, "none"):
            log.info("algorithm.kl_loss_fn: %s -> k2: Trinity 0.2+ trains DPO with a KL term (its config check "
                     "replaces an unset or 'none' one by k2); algorithm.kl_loss_fn_args.kl_coef: 0 turns it off",
                     algo.kl_loss_fn or "unset")
            algo.kl_loss_fn = "k2"
        if kl_args.kl_coef is None:
            kl_args.kl_coef = 0.001
    elif algo.kl_loss_fn in (None, "none") or kl_args.kl_coef == 0:
        algo.kl_loss_fn = "none"
    elif kl_args.kl_coef is None:
        kl_args.kl_coef = 0.001
    if kl_args.kl_coef == 0:
        algo.kl_loss_fn = "none"
    kl_args.kl_coef = kl_args.kl_coef or 0.0
    if algo.entropy_loss_fn == "none" or entropy_args.entropy_coef is None:
        entropy_args.entropy_coef = 0.0
    if algo.kl_loss_fn != "none" or entropy_args.entropy_coef:
        log.info("loss terms besides %s: %s%s (%s over the step's response tokens; Trinity 0.2+ spellings: %s)",
                 algo.policy_loss_fn,
                 f"+ {kl_args.kl_coef:g} x KL ({algo.kl_loss_fn}) " if algo.kl_loss_fn != "none" else "",
                 f"- {entropy_args.entropy_coef:g} x entropy" if entropy_args.entropy_coef else "",
                 algo.loss_agg_mode, ", ".join(dated) or "none")


def fold_betas(cfg: Config, section: str, provided: set[str], overridden: set[str] = frozenset()) -> None:
    """verl's beta1/beta2 into `betas`; a command-line override of either spelling replaces the file's other one."""
    opt = get_field(cfg, section)
    if f"{section}.betas" in overridden and not {f"{section}.beta1", f"{section}.beta2"} & overridden:
        opt.beta1 = opt.beta2 = None
    elif {f"{section}.beta1", f"{section}.beta2"} & overridden:
        provided.discard(f"{section}.betas")
    if opt.beta1 is None and opt.beta2 is None:
        return
    if len(opt.betas) != 2:
        raise ConfigError(f"{section}.betas must be two numbers in [0, 1), got {opt.betas}")
    betas = [opt.beta1 if opt.beta1 is not None else opt.betas[0], opt.beta2 if opt.beta2 is not None else opt.betas[1]]
    if f"{section}.betas" in provided and betas != opt.betas:
        raise ConfigError(f"conflicting values for one setting: {section}.betas={opt.betas} and beta1/beta2={betas}")
    opt.betas = betas
    provided.add(f"{section}.betas")
