"""Chunked fp32 log-probs equal the naive full-logits path, in values and gradients; padding changes nothing."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import trinity_dpo.logprobs as lp
from trinity_dpo.attention import use_varlen
from trinity_dpo.batching import collate
from trinity_dpo.logprobs import sequence_logps, token_logprobs
from trinity_dpo.pairs import Pair

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


@pytest.mark.parametrize("pack", [False, True])
def test_batch_equals_each_sequence_alone(llama_dir, pack):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    use_varlen(model)
    mb = collate(pairs(), pad_id=0, pack=pack)
    chosen, rejected = sequence_logps(model, mb, NO_AUTOCAST).chunk(2)
    for i, pair in enumerate(pairs()):
        c, r = naive_logps(model, pair)
        assert torch.allclose(chosen[i], c, atol=1e-5) and torch.allclose(rejected[i], r, atol=1e-5)


def test_chunked_values_and_gradients_equal_naive(monkeypatch):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(23, 16, requires_grad=True)
    labels = torch.randint(0, 50, (23,))
    weights = torch.randn(23)
    naive = F.log_softmax(head(hidden), -1).gather(-1, labels[:, None]).squeeze(-1)
    (naive * weights).sum().backward()
    g_hidden, g_head = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = None
    head.weight.grad = None
    monkeypatch.setattr(lp, "_CHUNK_ELEMENTS", 50 * 5)  # 5 rows per chunk: 5 chunks, the last one short
    monkeypatch.setattr(lp, "_MIN_ROWS", 1)
    chunked = token_logprobs(hidden, head, labels)
    (chunked * weights).sum().backward()
    assert torch.allclose(chunked, naive, atol=1e-6)
    assert torch.allclose(hidden.grad, g_hidden, atol=1e-6) and torch.allclose(head.weight.grad, g_head, atol=1e-6)


def test_prompt_positions_never_reach_the_head(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda *a: seen.append(1))  # the head module is bypassed
    calls = []
    original = lp._chunk_logprobs
    lp_rows = lambda h, *rest: calls.append(h.shape[0]) or original(h, *rest)  # noqa: E731
    lp._chunk_logprobs = lp_rows
    try:
        sequence_logps(model, collate(pairs(), pad_id=0), NO_AUTOCAST)
    finally:
        lp._chunk_logprobs = original
    n_response = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs())
    assert sum(calls) == n_response and not seen
