"""Attention over packed sequences: many sequences end to end in one row, each attending only to itself.

Registered with transformers as the attention implementation `trinity_varlen`. Given the sequences' bounds it
runs causal scaled-dot-product attention on each sequence's slice (the fast causal kernel, no mask, no pad slot),
which is exactly what each sequence would get alone (on CPU all of a row's slices in one autograd node, in fp32:
`packed_attention.py`); without bounds (generation, padded rows) it is plain SDPA.
The same keyword arguments (`cu_seq_lens_q`, ...) drive flash-attention's varlen kernel where that is installed.
On CUDA in half precision one call of torch's `varlen_attn` replaces the per-sequence calls, for both layouts.
With shared prompts (`batching.MicroBatch.prefixes`) a rejected segment attends to its pair's prompt, computed once
earlier in the row, and causally to itself: a masked SDPA call over the prompt's and its own keys.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from .packed_attention import additive_mask, bool_mask, packed_attention

try:  # torch's own FlashAttention varlen entry point (CUDA, half precision)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

NAME = "trinity_varlen"


def varlen_kwargs(bounds: list[int] | None, device: torch.device,
                  prefixes: list[tuple[int, int] | None] | None = None) -> dict:
    """Forward keyword arguments that tell the attention where packed sequences start and end, and which segments
    also see a shared prompt (`batching.MicroBatch.prefixes`; then only this module's attention can run them)."""
    if bounds is None:
        return {}
    flash = _flash_plan(bounds, prefixes, device) if device.type == "cuda" and varlen_attn is not None else {}
    if prefixes is not None:
        # Per prompt-sharing segment: its prompt span, and the [L, P + L] mask "all of the prompt, causal within
        # the segment", built once here rather than in every layer (CPU: the additive fp32 mask its kernel takes).
        mask = bool_mask if device.type != "cpu" else additive_mask
        spans = [None if pre is None else (pre, mask(pre[1] - pre[0], b - a, device))
                 for (a, b), pre in zip(zip(bounds, bounds[1:]), prefixes)]
        return {"seq_bounds": bounds, "seq_prefixes": spans, **flash}
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
            "seq_bounds": bounds, **flash}


def _flash_plan(bounds: list[int], prefixes, device: torch.device) -> dict:
    """One varlen kernel call for the whole row (CUDA): each segment's queries against its keys, which are its own
    positions, after its shared prompt's where it has one. Flash's causal mask aligns to the last key, so a
    segment sees all of its prompt and causally itself: the same attention as the per-segment SDPA calls."""
    prefixes = prefixes or [None] * (len(bounds) - 1)
    keys, cu_k = [], [0]
    for (a, b), pre in zip(zip(bounds, bounds[1:]), prefixes):
        span = ([] if pre is None else list(range(pre[0], pre[1]))) + list(range(a, b))
        keys += span
        cu_k.append(len(keys))
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    as_int = functools.partial(torch.tensor, dtype=torch.int32, device=device)
    index = None if not any(prefixes) else torch.tensor(keys, dtype=torch.long, device=device)  # None: all, in order
    return {"flash": (as_int(bounds), as_int(cu_k), index, max(lengths), max(k - j for j, k in zip(cu_k, cu_k[1:])))}


def _flash_attention(query, key, value, plan, scaling):
    """[1, H, T, D] query, [1, H_kv, T, D] key and value -> [1, T, H, D] through `varlen_attn`."""
    cu_q, cu_k, index, max_q, max_k = plan
    q = query[0].transpose(0, 1)
    k, v = (x[0].transpose(0, 1) for x in (key, value))
    if index is not None:
        k, v = k.index_select(0, index), v.index_select(0, index)
    out = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, max_q, max_k, scale=scaling,
                      window_size=(-1, 0), enable_gqa=query.shape[1] != key.shape[1])
    return out.unsqueeze(0)


def varlen_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """query [1, H, T, D], key/value [1, H_kv, T, D] -> ([1, T, H, D], None)."""
    bounds, plan = kwargs.pop("seq_bounds", None), kwargs.pop("flash", None)
    if plan is not None and query.dtype in (torch.bfloat16, torch.float16) and not dropout:
        return _flash_attention(query, key, value, plan, scaling), None
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    prefixes = kwargs.pop("seq_prefixes", None) or [None] * (len(bounds) - 1)
    if query.device.type == "cpu" and not dropout:
        return packed_attention(query, key, value, bounds, prefixes, scaling), None
    sdpa = functools.partial(F.scaled_dot_product_attention, dropout_p=dropout, scale=scaling,
                             enable_gqa=query.shape[1] != key.shape[1])
    pieces = []
    for (a, b), prefix in zip(zip(bounds, bounds[1:]), prefixes):
        if a == b:
            continue
        if prefix is None:
            pieces.append(sdpa(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True))
            continue
        (p0, p1), mask = prefix
        pieces.append(sdpa(query[:, :, a:b], torch.cat([key[:, :, p0:p1], key[:, :, a:b]], dim=2),
                           torch.cat([value[:, :, p0:p1], value[:, :, a:b]], dim=2), attn_mask=mask))
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    # Every call this tool makes needs none: packed rows carry their bounds, padded rows are right-padded under
    # causal attention, generation runs one unpadded sequence. A mask here would be a dense T x T tensor for nothing.
    return None


AttentionInterface.register(NAME, varlen_sdpa)
AttentionMaskInterface.register(NAME, _no_mask)


def is_varlen(model) -> bool:
    """Whether `model` attends through this module (and so can share prompts)."""
    return getattr(model.config, "_attn_implementation", None) == NAME


def use_varlen(model) -> None:
    """Switch an SDPA model to the packed-sequence attention (other implementations are left as they are, and so is
    a model with sliding-window layers: this module attends to whole segments, and transformers' own SDPA masks a
    packed row by its position ids, window included)."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa" and not has_sliding_window(model.config):
        model.set_attn_implementation(NAME)


def has_sliding_window(config) -> bool:
    """Whether any layer attends through a sliding window (Mistral, Gemma 2 and 3, Qwen2 with use_sliding_window):
    `layer_types` where the config has them, else a `sliding_window` in force."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    if window and window >= (getattr(text, "max_position_embeddings", None) or float("inf")):
        return False  # a window no sequence can outgrow (Phi-3.5's 262144 over 131072 positions) never binds
    types = getattr(text, "layer_types", None)
    if types:
        return "sliding_attention" in types
    return bool(window) and getattr(text, "use_sliding_window", True) is not False
