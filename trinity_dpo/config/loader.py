"""Reading a run's configuration: YAML files, `${oc.env:VAR,default}`, `key=value` overrides, typed filling of
the `config.Config` schema, folding of alias spellings, and validation. Nothing here loads a model or data: every
error it raises is a `ConfigError` with one line for the user.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import ConfigError, one_line
from .schema import ALIASES, Config
from .checks import get_field, validate
from .folds import TRINITY_02_KEYS, fold_betas, fold_eval_format, fold_lora, fold_regularizers

log = logging.getLogger(__name__)

_VERL_PREFIX = "trainer.trainer_config."  # verl writes -1 or null for "derive the step count"
# Format columns read by some algorithms only: given to another, they are logged as not used (as Trinity's readers
# of the other kinds of rows never looked at them).
_FORMAT_READERS = {"response_key": ("sft",), "completion_key": ("kto",), "label_key": ("kto",),
                   "chosen_key": ("dpo", "reward_model", "kto"), "rejected_key": ("dpo", "reward_model", "kto")}


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> Config:
    """Build the validated `Config` from the Trinity YAML at `path` and dotted `key=value` overrides. A config with
    `stages:` is several runs: `config.stages.load_stages` reads it."""
    path, raw = read_raw(path)
    if raw.pop("stages", None):
        raise ConfigError(f"{path} has stages: each stage is a run of its own; give a config without stages")
    return build_config(raw, path, [parse_override(o) for o in overrides])


def read_raw(path: str | os.PathLike) -> tuple[Path, dict]:
    """The YAML mapping at `path`, nothing resolved yet."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    return path, _read_yaml(path)


