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

from . import builtin, hub
from .config import ALIASES, Config, ConfigError

log = logging.getLogger(__name__)

_VERL_PREFIX = "trainer.trainer_config."  # verl writes -1 or null for "derive the step count"


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> Config:
    """Build the validated `Config` from the Trinity YAML at `path` and dotted `key=value` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = _read_yaml(path)
    pairs = [_parse_override(o) for o in overrides]
    trainer = raw.setdefault("trainer", {}) or {}
    if not isinstance(trainer, dict):
        raise ConfigError(f"{path}: 'trainer' must be a mapping, got {type(trainer).__name__}")
    raw["trainer"] = trainer
    file_path = dict(pairs).get("trainer.trainer_config_path", trainer.get("trainer_config_path"))
    if file_path:
        file_path = _resolve_scalar(file_path, "trainer.trainer_config_path")
        verl_path = _find_trainer_file(str(file_path), path)
        # The trainer file's own `${trainer.project_name}`-style references point into that file: resolve it alone.
        verl = _to_plain(OmegaConf.create(_read_yaml(verl_path)), verl_path)
        inline = trainer.get("trainer_config") or {}
        if not isinstance(inline, dict):
            _refuse_non_mapping(inline, "trainer.trainer_config")
        trainer["trainer_config"] = OmegaConf.to_container(OmegaConf.merge(verl, inline))
    merged = OmegaConf.create(raw)
    for key, value in pairs:
        OmegaConf.update(merged, key, value, merge=True, force_add=True)
    data = _to_plain(merged, path)
    provided: set[str] = set()
    ignored: list[str] = []
    cfg = _build(Config, data, "", provided, ignored)
    if cfg.algorithm.algorithm_type == "dpo":  # Trinity's DPO reader never read it: pairs are kept whole
        ignored += [k for k in provided if k == f"{_VERL_PREFIX}data.truncation"]
    if ignored:
        verl = [k[len(_VERL_PREFIX):] for k in ignored if k.startswith(_VERL_PREFIX)]
        main = [k for k in ignored if not k.startswith(_VERL_PREFIX)]
        parts = ([f"config: {', '.join(main)}"] if main else []) + ([f"trainer config: {', '.join(verl)}"] if verl else [])
        log.info("ignored, not used by offline %s: %s", cfg.algorithm.algorithm_type.upper(), "; ".join(parts))
    resolve(cfg, provided, {key for key, _ in pairs})
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


def _to_plain(conf: Any, path: Path) -> dict:
    try:
        return OmegaConf.to_container(conf, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: cannot resolve {_first_line(e)}") from None


def _find_trainer_file(name: str, config_path: Path) -> Path:
    for candidate in (Path(name), config_path.parent / name, config_path.parent / Path(name).name):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"trainer.trainer_config_path: file not found: {name} (looked in the working directory "
                      f"and beside {config_path})")


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key or key != key.strip():
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    try:
        return key, yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        return key, value


def _resolve_scalar(value: Any, key: str) -> Any:
    try:
        return OmegaConf.create({"v": value}).v
    except OmegaConfBaseException as e:
        raise ConfigError(f"{key}: cannot resolve {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0]


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
        if dataclasses.is_dataclass(tp):
            inner = getattr(default, key) if default is not None else _field_default(cls, key)
            kwargs[key] = _build(tp, value, dotted + ".", provided, ignored, inner)
        else:
            kwargs[key] = _coerce(value, tp, dotted)
            if value is not None:
                provided.add(dotted)
    return dataclasses.replace(default, **kwargs) if default is not None else cls(**kwargs)


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


def get_field(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _set(cfg: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        cfg = getattr(cfg, part)
    setattr(cfg, last, value)


def resolve(cfg: Config, provided: set[str], overridden: set[str] = frozenset()) -> None:
    """Fold every alias group of `config.ALIASES` into its canonical field (in place), tier by tier.

    A command-line override of any spelling replaces what the files say under the other spellings.
    """
    for section in ("algorithm.optimizer", "trainer.trainer_config.actor_rollout_ref.actor.optim"):
        _fold_betas(cfg, section, provided)
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
    algo = cfg.algorithm
    if algo.algorithm_type == "sft" and "algorithm.policy_loss_fn" not in provided:
        algo.policy_loss_fn = "sft"  # Trinity's default loss for its SFT algorithm
    if algo.use_token_level_loss is not None:
        mode = "token-mean" if algo.use_token_level_loss else "seq-mean-token-mean"
        if "algorithm.loss_agg_mode" in provided and algo.loss_agg_mode != mode:
            raise ConfigError(f"conflicting values for one setting: algorithm.loss_agg_mode={algo.loss_agg_mode!r}, "
                              f"algorithm.use_token_level_loss={algo.use_token_level_loss}")
        algo.loss_agg_mode = mode
    fmt = cfg.buffer.trainer_input.experience_buffer.format
    if fmt.enable_thinking is None:
        fmt.enable_thinking = cfg.model.enable_thinking
    args = algo.policy_loss_fn_args
    if isinstance(args.loss_type, str):
        args.loss_type = [args.loss_type]
    if cfg.continue_from_checkpoint is False:
        if "trainer.resume_mode" in provided and cfg.trainer.resume_mode != "disable":
            raise ConfigError(f"conflicting values for one setting: continue_from_checkpoint=False, "
                              f"trainer.resume_mode={cfg.trainer.resume_mode!r}")
        cfg.trainer.resume_mode = "disable"
    inputs = cfg.buffer.trainer_input
    if not any(k.startswith("buffer.trainer_input.eval_buffer.format.") for k in provided):
        inputs.eval_buffer.format = dataclasses.replace(inputs.experience_buffer.format)


def _fold_betas(cfg: Config, section: str, provided: set[str]) -> None:
    opt = get_field(cfg, section)
    if opt.beta1 is None and opt.beta2 is None:
        return
    betas = [opt.beta1 if opt.beta1 is not None else opt.betas[0], opt.beta2 if opt.beta2 is not None else opt.betas[1]]
    if f"{section}.betas" in provided and betas != opt.betas:
        raise ConfigError(f"conflicting values for one setting: {section}.betas={opt.betas} and beta1/beta2={betas}")
    opt.betas = betas
    provided.add(f"{section}.betas")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Range and path checks, all before any model or data loads."""
    opt = cfg.algorithm.optimizer
    actor = cfg.trainer.trainer_config.actor_rollout_ref.actor
    for key in ("buffer.train_batch_size", "buffer.total_epochs", "trainer.max_consecutive_skips", "cluster.node_num",
                "cluster.gpu_per_node", "trainer.log_interval"):
        _check(get_field(cfg, key) > 0, f"{key} must be a positive integer, got {get_field(cfg, key)}")
    for key in ("trainer.total_steps", "buffer.total_steps", "model.max_model_len", "model.max_prompt_tokens",
                "model.max_response_tokens", _ACTOR_MICRO, "trainer.max_checkpoints_to_keep"):
        value = get_field(cfg, key)
        _check(value is None or value > 0, f"{key} must be a positive integer, got {value}")
    for key in ("trainer.save_interval", "trainer.eval_interval", "trainer.eval_samples"):
        _check(get_field(cfg, key) >= 0, f"{key} must be >= 0, got {get_field(cfg, key)}")
    _check(cfg.trainer.eval_max_new_tokens > 0,
           f"trainer.eval_max_new_tokens must be a positive integer, got {cfg.trainer.eval_max_new_tokens}")
    fraction = cfg.buffer.trainer_input.eval_fraction
    _check(0 <= fraction <= 0.5, f"buffer.trainer_input.eval_fraction must be in [0, 0.5], got {fraction}")
    from .objectives import validate as validate_objective

    validate_objective(cfg.algorithm)
    _check(opt.lr > 0, f"algorithm.optimizer.lr must be > 0, got {opt.lr}")
    _check(0 <= opt.lr_warmup_steps_ratio <= 1,
           f"algorithm.optimizer.lr_warmup_steps_ratio must be in [0, 1], got {opt.lr_warmup_steps_ratio}")
    _check(0 <= opt.min_lr_ratio <= 1, f"algorithm.optimizer.min_lr_ratio must be in [0, 1], got {opt.min_lr_ratio}")
    _check(len(opt.betas) == 2 and all(0 <= b < 1 for b in opt.betas),
           f"algorithm.optimizer.betas must be two numbers in [0, 1), got {opt.betas}")
    _check(opt.weight_decay >= 0, f"algorithm.optimizer.weight_decay must be >= 0, got {opt.weight_decay}")
    _check(opt.num_cycles > 0, f"algorithm.optimizer.num_cycles must be > 0, got {opt.num_cycles}")
    _check(opt.optimizer_type.lower() in ("adam", "adamw"), f"algorithm.optimizer.optimizer_type: "
           f"{opt.optimizer_type!r} is not supported; this tool trains with AdamW ('adam' or 'adamw')")
    _refuse_unsupported(cfg)
    _check(cfg.trainer.grad_clip >= 0, f"trainer.grad_clip must be >= 0, got {cfg.trainer.grad_clip}")
    micro = actor.ppo_micro_batch_size_per_gpu
    world = cfg.cluster.node_num * cfg.cluster.gpu_per_node
    _check(actor.ppo_max_token_len_per_gpu > 0,
           f"ppo_max_token_len_per_gpu must be a positive integer, got {actor.ppo_max_token_len_per_gpu}")
    _check(cfg.buffer.train_batch_size % world == 0,
           f"buffer.batch_size ({cfg.buffer.train_batch_size}) must be divisible by the number of processes, "
           f"cluster.node_num x cluster.gpu_per_node ({world}): each takes an equal share of every step's pairs")
    if micro is not None and not actor.use_dynamic_bsz:
        _check(cfg.buffer.train_batch_size % (micro * world) == 0,
               f"buffer.batch_size ({cfg.buffer.train_batch_size}) must be divisible by "
               f"ppo_micro_batch_size_per_gpu ({micro}) x processes ({world})")
    _check(cfg.trainer.trainer_config.actor_rollout_ref.nccl_timeout > 0,
           "trainer.trainer_config.actor_rollout_ref.nccl_timeout must be a positive number of seconds")
    resume = cfg.trainer.resume_from_path
    _check(cfg.trainer.resume_mode != "resume_path" or bool(resume),
           "trainer.resume_mode is 'resume_path' but trainer.resume_from_path is not set")
    _check(not resume or Path(resume, "trainer_state", "state.json").is_file(),
           f"trainer.resume_from_path: {resume} is not a checkpoint folder of this tool (global_step_<N> with "
           "trainer_state/)")
    _validate_paths(cfg)
    from .metrics import check_sinks

    check_sinks(cfg)


