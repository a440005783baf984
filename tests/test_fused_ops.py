"""The fused RMSNorm and SwiGLU nodes (`engine/fused_ops.py`): transformers' numbers, less kept for backward."""
import copy

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from trinity_dpo.engine import fused_ops


def _llama(layers=2, seed=0):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    for p in model.parameters():  # norms start at 1: make them random so a wrong weight gradient shows
        p.data.normal_(0, 0.5)
    return model


def _grads(module_or_fn, *inputs, weight_of=None, seed=3):
    out = module_or_fn(*inputs)
    torch.manual_seed(seed)
    out.backward(torch.randn(out.shape).to(out.dtype))
    found = [out.detach(), *(t.grad.clone() for t in inputs)]
    if weight_of is not None:
        found.append(weight_of.weight.grad.clone())
    return found


def test_norm_fp32_equals_transformers():
    """fp32: the output is transformers' bit for bit (same ops, same order); the input and weight gradients, from
    the closed form rstd * (g w - x_hat mean(g w x_hat)) and sum_t g x_hat, equal autograd's within fp32 rounding."""
    norm = LlamaRMSNorm(8, eps=1e-5)
    norm.weight.data = torch.randn(8, generator=torch.Generator().manual_seed(1))
    fused = copy.deepcopy(norm)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(2)) * 3
    want = _grads(norm, x.clone().requires_grad_(), weight_of=norm)
    got = _grads(lambda t: fused_ops._RMSNorm.apply(t, fused.weight, 1e-5), x.clone().requires_grad_(),
                 weight_of=fused)
    assert torch.equal(got[0], want[0])
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_norm_under_autocast_is_the_projections_cast():
    """Under bf16 autocast the output is transformers' fp32 output rounded once to bf16: exactly the value each
    projection's autocast cast would have made of it, so q, k and v read the same numbers and share one tensor."""
    norm = LlamaRMSNorm(8, eps=1e-5)
    norm.weight.data = torch.randn(8, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(2)) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_ops._RMSNorm.apply(x, norm.weight, 1e-5)
        want = norm(x)
    assert got.dtype == torch.bfloat16 and want.dtype == torch.float32
    assert torch.equal(got, want.to(torch.bfloat16))


def test_silu_mul_is_autograds_own_arithmetic():
    """bf16 gate and up: forward and both gradients are bit for bit what autograd gives for silu(gate) * up (the
    backward runs the same ops in the same dtype, silu(gate) being computed again rather than kept)."""
    g0 = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(3, 7, 16, generator=g0).bfloat16() * 3 for _ in range(2))
    want = _grads(lambda a, b: F.silu(a) * b, gate.clone().requires_grad_(), up.clone().requires_grad_())
    got = _grads(fused_ops._SiluMul.apply, gate.clone().requires_grad_(), up.clone().requires_grad_())
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_model_routed_equals_unrouted_and_keeps_less():
    """A Llama's 2 layers get 7 routed modules each (2 norms, the MLP, 4 attention projections); the model's loss and every gradient equal the unrouted
    model's (fp32, rounding only), and under bf16 autocast a forward keeps fewer bytes for backward (parameters
    themselves not counted). Per token and layer: the two norms' fp32 normalised values (2 x 4 x 32 bytes), the
    five projections' separate bf16 casts of the norms' outputs (3 + 2 casts become 1 + 1: 3 x 2 x 32 bytes),
    silu(gate) and the product silu(gate) * up (2 x 2 x 64 bytes): 256 + 192 + 256 = 704 bytes, for 12 tokens and
    2 layers. Per layer: autocast's bf16 copies of the gate, up and down weights (3 x 32 x 64 x 2 bytes = 12288)
    and of q, k, v and o (32 x 32, 16 x 32, 16 x 32, 32 x 32: 3072 x 2 bytes = 6144), which the nodes make again
    in backward instead of keeping."""
    plain = _llama()
    routed = copy.deepcopy(plain)
    state = torch.random.get_rng_state()
    assert fused_ops.apply(routed) == 14
    assert torch.equal(torch.random.get_rng_state(), state)  # the probes draw nothing from the run's generator
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(5))
    losses = []
    for model in (plain, routed):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), routed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    kept = [_saved_bytes(m, ids) for m in (plain, routed)]
    assert kept[0] - kept[1] == 704 * 12 * 2 + (12288 + 6144) * 2


