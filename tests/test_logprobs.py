"""Chunked fp32 log-probs equal the naive full-logits path, in values and gradients; padding changes nothing."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import trinity_dpo.engine.logprobs as lp
from trinity_dpo.engine.attention import use_varlen
from trinity_dpo.data.batching import collate
from trinity_dpo.engine.logprobs import sequence_logps, token_logprobs
from trinity_dpo.data.pairs import Pair

NO_AUTOCAST = contextlib.nullcontext()


def naive_logps(model, pair: Pair) -> tuple[float, float]:
    """Full logits over whole unpadded sequences, shifted, gathered, summed over response tokens."""
    out = []
    for response in (pair.chosen_ids, pair.rejected_ids):
        ids = torch.tensor([pair.prompt_ids + response])
        logits = model(input_ids=ids).logits[0, :-1].float()
        logps = F.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        out.append(logps[len(pair.prompt_ids) - 1:].sum())
    return tuple(out)


def pairs():
    return [Pair(0, 1, [1, 5, 6, 7], [8, 9, 2], [10, 2]), Pair(1, 2, [1, 11], [12, 13, 14, 15, 2], [16, 2]),
            Pair(2, 3, [1, 5, 6, 7, 20, 21, 22], [8], [30, 31, 2])]


@pytest.mark.parametrize("pack, share", [(False, False), (True, False), (True, True)])
def test_batch_equals_each_sequence_alone(llama_dir, pack, share):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    use_varlen(model)
    mb = collate(pairs(), pad_id=0, pack=pack, share_prompt=share)
    chosen, rejected = sequence_logps(model, mb, NO_AUTOCAST).chunk(2)
    for i, pair in enumerate(pairs()):
        c, r = naive_logps(model, pair)
        assert torch.allclose(chosen[i], c, atol=1e-5) and torch.allclose(rejected[i], r, atol=1e-5)


def test_shared_prompt_gradients_equal_separate_sequences(llama_dir):
    """Computing each prompt once changes no gradient: the prompt's positions collect what both responses send
    back through them, as two separate copies would."""
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    use_varlen(model)
    grads = []
    for share in (False, True):
        model.zero_grad()
        logps = sequence_logps(model, collate(pairs(), pad_id=0, share_prompt=share), NO_AUTOCAST)
        (logps * torch.arange(1.0, 7.0)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-5) for n in grads[0])


def _softcap(logits):
    return torch.tanh(logits / 3.0) * 3.0


@pytest.mark.parametrize("bias, transform", [(False, None), (True, None), (True, _softcap)])
def test_chunked_values_and_gradients_equal_naive(monkeypatch, bias, transform):
    """Values and the gradients of hidden states, weight and bias equal autograd through full logits, for a plain
    head, one with a bias, and a Gemma-style soft cap (its derivative 1 - tanh^2 goes through the chunks)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    hidden = torch.randn(23, 16, requires_grad=True)
    labels = torch.randint(0, 50, (23,))
    weights = torch.randn(23)
    logits = head(hidden) if transform is None else transform(head(hidden))
    naive = F.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)
    (naive * weights).sum().backward()
    params = [hidden, head.weight] + ([head.bias] if bias else [])
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    monkeypatch.setattr(lp, "_CHUNK_ELEMENTS", 50 * 5)  # 5 rows per chunk: 5 chunks, the last one short
    monkeypatch.setattr(lp, "_MIN_ROWS", 1)
    chunked = token_logprobs(hidden, head, labels, transform)
    (chunked * weights).sum().backward()
    assert torch.allclose(chunked, naive, atol=1e-6)
    for p, want in zip(params, expected):
        assert torch.allclose(p.grad, want, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_head_backward_done_in_forward_for_a_uniform_gradient(monkeypatch, bias):
    """With `uniform_grad` and a loss giving every row the same gradient (-0.25 each, as SFT's token mean over 4
    tokens would), forward computes the head's gradients for a unit gradient and backward only scales them: no
    chunk is rebuilt, and the gradients equal full-logits autograd. A loss that weighs rows differently, or no
    gradient at all, takes the usual rebuild and gives the same numbers as without the flag, to the bit."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    hidden = torch.randn(23, 16, requires_grad=True)
    labels = torch.randint(0, 50, (23,))
    params = [hidden, head.weight] + ([head.bias] if bias else [])
    monkeypatch.setattr(lp, "_CHUNK_ELEMENTS", 50 * 5)
    monkeypatch.setattr(lp, "_MIN_ROWS", 1)
    rebuilds = []
    rebuild = lp._logits_grad
    monkeypatch.setattr(lp, "_logits_grad", lambda *a: rebuilds.append(1) or rebuild(*a))

    def grads(weights, uniform, naive=False):
        for p in params:
            p.grad = None
        if naive:
            out = F.log_softmax(head(hidden), -1).gather(-1, labels[:, None]).squeeze(-1)
        else:
            out = lp.head_logprobs(hidden, head, labels, uniform_grad=uniform)[0]
        (out * weights).sum().backward()
        return [p.grad.clone() for p in params]

    same = torch.full((23,), -0.25)
    expected = grads(same, False, naive=True)
    assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(grads(same, True), expected)) and not rebuilds
    varied = torch.randn(23)
    assert all(torch.equal(g, e) for g, e in zip(grads(varied, True), grads(varied, False))) and rebuilds
    # No gradient at all: the forward must not build the unit-gradient sums (a [V, H] buffer nothing would read),
    # and its log-probs equal those the grad-enabled forward made while building them.
    built, sums = [], lp._HeadGrads
    monkeypatch.setattr(lp, "_HeadGrads", lambda *a: built.append(1) or sums(*a))
    with_sums = lp.head_logprobs(hidden, head, labels, uniform_grad=True)[0].detach()
    assert built == [1]
    with torch.no_grad():
        assert torch.equal(lp.head_logprobs(hidden, head, labels, uniform_grad=True)[0], with_sums)
    assert built == [1]


def test_bf16_hidden_states_get_bf16_gradients_from_fp32_logits():
    """Under autocast the backbone hands over bf16 hidden states: the head returns fp32 log-probs and each input's
    gradient in that input's dtype. On a CPU with bf16 units its products are bf16 (tests/test_bf16_head.py states
    their tolerance); without, fp32."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(7, 16).bfloat16().requires_grad_(True)
    labels = torch.randint(0, 50, (7,))
    out = token_logprobs(hidden, head, labels)
    out.sum().backward()
    naive = F.log_softmax(head(hidden.detach().float()), -1).gather(-1, labels[:, None]).squeeze(-1)
    from trinity_dpo.engine.bf16_head import cpu_has_bf16

    assert out.dtype == torch.float32 and torch.allclose(out, naive, atol=1e-2 if cpu_has_bf16() else 1e-6)
    assert hidden.grad.dtype == torch.bfloat16 and head.weight.grad.dtype == torch.float32


