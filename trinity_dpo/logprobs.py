"""Sequence log-probabilities of response tokens: the one place they are computed.

The backbone runs once over a micro-batch; only the hidden states at positions that predict a response token are
kept, and the LM head turns them into log-probs chunk by chunk in fp32. Each chunk is checkpointed, so neither the
forward nor the backward ever holds a tokens x vocabulary tensor for more than one chunk, and prompt positions never
reach the head.
"""
from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import varlen_kwargs
from .batching import MicroBatch

# Logits per chunk: 16 MiB of fp32 on CPU (85 tokens of a 49k vocabulary), 512 MiB on GPU. Backward holds about
# three such blocks; larger chunks were measured no faster on CPU and cost hundreds of MB at peak. Each chunk reads
# the whole head weight, so a chunk needs enough rows to be compute-bound rather than memory-bound: at least
# _MIN_ROWS (a 152k vocabulary would otherwise give 27-row chunks), and on GPU, with its far higher FLOP per byte,
# the larger budget (~880 rows at 152k).
_CHUNK_ELEMENTS = 1 << 22
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
                          **varlen_kwargs(mb.seq_bounds, mb.input_ids.device)).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, mb.target_pos)  # [N, H]
    token_logps = token_logprobs(hidden, model.get_output_embeddings(), mb.target_ids, _logit_transform(model.config))
    n_seqs = 2 * mb.n_pairs
    return torch.zeros(n_seqs, dtype=torch.float32, device=token_logps.device).index_add(0, mb.target_seq, token_logps)


def token_logprobs(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, transform=None) -> torch.Tensor:
    """log softmax(head(hidden))[label] for each row of `hidden` [N, H] and `labels` [N]; fp32 [N]."""
    weight, bias = head.weight, getattr(head, "bias", None)
    budget = _CHUNK_ELEMENTS_GPU if hidden.is_cuda else _CHUNK_ELEMENTS
    chunk = max(_MIN_ROWS, budget // weight.shape[0])
    out = []
    for start in range(0, hidden.shape[0], chunk):
        args = (hidden[start:start + chunk], weight, bias, labels[start:start + chunk], transform)
        if torch.is_grad_enabled():
            out.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            out.append(_chunk_logprobs(*args))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def _chunk_logprobs(hidden, weight, bias, labels, transform):
    # fp32 logits even under bf16 autocast: log-softmax over ~1e5 classes loses the differences DPO trains on.
    with torch.autocast(hidden.device.type, enabled=False):
        logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
        if transform is not None:
            logits = transform(logits)
        return logits.gather(-1, labels[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


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
