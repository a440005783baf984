"""The CPU packed-row attention (`engine/packed_attention.py`) against per-segment SDPA, forward and backward."""
import torch
import torch.nn.functional as F

from trinity_dpo.engine.attention import varlen_kwargs, varlen_sdpa
from trinity_dpo.engine.packed_attention import additive_mask, packed_attention

# A row of 4 segments: a prompt + chosen answer (0:7), its rejected answer seeing the prompt 0:3 (7:11), then a
# sequence alone (11:16) and a one-token segment seeing the prompt 11:13 (16:17).
BOUNDS = [0, 7, 11, 16, 17]
PREFIXES = [None, (0, 3), None, (11, 13)]


def _qkv(dtype, heads=4, kv_heads=2, width=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: (torch.randn(1, BOUNDS[-1], h, width, generator=g) * 2).transpose(1, 2).to(dtype)  # noqa: E731
    return [t.requires_grad_() for t in (make(heads), make(kv_heads), make(kv_heads))]


def _reference(q, k, v, fp32=True):
    """Each segment alone through SDPA (in fp32 unless `fp32` is False), the rejected answer over its prompt's keys
    then its own, joined: what `varlen_sdpa` computed before the packed node."""
    q, k, v = (t.float() if fp32 else t for t in (q, k, v))
    pieces = []
    for (a, b), pre in zip(zip(BOUNDS, BOUNDS[1:]), PREFIXES):
        keys = [k[:, :, a:b]] if pre is None else [k[:, :, pre[0]:pre[1]], k[:, :, a:b]]
        vals = [v[:, :, a:b]] if pre is None else [v[:, :, pre[0]:pre[1]], v[:, :, a:b]]
        p = 0 if pre is None else pre[1] - pre[0]
        mask = torch.ones(b - a, p + b - a, dtype=torch.bool).tril(diagonal=p)
        pieces.append(F.scaled_dot_product_attention(q[:, :, a:b], torch.cat(keys, 2), torch.cat(vals, 2),
                                                     attn_mask=mask, enable_gqa=True))
    return torch.cat(pieces, dim=2).transpose(1, 2)


def _run(fn, q, k, v, grad):
    out = fn(q, k, v)
    out.backward(grad.to(out.dtype))
    grads = [t.grad.float() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return [out.float(), *grads]


def _packed(q, k, v):
    spans = [None if p is None else (p, additive_mask(p[1] - p[0], b - a, q.device))
             for (a, b), p in zip(zip(BOUNDS, BOUNDS[1:]), PREFIXES)]
    return packed_attention(q, k, v, BOUNDS, spans, None)


def test_fp32_equals_per_segment_sdpa():
    """In fp32 the packed node runs the same kernels on the same numbers: output and the three gradients equal
    per-segment SDPA within fp32 rounding, including the shared prompts' keys, which take gradient from the chosen
    segment and from the rejected one (summed)."""
    q, k, v = _qkv(torch.float32)
    grad = torch.randn(1, BOUNDS[-1], 4, 8, generator=torch.Generator().manual_seed(1))
    for got, want in zip(_run(_packed, q, k, v, grad), _run(_reference, q, k, v, grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_is_fp32_math_rounded_once():
    """bf16 inputs: the softmax and its products run in fp32, so the output is exactly the fp32 result of the same
    bf16 inputs rounded once to bf16. The gradients differ from fp32's by their own rounding to bf16 and by the bf16
    output kept for backward (D = rowsum(dO * O) from O rounded: 2^-9 relative); each is still closer to the fp32
    gradient than what SDPA's bf16 kernels gave per segment (the path this replaces), and within 2^-6 of the
    gradient's largest magnitude."""
    q, k, v = _qkv(torch.bfloat16)
    grad = torch.randn(1, BOUNDS[-1], 4, 8, generator=torch.Generator().manual_seed(1)).bfloat16()
    got = _run(_packed, q, k, v, grad)
    want = _run(_reference, q, k, v, grad)  # fp32 math on the same (bf16-valued) inputs
    old = _run(lambda *t: _reference(*t, fp32=False), q, k, v, grad)
    torch.testing.assert_close(got[0], want[0].bfloat16().float(), rtol=0, atol=0)
    for g, w, o in zip(got[1:], want[1:], old[1:]):
        assert (g - w).abs().max() <= (o - w).abs().max()
        assert (g - w).abs().max() <= 2 ** -6 * w.abs().max()


def test_varlen_sdpa_takes_it_on_cpu():
    """The registered attention on a CPU row with bounds and prompts runs the packed node (one autograd node for
    the row: its grad_fn) and gives per-segment SDPA's numbers."""
    q, k, v = _qkv(torch.float32)
    kwargs = varlen_kwargs(BOUNDS, torch.device("cpu"), PREFIXES)
    out, _ = varlen_sdpa(None, q, k, v, None, scaling=None, **kwargs)
    assert type(out.grad_fn).__name__ == "_PackedBackward"
    torch.testing.assert_close(out, _reference(q, k, v), rtol=1e-5, atol=1e-5)


def test_autocast_rounds_inputs_as_sdpa_and_keeps_bf16():
    """Under bf16 autocast, fp32 query and key (rotary embeddings leave them in fp32) are rounded to bf16 first, as
    autocast rounds SDPA's inputs: the output is the packed node's on the rounded inputs, in bf16, and everything
    kept for backward is bf16."""
    q, k, v = _qkv(torch.float32)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.dtype) or t, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        out = _packed(q, k, v)
    assert out.dtype == torch.bfloat16 and set(kept) == {torch.bfloat16}
    assert torch.equal(out, _packed(*(t.detach().bfloat16() for t in (q, k, v))))
