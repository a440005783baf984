"""Checking a loaded configuration: ranges, settings this tool does not do (refused in one line each) and paths.
Nothing here loads a model or data; every failure is a `ConfigError` with one line for the user.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import ConfigError
from .kto_checks import check_kto_batch
from .objective_checks import validate_objective
from .schema import Config


def get_field(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


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
                "model.max_response_tokens", _ACTOR_MICRO):
        value = get_field(cfg, key)
        _check(value is None or value > 0, f"{key} must be a positive integer, got {value}")
    for key in ("trainer.save_interval", "trainer.eval_interval", "trainer.eval_samples", "buffer.tokenize_workers",
                "trainer.max_checkpoints_to_keep"):  # max_checkpoints_to_keep 0: keep all, as in Trinity
        value = get_field(cfg, key)
        _check(value is None or value >= 0, f"{key} must be >= 0, got {value}")
    _check(cfg.trainer.eval_max_new_tokens > 0,
           f"trainer.eval_max_new_tokens must be a positive integer, got {cfg.trainer.eval_max_new_tokens}")
    fraction = cfg.buffer.trainer_input.eval_fraction
    _check(0 <= fraction <= 0.5, f"buffer.trainer_input.eval_fraction must be in [0, 0.5], got {fraction}")
    _check(not fraction or not cfg.buffer.trainer_input.eval_buffer.path, "buffer.trainer_input.eval_fraction holds "
           "out part of the training data, and eval_buffer.path gives held-out data of its own: set one of them")
    validate_objective(cfg.algorithm)
    check_kto_batch(cfg)
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
    _check_lora(cfg)
    check_sinks(cfg)


_ACTOR_MICRO = "trainer.trainer_config.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu"


def _refuse_unsupported(cfg: Config) -> None:
    """Trinity and verl settings that would change training but that this tool does not do: one line each."""
    algo, verl_model = cfg.algorithm, cfg.trainer.trainer_config.actor_rollout_ref.model
    _check(algo.kl_loss_fn == "none" or algo.policy_loss_fn == "dpo",
           f"algorithm.kl_loss_fn: {algo.kl_loss_fn} is a KL term against the reference, and {algo.policy_loss_fn} has "
           "no reference; remove it (or set algorithm.kl_loss_fn_args.kl_coef: 0)")
    sft = algo.algorithm_type == "sft"
    inputs = cfg.buffer.trainer_input
    for fmt in (inputs.experience_buffer.format, inputs.eval_buffer.format):  # held-out rows are read alike
        _check(sft or not fmt.enable_concatenated_multi_turn, "format.enable_concatenated_multi_turn applies to SFT "
               "rows (algorithm.algorithm_type: sft); preference pairs train their responses")
        _check(not sft or fmt.prompt_type != "chatpair", "format.prompt_type: chatpair is for preference pairs; SFT "
               "rows are 'messages' (messages_key) or 'plaintext' (prompt_key, response_key)")
        _check(not fmt.image_key and not fmt.video_key, "format.image_key/video_key: multimodal rows are not "
               "supported; this tool trains text chat models")
    _check(not verl_model.override_config, "actor_rollout_ref.model.override_config: changing the model's config is "
           "not supported; edit the model folder's config.json instead")
    every = verl_model.gradient_checkpointing_every
    _check(every >= 1, f"actor_rollout_ref.model.gradient_checkpointing_every must be a positive integer, got {every}")
    _check(every == 1 or verl_model.enable_gradient_checkpointing, "actor_rollout_ref.model."
           "gradient_checkpointing_every applies with enable_gradient_checkpointing: true; set that, or remove it")
    _check(not verl_model.external_lib, "actor_rollout_ref.model.external_lib: importing custom model code is not "
           "supported; use a model folder with model.trust_remote_code: true")
    _refuse_parallelism(cfg)
    _check_optimizer_overrides(cfg.algorithm.optimizer.override_optimizer_config)


def _refuse_parallelism(cfg: Config) -> None:
    trainer = cfg.trainer
    _check(trainer.trainer_strategy != "megatron", "trainer.trainer_strategy (or the trainer file's actor.strategy): "
           "megatron is not supported; this tool shards with FSDP2 (fsdp and fsdp2 both mean that here)")
    _check(trainer.ulysses_sequence_parallel_size <= 1, "trainer.ulysses_sequence_parallel_size (or the trainer file's "
           f"actor's): {trainer.ulysses_sequence_parallel_size}: sequence parallelism is not supported; each sequence "
           "is computed whole on one process (set 1)")


_OPTIMIZER_SWITCHES = ("fused", "foreach")  # torch AdamW's implementation switches: same update, other kernels


def _check_optimizer_overrides(extra) -> None:
    """verl hands `optim.override_optimizer_config` to the optimizer's constructor as keyword arguments; this tool
    takes the two that choose AdamW's implementation and refuses the rest (they would change the update)."""
    if extra is None:
        return
    key = "actor.optim.override_optimizer_config"
    _check(isinstance(extra, dict), f"{key}: expected a mapping, got {extra!r}")
    other = [k for k in extra if k not in _OPTIMIZER_SWITCHES]
    _check(not other, f"{key}.{other[0] if other else ''}: not supported; AdamW's settings are algorithm.optimizer's, "
           f"and only {' and '.join(_OPTIMIZER_SWITCHES)} may be given here")
    for name, value in extra.items():
        _check(value is None or isinstance(value, bool), f"{key}.{name}: expected true or false, got {value!r}")
    _check(not (extra.get("fused") and extra.get("foreach")), f"{key}: fused and foreach cannot both be true (torch "
           "AdamW runs one implementation)")


