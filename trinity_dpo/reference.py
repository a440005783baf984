"""Reference log-probs, computed once before training.

The reference is the policy's initial weights, frozen. Rather than keep a second copy of the model, the policy
itself scores every pair before its first update, in no-grad passes; training then reads the per-pair numbers
from a [n_pairs, 2] table (chosen, rejected). The passes use the very micro-batches the first epoch trains on,
so at step 1 policy and reference agree to the bit (loss exactly ln 2), in bf16 as in fp32.
"""
from __future__ import annotations

import torch

from .batching import collate, plan_micro, step_indices, steps_per_epoch
from .logprobs import sequence_logps
from .modeling import Runtime
from .pairs import Pair


@torch.no_grad()
def score(model, groups: list[list[Pair]], n_rows: int, pad_id: int, runtime: Runtime) -> torch.Tensor:
    """fp32 [n_rows, 2]: summed response log-probs of chosen and rejected under the current weights, in the row of
    each pair's index, one no-grad pass per group; rows of pairs in no group are NaN, so a use shows at once."""
    table = torch.full((n_rows, 2), float("nan"), dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        for group in groups:
            mb = collate(group, pad_id).to(runtime.device)
            chosen, rejected = sequence_logps(model, mb, runtime.autocast()).float().cpu().chunk(2)
            table[mb.pair_index.cpu(), 0] = chosen
            table[mb.pair_index.cpu(), 1] = rejected
    finally:
        model.train(was_training)
    return table


def first_epoch_groups(pairs: list[Pair], batch_size: int, seed: int, total_steps: int,
                       plan: tuple[int | None, int | None]) -> list[list[Pair]]:
    """The micro-batches of the first epoch's steps (at most `total_steps` of them): every pair the run visits."""
    steps = min(total_steps, steps_per_epoch(len(pairs), batch_size))
    groups = []
    for step in range(steps):
        _, indices = step_indices(step, len(pairs), batch_size, seed)
        groups += plan_micro([pairs[i] for i in indices], *plan)
    return groups
