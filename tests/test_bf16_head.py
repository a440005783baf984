"""The LM head's bf16 products on CPU (`engine/bf16_head.py`): log-probs within a stated tolerance of the exact ones
for the same bf16 operands, gradients likewise, and step 1 exactly ln 2."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import pytest

from trinity_dpo.engine import bf16_head
from trinity_dpo.engine import logprobs as lp

pytestmark = pytest.mark.skipif(not bf16_head.cpu_has_bf16(), reason="this CPU has no bf16 units: the head is fp32")


def _case(n=300, k=96, v=3000, seed=0):
    """Hidden states and a head whose logits reach +-40 (SmolLM2's reach ~30), labels half the top-1 token (a
    trained model's usual case) and half random (log-probs near -40); K = 96 is no multiple of 32, so the centring
    column is padded."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(v, k, generator=g) * 0.3).bfloat16()
    h = (torch.randn(n, k, generator=g) * 2.2).bfloat16()
    exact = h.double() @ w.double().t()
    labels = torch.where(torch.arange(n) % 2 == 0, exact.argmax(-1), torch.randint(0, v, (n,), generator=g))
    return h, w, labels, exact


def _within_tolerance(got, exact, labels):
    """(exact log-probs, |error|) after checking |error| <= 2^-8 (1 + E_p |z - z_label|) row by row."""
    truth = torch.log_softmax(exact, -1)
    want = truth.gather(-1, labels[:, None]).squeeze(-1)
    spread = (truth.exp() * (exact - exact.gather(-1, labels[:, None])).abs()).sum(-1)
    err = (got.double() - want).abs()
    assert bool((err <= 2 ** -8 * (1 + spread)).all()), float((err / (1 + spread)).max())
    return want, err


def test_log_probs_within_the_stated_tolerance_of_the_exact_product():
    """Tolerance: each log-prob within 2^-8 (1 + E_p |z - z_label|) of log softmax of the exact product of the same
    bf16 operands (the centred rounding bounds a logit's error by 2^-9 |z - c|; the rest is fp32 arithmetic). The
    test discriminates: without centring (the product's output rounded to bf16 as a plain bf16 matmul gives) the
    error of the likely labels is over 4 times larger."""
    h, w, labels, exact = _case()
    head = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    head.weight.data = w.float()
    got = lp.head_logprobs(h, head, labels)[0]
    want, err = _within_tolerance(got, exact, labels)
    assert float(exact.abs().max()) > 30
    plain = torch.log_softmax(torch.mm(h, w.t()).double(), -1).gather(-1, labels[:, None]).squeeze(-1)
    likely = torch.arange(len(labels)) % 2 == 0
    assert float((plain - want).abs()[likely].max()) > 4 * float(err[likely].max())


@pytest.mark.parametrize("bias", [False, True])
def test_gradients_within_bf16_rounding_of_the_exact_ones(monkeypatch, bias):
    """d hidden, d weight (and d bias) of sum(g * logp) against autograd through the exact fp32 product of the same
    bf16 operands: relative error (norm of the difference over norm) under 1e-2, bf16 rounding of each chunk's
    product; over 4 chunks, the last one short, so the reused bf16 blocks carry no chunk into the next."""
    monkeypatch.setattr(lp, "_CHUNK_ELEMENTS", 3000 * 60)
    monkeypatch.setattr(lp, "_MIN_ROWS", 1)
    h, w, labels, _ = _case(n=203)
    g = torch.randn(len(labels), generator=torch.Generator().manual_seed(1))
    head = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias)
    head.weight.data = w.float()
    b = torch.randn(w.shape[0]) if bias else torch.zeros(w.shape[0])
    if bias:
        head.bias.data = b.clone()
    hb = h.clone().requires_grad_(True)
    (lp.head_logprobs(hb, head, labels)[0] * g).sum().backward()
    hf, wf, bf = h.float().requires_grad_(True), w.float().requires_grad_(True), b.requires_grad_(True)
    (F.log_softmax(hf @ wf.t() + bf, -1).gather(-1, labels[:, None]).squeeze(-1) * g).sum().backward()
    assert hb.grad.dtype == torch.bfloat16 and head.weight.grad.dtype == torch.float32
    pairs = [(hb.grad.float(), hf.grad), (head.weight.grad, wf.grad)] + ([(head.bias.grad, bf.grad)] if bias else [])
    for got, want in pairs:
        assert float((got - want).norm() / want.norm()) < 1e-2


def test_a_bias_and_extras_take_the_same_centred_logits():
    """A head with a bias (Qwen-style heads have none, some have one) and the extras (entropy, top-1) read the same
    fp32 logits: within the tolerance of the exact ones."""
    h, w, labels, exact = _case(n=64, v=500)
    head = torch.nn.Linear(w.shape[1], w.shape[0], bias=True)
    head.weight.data, head.bias.data = w.float(), torch.randn(w.shape[0]) * 2
    exact = exact + head.bias.double()
    logps, extra = lp.head_logprobs(h, head, labels, extras=("entropy", "top1"))
    _within_tolerance(logps, exact, labels)
    truth = torch.log_softmax(exact, -1)
    assert torch.allclose(extra["entropy"].double(), -(truth.exp() * truth).sum(-1), atol=0.05)
    assert torch.equal(extra["top1"].bool(), exact.argmax(-1) == labels)
