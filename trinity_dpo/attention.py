"""Attention over packed sequences: many sequences end to end in one row, each attending only to itself.

Registered with transformers as the attention implementation `trinity_varlen`. Given the sequences' bounds it
runs causal scaled-dot-product attention on each sequence's slice (the fast causal kernel, no mask, no pad slot),
which is exactly what each sequence would get alone; without bounds (generation, padded rows) it is plain SDPA.
The same keyword arguments (`cu_seq_lens_q`, ...) drive flash-attention's varlen kernel where that is installed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

NAME = "trinity_varlen"


def varlen_kwargs(bounds: list[int] | None, device: torch.device) -> dict:
    """Forward keyword arguments that tell the attention where packed sequences start and end."""
    if bounds is None:
        return {}
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
            "seq_bounds": bounds}


def varlen_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """query [1, H, T, D], key/value [1, H_kv, T, D] -> ([1, T, H, D], None)."""
    bounds = kwargs.pop("seq_bounds", None)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    pieces = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout,
                                             is_causal=True, scale=scaling, enable_gqa=gqa)
              for a, b in zip(bounds, bounds[1:])]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    # Every call this tool makes needs none: packed rows carry their bounds, padded rows are right-padded under
    # causal attention, generation runs one unpadded sequence. A mask here would be a dense T x T tensor for nothing.
    return None


AttentionInterface.register(NAME, varlen_sdpa)
AttentionMaskInterface.register(NAME, _no_mask)


def use_varlen(model) -> None:
    """Switch an SDPA model to the packed-sequence attention (other implementations are left as they are)."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(NAME)
