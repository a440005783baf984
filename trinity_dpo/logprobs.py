"""Sequence log-probabilities of response tokens: the one place they are computed.

The backbone runs once over a micro-batch; only the hidden states at positions that predict a response token are
kept, and the LM head turns them into log-probs chunk by chunk in fp32 (`_HeadLogprobs`), so neither the forward nor
the backward ever holds a tokens x vocabulary tensor for more than one chunk, and prompt positions never reach the
head.
"""
from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F

from .attention import varlen_kwargs
from .batching import MicroBatch

# Logits per chunk: 32 MiB of fp32 on CPU (170 tokens of a 49k vocabulary), 512 MiB on GPU. Backward holds one such
# block. On 2 CPU cores 32 MiB chunks ran a SmolLM2 step 3% faster than 16 MiB, 64 MiB 1% more. Each chunk reads
# the whole head weight, so a chunk needs enough rows to be compute-bound rather than memory-bound: at least
# _MIN_ROWS (a 152k vocabulary would otherwise give 27-row chunks), and on GPU, with its far higher FLOP per byte,
# the larger budget (~880 rows at 152k).
_CHUNK_ELEMENTS = 1 << 23
_CHUNK_ELEMENTS_GPU = 1 << 27
_MIN_ROWS = 64
METHOD = "trinity_sequence_logps"


def sequence_logps(model, mb: MicroBatch, autocast: contextlib.AbstractContextManager) -> torch.Tensor:
    """Sum of response-token log-probs per sequence, fp32, shape [2 * n_pairs] (chosen sequences, then rejected).

    A packed row carries its sequences' bounds to the attention (`attention.py`), which keeps each sequence to
    itself; padded rows need no mask (right padding under causal attention).
    """
    bound = getattr(model, METHOD, None)
    return bound(mb, autocast) if bound is not None else _sequence_logps(model, mb, autocast)


def bind(model) -> str:
    """Make `sequence_logps` a method of `model` and return its name: FSDP2 gathers the root's parameters (the
    embeddings and the LM head) only inside methods registered with it (`distributed.shard`)."""
    setattr(model, METHOD, types.MethodType(_sequence_logps, model))
    return METHOD


def _sequence_logps(model, mb: MicroBatch, autocast: contextlib.AbstractContextManager) -> torch.Tensor:
    backbone = getattr(model, model.base_model_prefix)
    with autocast:
        hidden = backbone(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False,
                          **varlen_kwargs(mb.seq_bounds, mb.input_ids.device, mb.prefixes)).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, mb.target_pos)  # [N, H]
    token_logps = token_logprobs(hidden, model.get_output_embeddings(), mb.target_ids, _logit_transform(model.config))
    n_seqs = 2 * mb.n_pairs
    return torch.zeros(n_seqs, dtype=torch.float32, device=token_logps.device).index_add(0, mb.target_seq, token_logps)


def token_logprobs(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, transform=None) -> torch.Tensor:
    """log softmax(transform(head(hidden)))[label] for each row of `hidden` [N, H] and `labels` [N]; fp32 [N]."""
    weight, bias = head.weight, getattr(head, "bias", None)
    budget = _CHUNK_ELEMENTS_GPU if hidden.is_cuda else _CHUNK_ELEMENTS
    chunk = max(_MIN_ROWS, budget // weight.shape[0])
    return _HeadLogprobs.apply(hidden, weight, bias, labels, transform, chunk)


class _HeadLogprobs(torch.autograd.Function):
    """Label log-probs of a linear head, chunk by chunk, with no autograd graph inside.

    Forward keeps each row's logsumexp [N] and nothing of vocabulary size. Backward rebuilds a chunk's logits once,
    turns them in place into g * (onehot(label) - softmax) and accumulates dW into one [V, H] buffer. Checkpointing
    each chunk instead would recompute the logsumexp too, and allocate and then add a whole [V, H] weight gradient
    per chunk (113 MB each for a 49k x 576 head).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, transform, chunk):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for s in range(0, hidden.shape[0], chunk):
            logits = _chunk_logits(hidden[s:s + chunk], weight, bias)
            if transform is not None:
                logits = transform(logits)
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            out[s:s + chunk] = logits.gather(-1, labels[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.transform, ctx.chunk = transform, chunk
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        w, n = weight.float(), ctx.chunk
        d_hidden = torch.empty_like(hidden) if want_hidden else None
        d_weight = torch.zeros_like(w) if want_weight else None
        d_bias = torch.zeros_like(w[:, 0]) if want_bias else None
        for s in range(0, hidden.shape[0], n):
            h = hidden[s:s + n].float()
            d_logits = _logits_grad(h, w, bias, labels[s:s + n, None], grad[s:s + n, None], lse[s:s + n, None],
                                    ctx.transform)
            if want_hidden:
                d_hidden[s:s + n] = d_logits @ w
            if want_weight:
                d_weight.addmm_(d_logits.t(), h)
            if want_bias:
                d_bias += d_logits.sum(0)
        if want_weight:
            d_weight = d_weight.to(weight.dtype)
        return d_hidden, d_weight, d_bias, None, None, None


def _chunk_logits(hidden, weight, bias):
    # fp32 logits even under bf16 autocast: log-softmax over ~1e5 classes loses the differences DPO trains on.
    with torch.autocast(hidden.device.type, enabled=False):
        return F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())


def _logits_grad(h, w, bias, labels, g, lse, transform):
    """g * d log softmax(t)[label] / d z for one chunk: z = h w^T + b, t = transform(z); all [n, V] but labels, g,
    lse [n, 1]."""
    z = _chunk_logits(h, w, bias)
    if transform is None:
        return _softmax_grad(z, labels, g, lse)
    with torch.enable_grad():
        z.requires_grad_(True)
        t = transform(z)
    return torch.autograd.grad(t, z, _softmax_grad(t.detach().clone(), labels, g, lse))[0]


def _softmax_grad(t, labels, g, lse):
    """In place: logits t -> g * (onehot(labels) - softmax(t)), where lse = logsumexp(t) from the forward."""
    return t.sub_(lse).exp_().mul_(-g).scatter_add_(1, labels, g)


def _logit_transform(config):
    """The architectures whose logits are not the plain head output: Granite scales, Cohere scales, Gemma caps."""
    scaling = getattr(config, "logits_scaling", None)
    scale = getattr(config, "logit_scale", None)
    cap = getattr(config, "final_logit_softcapping", None)
    if not (scaling or scale or cap):
        return None

    def transform(logits):
        if scaling:
            logits = logits / scaling
        if scale:
            logits = logits * scale
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform
