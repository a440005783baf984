"""The training run: data -> examples (pairs or SFT rows) -> reference log-probs (where the objective has one) ->
optimizer steps -> checkpoints, metrics and report.

Entry point: `trinity run --config examples/dpo_humanlike/dpo.yaml` (see `cli.py`), which calls `run(cfg)`.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..sources.local import localize
from . import checkpoint, report, folder as run_folder, lock as run_lock
from ..data import dataset
from ..engine import distributed, lora, memory, score_head
from ..data.batching import collate, is_padding
from ..data.schedule import Schedule, Step, explain_steps
from ..config.schema import Config, LoraConfig
from ..errors import CheckpointError, NumericError
from ..data.dataset import Data
from ..engine.distributed import Dist
from .evaluate import comparison, eval_metrics, generate, side_by_side
from ..engine.logprobs import sequence_stats
from ..objective.extrema import Extremes
from ..objective.objectives import Objective, step_totals
from ..objective.objectives import build as build_objective
from .metrics import MetricsLog, NullLog
from ..engine.modeling import Runtime, load_tokenizer, pick_runtime
from ..engine.optim import build_optimizer, lr_factor, set_lr
from ..engine.policy import Policy, build_policy
from ..data.pairs import Pair, prompt_text
from ..objective.reference import Scoring, Tables, cached_score, rows_of, score
from ..objective.token_ref import TokenStore, target_counts

log = logging.getLogger(__name__)


class Stop:
    """SIGINT/SIGTERM ask the loop to stop after the current step (and save); a second one is not caught. Installed
    once per command, before a run starts (tokenizing, loading and the reference pass can take minutes) and across
    a config's stages, so that no signal is lost between them."""

    def __init__(self):
        self.asked = None
        self._old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        self.asked = signal.Signals(signum).name
        log.warning("%s: finishing the current step, then saving a checkpoint", self.asked)
        self.restore()

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class Session:
    """Everything a run works with, built once by `_start`; `state` is the loop position a checkpoint keeps."""

    cfg: Config
    d: Dist
    tokenizer: object
    data: Data
    schedule: Schedule
    run_dir: Path
    resume_from: Path | None  # the checkpoint this run resumed from (after any fallback)
    policy: Policy
    optimizer: torch.optim.Optimizer
    objective: Objective
    eval_objective: Objective  # the objective alone: held-out figures leave out the KL and entropy terms
    ref: Tables | None  # reference statistics, each [n_train, sequences] (a pair: chosen, rejected); None: not needed
    token_ref: TokenStore | None  # the reference's log-prob of every response token (a KL term), else None
    eval_groups: list[list[Pair]]  # this process's held-out micro-batches
    eval_ref: Tables | None  # [n_eval, sequences] each
    state: dict
    metrics: MetricsLog | NullLog


@dataclass(frozen=True)
class StepContext:
    """What every optimizer step of a run works with besides the model, the optimizer and the step itself."""

    objective: Objective
    ref: Tables | None
    token_ref: TokenStore | None
    runtime: Runtime
    pad_id: int
    grad_clip: float  # inf: no clipping
    d: Dist


def run(cfg: Config, stop: Stop | None = None) -> Path:
    """Train offline DPO as `cfg` says (resuming where the run folder says so); return the run folder. Under
    torchrun every worker process runs this, each on its share of every step (`distributed.py`). `stop`: the
    command's signal handler (`run_stages` keeps one over all stages); without one, the run installs its own."""
    own = stop is None
    stop = stop or Stop()
    try:
        cfg = localize(cfg)  # names -> local folders, before anything reads them (idempotent: safe in every worker)
        runtime = pick_runtime(cfg)
        d = distributed.setup(cfg, runtime.device)
        try:
            s = _start(cfg, runtime, d)
            finished = _train(s, stop)
        finally:
            if d.main:  # the run is over, or never started: a later run in this process takes the folder afresh
                run_lock.release(run_folder.run_dir_of(cfg))
    finally:
        if own:
            stop.restore()
    if finished and d.main:
        report.write_report(s.run_dir)
    distributed.teardown(d)  # only after a clean finish: a failing worker just exits, the launcher stops the rest
    return s.run_dir


def _train(s: Session, stop: Stop) -> bool:
    """Step-0 evaluation and answers, the loop, then the trained answers; False when stopped by a signal."""
    try:
        if s.d.any(stop.asked is not None):  # while the run started: nothing trained since its last checkpoint
            log.warning("stopped by %s before step %d; run the same command again to resume",
                        stop.asked or "a signal to another process", s.state["step"] + 1)
            return False
        if s.state["step"] == 0:
            _evaluate(s, 0)
            base_answers = _answer(s)
            if s.d.main:
                run_folder.write_json(s.run_dir / "samples_base.json", base_answers)
        finished = _loop(s, stop)
        if finished:
            trained_answers = _answer(s)
            if s.d.main:
                _finish(s.run_dir, s.data, trained_answers)
    finally:
        s.metrics.close()
    return finished


