"""The lr schedule, hand-worked, and the weight-decay groups."""
from __future__ import annotations

import math

import torch

from trinity_dpo.config.schema import OptimizerConfig
from trinity_dpo.engine.optim import build_optimizer, lr_factor


def test_constant_with_warmup():
    """10 steps, ratio 0.2: warmup = int(0.2 * 10) = 2 steps: 0/2, 1/2, then 1."""
    opt = OptimizerConfig(lr_warmup_steps_ratio=0.2)
    assert [lr_factor(s, opt, 10) for s in range(4)] == [0.0, 0.5, 1.0, 1.0]


def test_cosine_to_min_lr_ratio():
    """10 steps, 2 warmup, min 0.1: step s >= 2 has progress p = (s - 2) / 8 and factor 0.1 + 0.9 * (1 + cos(pi p)) / 2.
    s=2: 1.0; s=6: p=0.5 -> 0.55; s=9: p=7/8 -> 0.1 + 0.45 * (1 + cos(7 pi / 8)) = 0.1342542.
    """
    opt = OptimizerConfig(lr_warmup_steps=2, lr_scheduler_type="cosine", min_lr_ratio=0.1)
    assert lr_factor(2, opt, 10) == 1.0
    assert math.isclose(lr_factor(6, opt, 10), 0.55)
    assert math.isclose(lr_factor(9, opt, 10), 0.1 + 0.45 * (1 + math.cos(7 * math.pi / 8)))
    assert math.isclose(lr_factor(9, opt, 10), 0.1342542, rel_tol=1e-6)


def test_cosine_cycles():
    """verl's num_cycles: factor max(min, min + (1 - min) * (1 + cos(2 pi cycles p)) / 2). With 1 cycle over 8 steps
    (no warmup, min 0.2): s=4, p=1/2 -> cos(pi) = -1 -> 0.2; s=6, p=3/4 -> cos(3 pi / 2) = 0 -> 0.2 + 0.8 / 2 = 0.6;
    with the default half cycle, s=4 -> cos(pi / 2) = 0 -> 0.6."""
    opt = OptimizerConfig(lr_scheduler_type="cosine", min_lr_ratio=0.2, num_cycles=1.0, lr_warmup_steps=0)
    assert math.isclose(lr_factor(4, opt, 8), 0.2) and math.isclose(lr_factor(6, opt, 8), 0.6)
    half = OptimizerConfig(lr_scheduler_type="cosine", min_lr_ratio=0.2, lr_warmup_steps=0)
    assert math.isclose(lr_factor(4, half, 8), 0.6)


def test_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = build_optimizer(model, OptimizerConfig(weight_decay=0.1)).param_groups
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


def test_moments_allocated_up_front_step_as_lazy_ones():
    """`build_optimizer` allocates AdamW's moments before the first step (for the heap's sake); three steps from
    them give bit for bit the weights and state of torch's own lazily initialised AdamW, fused and foreach, and the
    state dict has the same keys and values, so checkpoints and resumes do not change."""
    for switches in ({}, {"foreach": True}):
        opt = OptimizerConfig(lr=1e-2, weight_decay=0.1, override_optimizer_config=switches)
        torch.manual_seed(0)
        models = [torch.nn.Linear(4, 3)]
        models.append(torch.nn.Linear(4, 3))
        models[1].load_state_dict(models[0].state_dict())
        ours = build_optimizer(models[0], opt)
        assert len(ours.state) == 2 and all(len(s) == 3 for s in ours.state.values())  # weight and bias, before any step
        lazy = torch.optim.AdamW([{"params": [models[1].weight], "weight_decay": 0.1},
                                  {"params": [models[1].bias], "weight_decay": 0.0}], lr=1e-2, **(
                                      switches or {"fused": True}))
        for step in range(3):
            x = torch.randn(5, 4, generator=torch.Generator().manual_seed(step))
            for model, optimizer in zip(models, (ours, lazy)):
                model(x).pow(2).sum().backward()
                optimizer.step()
                optimizer.zero_grad()
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            assert torch.equal(a, b)
        got, want = ours.state_dict()["state"], lazy.state_dict()["state"]
        assert got.keys() == want.keys()
        for i in got:
            assert got[i].keys() == want[i].keys()
            for key in got[i]:
                assert torch.equal(got[i][key], want[i][key]) and got[i][key].dtype == want[i][key].dtype
