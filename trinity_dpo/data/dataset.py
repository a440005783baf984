"""What a run trains and evaluates on: tokenized training pairs, held-out pairs (the eval buffer, or a seeded
fraction of the data) and the prompts answered before and after training (steps and micro-batches: `schedule.py`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config.schema import Config, StorageConfig
from ..errors import DataError
from .conversations import Conversation, DataReport, Turns, load_conversations
from .pairs import Limits, Pair, build_pairs
from .sft import build_examples, load_dialogues

log = logging.getLogger(__name__)

TRAIN_KEY, EVAL_KEY = "buffer.trainer_input.experience_buffer", "buffer.trainer_input.eval_buffer"


@dataclass
class Data:
    """Tokenized training pairs, held-out pairs (possibly none) and the prompts answered before and after."""

    train: list[Pair]
    eval: list[Pair]
    sample_prompts: list[Turns]
    summary: dict


def _read(cfg: Config, storage: StorageConfig, key: str) -> tuple[list, DataReport]:
    """Preference conversations, or SFT dialogues, of `storage` and what reading them did."""
    return (load_dialogues if _is_sft(cfg) else load_conversations)(storage, key)


def _is_sft(cfg: Config) -> bool:
    return cfg.algorithm.algorithm_type == "sft"


def _tokenize(cfg: Config, tokenizer, convs: list, report_: DataReport, storage: StorageConfig) -> list:
    verl = cfg.trainer.trainer_config.data
    if _is_sft(cfg):
        examples = build_examples(convs, tokenizer, storage.format, cfg.model.max_model_len, verl.truncation,
                                  report_, storage.on_bad_row)
    else:
        limits = Limits(cfg.model.max_prompt_tokens, cfg.model.max_response_tokens, cfg.model.max_model_len,
                        verl.max_prompt_length, verl.max_response_length)
        examples = build_pairs(convs, tokenizer, limits, report_)
    log.info(report_.summary())
    return examples


def load_data(cfg: Config, tokenizer) -> Data:
    """Training and held-out examples (preference pairs, or SFT rows): the eval buffer if it has a path, else
    `eval_fraction` of the data."""
    inputs = cfg.buffer.trainer_input
    if _is_sft(cfg) and (cfg.model.max_prompt_tokens or cfg.model.max_response_tokens):
        log.info("model.max_prompt_tokens and max_response_tokens do not cut SFT rows (Trinity's SFT reader did not "
                 "either); model.max_model_len and the trainer file's data.truncation do")
    convs, train_report = _read(cfg, inputs.experience_buffer, TRAIN_KEY)
    eval_convs, eval_report = [], None
    if inputs.eval_buffer.path:
        eval_convs, eval_report = _read(cfg, inputs.eval_buffer, EVAL_KEY)
        _count_shared_prompts(convs, eval_convs, eval_report)
    elif inputs.eval_fraction > 0 and convs:
        order = torch.randperm(len(convs), generator=torch.Generator().manual_seed(cfg.trainer.seed)).tolist()
        n_eval = max(1, round(inputs.eval_fraction * len(convs)))
        eval_convs = [convs[i] for i in sorted(order[:n_eval])]
        convs = [convs[i] for i in sorted(order[n_eval:])]
        eval_report = DataReport(f"{train_report.source} (held-out {inputs.eval_fraction:g})", read=len(eval_convs),
                                 unit=train_report.unit)
        train_report.read -= len(eval_convs)
        _count_shared_prompts(convs, eval_convs, eval_report)
    examples = _tokenize(cfg, tokenizer, convs, train_report, inputs.experience_buffer)
    what = "SFT rows" if _is_sft(cfg) else "preference pairs"
    if not examples:
        raise DataError(f"{train_report.source}: no usable {what} ({train_report.summary()})")
    eval_storage = inputs.eval_buffer if inputs.eval_buffer.path else inputs.experience_buffer
    held_out = _tokenize(cfg, tokenizer, eval_convs, eval_report, eval_storage) if eval_report else []
    if eval_report and not held_out:
        raise DataError(f"no usable held-out {what} ({eval_report.summary()})")
    kept_rows = {p.row for p in held_out}
    samples = [c.prompt for c in eval_convs if c.row in kept_rows][:cfg.trainer.eval_samples]
    summary = {"train": train_report.as_dict(), "eval": eval_report.as_dict() if eval_report else None}
    return Data(examples, held_out, samples, summary)


def _count_shared_prompts(train: list[Conversation], held_out: list[Conversation], report: DataReport) -> None:
    """Held-out figures on prompts the model trains on measure memory, not generalisation: count and warn."""
    seen = {repr(c.prompt) for c in train}
    report.prompts_in_train = sum(repr(c.prompt) in seen for c in held_out)
    if report.prompts_in_train:
        log.warning("%d of %d held-out pairs have a prompt that is also a training prompt: held-out figures on them "
                    "are not held out", report.prompts_in_train, len(held_out))