def _start(cfg: Config, runtime: Runtime, d: Dist) -> Session:
    """Data, run folder, model (sharded over the processes), reference tables, optimizer; restored from the
    checkpoint the run folder says to resume from."""
    torch.manual_seed(cfg.trainer.seed)
    tokenizer = load_tokenizer(cfg)
    data = dataset.load_data(cfg, tokenizer)
    schedule = Schedule.of(cfg, data, d.world)
    memory.check_fits(cfg, runtime, d.world, schedule.micro_tokens())  # before loading
    run_dir, resume = run_folder.prepare_run_dir(cfg, d)
    if d.main:
        run_folder.write_json(run_dir / "data_summary.json", data.summary)
    policy = build_policy(cfg, runtime, d)
    score_head.match_pad(policy.model, tokenizer.pad_token_id)  # a reward model's checkpoints find last tokens by it
    log.info("model %s on %s x %d, %s compute, %.1fM parameters", cfg.model.model_path, runtime.device, d.world,
             "bf16" if runtime.bf16 else "fp32", sum(p.numel() for p in policy.model.parameters()) / 1e6)
    log.info("%d %s, batch %d: %s", len(data.train), "rows" if cfg.algorithm.algorithm_type == "sft" else "pairs",
             cfg.buffer.train_batch_size, explain_steps(cfg, len(data.train)))
    # Before the optimizer exists and before any restore: the reference is the initial weights.
    objective = build_objective(cfg.algorithm)
    eval_objective = build_objective(cfg.algorithm, terms=False, held_out=True)
    scoring = Scoring(policy, cfg.model.model_path, tokenizer.pad_token_id, run_dir, d)
    ref, token_ref, eval_groups, eval_ref = _reference_tables(scoring, objective, eval_objective, schedule,
                                                              cfg.model.lora)
    optimizer = build_optimizer(policy.model, cfg.algorithm.optimizer)
    state, resume_from = {"step": 0, "skipped_steps": 0, "consecutive_skips": 0}, None
    if resume is not None:
        state, resume_from = checkpoint.restore(resume, policy.model, optimizer, d.main)
        log.info("resumed from %s at step %d", resume_from, state["step"])
        _check_length(state, schedule.total, resume_from)
        if d.main:
            run_folder.carry_history(resume_from.parent, run_dir)
            run_folder.truncate_metrics(run_dir, state["step"])
    metrics = MetricsLog(run_dir, cfg, schedule.total, first_step=state["step"]) if d.main else NullLog()
    return Session(cfg, d, tokenizer, data, schedule, run_dir, resume_from, policy, optimizer, objective,
                   eval_objective, ref, token_ref, eval_groups, eval_ref, state, metrics)


def _loop(s: Session, stop: Stop) -> bool:
    """Optimizer steps from the state's step on, with evals and checkpoints; False when stopped by a signal."""
    cfg, d, total = s.cfg, s.d, s.schedule.total
    context = StepContext(s.objective, s.ref, s.token_ref, s.policy.runtime, s.tokenizer.pad_token_id,
                          cfg.trainer.grad_clip if cfg.trainer.grad_clip > 0 else float("inf"), d)
    if s.state["step"] == total and s.state.get("total") not in (None, total):
        # Resumed at this run's last step from a checkpoint planned for more: its final evaluation and save (the
        # Hugging Face weights under save_hf_checkpoint: last, the merged model) were never made.
        _evaluate(s, total)
        _save(s, total, last=True)
    for index in range(s.state["step"], total):
        lr = cfg.algorithm.optimizer.lr * lr_factor(index, cfg.algorithm.optimizer, total)
        step = s.schedule.step(index, d.rank)
        record = train_step(s.policy.model, s.optimizer, step, lr, context)
        _count_skips(s.state, record, cfg.trainer.max_consecutive_skips)
        s.state["step"] = done = index + 1
        s.metrics.write({"step": done, "epoch": step.epoch, **record, "skipped_steps": s.state["skipped_steps"]})
        if done == total or (cfg.trainer.eval_interval and done % cfg.trainer.eval_interval == 0):
            _evaluate(s, done)
        stopping = d.any(stop.asked is not None)  # every process stops after the same step
        if done == total or stopping or (cfg.trainer.save_interval and done % cfg.trainer.save_interval == 0):
            _save(s, done, last=done == total or stopping)
            stopping = stopping or d.any(stop.asked is not None)  # a signal during the save: it has just saved
        if stopping and done < total:
            log.warning("stopped by %s after step %d of %d; run the same command again to resume",
                        stop.asked or "a signal to another process", done, total)
            return False
    return True


def _evaluate(s: Session, step: int) -> None:
    """Held-out figures at `step` (nothing without held-out pairs)."""
    if not s.data.eval:
        return
    if step == 0 and s.eval_ref is not None:
        policy = s.eval_ref  # before any update the policy is the reference (which holds the policy's statistics too)
    else:
        tables = score(s.policy.model, s.eval_groups, len(s.data.eval), s.tokenizer.pad_token_id, s.policy.runtime,
                       s.eval_objective.sequences, s.eval_objective.stats)
        policy = {k: s.d.merge_rows(t) for k, t in tables.items()}
    s.metrics.write_eval(step, eval_metrics(policy, s.eval_ref, s.data.eval, s.eval_objective))


def _answer(s: Session) -> list[str]:
    return generate(s.policy.model, s.tokenizer, s.data.sample_prompts, s.policy.runtime,
                    s.cfg.trainer.eval_max_new_tokens, synced=s.d.world > 1, template=s.data.template)


def _check_length(state: dict, total: int, path) -> None:
    """A checkpoint of a run planned for another number of steps (more epochs or data, a changed total_steps): the
    schedule follows the new count; one already past it has nothing left to train."""
    planned = state.get("total")
    if planned is not None and planned != total:
        log.warning("%s: its run was planned for %d steps, this one for %d: the learning-rate schedule follows %d",
                    path, planned, total, total)
    if state["step"] > total:
        raise CheckpointError(f"{path} is at step {state['step']}, past this run's {total} steps; raise "
                              "buffer.total_epochs or trainer.total_steps, or resume from an earlier checkpoint")


def _save(s: Session, step: int, last: bool) -> None:
    total, hf = s.schedule.total, checkpoint.wants_hf(s.cfg.trainer.save_hf_checkpoint, last)
    path = checkpoint.save(s.run_dir, step, s.policy.model, s.tokenizer, s.policy.save_dtype, s.optimizer,
                           {**s.state, "total": total, "settings": run_folder.settings_of(s.cfg)}, s.d,
                           merge=lora.wants_merged(s.cfg.model.lora, step, total),
                           hf=hf)
    if s.d.main:
        checkpoint.prune(s.run_dir, s.cfg.trainer.max_checkpoints_to_keep, s.resume_from)
    log.info("saved %s", path)


def _reference_tables(scoring: Scoring, objective: Objective, eval_objective: Objective, schedule: Schedule,
                      lora_cfg: LoraConfig) -> tuple[Tables | None, TokenStore | None, list[list[Pair]], Tables | None]:
    """(training reference table, its per-token log-probs where a KL term needs them, this process's held-out
    micro-batches, held-out reference table), all cached in the run folder; each process scores its own share.
    No reference pass for an objective without one."""
    held_out = schedule.held_out()
    eval_groups = held_out.per_rank[scoring.d.rank]
    if not objective.needs_reference:
        return None, None, eval_groups, None
    t0 = time.perf_counter()
    counts = target_counts(schedule.train, objective.sequences) if objective.kl else None
    with lora.reference(scoring.policy.model, lora_cfg):
        plan = schedule.first_epoch() if objective.reference_plan is None else objective.reference_plan(schedule)
        ref, token_ref = cached_score(scoring, plan, objective.ref_stats, counts, objective.sequences)
        # The held-out reference pass also gives the untrained policy's statistics (the step-0 evaluation).
        eval_ref, _ = cached_score(scoring, held_out, tuple(dict.fromkeys(eval_objective.ref_stats +
                                                                          eval_objective.stats)),
                                   sequences=eval_objective.sequences)
    if objective.data_tables is not None:  # per-example data the loss reads beside the reference (KTO's labels)
        ref.update(objective.data_tables(schedule.train))
        eval_ref.update(eval_objective.data_tables(schedule.eval))
    log.info("reference log-probs of %d pairs in %.1f s", int((~ref["logps"].isnan()).all(1).sum()) + held_out.n_rows,
             time.perf_counter() - t0)
    return ref, token_ref, eval_groups, eval_ref


def _count_skips(state: dict, record: dict, limit: int) -> None:
    if not record["skipped"]:
        state["consecutive_skips"] = 0
        return
    state["skipped_steps"] += 1
    state["consecutive_skips"] += 1
    log.warning("step %d: non-finite loss or gradient norm; optimizer step skipped", state["step"] + 1)
    if state["consecutive_skips"] >= limit:
        raise NumericError(f"{limit} optimizer steps in a row had a non-finite loss or gradient norm (last at step "
                           f"{state['step'] + 1}); stopping. Lower the learning rate or check the data; the last "
                           "checkpoint is intact")


