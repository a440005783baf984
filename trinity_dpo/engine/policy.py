"""The policy a run trains, built in one place: read, attach LoRA, shard over the processes, fill, bind.

With several processes the model is built on the meta device and each process reads only its shard of the weights;
one process, or a folder that cannot be read that way, loads it whole (and FSDP2, if any, shards it then).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from . import distributed, logprobs, lora
from ..config.schema import Config
from .distributed import Dist
from .modeling import Runtime, for_model, load_model, round_to_bf16, weights_reader

log = logging.getLogger(__name__)


@dataclass
class Policy:
    """The policy and what the run needs to know of how it was built."""

    model: torch.nn.Module
    save_dtype: torch.dtype  # the dtype its HF checkpoints store (`checkpoint_dtype`)
    adapter: str  # a digest of the starting adapter ('' without LoRA): the reference cache depends on it
    runtime: Runtime  # the run's runtime as this model allows (`modeling.for_model`)


def build_policy(cfg: Config, runtime: Runtime, d: Dist) -> Policy:
    """The policy of `cfg`, sharded over `d`'s processes, its starting values in place, its scoring method bound."""
    read = None
    if d.mesh is not None:
        model, stored = _read(cfg, runtime, empty=True)
        read = weights_reader(cfg, model)
    if read is None:
        model, stored = _read(cfg, runtime, empty=False)
    distributed.shard(model, d, runtime.bf16)
    if read is not None:
        distributed.fill(model, d, read)
    # Every weight holds its starting value from here: what changes them at load goes here, before the digest.
    if runtime.bf16:
        round_to_bf16(model)
    adapter = lora.initial_digest(model)  # a sharded adapter is gathered: every process calls this
    distributed.register_forward(model, logprobs.bind(model))
    return Policy(model, checkpoint_dtype(cfg.trainer.save_dtype, runtime.bf16, stored), adapter,
                  for_model(runtime, cfg, model))


def checkpoint_dtype(setting: str, bf16: bool, stored: torch.dtype) -> torch.dtype:
    """The dtype of the HF checkpoints' weights. `auto` writes the weights the run computes with: its fp32 masters
    under fp32 compute (a bf16 file would round away updates below bf16's resolution: a short run's whole
    progress), and under bf16 autocast the folder's own dtype, as bf16 is what every product read anyway."""
    if setting != "auto":
        return getattr(torch, setting)
    return stored if bf16 else torch.float32


def _read(cfg: Config, runtime: Runtime, empty: bool) -> tuple[torch.nn.Module, torch.dtype]:
    """The policy's model with its adapters attached: whole on the runtime's device, or with `empty` a skeleton on
    the meta device; and the dtype its folder stores."""
    model, save_dtype = load_model(cfg, runtime.device, empty=empty, bf16=runtime.bf16)
    if cfg.model.lora.rank > 0:
        lora.attach(model, cfg.model.lora, cfg.model.model_path, cfg.trainer.seed)
        if lora.frozen_in_bf16(cfg.model.lora, runtime.bf16, save_dtype):
            log.info("LoRA: the frozen base of %d adapted layers kept in bf16 (bf16 compute, bf16 checkpoint)",
                     lora.base_in_bf16(model))
    return model, save_dtype
