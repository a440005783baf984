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


@pytest.mark.parametrize("bias, group_rows", [(False, None), (True, None), (False, 1), (False, 90)])
def test_gradients_within_bf16_rounding_of_the_exact_ones(monkeypatch, bias, group_rows):
    """d hidden, d weight (and d bias) of sum(g * logp) against autograd through the exact fp32 product of the same
    bf16 operands: relative error (norm of the difference over norm) under 1e-2, bf16 rounding of each chunk's
    product, and of d weight's product over each group of chunks; over 4 chunks of 60, 60, 60 and 23 rows, so the
    reused bf16 blocks carry no chunk into the next. Groups: all chunks in one (the default budget), one chunk per
    group, and 90 rows (a chunk that does not fit flushes the group: 60, 60, 60 + 23)."""
    monkeypatch.setattr(lp, "_CHUNK_ELEMENTS", 3000 * 60)
    monkeypatch.setattr(lp, "_MIN_ROWS", 1)
    if group_rows is not None:
        monkeypatch.setattr(bf16_head, "_GROUP_BYTES", 2 * 3000 * group_rows)
    flushed = []
    real_flush = bf16_head.Products.flush
    monkeypatch.setattr(bf16_head.Products, "flush", lambda self, d_weight: flushed.append(self._filled)
                        or real_flush(self, d_weight))
    h, w, labels, _ = _case(n=203)
    g = torch.randn(len(labels), generator=torch.Generator().manual_seed(1))
    head = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias)
    head.weight.data = w.float()
    b = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(2)) if bias else torch.zeros(w.shape[0])
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
    groups = {None: [203], 1: [60, 60, 60, 23], 90: [60, 60, 83]}[group_rows]
    assert [n for n in flushed if n] == groups


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_bias_and_extras_take_the_same_centred_logits(seed):
    """A head with a bias (Qwen-style heads have none, Phi-2's has one) and the extras (entropy, top-1) read the same
    fp32 logits. The bias is added after the centred product, exactly, in fp32, so a logit's error is
    2^-9 |hw - hw_label|, the unbiased difference: log-probs within 2^-8 (1 + E_p |hw - hw_label|) of the exact ones
    (p the biased softmax). The entropy H = lse - sum_v p_v z_v moves by sum_v p_v |log p_v + H| times each logit's
    error: within 2^-8 sum_v p_v |log p_v + H| (1 + |hw_v - hw_label|), plus 1e-5 for fp32's own rounding of logits
    near 40 (40 x 2^-22). Top-1 agrees wherever the exact best logit leads the second by more than the errors can
    close (2 x 2^-9 |hw - hw_label| at most, 0.2 here); a nearer race may go either way."""
    h, w, labels, unbiased = _case(n=64, v=500, seed=seed)
    bias = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(100 + seed)) * 2
    head = torch.nn.Linear(w.shape[1], w.shape[0], bias=True)
    head.weight.data, head.bias.data = w.float(), bias
    exact = unbiased + bias.double()
    logps, extra = lp.head_logprobs(h, head, labels, extras=("entropy", "top1"))
    truth = torch.log_softmax(exact, -1)
    p, entropy = truth.exp(), -(truth.exp() * truth).sum(-1)
    distance = 1 + (unbiased - unbiased.gather(-1, labels[:, None])).abs()
    err = (logps.double() - truth.gather(-1, labels[:, None]).squeeze(-1)).abs()
    assert bool((err <= 2 ** -8 * (p * distance).sum(-1)).all())
    spread = (p * (truth + entropy[:, None]).abs() * distance).sum(-1)
    assert bool(((extra["entropy"].double() - entropy).abs() <= 2 ** -8 * spread + 1e-5).all())
    top2 = exact.topk(2, -1).values
    clear = top2[:, 0] - top2[:, 1] > 0.2
    assert int(clear.sum()) > 50
    assert torch.equal(extra["top1"].bool()[clear], (exact.argmax(-1) == labels)[clear])


def test_backward_reuses_the_forward_bf16_weight(monkeypatch):
    """One bf16 copy of the head weight per forward-backward (the weight cannot change between them): backward takes
    the forward's instead of casting 113 MB again for SmolLM2. The gradients it gives are checked against the exact
    ones in `test_gradients_within_bf16_rounding_of_the_exact_ones`."""
    h, w, labels, _ = _case(n=64, v=500)
    head = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    head.weight.data = w.float()
    g = torch.randn(len(labels), generator=torch.Generator().manual_seed(3))  # not one value: backward rebuilds
    made = []

    class Counted(bf16_head.Products):
        def __init__(self, *args):
            made.append(1)
            super().__init__(*args)

    monkeypatch.setattr(bf16_head, "Products", Counted)
    hb = h.clone().requires_grad_(True)
    (lp.head_logprobs(hb, head, labels)[0] * g).sum().backward()
    assert len(made) == 1 and hb.grad is not None and head.weight.grad is not None


def test_a_frozen_head_keeps_one_chunk_of_d_logits():
    """Only d weight's product waits in groups: a frozen head (LoRA), which wants d hidden alone, keeps one chunk's
    bf16 d_logits, not a group's 128 MB."""
    products = bf16_head.Products(torch.randn(3000, 96), None)
    d_hidden = torch.empty(60, 96)
    products.add_grads(torch.randn(60, 3000), torch.randn(60, 96).bfloat16(), d_hidden, None)
    assert products._blocks["da"].shape == (60, 3000)


def test_a_pass_at_fixed_weights_copies_the_head_once():
    """Inside `keep_copies` the head's bf16 copy is made once per weight and reused while the weight is unchanged;
    an update (its version moves) makes a new one; outside, each forward makes its own."""
    weight = torch.nn.Parameter(torch.randn(50, 16))
    with bf16_head.keep_copies():
        first, second = bf16_head.Products(weight, None), bf16_head.Products(weight, None)
        assert first.w_aug is second.w_aug
        with torch.no_grad():
            weight.add_(1.0)
        third = bf16_head.Products(weight, None)
        assert third.w_aug is not first.w_aug and torch.equal(third.w, weight.detach().bfloat16())
    assert bf16_head.Products(weight, None).w_aug is not bf16_head.Products(weight, None).w_aug
