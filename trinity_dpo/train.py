"""The training run: data -> pairs -> reference log-probs -> DPO steps -> checkpoints, metrics and report.

Entry point: `trinity run --config examples/dpo_humanlike/dpo.yaml` (see `cli.py`), which calls `run(cfg)`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from . import builtin, checkpoint, report
from .batching import collate, plan_micro, step_indices, steps_per_epoch
from .config import Config, ConfigError, StorageConfig
from .data import Conversation, DataError, DataReport, load_conversations
from .evaluate import comparison, eval_metrics, generate, side_by_side
from .logprobs import sequence_logps
from .losses import LOSSES
from .metrics import MetricsLog
from .modeling import Runtime, load_model, load_tokenizer, pick_runtime
from .optim import build_optimizer, lr_factor, set_lr
from .pairs import Limits, Pair, build_pairs
from .reference import cached_score, first_epoch_groups, score

log = logging.getLogger(__name__)


@dataclass
class Data:
    """Tokenized training pairs, held-out pairs (possibly none) and the prompts answered before and after."""

    train: list[Pair]
    eval: list[Pair]
    sample_prompts: list[list[dict]]
    summary: dict


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.checkpoint_root_dir) / cfg.project / cfg.name


def total_steps_of(cfg: Config, n_pairs: int) -> int:
    if cfg.trainer.total_steps:
        return cfg.trainer.total_steps
    return steps_per_epoch(n_pairs, cfg.buffer.train_batch_size) * cfg.buffer.total_epochs


def _tokenize(cfg: Config, tokenizer, convs: list[Conversation], report_: DataReport) -> list[Pair]:
    limits = Limits(cfg.model.max_prompt_tokens, cfg.model.max_response_tokens, cfg.model.max_model_len,
                    cfg.trainer.trainer_config.data.truncation)
    pairs = build_pairs(convs, tokenizer, limits, report_)
    log.info(report_.summary())
    return pairs


def load_data(cfg: Config, tokenizer) -> Data:
    """Training and held-out pairs: the eval buffer if it has a path, else `eval_fraction` of the data."""
    inputs = cfg.buffer.trainer_input
    storage = dataclasses.replace(inputs.experience_buffer, path=builtin.data_path(inputs.experience_buffer.path))
    convs, train_report = load_conversations(storage)
    eval_convs, eval_report = [], None
    if inputs.eval_buffer.path:
        eval_storage = dataclasses.replace(inputs.eval_buffer, path=builtin.data_path(inputs.eval_buffer.path))
        eval_convs, eval_report = load_conversations(eval_storage)
    elif inputs.eval_fraction > 0 and convs:
        order = torch.randperm(len(convs), generator=torch.Generator().manual_seed(cfg.trainer.seed)).tolist()
        n_eval = max(1, round(inputs.eval_fraction * len(convs)))
        eval_convs = [convs[i] for i in sorted(order[:n_eval])]
        convs = [convs[i] for i in sorted(order[n_eval:])]
        eval_report = DataReport(f"{storage.path} (held-out {inputs.eval_fraction:g})", read=len(eval_convs))
        train_report.read -= len(eval_convs)
    pairs = _tokenize(cfg, tokenizer, convs, train_report)
    if not pairs:
        raise DataError(f"{storage.path}: no usable preference pairs ({train_report.summary()})")
    eval_pairs = _tokenize(cfg, tokenizer, eval_convs, eval_report) if eval_report else []
    if eval_report and not eval_pairs:
        raise DataError(f"no usable held-out pairs ({eval_report.summary()})")
    kept_rows = {p.row for p in eval_pairs}
    samples = [c.prompt for c in eval_convs if c.row in kept_rows][:cfg.trainer.eval_samples]
    summary = {"train": train_report.as_dict(), "eval": eval_report.as_dict() if eval_report else None}
    return Data(pairs, eval_pairs, samples, summary)


def prepare_run_dir(cfg: Config) -> Path:
    run_dir = run_dir_of(cfg)
    if run_dir.is_dir() and any(run_dir.glob("global_step_*")):
        raise ConfigError(f"run folder {run_dir} already holds checkpoints; resuming is not supported yet: choose "
                          "a new `name` or remove the folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.jsonl", "samples.json"):
        (run_dir / stale).unlink(missing_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    return run_dir


def run(cfg: Config) -> Path:
    """Train offline DPO as `cfg` says; return the run folder."""
    runtime = pick_runtime(cfg)
    cfg.model.model_path = builtin.materialize(cfg.model.model_path)
    torch.manual_seed(cfg.trainer.seed)
    tokenizer = load_tokenizer(cfg)
    data = load_data(cfg, tokenizer)
    run_dir = prepare_run_dir(cfg)
    (run_dir / "data_summary.json").write_text(json.dumps(data.summary, indent=1))
    model, save_dtype = load_model(cfg, runtime.device)
    log.info("model %s on %s, %s compute, %.1fM parameters", cfg.model.model_path, runtime.device,
             "bf16 autocast" if runtime.bf16 else "fp32", sum(p.numel() for p in model.parameters()) / 1e6)
    total = total_steps_of(cfg, len(data.train))
    log.info("%d pairs, batch %d, %d optimizer steps", len(data.train), cfg.buffer.train_batch_size, total)
    pad = tokenizer.pad_token_id
    plan = micro_plan(cfg)
    t0 = time.perf_counter()
    groups = first_epoch_groups(data.train, cfg.buffer.train_batch_size, cfg.trainer.seed, total, plan)
    ref = cached_score(model, cfg.model.model_path, groups, len(data.train), pad, runtime, run_dir, "train")
    eval_groups = plan_micro(data.eval, *plan)
    eval_ref = cached_score(model, cfg.model.model_path, eval_groups, len(data.eval), pad, runtime, run_dir, "eval")
    log.info("reference log-probs of %d pairs in %.1f s", sum(map(len, groups)) + len(data.eval),
             time.perf_counter() - t0)

    args = cfg.algorithm.policy_loss_fn_args

    def run_eval(step: int) -> dict[str, float]:
        # Before any update the policy is the reference: its scores are the reference table itself.
        policy = eval_ref if step == 0 else score(model, eval_groups, len(data.eval), pad, runtime)
        result = eval_metrics(policy, eval_ref, data.eval, cfg.algorithm.policy_loss_fn, args.beta,
                              args.label_smoothing)
        metrics.write_eval(step, result)
        return result

    def answer() -> list[str]:
        return generate(model, tokenizer, data.sample_prompts, runtime, cfg.trainer.eval_max_new_tokens)

    optimizer = build_optimizer(model, cfg.algorithm.optimizer)
    metrics = MetricsLog(run_dir, cfg, total)
    try:
        before = run_eval(0) if data.eval else None
        base_answers = answer()
        for step in range(total):
            lr = cfg.algorithm.optimizer.lr * lr_factor(step, cfg.algorithm.optimizer, total)
            epoch, indices = step_indices(step, len(data.train), cfg.buffer.train_batch_size, cfg.trainer.seed)
            record = train_step(model, optimizer, [data.train[i] for i in indices], ref, cfg, runtime, pad, lr)
            metrics.write({"step": step + 1, "epoch": epoch, **record})
            done = step + 1
            if data.eval and cfg.trainer.eval_interval and done % cfg.trainer.eval_interval == 0 and done < total:
                run_eval(done)
            if done == total or (cfg.trainer.save_interval and done % cfg.trainer.save_interval == 0):
                log.info("saved %s", checkpoint.save_hf(run_dir, done, model, tokenizer, save_dtype))
        after = run_eval(total) if data.eval else None
        _finish(run_dir, data, before, after, base_answers, answer())
    finally:
        metrics.close()
    report.write_report(run_dir)
    return run_dir


def _finish(run_dir: Path, data: Data, before, after, base_answers: list[str], trained_answers: list[str]) -> None:
    """Keep the before/after answers in the run folder and print the headline comparison."""
    prompts = [messages[-1]["content"] for messages in data.sample_prompts]
    samples = [{"prompt": p, "base": a, "trained": b} for p, a, b in zip(prompts, base_answers, trained_answers)]
    (run_dir / "samples.json").write_text(json.dumps(samples, indent=1, ensure_ascii=False))
    if before is not None:
        print(comparison(before, after, len(data.eval)), flush=True)
    if samples:
        print("\n" + side_by_side(prompts, base_answers, trained_answers) + "\n", flush=True)


def micro_plan(cfg: Config) -> tuple[int | None, int | None]:
    """(pairs per micro-batch, token budget per micro-batch) as the actor settings say."""
    actor = cfg.trainer.trainer_config.actor_rollout_ref.actor
    return actor.ppo_micro_batch_size_per_gpu, actor.ppo_max_token_len_per_gpu if actor.use_dynamic_bsz else None


def train_step(model, optimizer, batch: list[Pair], ref: torch.Tensor, cfg: Config, runtime: Runtime,
               pad_id: int, lr: float) -> dict[str, float]:
    """One optimizer step over `batch`; returns the step's metrics (means over its pairs)."""
    start = time.perf_counter()
    args = cfg.algorithm.policy_loss_fn_args
    loss_fn = LOSSES[cfg.algorithm.policy_loss_fn]
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=runtime.device))
    tokens = slots = 0
    for group in plan_micro(batch, *micro_plan(cfg)):
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
        slots += mb.input_ids.numel()
    clip = cfg.trainer.grad_clip if cfg.trainer.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    set_lr(optimizer, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    record = {k: v.item() / len(batch) for k, v in sums.items()}  # one host sync per step
    elapsed = time.perf_counter() - start
    record.update(grad_norm=grad_norm.item(), lr=lr, pairs=len(batch), tokens=tokens, pad_share=1 - tokens / slots,
                  tokens_per_s=tokens / elapsed, step_time_s=elapsed)
    return record
