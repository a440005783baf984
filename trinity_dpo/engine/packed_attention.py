"""Attention over a packed row on CPU: one autograd node for all of the row's sequences, computed in fp32.

`attention.varlen_sdpa` runs each sequence's causal attention (a shared prompt's keys first where a segment has
one) through torch's CPU flash kernels. This module calls the same kernels directly, inside one autograd Function,
for three reasons measured on SmolLM2's shapes (docs/benchmarks.md, History):
- In bf16 the kernels run slower than in fp32 on CPUs without AMX (a 300-token segment's forward and backward:
  9.9 ms in bf16, 8.2 ms in fp32; a prompt-sharing segment: 6.1 against 3.7 ms), and fp32 is the more exact of
  the two. Under autocast the inputs are rounded to bf16 as autocast rounds them for SDPA, then cast up per
  segment; the output is rounded back once.
- Only the bf16 inputs and output are kept for backward, which casts them up again: keeping fp32 copies would
  double what attention holds per token and layer for as long as the activations live, and the bf16 output is
  the very tensor o_proj keeps.
- Each segment's gradients are written into one row-sized gradient per input, where autograd's per-slice nodes
  would allocate and zero a whole row-sized gradient for every segment and then add them all.
Numerics in fp32 are the kernels' own; in bf16 the softmax and its products are fp32, rounded once on output.
"""
from __future__ import annotations

import torch

_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def bool_mask(prompt: int, length: int, device: torch.device) -> torch.Tensor:
    """[length, prompt + length]: True where a segment's query sees the key (all of its shared prompt, itself
    causally)."""
    return torch.ones(length, prompt + length, dtype=torch.bool, device=device).tril(diagonal=prompt)


def additive_mask(prompt: int, length: int, device: torch.device) -> torch.Tensor:
    """`bool_mask` as the CPU kernel takes it: fp32, 0 where seen, -inf elsewhere."""
    allowed = bool_mask(prompt, length, device)
    return torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, float("-inf"))


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[int],
                     prefixes: list | None, scale: float | None) -> torch.Tensor:
    """query [1, H, T, D], key and value [1, H_kv, T, D] -> [1, T, H, D] in query's dtype. `bounds` cut the row
    into segments; `prefixes[i]` is None (causal within segment i) or ((p0, p1), mask): segment i also sees keys
    p0:p1, with `additive_mask`'s mask."""
    plan = [(a, b, None if pre is None else pre[0], None if pre is None else pre[1])
            for (a, b), pre in zip(zip(bounds, bounds[1:]), prefixes or [None] * (len(bounds) - 1)) if a < b]
    device = query.device.type
    if torch.is_autocast_enabled(device):
        # Autocast's own rule for attention: inputs in the autocast dtype (rotary embeddings leave query and key
        # in fp32), so they are rounded as with SDPA, kept at half the size, and the output is what o_proj reads.
        dtype = torch.get_autocast_dtype(device)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    return _Packed.apply(query, key, value, plan, scale)


def _inputs(query, key, value, segment):
    """The fp32 query, keys and values of one segment (its prompt's keys first), [1, heads, length, D]."""
    a, b, span, _ = segment
    q, k, v = query[:, :, a:b], key[:, :, a:b], value[:, :, a:b]
    if span is not None:
        k, v = (torch.cat([x[:, :, span[0]:span[1]], y], dim=2) for x, y in ((key, k), (value, v)))
    return q.float(), k.float(), v.float()


class _Packed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, plan, scale):
        heads, width = query.shape[1], query.shape[3]
        out = query.new_empty(1, query.shape[2], heads, width)
        lses = []
        for segment in plan:
            q, k, v = _inputs(query, key, value, segment)
            o, lse = _FORWARD(q, k, v, 0.0, segment[3] is None, attn_mask=segment[3], scale=scale)
            out[:, segment[0]:segment[1]] = o.transpose(1, 2)
            lses.append(lse)
        ctx.save_for_backward(query, key, value, out)
        ctx.plan, ctx.lses, ctx.scale = plan, lses, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, out = ctx.saved_tensors
        # Written in the [1, T, heads, D] layout the projections produced (their grads flow back through a
        # transpose); keys and values start at zero since a shared prompt's keys take gradient from two segments.
        dq = query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])
        dk = torch.zeros(1, key.shape[2], key.shape[1], key.shape[3], dtype=torch.float32, device=key.device)
        dv = torch.zeros_like(dk)
        for segment, lse in zip(ctx.plan, ctx.lses):
            a, b, span, mask = segment
            q, k, v = _inputs(query, key, value, segment)
            g, o = (x[:, a:b].transpose(1, 2).float() for x in (grad, out))
            gq, gk, gv = _BACKWARD(g, q, k, v, o, lse, 0.0, mask is None, attn_mask=mask, scale=ctx.scale)
            dq[:, a:b] = gq.transpose(1, 2)
            own = gk.shape[2] - (b - a)
            dk[:, a:b] += gk[:, :, own:].transpose(1, 2)
            dv[:, a:b] += gv[:, :, own:].transpose(1, 2)
            if span is not None:
                dk[:, span[0]:span[1]] += gk[:, :, :own].transpose(1, 2)
                dv[:, span[0]:span[1]] += gv[:, :, :own].transpose(1, 2)
        return (dq.transpose(1, 2), dk.to(key.dtype).transpose(1, 2), dv.to(value.dtype).transpose(1, 2), None,
                None)