def _finish(run_dir: Path, data: Data, trained_answers: list[str]) -> None:
    """Keep the before/after answers in the run folder and print the headline comparison."""
    from .report import read_metrics

    prompts = [prompt_text(p) for p in data.sample_prompts]
    base_path = run_dir / "samples_base.json"
    base_answers = json.loads(base_path.read_text()) if base_path.is_file() else [""] * len(prompts)
    samples = [{"prompt": p, "base": a, "trained": b} for p, a, b in zip(prompts, base_answers, trained_answers)]
    run_folder.write_json(run_dir / "samples.json", samples)
    _, evals = read_metrics(run_dir)
    if evals:
        print(comparison(evals[0], evals[-1], len(data.eval)), flush=True)
    if samples:
        print("\n" + side_by_side(prompts, base_answers, trained_answers) + "\n", flush=True)


def train_step(model, optimizer, step: Step, lr: float, context: StepContext) -> dict[str, float]:
    """One optimizer step: this process's micro-batches of `step`; returns the step's metrics, means over all the
    step's examples (the same on every process)."""
    objective, ref, runtime, d = context.objective, context.ref, context.runtime, context.d
    totals = step_totals(step.examples)  # the whole step's counts, which every micro-batch's loss is normalised by
    start = time.perf_counter()
    if objective.before_step is not None:  # step-wide figures every micro-batch's loss reads (KTO's KL baseline)
        totals.update(objective.before_step(model, step, context))
    n_pairs = totals["examples"]
    names = ["loss", *(m for m in objective.metrics if m not in objective.extrema)]
    extremes = Extremes(objective.extrema, runtime.device)  # metrics reduced by min or max (a reward model's)
    # Sums over this process's examples, then the sequences' tokens, the positions computed and the slots
    # (positions and pads); summed over processes in one collective.
    sums = torch.zeros(len(names) + 3, dtype=torch.float64, device=runtime.device)
    tokens = real = slots = 0
    groups = step.micro_batches
    for i, group in enumerate(groups):  # every process has as many micro-batches (`shard_step` pads)
        distributed.sync_gradients(model, i == len(groups) - 1)
        mb = collate(group, context.pad_id, share_prompt=runtime.share_prompt).to(runtime.device)
        token_ref = None
        if objective.kl is not None:  # a padding micro-batch's copies have no places: any values do, times 0
            token_ref = torch.zeros(mb.target_ids.numel()) if is_padding(group) else context.token_ref.read(
                mb.pair_index, torch.bincount(mb.target_seq, minlength=mb.n_seqs))
        stats = sequence_stats(model, mb, runtime.autocast(), objective.stats, objective.uniform_grad, token_ref,
                               objective.kl)
        runtime.release_host_memory()
        if is_padding(group):
            (sum(v.sum() for v in stats.values()) * 0).backward()  # joins the other processes' collectives
            continue
        losses, metrics = objective.compute(stats, None if ref is None else rows_of(ref, mb.pair_index, runtime.device),
                                            totals)
        # Each micro-batch adds its share of the mean over the whole step's examples: the summed gradients (over
        # micro-batches and processes) equal those of one full-batch step.
        (losses.sum() / n_pairs).backward()
        sums[:len(names)] += torch.stack([losses.detach().sum(), *(metrics[k].sum() for k in names[1:])])
        extremes.add(metrics)
        tokens, real, slots = tokens + mb.n_tokens, real + mb.n_real, slots + mb.input_ids.numel()
    sums[len(names):] = torch.tensor([tokens, real, slots], dtype=torch.float64)
    runtime.release_host_memory()
    grad_norm = distributed.clip_grad_norm(model, context.grad_clip)
    summed = d.all_sum(sums).tolist()  # one host sync per step
    record = {name: total / n_pairs for name, total in zip(names, summed)}
    record.update(extremes.result(d))
    record.update(objective.derived(record))
    record["pairs" if objective.sequences == 2 else "rows"] = n_pairs
    tokens, real, slots = summed[len(names):]
    # A non-finite loss or norm would poison the weights and Adam's moments: drop this step's update entirely.
    skipped = not (math.isfinite(record["loss"]) and math.isfinite(grad_norm))
    if not skipped:
        set_lr(optimizer, lr)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    record.update(grad_norm=grad_norm, lr=lr, skipped=int(skipped), tokens=int(tokens), positions=int(real), pad_share=1 - real / slots, tokens_per_s=tokens / elapsed, step_time_s=elapsed)
    return record

