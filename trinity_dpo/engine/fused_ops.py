"""RMSNorm and SwiGLU of the common decoder layers as autograd nodes that keep less for backward.

Written as transformers writes them, each op keeps its own inputs for backward, so a Llama-style layer under bf16
autocast holds, per token: the norm's fp32 input and its fp32 normalised value, then one bf16 cast of the norm's
output per projection that reads it (q, k and v; gate and up), and in the MLP the gate, silu(gate) and up. Here:
- `_RMSNorm` computes transformers' output exactly, then, under autocast, rounds it once to the autocast dtype (the
  cast each projection would make of it): it keeps its input and the per-token 1/rms, and its projections share
  one bf16 tensor. Its backward works in fp32 from the input.
- `_SwiGLU`, for an MLP of plain bias-free projections, runs the whole MLP as autocast would (the same bf16
  products of the same casts) and keeps its input, gate and up: the product silu(gate) * up is computed again in
  backward, and so are the three weights' bf16 copies, which autocast would keep from forward to backward.
- `_SiluMul`, where the projections are LoRA-wrapped or biased, computes silu(gate) * up as transformers does and
  keeps gate and up only; its backward is autograd's for that code, with silu(gate) computed again.
- `_CastLinear`, for the attention's plain projections, is autocast's linear keeping the parameter rather than
  its bf16 copy, which backward makes again.
Per token and layer of SmolLM2 (hidden 576, MLP 1536) under bf16 autocast, a layer keeps 16 KB instead of 30 KB
(what autograd's saved-tensor hooks count), and no bf16 copy of its weights (7 MB a layer).

They replace the forward of the two norms, the MLP and the four attention projections inside decoder layers whose
norms feed only projections (`LAYERS`); a norm or MLP class only if the replacement gives the module's own output
on a random input, bit for bit in fp32, and a projection only if it is a plain `nn.Linear`. Anything else keeps
transformers' code.
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
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


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


class _SwiGLU(torch.autograd.Function):
    """down(silu(x gate^T) * (x up^T)) for plain bias-free projections, keeping x, gate and up: the product (the
    down projection's input) is computed again in backward, and the weights' autocast copies are made again rather
    than kept (3 casts per layer, where autocast keeps a bf16 copy of every weight from forward to backward)."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down):
        weights = _compute_weights(x, (w_gate, w_up, w_down))
        x = x.to(weights[0].dtype)
        gate, up = F.linear(x, weights[0]), F.linear(x, weights[1])
        ctx.save_for_backward(x, gate, up, w_gate, w_up, w_down)
        return F.linear(F.silu(gate) * up, weights[2])

    @staticmethod
    def backward(ctx, grad):
        x, gate, up, *params = ctx.saved_tensors  # unpacked once: checkpointing allows no second unpack
        shape = x.shape
        w_gate, w_up, w_down = (w.to(x.dtype) for w in params)
        grad = grad.to(x.dtype).reshape(-1, grad.shape[-1])
        flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
        gate, up, x = flat(gate), flat(up), flat(x)
        d_down = grad.T @ (F.silu(gate) * up)
        d_product = grad @ w_down
        d_gate = torch.ops.aten.silu_backward(d_product * up, gate)
        d_up = d_product.mul_(F.silu(gate))
        dx = (d_gate @ w_gate).add_(d_up @ w_up)
        return (dx.view(shape), (d_gate.T @ x).to(params[0].dtype),
                (d_up.T @ x).to(params[1].dtype), d_down.to(params[2].dtype))


class _CastLinear(torch.autograd.Function):
    """x W^T + b under autocast with autocast's casts, keeping the parameter W rather than its bf16 copy, which
    backward makes again; its products are autocast's own, forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x = x.to(torch.get_autocast_dtype(x.device.type))
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = grad.to(x.dtype).reshape(-1, grad.shape[-1])
        dx = (g @ weight.to(x.dtype)).view(x.shape) if need[0] else None
        dw = (g.T @ x.reshape(-1, x.shape[-1])).to(weight.dtype) if need[1] else None
        db = g.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and need[2] else None
        return dx, dw, db


def _projection_forward(self, x):
    if torch.is_grad_enabled() and torch.is_autocast_enabled(x.device.type):
        return _CastLinear.apply(x, self.weight, self.bias)
    return torch.nn.Linear.forward(self, x)


def _compute_weights(x: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return tuple(w.to(torch.get_autocast_dtype(device)) for w in weights)
    return weights


def _norm_forward(self, hidden_states):
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    projections = (self.gate_proj, self.up_proj, self.down_proj)
    plain = all(type(p) is torch.nn.Linear and p.bias is None for p in projections)  # not LoRA-wrapped, no bias
    if plain and torch.is_grad_enabled():
        return _SwiGLU.apply(x, *(p.weight for p in projections))
    # Without gradients there is nothing to keep: the modules' own products, bit for bit `_SwiGLU`'s forward, whose
    # weight casts go through autocast's cache (one cast per pass at fixed weights: `modeling.scoring_mode`).
    return self.down_proj(_SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def _small_mlp(mlp: torch.nn.Module) -> tuple[torch.nn.Module, int]:
    """(`mlp`'s code over projections 8 -> 16 -> 8, its input width): what `_same` tries, instead of a copy of
    weights that reach gigabytes in fp32 for a large model, made in every process at every load."""
    probe = copy.copy(mlp)
    probe._modules = dict(mlp._modules)  # its own table of submodules; `mlp`'s stays as it is
    for name, shape in (("gate_proj", (8, 16)), ("up_proj", (8, 16)), ("down_proj", (16, 8))):
        # On the meta device: no memory, and no draw from the run's random generator (`_same` fills them).
        probe._modules[name] = torch.nn.Linear(*shape, bias=getattr(mlp, name).bias is not None, device="meta")
    return probe, 8


def _same(module, forward, width: int) -> bool:
    """Whether `forward` gives `module`'s own output, bit for bit, on a random fp32 input of `width` features: tried
    on an fp32 copy on the CPU with random weights (the module may be on the meta device, or in bf16)."""
    probe = copy.deepcopy(module)
    if any(p.device.type == "meta" for p in probe.parameters()):
        probe = probe.to_empty(device="cpu")
    probe = probe.to("cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        for param in probe.parameters():
            param.copy_(torch.randn(param.shape, generator=g))
        x = torch.randn(2, 3, width, generator=g)
        try:
            return torch.equal(forward(probe, x), probe.forward(x))
        except RuntimeError:  # code that reads sizes other than its weights' (the small MLP probe): not routed
            return False


def apply(model: torch.nn.Module) -> int:
    """Route the norms and MLPs of `model`'s decoder layers in `LAYERS` through the fused nodes, each module class
    once it passes `_same`; returns how many modules were routed."""
    count, passed = 0, {}

    def route(module, forward, probe, width) -> int:
        kind = type(module)
        if kind not in passed:
            passed[kind] = _same(probe, forward, width)
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
                count += route(norm, _norm_forward, norm, width)
        for name in PROJECTIONS:  # plain nn.Linear: its own forward wherever autocast is off
            projection = getattr(getattr(layer, "self_attn", None), name, None)
            if type(projection) is torch.nn.Linear:
                projection.forward = types.MethodType(_projection_forward, projection)
                count += 1
        mlp = layer.mlp
        act = type(getattr(mlp, "act_fn", None)).__name__
        if act in ("SiLU", "SiLUActivation") and all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            count += route(mlp, _mlp_forward, *_small_mlp(mlp))
    return count