_ACTOR_MICRO = "trainer.trainer_config.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu"


def _refuse_unsupported(cfg: Config) -> None:
    """Trinity and verl settings that would change training but that this tool does not do: one line each."""
    algo, verl_model = cfg.algorithm, cfg.trainer.trainer_config.actor_rollout_ref.model
    coef, kl_fn = algo.kl_loss_fn_args.kl_coef, algo.kl_loss_fn
    _check(coef in (None, 0) and (coef == 0 or kl_fn in (None, "none")),
           f"algorithm.kl_loss_fn{'_args.kl_coef' if coef else ''}: Trinity 0.2+ adds kl_coef (default 0.001) x a "
           f"per-token KL ({kl_fn or 'k2'}) to the DPO loss, which this tool does not compute; set "
           "algorithm.kl_loss_fn_args.kl_coef: 0 to train DPO alone (its beta is policy_loss_fn_args.beta)")
    entropy = algo.entropy_loss_fn_args.entropy_coef
    _check(not entropy, f"algorithm.entropy_loss_fn_args.entropy_coef: {entropy} adds an entropy term to the loss, "
           "which this tool does not compute; set it to 0")
    _check(not cfg.model.lora_configs and not verl_model.lora_rank,
           "LoRA (model.lora_configs, actor_rollout_ref.model.lora_rank) is not supported yet: remove it to train all "
           "weights")
    fmt = cfg.buffer.trainer_input.experience_buffer.format
    sft = algo.algorithm_type == "sft"
    _check(sft or not fmt.enable_concatenated_multi_turn, "format.enable_concatenated_multi_turn applies to SFT rows "
           "(algorithm.algorithm_type: sft); preference pairs train their responses")
    _check(not sft or fmt.prompt_type != "chatpair", "format.prompt_type: chatpair is for preference pairs; SFT rows "
           "are 'messages' (messages_key) or 'plaintext' (prompt_key, response_key)")
    _check(not fmt.image_key and not fmt.video_key, "format.image_key/video_key: multimodal rows are not supported; "
           "this tool trains text chat models")
    _check(not verl_model.override_config, "actor_rollout_ref.model.override_config: changing the model's config is "
           "not supported; edit the model folder's config.json instead")
    _check(not verl_model.external_lib, "actor_rollout_ref.model.external_lib: importing custom model code is not "
           "supported; use a model folder with model.trust_remote_code: true")
    _check(not cfg.stages, "stages: several stages in one config are not supported; write one config per stage and "
           "run them one after the other (model_path: the previous stage's last checkpoint)")


