"""From pairs to optimizer steps and micro-batches.

The data order is a pure function of (seed, epoch): step `s` takes the `s % steps_per_epoch`-th slice of epoch
`s // steps_per_epoch`'s permutation, so any step can be rebuilt without replaying the ones before it. A step's
pairs are split into micro-batches without ever splitting a pair; each micro-batch holds its chosen and rejected
sequences as rows of one forward pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .pairs import Pair


def steps_per_epoch(n_pairs: int, batch_size: int) -> int:
    return math.ceil(n_pairs / batch_size)


def step_indices(step: int, n_pairs: int, batch_size: int, seed: int) -> tuple[int, list[int]]:
    """(epoch, dataset indices) of global step `step` (0-based); the last step of an epoch may be short."""
    per_epoch = steps_per_epoch(n_pairs, batch_size)
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return epoch, order[offset * batch_size:(offset + 1) * batch_size].tolist()


def split_micro(indices: list[int], micro_size: int | None) -> list[list[int]]:
    """Consecutive groups of at most `micro_size` pairs (all of them when None)."""
    size = micro_size or len(indices)
    return [indices[i:i + size] for i in range(0, len(indices), size)]


@dataclass
class MicroBatch:
    """Model inputs for some pairs and the positions of their response tokens.

    Shapes: `input_ids`, `position_ids`, `attention_mask`: [R, T] (R = 2 * n_pairs rows: chosen rows first, then
    rejected rows; right padding, mask 1 on real tokens). `target_pos`, `target_ids`, `target_seq`: [N], one entry
    per response token: the flat index into R*T of the position whose logits predict it, its id, and its sequence
    (pair j's chosen is j, its rejected n_pairs + j). `pair_index`: [n_pairs] dataset indices.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_pos: torch.Tensor
    target_ids: torch.Tensor
    target_seq: torch.Tensor
    pair_index: torch.Tensor
    n_tokens: int

    @property
    def n_pairs(self) -> int:
        return self.pair_index.numel()

    @property
    def n_pad(self) -> int:
        return self.input_ids.numel() - self.n_tokens

    def to(self, device: torch.device) -> "MicroBatch":
        moved = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                 for k, v in vars(self).items()}
        return MicroBatch(**moved)


def collate(pairs: list[Pair], pad_id: int) -> MicroBatch:
    """Right-padded rows [chosen_0..chosen_{m-1}, rejected_0..rejected_{m-1}] of `pairs`."""
    seqs = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(a) + len(b) for a, b in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    pos, ids, seq = [], [], []
    for row, (prompt, response) in enumerate(seqs):
        n_prompt, n = len(prompt), len(prompt) + len(response)
        input_ids[row, :n] = torch.tensor(prompt + response, dtype=torch.long)
        mask[row, :n] = 1
        # Logits at position t predict token t + 1: the response tokens are predicted from n_prompt - 1 on.
        pos.append(torch.arange(n_prompt - 1, n - 1) + row * width)
        ids.extend(response)
        seq.extend([row] * len(response))
    return MicroBatch(
        input_ids=input_ids,
        position_ids=torch.arange(width).expand(len(seqs), width).contiguous(),
        attention_mask=mask,
        target_pos=torch.cat(pos),
        target_ids=torch.tensor(ids, dtype=torch.long),
        target_seq=torch.tensor(seq, dtype=torch.long),
        pair_index=torch.tensor([p.index for p in pairs], dtype=torch.long),
        n_tokens=int(mask.sum()),
    )
