"""AdamW and the learning-rate schedule (verl's: linear warmup, then constant or cosine to min_lr_ratio * lr)."""
from __future__ import annotations

import math

import torch

from ..config.schema import OptimizerConfig


def build_optimizer(model: torch.nn.Module, opt: OptimizerConfig) -> torch.optim.AdamW:
    # As in nanoGPT and the HF Trainer: matrices decay, biases and norm gains do not.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": opt.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # The fused kernel updates each parameter in one pass: no parameter-sized temporaries, a third of the time. verl's
    # override_optimizer_config may choose another implementation (checked: only fused and foreach).
    switches = opt.override_optimizer_config or {}
    fused = switches.get("fused", None if switches.get("foreach") else True)
    optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, fused=fused,
                                  foreach=switches.get("foreach"))
    _allocate_state(optimizer)
    return optimizer


def _allocate_state(optimizer: torch.optim.AdamW) -> None:
    """AdamW's moments allocated now, as its first step would make them (zeros, step 0). Made lazily, the 2 x
    parameters of moments fill the heap that step 1's activations have just freed, and step 2's activations then
    take fresh memory on top: 0.1 GB more peak memory on the SmolLM2 reward-model job (docs/benchmarks.md)."""
    for group in optimizer.param_groups:
        fused_or_capturable = group["fused"] or group["capturable"]
        for p in group["params"]:
            optimizer.state[p] = {
                "step": torch.zeros((), dtype=torch.float32, device=p.device if fused_or_capturable else "cpu"),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def warmup_steps(opt: OptimizerConfig, total_steps: int) -> int:
    return opt.lr_warmup_steps if opt.lr_warmup_steps >= 0 else int(opt.lr_warmup_steps_ratio * total_steps)


def lr_factor(step: int, opt: OptimizerConfig, total_steps: int) -> float:
    """Multiplier of the peak lr at 0-based optimizer step `step`."""
    warmup = warmup_steps(opt, total_steps)
    if step < warmup:
        return step / max(1, warmup)
    if opt.lr_scheduler_type == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    cosine = 0.5 * (1.0 + math.cos(math.pi * opt.num_cycles * 2.0 * progress))
    return max(opt.min_lr_ratio, opt.min_lr_ratio + (1.0 - opt.min_lr_ratio) * cosine)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