def test_prompt_positions_never_reach_the_head(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda *a: seen.append(1))  # the head module is bypassed
    calls = []
    original = lp._chunk_logits
    lp_rows = lambda h, *rest: calls.append(h.shape[0]) or original(h, *rest)  # noqa: E731
    lp._chunk_logits = lp_rows
    try:
        sequence_logps(model, collate(pairs(), pad_id=0), NO_AUTOCAST).sum().backward()
    finally:
        lp._chunk_logits = original
    n_response = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs())
    assert sum(calls) == 2 * n_response and not seen  # forward, then backward's rebuild


@pytest.mark.parametrize("extras", [(), ("top1", "mean_logits"), ("entropy", "top1", "log_sum_sq_probs")])
def test_frozen_head_takes_any_gradient_ahead_with_its_extras(monkeypatch, extras):
    """A frozen head (LoRA: only the hidden states want gradients) gets d hidden from forward for any per-row
    gradient, since d hidden_r = g_r x (onehot - softmax)_r W scales row by row: no chunk is rebuilt. Each chunk's
    e = exp(z - max z) overwrites its logits in the reused block, or goes to a second block where the entropy still
    reads the logits. Either way the label log-probs, the extras and d hidden equal full-logits autograd, over 5
    chunks, the last one short."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(23, 16, requires_grad=True)
    labels, weights = torch.randint(0, 50, (23,)), torch.randn(23)
    monkeypatch.setattr(lp, "_CHUNK_ELEMENTS", 50 * 5)
    monkeypatch.setattr(lp, "_MIN_ROWS", 1)
    monkeypatch.setattr(lp, "_logits_grad", lambda *a: pytest.fail("a chunk was rebuilt"))
    out, table = lp.head_logprobs(hidden, head, labels, extras=extras)
    (out * weights).sum().backward()
    ours, hidden.grad = hidden.grad, None
    logits = head(hidden)
    logp = F.log_softmax(logits, -1)
    naive = logp.gather(-1, labels[:, None]).squeeze(-1)
    (naive * weights).sum().backward()
    want = {"top1": (logits.argmax(-1) == labels).float(), "mean_logits": logits.mean(-1),
            "entropy": -(logp.exp() * logp).sum(-1), "log_sum_sq_probs": torch.logsumexp(2 * logp, -1)}
    assert torch.allclose(out, naive, atol=1e-6) and torch.allclose(ours, hidden.grad, atol=1e-6)
    assert head.weight.grad is None
    for name in extras:
        assert torch.allclose(table[name], want[name].detach(), atol=1e-5), name


@pytest.mark.parametrize("bias, transform, uniform", [(False, None, False), (True, _softcap, False),
                                                      (False, None, True)])
def test_entropy_with_gradient_equals_naive(monkeypatch, bias, transform, uniform):
    """An entropy term's gradient (Trinity's entropy loss): for a loss a . logp + b . H, with
    H = -sum_v p_v log p_v, the chunked head's gradients of hidden, weight and bias equal autograd through the
    full logits, with a soft cap too, and with `uniform_grad` asked (the entropy then forces the rebuild)."""
    torch.manual_seed(1)
    head = torch.nn.Linear(16, 50, bias=bias)
    hidden = torch.randn(23, 16, requires_grad=True)
    labels = torch.randint(0, 50, (23,))
    a, b = torch.randn(23), torch.randn(23)
    logits = head(hidden) if transform is None else transform(head(hidden))
    logp_all = F.log_softmax(logits, -1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    ((logp_all.gather(-1, labels[:, None]).squeeze(-1) * a).sum() + (entropy * b).sum()).backward()
    params = [hidden, head.weight] + ([head.bias] if bias else [])
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    monkeypatch.setattr(lp, "_CHUNK_ELEMENTS", 50 * 5)
    monkeypatch.setattr(lp, "_MIN_ROWS", 1)
    logps, extra = lp.head_logprobs(hidden, head, labels, transform, ("entropy",), uniform, entropy_grad=True)
    ((logps * a).sum() + (extra["entropy"] * b).sum()).backward()
    assert torch.allclose(extra["entropy"], entropy, atol=1e-5)
    for p, want in zip(params, expected):
        assert torch.allclose(p.grad, want, atol=1e-5)


def test_top1_is_the_first_of_equal_maxima():
    """top1 says whether the label is argmax's token, the first of equal maxima (the pass that finds the maximum
    gives its index). With an identity head the logits are the hidden rows: [1, 3, 3, 2] ties at 1 and 2, and
    [0, 0, 5, 5] at 2 and 3. Labels (1, 3) give top1 (1, 0); labels (2, 2) give (0, 1)."""
    head = torch.nn.Linear(4, 4, bias=False)
    head.weight.data = torch.eye(4)
    hidden = torch.tensor([[1.0, 3, 3, 2], [0, 0, 5, 5]])
    for labels, want in (((1, 3), (1.0, 0.0)), ((2, 2), (0.0, 1.0))):
        _, extra = lp.head_logprobs(hidden, head, torch.tensor(labels), extras=("top1", "entropy"))
        assert extra["top1"].tolist() == list(want)


def test_logit_transforms_follow_each_architecture():
    """logits [2, -4] as each model family's own forward turns them: Granite divides by logits_scaling (4: [0.5,
    -1]), HyperCLOVA X multiplies by it ([8, -16]), Cohere by logit_scale (0.5: [1, -2]), Falcon-H1 by
    lm_head_multiplier (3: [6, -12]), Gemma caps (c tanh(x / c), c = 2: [1.5232, -1.9281]); a plain model: none.
    The multiplier is read from the text config of a multimodal model."""
    from types import SimpleNamespace as C

    x = torch.tensor([2.0, -4.0])
    cases = [(C(logits_scaling=4.0, model_type="granite"), [0.5, -1.0]),
             (C(logits_scaling=4.0, model_type="hyperclovax"), [8.0, -16.0]),
             (C(logit_scale=0.5, model_type="cohere"), [1.0, -2.0]),
             (C(lm_head_multiplier=3.0, model_type="falcon_h1"), [6.0, -12.0]),
             (C(final_logit_softcapping=2.0, model_type="gemma2"), [1.5232, -1.9281])]
    for config, want in cases:
        assert torch.allclose(lp._logit_transform(config)(x), torch.tensor(want), atol=1e-4), config
    assert lp._logit_transform(C(model_type="llama")) is None
    outer = C(get_text_config=lambda: C(output_multiplier=2.0, model_type="glimmer_text"))
    assert torch.equal(lp._logit_transform(outer)(x), torch.tensor([4.0, -8.0]))


@pytest.mark.parametrize("model_type, extra", [
    ("mistral", {"sliding_window": 4}),
    ("gemma3_text", {"sliding_window": 4, "head_dim": 8, "layer_types": ["sliding_attention", "full_attention"]}),
    ("llama", {}),
])
def test_sliding_window_layers_keep_their_window(model_type, extra):
    """A prompt of 6 tokens and answers of 7 and 2, under a window of 4: each sequence's log-probs equal the model's
    own forward on that sequence alone. Packed-segment attention sees whole segments, so models with sliding layers
    keep transformers' SDPA, whose mask of a packed row follows its position ids, window included (they were
    switched, and attended to the whole prompt); a model without sliding layers is switched."""
    import contextlib

    from transformers import AutoConfig, AutoModelForCausalLM

    from trinity_dpo.data.batching import collate
    from trinity_dpo.data.pairs import Pair
    from trinity_dpo.engine.attention import is_varlen, use_varlen

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **extra)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    pair = Pair(index=0, row=1, prompt_ids=[1, 2, 3, 4, 5, 6], chosen_ids=[7, 8, 9, 10, 11, 12, 13],
                rejected_ids=[14, 15])
    with torch.no_grad():
        alone = []
        for response in (pair.chosen_ids, pair.rejected_ids):
            ids = torch.tensor([pair.prompt_ids + response])
            logps = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1).gather(-1, ids[0, 1:, None])
            alone.append(logps[len(pair.prompt_ids) - 1:].sum())
        use_varlen(model)
        packed = lp.sequence_stats(model, collate([pair], pad_id=0), contextlib.nullcontext(), ("logps",))["logps"]
    assert is_varlen(model) == (model_type == "llama")
    assert torch.allclose(packed, torch.stack(alone), atol=1e-5)


def test_a_window_no_sequence_can_outgrow_keeps_packed_attention():
    """Phi-3.5-mini's window (262144) exceeds its positions (131072): it never binds, so the model keeps packed
    attention and shared prompts."""
    from transformers import AutoConfig

    from trinity_dpo.engine.attention import has_sliding_window

    assert not has_sliding_window(AutoConfig.for_model("phi3", sliding_window=262144, max_position_embeddings=131072))
    assert has_sliding_window(AutoConfig.for_model("phi3", sliding_window=2047, max_position_embeddings=4096))
