"""The training run: data -> pairs -> reference log-probs -> DPO steps -> checkpoints and metrics.

Entry point: `trinity run --config examples/dpo_humanlike/dpo.yaml` (see `cli.py`), which calls `run(cfg)`.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from pathlib import Path

import torch
import yaml

from . import builtin, checkpoint
from .batching import collate, split_micro, step_indices, steps_per_epoch
from .config import Config, ConfigError
from .data import DataError, load_conversations
from .logprobs import sequence_logps
from .losses import LOSSES
from .metrics import MetricsLog
from .modeling import Runtime, load_model, load_tokenizer, pick_runtime
from .optim import build_optimizer, lr_factor, set_lr
from .pairs import Limits, Pair, build_pairs
from .reference import reference_logps

log = logging.getLogger(__name__)


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.checkpoint_root_dir) / cfg.project / cfg.name


def total_steps_of(cfg: Config, n_pairs: int) -> int:
    if cfg.trainer.total_steps:
        return cfg.trainer.total_steps
    return steps_per_epoch(n_pairs, cfg.buffer.train_batch_size) * cfg.buffer.total_epochs


def load_pairs(cfg: Config, tokenizer) -> list[Pair]:
    storage = cfg.buffer.trainer_input.experience_buffer
    convs, report = load_conversations(storage)
    verl_data = cfg.trainer.trainer_config.data
    limits = Limits(cfg.model.max_prompt_tokens, cfg.model.max_response_tokens, cfg.model.max_model_len,
                    verl_data.truncation)
    pairs = build_pairs(convs, tokenizer, limits, report)
    log.info(report.summary())
    if not pairs:
        raise DataError(f"{storage.path}: no usable preference pairs ({report.summary()})")
    return pairs


def pairs_used(cfg: Config, n_pairs: int, total_steps: int) -> list[int]:
    """Indices of the pairs the run's steps will visit: all of them once a run covers an epoch."""
    batch = cfg.buffer.train_batch_size
    if total_steps >= steps_per_epoch(n_pairs, batch):
        return list(range(n_pairs))
    return sorted({i for s in range(total_steps) for i in step_indices(s, n_pairs, batch, cfg.trainer.seed)[1]})


def prepare_run_dir(cfg: Config) -> Path:
    run_dir = run_dir_of(cfg)
    if run_dir.is_dir() and any(run_dir.glob("global_step_*")):
        raise ConfigError(f"run folder {run_dir} already holds checkpoints; resuming is not supported yet: choose "
                          "a new `name` or remove the folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    return run_dir


def run(cfg: Config) -> Path:
    """Train offline DPO as `cfg` says; return the run folder."""
    runtime = pick_runtime(cfg)
    cfg.model.model_path = builtin.materialize(cfg.model.model_path)
    torch.manual_seed(cfg.trainer.seed)
    tokenizer = load_tokenizer(cfg)
    pairs = load_pairs(cfg, tokenizer)
    run_dir = prepare_run_dir(cfg)
    model, save_dtype = load_model(cfg, runtime.device)
    log.info("model %s on %s, %s compute, %.1fM parameters", cfg.model.model_path, runtime.device,
             "bf16 autocast" if runtime.bf16 else "fp32", sum(p.numel() for p in model.parameters()) / 1e6)
    total = total_steps_of(cfg, len(pairs))
    log.info("%d pairs, batch %d, %d optimizer steps", len(pairs), cfg.buffer.train_batch_size, total)
    micro = cfg.trainer.trainer_config.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu
    t0 = time.perf_counter()
    used = pairs_used(cfg, len(pairs), total)
    ref = reference_logps(model, [pairs[i] for i in used], tokenizer.pad_token_id, micro or 8, runtime)
    log.info("reference log-probs of %d pairs in %.1f s", len(used), time.perf_counter() - t0)

    optimizer = build_optimizer(model, cfg.algorithm.optimizer)
    metrics = MetricsLog(run_dir, total, 0, cfg.trainer.log_interval)
    try:
        for step in range(total):
            lr = cfg.algorithm.optimizer.lr * lr_factor(step, cfg.algorithm.optimizer, total)
            epoch, indices = step_indices(step, len(pairs), cfg.buffer.train_batch_size, cfg.trainer.seed)
            record = train_step(model, optimizer, [pairs[i] for i in indices], ref, cfg, runtime, tokenizer.pad_token_id, lr)
            metrics.write({"step": step + 1, "epoch": epoch, **record})
            last = step + 1 == total
            if last or (cfg.trainer.save_interval and (step + 1) % cfg.trainer.save_interval == 0):
                path = checkpoint.save_hf(run_dir, step + 1, model, tokenizer, save_dtype)
                log.info("saved %s", path)
    finally:
        metrics.close()
    return run_dir


def train_step(model, optimizer, batch: list[Pair], ref: torch.Tensor, cfg: Config, runtime: Runtime,
               pad_id: int, lr: float) -> dict[str, float]:
    """One optimizer step over `batch`; returns the step's metrics (means over its pairs)."""
    start = time.perf_counter()
    args = cfg.algorithm.policy_loss_fn_args
    loss_fn = LOSSES[cfg.algorithm.policy_loss_fn]
    micro = cfg.trainer.trainer_config.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=runtime.device))
    tokens = 0
    for group in split_micro(batch, micro):
        mb = collate(group, pad_id).to(runtime.device)
        chosen, rejected = sequence_logps(model, mb, runtime.autocast()).chunk(2)
        ref_pairs = ref[mb.pair_index.cpu()].to(runtime.device)
        losses, per_pair = loss_fn(chosen, rejected, ref_pairs[:, 0], ref_pairs[:, 1], args.beta, args.label_smoothing)
        # Each micro-batch adds its share of the mean over the whole step's pairs: the summed gradients equal
        # those of one full-batch step.
        (losses.sum() / len(batch)).backward()
        sums["loss"] += losses.detach().sum()
        for key, values in per_pair.items():
            sums[key] += values.sum()
        tokens += mb.n_tokens
    clip = cfg.trainer.grad_clip if cfg.trainer.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    set_lr(optimizer, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    record = {k: v.item() / len(batch) for k, v in sums.items()}  # one host sync per step
    elapsed = time.perf_counter() - start
    record.update(grad_norm=grad_norm.item(), lr=lr, pairs=len(batch), tokens=tokens,
                  tokens_per_s=tokens / elapsed, step_time_s=elapsed)
    return record
