"""RMSNorm and SwiGLU of the common decoder layers as autograd nodes that keep less for backward.

Written as transformers writes them, each op keeps its own inputs for backward, so a Llama-style layer under bf16
autocast holds, per token: the norm's fp32 input and its fp32 normalised value, then one bf16 cast of the norm's
output per projection that reads it (q, k and v; gate and up), and in the MLP the gate, silu(gate) and up. Here:
- `_RMSNorm` computes transformers' output exactly, then, under autocast, rounds it once to the autocast dtype (the
  cast each projection would make of it): it keeps its input and the per-token 1/rms, and its projections share
  one bf16 tensor. Its backward works in fp32 from the input.
- `_SiluMul` computes silu(gate) * up as transformers does and keeps gate and up only; its backward is autograd's
  for that code, with silu(gate) computed again (one pass over the MLP's width).
Per token and layer of SmolLM2 (hidden 576, MLP 1536) under bf16 autocast, a layer keeps 19 KB instead of 30 KB
(what autograd's saved-tensor hooks count).

They replace the forward of the two norms and the MLP inside decoder layers whose norms feed only projections
(`LAYERS`), and each module only if the replacement gives the module's own output on a random input, bit for bit
in fp32; anything else keeps transformers' code.
"""
from __future__ import annotations

import copy
import types

import torch
import torch.nn.functional as F

# Decoder layers whose input and post-attention norms feed only linear projections (a sandwich norm, as in Gemma,
# adds its output to the residual stream, where a rounded output would not do).
LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"}
NORMS = ("input_layernorm", "post_attention_layernorm")


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = weight * (xf * rstd).to(x.dtype)
        if torch.is_autocast_enabled(x.device.type):
            y = y.to(torch.get_autocast_dtype(x.device.type))
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        g = grad.float()
        gw = (g * normed).reshape(-1, normed.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        g = g * weight.float()
        # d/dx of x * rstd: rstd * (g - normed * mean(g * normed)), written in place into the fresh tensors.
        gx = g.sub_(normed.mul_((g * normed).mean(-1, keepdim=True))).mul_(rstd)
        return gx.to(x.dtype), None if gw is None else gw.to(weight.dtype), None


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        # The ops autograd would run for transformers' code, in the same dtype, plus silu(gate) computed again.
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


def _norm_forward(self, hidden_states):
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    return self.down_proj(_SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def _same(module, forward, width: int) -> bool:
    """Whether `forward` gives `module`'s own output, bit for bit, on a random fp32 input: tried on an fp32 copy on
    the CPU with random weights (the module may be on the meta device, or in bf16)."""
    probe = copy.deepcopy(module)
    if any(p.device.type == "meta" for p in probe.parameters()):
        probe = probe.to_empty(device="cpu")
    probe = probe.to("cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        for param in probe.parameters():
            param.copy_(torch.randn(param.shape, generator=g))
        x = torch.randn(2, 3, width, generator=g)
        return torch.equal(forward(probe, x), probe.forward(x))


def apply(model: torch.nn.Module) -> int:
    """Route the norms and MLPs of `model`'s decoder layers in `LAYERS` through the fused nodes, each module class
    once it passes `_same`; returns how many modules were routed."""
    count, passed = 0, {}

    def route(module, forward, width) -> int:
        kind = type(module)
        if kind not in passed:
            passed[kind] = _same(module, forward, width)
        if passed[kind]:
            module.forward = types.MethodType(forward, module)
        return int(passed[kind])

    for layer in model.modules():
        if type(layer).__name__ not in LAYERS:
            continue
        width = layer.input_layernorm.weight.shape[-1]
        for name in NORMS:
            norm = getattr(layer, name)
            if hasattr(norm, "variance_epsilon"):
                count += route(norm, _norm_forward, width)
        mlp = layer.mlp
        act = type(getattr(mlp, "act_fn", None)).__name__
        if act in ("SiLU", "SiLUActivation") and all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            count += route(mlp, _mlp_forward, width)
    return count