def test_bf16_mlp_near_autocast():
    """Under bf16 autocast the routed MLP's output is autocast's bit for bit (the same bf16 products of the same
    casts), and its gradients are autocast's up to bf16 rounding (the input's two gradients are summed with one
    rounding instead of two)."""
    mlp = _llama(layers=1).model.layers[0].mlp
    routed = copy.deepcopy(mlp)
    routed.forward = fused_ops._mlp_forward.__get__(routed)
    x = torch.randn(1, 9, 32, generator=torch.Generator().manual_seed(4)).bfloat16()
    results = [_autocast_run(m, x) for m in (mlp, routed)]
    assert torch.equal(results[0][0], results[1][0])
    for got, want in zip(results[1][1:], results[0][1:]):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


def _autocast_run(module, x) -> list[torch.Tensor]:
    """[output, d input, d each parameter] of `module` on bf16 `x` under bf16 autocast, for the loss sum(out^2)."""
    xi = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(xi)
    out.float().pow(2).sum().backward()
    return [out.detach(), xi.grad, *(p.grad.clone() for p in module.parameters())]


def _saved_bytes(model, ids) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.model(input_ids=ids)
    del out
    return sum(storages.values())


def test_a_norm_with_other_arithmetic_is_left_alone():
    """A norm of the same shape whose forward differs (Gemma's (1 + w) scale) fails the bit-for-bit probe and
    keeps its own forward; the MLP, which passes, is still routed; a layer class outside `LAYERS` is not touched."""
    class OnePlusNorm(LlamaRMSNorm):
        def forward(self, x):
            xf = x.float()
            return (1 + self.weight) * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    model = _llama(layers=1)
    layer = model.model.layers[0]
    layer.input_layernorm = OnePlusNorm(32)
    assert fused_ops.apply(model) == 6
    assert "forward" not in vars(layer.input_layernorm) and "forward" in vars(layer.post_attention_layernorm)

    class OtherLayer(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.input_layernorm, self.post_attention_layernorm, self.mlp = (
                inner.input_layernorm, inner.post_attention_layernorm, inner.mlp)

    other = torch.nn.Sequential(OtherLayer(_llama(layers=1).model.layers[0]))
    assert fused_ops.apply(other) == 0


def test_projection_is_autocasts_linear():
    """A routed attention projection (with a bias, as Qwen2's) under bf16 autocast: output and the input, weight and
    bias gradients bit for bit autocast's; outside autocast or without gradients it is nn.Linear itself."""
    torch.manual_seed(0)
    plain = torch.nn.Linear(16, 8)
    routed = copy.deepcopy(plain)
    routed.forward = fused_ops._projection_forward.__get__(routed)
    x = torch.randn(2, 5, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(routed(x.clone().requires_grad_()).grad_fn).__name__ == "_CastLinearBackward"
    results = [_autocast_run(m, x) for m in (plain, routed)]
    for got, want in zip(*results):
        assert torch.equal(got, want)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert routed(x).grad_fn is None and torch.equal(routed(x), plain(x))


def test_a_pass_at_fixed_weights_casts_each_weight_once():
    """Without gradients the MLP runs its plain projections, whose casts go through autocast's cache: inside
    `scoring_mode` three forwards of a 2-layer routed Llama cast each linear weight to bf16 once (2 layers x 7
    projections = 14 casts, the tied embedding's head 1 more), where a forward per autocast context casts them at
    every forward (3 x 15 = 45). The outputs are those of the forward with gradients (the `_SwiGLU` node), bit for
    bit."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from trinity_dpo.engine.modeling import Runtime, scoring_mode

    model = _llama()
    fused_ops.apply(model)
    weights = {p.data_ptr() for p in model.parameters() if p.dim() == 2}

    class Casts(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in weights:
                Casts.n += 1
            return func(*args, **(kwargs or {}))

    ids = [torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    runtime = Runtime(torch.device("cpu"), bf16=True)
    with Casts(), scoring_mode(model, runtime):
        kept = [model(input_ids=i).logits for i in ids]
    once, Casts.n = Casts.n, 0
    with Casts(), torch.no_grad():
        for i in ids:
            with runtime.autocast():
                model(input_ids=i)
    assert (once, Casts.n) == (15, 45)
    with runtime.autocast():  # the training forward: `_SwiGLU` and `_CastLinear` nodes
        trained = [model(input_ids=i).logits.detach() for i in ids]
    assert all(torch.equal(a, b) for a, b in zip(kept, trained))
