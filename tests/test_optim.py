"""The lr schedule, hand-worked, and the weight-decay groups."""
from __future__ import annotations

import math

import torch

from trinity_dpo.config import OptimizerConfig
from trinity_dpo.optim import build_optimizer, lr_factor


def test_constant_with_warmup():
    """10 steps, ratio 0.2: warmup = int(0.2 * 10) = 2 steps: 0/2, 1/2, then 1."""
    opt = OptimizerConfig(lr_warmup_steps_ratio=0.2)
    assert [lr_factor(s, opt, 10) for s in range(4)] == [0.0, 0.5, 1.0, 1.0]


def test_cosine_to_min_lr_ratio():
    """10 steps, 2 warmup, min 0.1: step s >= 2 has progress p = (s - 2) / 8 and factor 0.1 + 0.9 * (1 + cos(pi p)) / 2.
    s=2: 1.0; s=6: p=0.5 -> 0.55; s=9: p=7/8 -> 0.1 + 0.45 * (1 + cos(7 pi / 8)) = 0.1342542.
    """
    opt = OptimizerConfig(lr_warmup_steps=2, warmup_style="cosine", min_lr_ratio=0.1)
    assert lr_factor(2, opt, 10) == 1.0
    assert math.isclose(lr_factor(6, opt, 10), 0.55)
    assert math.isclose(lr_factor(9, opt, 10), 0.1 + 0.45 * (1 + math.cos(7 * math.pi / 8)))
    assert math.isclose(lr_factor(9, opt, 10), 0.1342542, rel_tol=1e-6)


def test_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = build_optimizer(model, OptimizerConfig(weight_decay=0.1)).param_groups
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
