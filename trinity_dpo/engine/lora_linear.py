"""One fused LoRA linear layer: y = x W^T + b + s (x A^T) B^T with its backward written out.

PEFT's own forward computes `base(x) + lora_B(lora_A(x)) * scaling`: per adapted layer that is two extra full-size
passes over the output in forward (the scaling, the sum) and two in backward (the scaled gradient, the sum of the
input's two gradients). Here the scaling rides on the small rank-r products and both sums are `addmm`'s
accumulate, so an adapted layer costs its base product plus the rank-r products and nothing else. The weights stay
PEFT's (names, layout, saving, `disable_adapter`); only the arithmetic of an active, plain adapter is replaced.
"""
from __future__ import annotations

import types

import torch


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling):
        xa = x @ a.T
        y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
        y.addmm_(xa, b.T, alpha=scaling)
        ctx.save_for_backward(x, weight, a, b, xa)
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, a, b, xa = ctx.saved_tensors
        s, need = ctx.scaling, ctx.needs_input_grad
        g = dy @ b  # (tokens, rank): the adapter's gradient at x A^T, before the scaling
        dx = (dy @ weight).addmm_(g, a, alpha=s) if need[0] else None
        dw = dy.T @ x if need[1] else None
        dbias = dy.sum(0) if need[2] else None
        da = torch.mm(g.T, x).mul_(s) if need[3] else None
        db = torch.mm(dy.T, xa).mul_(s) if need[4] else None
        return dx, dw, dbias, da, db, None


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's `lora.Linear.forward` where the fused product applies (one active plain adapter, no dropout, not
    merged, no extra arguments); PEFT's own forward otherwise."""
    name = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    if (args or kwargs or self.disable_adapters or self.merged or name not in self.lora_A or name in self.lora_variant
            or not isinstance(self.lora_dropout[name], torch.nn.Identity) or self.fan_in_fan_out
            or getattr(self, "lora_bias", {}).get(name)):  # lora_B's bias: PEFT's forward adds it
        return type(self).forward(self, x, *args, **kwargs)
    weight, bias = self.base_layer.weight, self.base_layer.bias
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    if torch.is_autocast_enabled(x.device.type):  # the casts autocast would make for F.linear, made once here
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, a, b = (t.to(dtype) for t in (x, weight, a, b))
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(x.device.type, enabled=False):
        y = _LoraLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias, a, b, float(self.scaling[name]))
    return y.view(*x.shape[:-1], y.shape[-1])


def fuse(model: torch.nn.Module) -> int:
    """Route every PEFT `lora.Linear` of `model` through the fused product; returns how many."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for module in model.modules():
        if type(module) is Linear:
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count