def build_config(raw: dict, path: Path, pairs: list[tuple[str, Any]]) -> Config:
    """The validated `Config` of the mapping `raw` (read from `path`) with the overrides `pairs` applied: the
    trainer file merged in, `${...}` resolved, every spelling folded."""
    merged = omega(lambda: OmegaConf.create(raw), path)
    for key, value in pairs:
        omega(lambda: OmegaConf.update(merged, key, value, merge=True, force_add=True), f"override {key}")
    data = _to_plain(merged, path)
    trainer = data.setdefault("trainer", {}) or {}
    if not isinstance(trainer, dict):
        raise ConfigError(f"{path}: 'trainer' must be a mapping, got {type(trainer).__name__}")
    data["trainer"] = trainer
    if trainer.get("trainer_config_path"):
        verl_path = _find_trainer_file(str(trainer["trainer_config_path"]), path)
        # The trainer file's own `${trainer.project_name}`-style references point into that file: resolve it alone.
        verl = _to_plain(omega(lambda: OmegaConf.create(_read_yaml(verl_path)), verl_path), verl_path)
        inline = trainer.get("trainer_config") or {}
        if not isinstance(inline, dict):
            _refuse_non_mapping(inline, "trainer.trainer_config")
        trainer["trainer_config"] = omega(lambda: OmegaConf.to_container(OmegaConf.merge(verl, inline)),
                                          f"{path}: trainer.trainer_config over {verl_path}")
    provided: set[str] = set()
    ignored: list[str] = []
    cfg = _build(Config, data, "", provided, ignored)
    kind = cfg.algorithm.algorithm_type
    if kind != "sft":  # Trinity's DPO reader never read it: pairs are kept whole
        ignored += [k for k in provided if k == f"{_VERL_PREFIX}data.truncation"]
    ignored += sorted(k for k in provided if k.startswith("buffer.trainer_input.")
                      and kind not in _FORMAT_READERS.get(k.rpartition(".format.")[2], (kind,)))
    if ignored:
        verl = [k[len(_VERL_PREFIX):] for k in ignored if k.startswith(_VERL_PREFIX)]
        main = [k for k in ignored if not k.startswith(_VERL_PREFIX)]
        parts = ([f"config: {', '.join(main)}"] if main else []) + ([f"trainer config: {', '.join(verl)}"] if verl else [])
        log.info("ignored, not used by offline %s: %s", cfg.algorithm.algorithm_type.upper(), "; ".join(parts))
    resolve(cfg, provided, {key for key, _ in pairs})
    _read_chat_template(cfg, path)
    validate(cfg)
    return cfg


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML: {getattr(e, 'problem', None) or e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top, got {type(data).__name__}")
    return data


def omega(action, where) -> Any:
    """`action()`, an OmegaConf call on the user's YAML; what it refuses (a broken `${`, a list merged into a
    mapping) becomes a one-line `ConfigError` naming `where`."""
    try:
        return action()
    except (OmegaConfBaseException, TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {one_line(e)}") from None


def _to_plain(conf: Any, path: Path) -> dict:
    try:
        return OmegaConf.to_container(conf, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: cannot resolve {one_line(e)}") from None


def _find_trainer_file(name: str, config_path: Path) -> Path:
    for candidate in (Path(name), config_path.parent / name, config_path.parent / Path(name).name):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"trainer.trainer_config_path: file not found: {name} (looked in the working directory "
                      f"and beside {config_path})")


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key or key != key.strip():
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    try:
        return key, yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        return key, value


# --------------------------------------------------------------------------- typed filling


def _build(cls: type, data: Any, prefix: str, provided: set[str], ignored: list[str], default: Any = None) -> Any:
    """Fill dataclass `cls` from mapping `data` over `default` (the parent field's own default instance: the eval
    buffer's split is 'test', not StorageConfig's 'train'); record the dotted keys the user gave in `provided`."""
    where = prefix.rstrip(".") or "the top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        _refuse_non_mapping(data, where)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    known_ignored = getattr(cls, "IGNORED", ())
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key in known_ignored:
            ignored.append(dotted)
            continue
        if key not in names:
            close = difflib.get_close_matches(str(key), names + list(known_ignored), n=1, cutoff=0.6)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys here: {', '.join(names)}"
            raise ConfigError(f"unknown key '{dotted}'{hint}")
        tp = hints[key]
        item = _listed_dataclass(tp)
        if item is not None and isinstance(value, (list, tuple)):
            kwargs[key] = [_build(item, v, f"{dotted}[{i}].", provided, ignored) for i, v in enumerate(value)]
            provided.add(dotted)
        elif dataclasses.is_dataclass(tp):
            inner = getattr(default, key) if default is not None else _field_default(cls, key)
            kwargs[key] = _build(tp, value, dotted + ".", provided, ignored, inner)
        else:
            kwargs[key] = _coerce(value, tp, dotted)
            if value is not None:
                provided.add(dotted)
    return dataclasses.replace(default, **kwargs) if default is not None else cls(**kwargs)


def _listed_dataclass(tp: Any) -> type | None:
    """The dataclass of a `list[D]` or `Optional[list[D]]` field (Trinity's `model.lora_configs`), else None."""
    if typing.get_origin(tp) is Union:
        tp = next((a for a in typing.get_args(tp) if a is not type(None)), None)
    args = typing.get_args(tp) if typing.get_origin(tp) is list else ()
    return args[0] if args and dataclasses.is_dataclass(args[0]) else None


def _refuse_non_mapping(value: Any, where: str) -> None:
    if isinstance(value, str) and value.strip() in ("...", "…"):
        raise ConfigError(f"{where}: '...' is a placeholder (as in Trinity's docs), not settings; write the "
                          "section's keys there or remove it")
    raise ConfigError(f"{where}: expected a mapping, got {_describe(value)}")


def _field_default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for tp_ in inner[:-1]:  # the first that takes the value (a list, else a string)
            try:
                return _coerce(value, tp_, key)
            except ConfigError:
                pass
        return _coerce(value, inner[-1], key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if origin is list:
        if isinstance(value, (list, tuple)):
            return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
    if isinstance(value, str) and tp in (int, float, bool):
        value = _from_env_string(value)  # ${oc.env:...} always yields strings
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    if tp is Any:
        return value
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))
    raise ConfigError(f"{key}: expected {kind}, got {_describe(value)}")


def _from_env_string(text: str) -> Any:
    # YAML 1.1 reads '5e-7' as a string; numbers written that way are common in trainer files.
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


# --------------------------------------------------------------------------- aliases and validation


def _set(cfg: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        cfg = getattr(cfg, part)
    setattr(cfg, last, value)


def resolve(cfg: Config, provided: set[str], overridden: set[str] = frozenset()) -> None:
    """Fold every alias group of `config.ALIASES` into its canonical field (in place), tier by tier.

    A command-line override of any spelling replaces what the files say under the other spellings.
    """
    dated = sorted(k for k in provided if k.startswith(TRINITY_02_KEYS))  # as written, before folding adds any
    for section in ("algorithm.optimizer", "trainer.trainer_config.actor_rollout_ref.actor.optim"):
        fold_betas(cfg, section, provided, overridden)
    for canonical, tiers in ALIASES:
        given = [{k: get_field(cfg, k) for k in tier if k in provided and get_field(cfg, k) is not None} for tier in tiers]
        if any(k in overridden for tier in given for k in tier):
            given = [{k: v for k, v in tier.items() if k in overridden} for tier in given]
        given = [tier for tier in given if tier]
        if not given:
            continue
        winner = given[0]
        if len(set(map(repr, winner.values()))) > 1:
            listing = ", ".join(f"{k}={v!r}" for k, v in winner.items())
            raise ConfigError(f"conflicting values for one setting: {listing}")
        value = next(iter(winner.values()))
        losers = {k: v for tier in given[1:] for k, v in tier.items() if repr(v) != repr(value)}
        if losers:
            log.info("%s=%r is used over %s, as Trinity gives it precedence", next(iter(winner)), value,
                     ", ".join(f"{k}={v!r}" for k, v in losers.items()))
        _set(cfg, canonical, value)
        provided.add(canonical)
    fold_lora(cfg, provided, overridden)
    algo = cfg.algorithm
    if algo.algorithm_type == "sft" and "algorithm.policy_loss_fn" not in provided:
        algo.policy_loss_fn = "sft"  # Trinity's default loss for its SFT algorithm
    if algo.algorithm_type == "reward_model":  # reward model: its own loss; a score head answers no prompts
        algo.policy_loss_fn = algo.policy_loss_fn if "algorithm.policy_loss_fn" in provided else "reward_model"
        if "trainer.eval_samples" in provided and cfg.trainer.eval_samples:
            log.info("trainer.eval_samples: %d not used: a reward model scores answers and generates none",
                     cfg.trainer.eval_samples)
        cfg.trainer.eval_samples = 0
    if algo.algorithm_type == "kto":  # KTO's own objective, TRL's loss type `kto` unless one is given
        algo.policy_loss_fn = algo.policy_loss_fn if "algorithm.policy_loss_fn" in provided else "kto"
        if "algorithm.policy_loss_fn_args.loss_type" not in provided:
            algo.policy_loss_fn_args.loss_type = "kto"
    if algo.use_token_level_loss is not None and not ("algorithm.loss_agg_mode" in overridden
                                                      and "algorithm.use_token_level_loss" not in overridden):
        mode = "token-mean" if algo.use_token_level_loss else "seq-mean-token-mean"
        if ("algorithm.loss_agg_mode" in provided and algo.loss_agg_mode != mode
                and "algorithm.use_token_level_loss" not in overridden):
            raise ConfigError(f"conflicting values for one setting: algorithm.loss_agg_mode={algo.loss_agg_mode!r}, "
                              f"algorithm.use_token_level_loss={algo.use_token_level_loss}")
        algo.loss_agg_mode = mode
    fmt = cfg.buffer.trainer_input.experience_buffer.format
    if fmt.enable_thinking is None:
        fmt.enable_thinking = cfg.model.enable_thinking
    fold_regularizers(cfg, dated)
    args = algo.policy_loss_fn_args
    if isinstance(args.loss_type, str):
        args.loss_type = [args.loss_type]
    if cfg.continue_from_checkpoint is False and not ("trainer.resume_mode" in overridden
                                                       and "continue_from_checkpoint" not in overridden):
        if ("trainer.resume_mode" in provided and cfg.trainer.resume_mode != "disable"
                and "continue_from_checkpoint" not in overridden):
            raise ConfigError(f"conflicting values for one setting: continue_from_checkpoint=False, "
                              f"trainer.resume_mode={cfg.trainer.resume_mode!r}")
        cfg.trainer.resume_mode = "disable"
    fold_eval_format(cfg, provided)


def _read_chat_template(cfg: Config, config_path: Path) -> None:
    """`model.chat_template_path`: the file's text becomes the chat template unless one is given inline, as
    Trinity's model check reads it (relative paths: the working directory, else beside the config)."""
    name = cfg.model.chat_template_path
    if not name or cfg.model.custom_chat_template is not None:
        return
    found = next((p for p in (Path(name), config_path.parent / name) if p.is_file()), Path(name))
    try:
        cfg.model.custom_chat_template = found.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise ConfigError(f"model.chat_template_path: cannot read {name}: {reason}") from None


def config_for_eval(config: str | None, data: str | None, ref: str | None, overrides: list[str]) -> Config:
    """The config `trinity eval` runs with: the given file's, or defaults reading `data`; `ref` names the base."""
    model = [f"model.model_path={ref}"] if ref else []
    if config:  # a config with stages: the last stage's data, whose result is what is usually evaluated
        from .stages import load_stages

        return load_stages(config, [*overrides, *model])[-1].cfg
    if not ref:
        raise ConfigError("trinity eval --data needs --ref BASE: the model the checkpoint is compared with")
    if overrides:
        raise ConfigError("key=value overrides need --config")
    cfg = Config()
    cfg.model.model_path = ref
    cfg.buffer.trainer_input.experience_buffer.path = data
    cfg.trainer.trainer_config.trainer.logger = ["console"]
    validate(cfg)
    return cfg
