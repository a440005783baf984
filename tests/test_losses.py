"""Hand-worked DPO numbers."""
from __future__ import annotations

import math

import torch

from trinity_dpo.losses import dpo_sigmoid


def test_dpo_sigmoid_hand_worked():
    """Pair 0: pi_c=-10, pi_r=-12, ref_c=ref_r=-11, beta=0.5.
    chosen ratio = +1, rejected ratio = -1, z = 0.5 * (1 - (-1)) = 1
    loss = -log sigmoid(1) = log(1 + e^-1) = 0.31326169
    rewards: chosen 0.5, rejected -0.5, margin 1.0, accuracy 1.
    Pair 1: policy == reference, z = 0, loss = ln 2, accuracy 0 (a tie is not a win).
    """
    t = lambda *v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    losses, m = dpo_sigmoid(t(-10.0, -5.0), t(-12.0, -7.0), t(-11.0, -5.0), t(-11.0, -7.0), beta=0.5)
    assert torch.allclose(losses, t(0.31326169, math.log(2)), atol=1e-7)
    assert torch.equal(m["rewards/chosen"], t(0.5, 0.0))
    assert torch.equal(m["rewards/rejected"], t(-0.5, 0.0))
    assert torch.equal(m["rewards/margins"], t(1.0, 0.0))
    assert torch.equal(m["rewards/accuracies"], t(1.0, 0.0))
    assert torch.equal(m["logps/chosen"], t(-10.0, -5.0)) and torch.equal(m["logps/rejected"], t(-12.0, -7.0))


def test_label_smoothing_hand_worked():
    """Same pair 0 with eps = 0.1:
    loss = 0.9 * -log sigmoid(1) + 0.1 * -log sigmoid(-1) = 0.9 * 0.31326169 + 0.1 * 1.31326169 = 0.41326169.
    At z = 0 the loss stays ln 2 for any eps.
    """
    t = lambda *v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    losses, _ = dpo_sigmoid(t(-10.0, -3.0), t(-12.0, -4.0), t(-11.0, -3.0), t(-11.0, -4.0), 0.5, 0.1)
    assert torch.allclose(losses, t(0.41326169, math.log(2)), atol=1e-7)


def test_gradient_pushes_chosen_up_and_rejected_down():
    """d loss / d pi_c = -beta * sigmoid(-z) (< 0) and d loss / d pi_r = +beta * sigmoid(-z); at z = 0: -/+ beta/2."""
    pc, pr = torch.tensor([-5.0], requires_grad=True), torch.tensor([-5.0], requires_grad=True)
    losses, _ = dpo_sigmoid(pc, pr, torch.tensor([-5.0]), torch.tensor([-5.0]), beta=0.2)
    losses.sum().backward()
    assert torch.allclose(pc.grad, torch.tensor([-0.1])) and torch.allclose(pr.grad, torch.tensor([0.1]))