def _validate_paths(cfg: Config) -> None:
    """The paths are given and the run folder can be made. Whether model and data paths exist is checked where
    they are made local (`sources.local.localize`): a hub id or a built-in name is not a path yet."""
    _check(bool(cfg.model.model_path), "model.model_path is required: a local Hugging Face model folder or a hub id")
    _check(bool(cfg.buffer.trainer_input.experience_buffer.path), "buffer.trainer_input.experience_buffer.path is "
           "required: a .json/.jsonl/.parquet file, a dataset folder or a hub dataset id")
    root = Path(cfg.checkpoint_root_dir)
    existing = next((p for p in (root, *root.parents) if p.exists()), Path("."))
    _check(existing.is_dir(), f"checkpoint_root_dir: {root} cannot be created: {existing} is not a folder")
    _check(os.access(existing, os.W_OK), f"checkpoint_root_dir: {root} is not writable ({existing} is read-only)")


def _check_lora(cfg: Config) -> None:
    lora, world = cfg.model.lora, cfg.cluster.node_num * cfg.cluster.gpu_per_node
    _check(lora.rank >= 0, f"model.lora.rank must be >= 0 (0: no LoRA), got {lora.rank}")
    if not lora.rank and not lora.path:  # a continued adapter's rank, alpha and targets are read when made local
        _check(not lora.load_in_4bit, "model.lora.load_in_4bit needs LoRA on: set model.lora.rank (or "
               "lora_configs[0].lora_rank) above 0")
        return
    _check(bool(lora.path) or (lora.alpha is not None and lora.alpha > 0),
           f"model.lora.alpha must be > 0, got {lora.alpha}")
    _check(0 <= lora.dropout < 1, f"model.lora.dropout must be in [0, 1), got {lora.dropout}")
    targets = [lora.target_modules] if isinstance(lora.target_modules, str) else lora.target_modules
    _check("lm_head" not in targets, "model.lora.target_modules: the LM head is scored from its weight in fp32 chunks "
           "and cannot take an adapter; adapt the other modules ('all-linear' leaves the head out)")
    if lora.load_in_4bit:
        import torch

        _check(cfg.cluster.device != "cpu" and torch.cuda.is_available(), "model.lora.load_in_4bit: QLoRA's 4-bit "
               "base weights need a CUDA device (bitsandbytes); on CPU train LoRA with load_in_4bit: false")
        _check(importlib.util.find_spec("bitsandbytes") is not None, "model.lora.load_in_4bit: QLoRA needs the "
               "bitsandbytes package: pip install bitsandbytes")
        _check(world == 1, "model.lora.load_in_4bit: QLoRA runs in one process; 4-bit weights are not sharded with "
               "FSDP2 here (set cluster.gpu_per_node: 1, or train LoRA without 4-bit)")
        _check(lora.save_merged == "never", "model.lora.load_in_4bit: merging into 4-bit weights would lose the "
               "adapter's precision; set model.lora.save_merged: never and merge the saved adapter into the "
               "full-precision base")


PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
# Trinity's other monitors: mlflow's client alone pulls in some twenty packages (a web server among them), and
# swanlab a service of its own; neither is a dependency here.
UNSUPPORTED_MONITORS = ("mlflow", "swanlab")


def sinks_of(cfg: Config) -> list[str]:
    """The extra sinks asked for (console and metrics.jsonl are always on)."""
    asked = list(cfg.trainer.trainer_config.trainer.logger)
    if cfg.monitor.monitor_type:
        asked.append(cfg.monitor.monitor_type)
    return sorted({s for s in asked if s != "console"})


def check_sinks(cfg: Config) -> None:
    kind = cfg.monitor.monitor_type
    _check(kind not in UNSUPPORTED_MONITORS, f"monitor.monitor_type: {kind} is not supported; the monitors are "
           "tensorboard and wandb (console and metrics.jsonl are always on)")
    for sink in sinks_of(cfg):
        if importlib.util.find_spec(PACKAGES[sink]) is None:
            raise ConfigError(f"monitor '{sink}' needs the package '{PACKAGES[sink]}': pip install {PACKAGES[sink]}")
