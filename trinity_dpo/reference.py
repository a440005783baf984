"""Reference log-probs, computed once before training.

The reference is the policy's initial weights, frozen. Rather than keep a second copy of the model, the policy
itself scores every pair before its first update, in no-grad batched passes; training then reads the
per-pair numbers from a [n_pairs, 2] table (chosen, rejected).
"""
from __future__ import annotations

import torch

from .batching import collate
from .logprobs import sequence_logps
from .modeling import Runtime
from .pairs import Pair


@torch.no_grad()
def reference_logps(model, pairs: list[Pair], pad_id: int, batch_pairs: int, runtime: Runtime) -> torch.Tensor:
    """fp32 [n, 2] with n = 1 + the largest `pair.index`: summed response log-probs of chosen and rejected under the
    current weights, in the row of each pair's index; rows of pairs not given are NaN, so a use shows at once."""
    table = torch.full((1 + max((p.index for p in pairs), default=-1), 2), float("nan"), dtype=torch.float32)
    # Longest first, in groups of similar length: little padding, and any out-of-memory shows at once.
    order = sorted(range(len(pairs)), key=lambda i: -pairs[i].n_tokens)
    for start in range(0, len(order), batch_pairs):
        group = [pairs[i] for i in order[start:start + batch_pairs]]
        mb = collate(group, pad_id).to(runtime.device)
        logps = sequence_logps(model, mb, runtime.autocast()).float().cpu()
        chosen, rejected = logps.chunk(2)
        table[mb.pair_index.cpu(), 0] = chosen
        table[mb.pair_index.cpu(), 1] = rejected
    return table
