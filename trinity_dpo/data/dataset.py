"""What a run trains and evaluates on: tokenized training pairs, held-out pairs (the eval buffer, or a seeded
fraction of the data) and the prompts answered before and after training (steps and micro-batches: `schedule.py`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config.schema import Config, StorageConfig
from ..errors import DataError
from ..sources.builtin import cache_root
from .conversations import DataReport, Turns
from . import margins
from .examples import Examples
from .pairs import Limits
from .prepare import Recipe, load_table
from .render import template_kwargs
from .token_cache import TokenTable
from .unpaired import split_by_rows, unpaired_examples

log = logging.getLogger(__name__)

TRAIN_KEY, EVAL_KEY = "buffer.trainer_input.experience_buffer", "buffer.trainer_input.eval_buffer"


@dataclass
class Data:
    """Training examples (preference pairs or SFT rows), held-out ones (possibly none) and the prompts answered
    before and after. `train` and `eval` are views of token tables (`Examples`): a few integers per example."""

    train: Examples
    eval: Examples | list
    sample_prompts: list[Turns]
    summary: dict
    template: dict = field(default_factory=dict)  # the chat template's switches the samples are rendered with


def _is_sft(cfg: Config) -> bool:
    return cfg.algorithm.algorithm_type == "sft"


def _recipe(cfg: Config) -> Recipe:
    verl = cfg.trainer.trainer_config.data
    if _is_sft(cfg):
        return Recipe("sft", max_len=cfg.model.max_model_len, truncation=verl.truncation)
    kind = "unpaired" if cfg.algorithm.algorithm_type == "kto" else "pairs"  # KTO: labelled completions
    return Recipe(kind, limits=Limits(cfg.model.max_prompt_tokens, cfg.model.max_response_tokens,
                                         cfg.model.max_model_len, verl.max_prompt_length, verl.max_response_length))


def _table(cfg: Config, tokenizer, storage: StorageConfig, key: str) -> tuple[TokenTable, DataReport]:
    # The config's folder, else $TRINITY_DPO_TOKEN_CACHE, else the tool's cache: where every run on the data finds it.
    cache = Path(cfg.buffer.token_cache_dir or os.environ.get("TRINITY_DPO_TOKEN_CACHE") or cache_root() / "tokens")
    return load_table(storage, key, tokenizer, cfg.model.model_path, _recipe(cfg), cache, cfg.buffer.tokenize_workers)


def _examples(cfg: Config, table: TokenTable, entries: np.ndarray, report: DataReport,
              held_out: bool = False) -> Examples:
    """The kept examples among `entries` of `table`, with what tokenizing them added counted into `report`."""
    ids, counts = np.unique(np.asarray(table.events)[entries], return_counts=True)
    for k, n in zip(ids.tolist(), counts.tolist()):
        report.add_counts(table.meta["events"][k], n)
    log.info(report.summary())
    kept = entries[np.asarray(table.kept)[entries]]
    if cfg.algorithm.algorithm_type == "kto":  # in file order; held out, with their KL sequences (unpaired.py)
        return unpaired_examples(table, kept, held_out and "kto" in cfg.algorithm.policy_loss_fn_args.loss_type)
    return Examples(table, kept, "sft" if _is_sft(cfg) else "pairs")


def load_data(cfg: Config, tokenizer) -> Data:
    """Training and held-out examples (preference pairs, or SFT rows): the eval buffer if it has a path, else
    `eval_fraction` of the data. Each source is tokenized once into a token table that later runs reuse."""
    inputs = cfg.buffer.trainer_input
    if _is_sft(cfg) and (cfg.model.max_prompt_tokens or cfg.model.max_response_tokens):
        log.info("model.max_prompt_tokens and max_response_tokens do not cut SFT rows (Trinity's SFT reader did not "
                 "either); model.max_model_len and the trainer file's data.truncation do")
    table, train_report = _table(cfg, tokenizer, inputs.experience_buffer, TRAIN_KEY)
    entries = np.arange(len(table))
    eval_table, eval_entries, eval_report = None, entries[:0], None
    if inputs.eval_buffer.path:
        eval_table, eval_report = _table(cfg, tokenizer, inputs.eval_buffer, EVAL_KEY)
        eval_entries = np.arange(len(eval_table))
    elif inputs.eval_fraction > 0 and len(table):
        # The split is over the usable rows, by seed, as it was over the rows' conversations.
        order = torch.randperm(len(table), generator=torch.Generator().manual_seed(cfg.trainer.seed)).numpy()
        n_eval = max(1, round(inputs.eval_fraction * len(table)))
        eval_table, eval_entries, entries = table, np.sort(order[:n_eval]), np.sort(order[n_eval:])
        if cfg.algorithm.algorithm_type == "kto":  # by source row: a pair's two halves stay on one side
            rows = torch.randperm(len(np.unique(np.asarray(table.rows))),
                                  generator=torch.Generator().manual_seed(cfg.trainer.seed)).numpy()
            entries, eval_entries, n_eval = split_by_rows(table, inputs.eval_fraction, rows)
        eval_report = DataReport(f"{train_report.source} (held-out {inputs.eval_fraction:g})", read=n_eval,
                                 unit=train_report.unit)
        train_report.read -= n_eval
    if eval_report is not None:
        _count_shared_prompts(np.asarray(table.prompt_hash)[entries], np.asarray(eval_table.prompt_hash)[eval_entries],
                              eval_report)
    examples = _examples(cfg, table, entries, train_report)
    what = "SFT rows" if _is_sft(cfg) else "unpaired examples" if cfg.algorithm.algorithm_type == "kto" else \
        "preference pairs"
    if not len(examples):
        raise DataError(f"{train_report.source}: no usable {what} ({train_report.summary()})")
    held_out = _examples(cfg, eval_table, eval_entries, eval_report, held_out=True) if eval_report else []
    if eval_report and not len(held_out):
        raise DataError(f"no usable held-out {what} ({eval_report.summary()})")
    if cfg.algorithm.algorithm_type == "reward_model":  # its optional margin column, by the rows' numbers
        margins.attach(examples, inputs.experience_buffer, TRAIN_KEY)
        if len(held_out):
            margins.attach(held_out, *((inputs.eval_buffer, EVAL_KEY) if inputs.eval_buffer.path else
                                       (inputs.experience_buffer, TRAIN_KEY)))
    samples = [eval_table.prompt(int(e)) for e in held_out.entries[:cfg.trainer.eval_samples]] if len(held_out) else []
    summary = {"train": train_report.as_dict(), "eval": eval_report.as_dict() if eval_report else None}
    held_format = (inputs.eval_buffer if inputs.eval_buffer.path else inputs.experience_buffer).format
    return Data(examples, held_out, samples, summary, template_kwargs(held_format))


def _count_shared_prompts(train: np.ndarray, held_out: np.ndarray, report: DataReport) -> None:
    """Held-out figures on prompts the model trains on measure memory, not generalisation: count and warn (by the
    prompts' hashes, in one pass over arrays)."""
    report.prompts_in_train = int(np.isin(held_out, train).sum())
    if report.prompts_in_train:
        log.warning("%d of %d held-out pairs have a prompt that is also a training prompt: held-out figures on them "
                    "are not held out", report.prompts_in_train, len(held_out))