def _validate_paths(cfg: Config) -> None:
    """Local paths exist; hub ids are replaced by their folders in the Hugging Face cache (`hub.resolve`)."""
    model = cfg.model.model_path
    _check(bool(model), "model.model_path is required: a local Hugging Face model folder or a hub id")
    if builtin.is_builtin(model):
        builtin.check(model)
    else:
        cfg.model.model_path = model = hub.resolve(model, "model", "model.model_path")
        _check(Path(model).is_dir(), f"model.model_path: folder not found: {model}")
        _check((Path(model) / "config.json").is_file(), f"model.model_path: {model} has no config.json (not a model "
                                                        "folder)")
    inputs = cfg.buffer.trainer_input
    _check(bool(inputs.experience_buffer.path), "buffer.trainer_input.experience_buffer.path is required: a "
           ".json/.jsonl/.parquet file, a dataset folder or a hub dataset id")
    for key, storage in (("experience_buffer", inputs.experience_buffer), ("eval_buffer", inputs.eval_buffer)):
        key = f"buffer.trainer_input.{key}.path"
        if storage.path and not builtin.is_builtin(storage.path):
            storage.path = hub.resolve(storage.path, "dataset", key)
            _check(Path(storage.path).exists(), f"{key}: not found: {storage.path}")
    root = Path(cfg.checkpoint_root_dir)
    existing = next((p for p in (root, *root.parents) if p.exists()), Path("."))
    _check(existing.is_dir(), f"checkpoint_root_dir: {root} cannot be created: {existing} is not a folder")
    _check(os.access(existing, os.W_OK), f"checkpoint_root_dir: {root} is not writable ({existing} is read-only)")


def config_for_eval(config: str | None, data: str | None, ref: str | None, overrides: list[str]) -> Config:
    """The config `trinity eval` runs with: the given file's, or defaults reading `data`; `ref` names the base."""
    model = [f"model.model_path={ref}"] if ref else []
    if config:
        return load_config(config, [*overrides, *model])
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
