"""From pairs to optimizer steps and micro-batches.

The data order is a pure function of (seed, epoch): step `s` takes the `s % steps_per_epoch`-th slice of epoch
`s // steps_per_epoch`'s permutation, so any step can be rebuilt without replaying the ones before it. A step's
pairs are split into micro-batches without ever splitting a pair; each micro-batch holds its chosen and rejected
sequences as rows of one forward pass.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .pairs import Pair


def steps_per_epoch(n_pairs: int, batch_size: int) -> int:
    return math.ceil(n_pairs / batch_size)


def step_indices(step: int, n_pairs: int, batch_size: int, seed: int, order=None) -> tuple[int, list[int]]:
    """(epoch, dataset indices) of global step `step` (0-based); the last step of an epoch may be short. `order`:
    the epoch's `epoch_order`, when the caller keeps it (a permutation of a million examples per step adds up)."""
    per_epoch = steps_per_epoch(n_pairs, batch_size)
    epoch, offset = divmod(step, per_epoch)
    order = epoch_order(epoch, n_pairs, seed) if order is None else order
    return epoch, order[offset * batch_size:(offset + 1) * batch_size].tolist()


def epoch_order(epoch: int, n_pairs: int, seed: int) -> torch.Tensor:
    """The order in which epoch `epoch` visits the examples: a function of (seed, epoch) alone."""
    order = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order.to(torch.int32) if n_pairs < 2**31 else order  # held by every process: half the bytes


def plan_micro(batch: list[Pair], micro_pairs: int | None, token_budget: int | None = None) -> list[list[Pair]]:
    """Split a step's pairs into micro-batches, never splitting a pair.

    With `token_budget` (verl's `use_dynamic_bsz` + `ppo_max_token_len_per_gpu`), each micro-batch takes pairs,
    longest first, while their tokens fit the budget (a pair over it goes alone); else groups of `micro_pairs`
    pairs, longest first, so that similar lengths share a micro-batch. The loss is normalised by the step's pair
    count, so any grouping gives the same step.
    """
    ordered = sorted(batch, key=lambda p: -p.n_tokens)
    if not token_budget:
        size = micro_pairs or max(1, len(ordered))
        return [ordered[i:i + size] for i in range(0, len(ordered), size)]
    groups, current, used = [], [], 0
    for pair in ordered:
        if current and used + pair.n_tokens > token_budget:
            groups.append(current)
            current, used = [], 0
        current.append(pair)
        used += pair.n_tokens
    return groups + [current] if current else groups


def shard_step(batch: list[Pair], world: int, micro_pairs: int | None,
               token_budget: int | None = None) -> list[list[list[Pair]]]:
    """Each process's micro-batches of one step, `[rank][micro-batch]`; every process sees distinct pairs.

    Pairs are dealt longest first, round-robin, so the shares are equal in pairs and close in tokens; each share is
    then planned by `plan_micro`. FSDP runs collectives in every forward and backward, so all processes must run
    the same number of micro-batches: a share planned into fewer is split further (its largest group in halves),
    and a process short of pairs (a short last step) runs padding micro-batches (`is_padding`) that add nothing.
    With one process this is `[plan_micro(batch, ...)]`.
    """
    ordered = sorted(batch, key=lambda p: -p.n_tokens)
    plans = [plan_micro(ordered[rank::world], micro_pairs, token_budget) for rank in range(world)]
    count = max(map(len, plans))
    filler = [dataclasses.replace(ordered[0], index=-1)]
    return [_stretch(groups, count, filler) for groups in plans]


def _stretch(groups: list[list[Pair]], count: int, filler: list[Pair]) -> list[list[Pair]]:
    groups = list(groups)
    while len(groups) < count:
        splittable = [i for i, g in enumerate(groups) if len(g) > 1]
        if not splittable:
            groups.append(filler)
            continue
        i = max(splittable, key=lambda j: sum(p.n_tokens for p in groups[j]))
        half = (len(groups[i]) + 1) // 2
        groups[i:i + 1] = [groups[i][:half], groups[i][half:]]
    return groups


def is_padding(group: list[Pair]) -> bool:
    """A micro-batch run only so that this process joins the others' collectives (see `shard_step`)."""
    return group[0].index < 0


@dataclass
class MicroBatch:
    """Model inputs for some pairs and the positions of their response tokens.

    Sequences: pair j's chosen is sequence j, its rejected n_pairs + j. Packed (the default), they lie end to end
    in one row, `input_ids` and `position_ids` [1, T] with positions restarting at each sequence, and
    `seq_bounds` (T's cut points, [2 * n_pairs + 1]) tells the attention where each sequence starts and ends: no
    pad slot at all. Packed with shared prompts, pair j is one piece `prompt chosen rejected`: segments
    `prompt chosen` and `rejected` (positions continuing from the prompt's end), and `prefixes` gives, per
    segment, the span of earlier tokens it also attends to (the rejected segment's prompt), else None. Padded,
    each sequence is a row of `input_ids` [2 * n_pairs, W], right-padded, `seq_bounds` None (causal attention
    never lets a real token see a pad). `target_pos`, `target_ids`, `target_seq`: [N], one entry per response
    token: the flat index of the position whose logits predict it, its id, and its sequence. `pair_index`:
    [n_pairs] dataset indices. `n_tokens`: the sequences' tokens (a shared prompt counts for both, as it would
    alone); `n_real`: the positions of `input_ids` that hold a token. `prompt_pos`, `prompt_target_ids`,
    `prompt_seq`: the same for the prompt tokens after the first, of each example's first sequence only (ORPO's
    NLL term reads them; they reach the LM head only when asked for).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    seq_bounds: list[int] | None
    target_pos: torch.Tensor
    target_ids: torch.Tensor
    target_seq: torch.Tensor
    pair_index: torch.Tensor
    n_tokens: int
    n_real: int
    prompt_pos: torch.Tensor | None = None
    prompt_target_ids: torch.Tensor | None = None
    prompt_seq: torch.Tensor | None = None
    prefixes: list[tuple[int, int] | None] | None = None
    seqs_per_example: int = 2  # sequence s is slot s // n of example s % n (a pair: chosen, then rejected)
    # A reward model's inputs: each example's margin [n_pairs] (0 without the column) and the flat position of
    # each sequence's last token that is not the pad id [n_seqs], where its score is read (`_last_kept`).
    margin: torch.Tensor | None = None
    score_pos: torch.Tensor | None = None

    @property
    def n_pairs(self) -> int:
        return self.pair_index.numel()

    @property
    def n_seqs(self) -> int:
        return self.seqs_per_example * self.n_pairs

    @property
    def n_pad(self) -> int:
        return self.input_ids.numel() - self.n_real

    def to(self, device: torch.device) -> "MicroBatch":
        moved = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                 for k, v in vars(self).items()}
        return MicroBatch(**moved)


def by_slot(values: torch.Tensor, sequences: int) -> torch.Tensor:
    """A micro-batch's [k * n] per-sequence values as [k, n]: row `slot` holds that slot of every example."""
    return values.view(sequences, -1)


def collate(examples: list, pad_id: int, pack: bool = True, share_prompt: bool = False) -> MicroBatch:
    """The micro-batch of `examples` (pairs, or SFT rows: anything with `sequences()`; see `MicroBatch`): packed
    into one row, with each pair's prompt once if `share_prompt`, or padded into one row per sequence."""
    per = [ex.sequences() for ex in examples]
    k = len(per[0])
    if share_prompt and k == 2:
        return _collate_shared(examples, pad_id)
    seqs = [per[j][slot] for slot in range(k) for j in range(len(examples))]  # slot-major
    lengths = [len(prompt) + len(response) for prompt, response, _ in seqs]
    width = sum(lengths) if pack else max(lengths)
    input_ids = torch.full((1 if pack else len(seqs), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros_like(input_ids)
    bounds, pos, ids, seq, score_pos = [0], [], [], [], []
    prompts = _Targets()
    for s, ((prompt, response, mask), n) in enumerate(zip(seqs, lengths)):
        row, start = (0, bounds[-1]) if pack else (s, 0)
        input_ids[row, start:start + n] = torch.tensor(prompt + response, dtype=torch.long)
        position_ids[row, start:start + n] = torch.arange(n)
        # Logits at position t predict token t + 1: the response is predicted from the prompt's last token on.
        first = row * width + start + len(prompt) - 1
        trained = range(len(response)) if mask is None else [i for i, m in enumerate(mask) if m]
        pos.append(torch.tensor([first + i for i in trained], dtype=torch.long))
        ids.extend(response[i] for i in trained)
        seq.extend([s] * len(trained))
        score_pos.append(row * width + start + _last_kept(prompt, response, pad_id))
        if s < len(examples):
            prompts.add(row * width + start, prompt, s)
        bounds.append(bounds[-1] + n)
    if not pack:
        position_ids = torch.arange(width).expand(len(seqs), width).contiguous()
    return MicroBatch(
        input_ids=input_ids, position_ids=position_ids, seq_bounds=bounds if pack else None,
        target_pos=torch.cat(pos), target_ids=torch.tensor(ids, dtype=torch.long),
        target_seq=torch.tensor(seq, dtype=torch.long),
        pair_index=torch.tensor([ex.index for ex in examples], dtype=torch.long), n_tokens=sum(lengths),
        n_real=sum(lengths), seqs_per_example=k, margin=_margins(examples),
        score_pos=torch.tensor(score_pos, dtype=torch.long), **prompts.fields())


def _collate_shared(pairs: list[Pair], pad_id: int) -> MicroBatch:
    # The prompt's hidden states are the same under both responses (causal attention), so they are computed once;
    # its last position predicts the first token of both responses.
    n = len(pairs)
    tokens, positions, bounds, prefixes = [], [], [0], []
    prompts = _Targets()
    pos, ids, seq = [[] for _ in range(2 * n)], [[] for _ in range(2 * n)], [[] for _ in range(2 * n)]
    score_pos = [0] * (2 * n)
    for j, p in enumerate(pairs):
        a, lp, lc, lr = bounds[-1], len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        tokens += p.prompt_ids + p.chosen_ids + p.rejected_ids
        positions += [*range(lp + lc), *range(lp, lp + lr)]
        bounds += [a + lp + lc, a + lp + lc + lr]
        prefixes += [None, (a, a + lp)]
        pos[j] = [*range(a + lp - 1, a + lp + lc - 1)]
        pos[n + j] = [a + lp - 1, *range(a + lp + lc, a + lp + lc + lr - 1)][:lr]
        ids[j], ids[n + j] = p.chosen_ids, p.rejected_ids
        prompts.add(a, p.prompt_ids, j)
        seq[j], seq[n + j] = [j] * lc, [n + j] * lr
        score_pos[j] = a + _last_kept(p.prompt_ids, p.chosen_ids, pad_id)
        last = _last_kept(p.prompt_ids, p.rejected_ids, pad_id)  # the rejected answer lies after the chosen one
        score_pos[n + j] = a + last + (lc if last >= lp else 0)
    flat = lambda rows: torch.tensor([x for row in rows for x in row], dtype=torch.long)  # noqa: E731
    return MicroBatch(
        input_ids=torch.tensor([tokens], dtype=torch.long), position_ids=torch.tensor([positions], dtype=torch.long),
        seq_bounds=bounds, target_pos=flat(pos), target_ids=flat(ids), target_seq=flat(seq),
        pair_index=torch.tensor([p.index for p in pairs], dtype=torch.long),
        n_tokens=sum(p.n_tokens for p in pairs), n_real=len(tokens), prefixes=prefixes, margin=_margins(pairs),
        score_pos=torch.tensor(score_pos, dtype=torch.long), **prompts.fields())


def _margins(examples: list) -> torch.Tensor:
    return torch.tensor([getattr(ex, "margin", 0.0) for ex in examples], dtype=torch.float32)


def _last_kept(prompt: list[int], response: list[int], pad_id: int) -> int:
    """The index in prompt + response of its last token that is not `pad_id` (0 if none): where a
    sequence-classification model reads a sequence's score. That is transformers' rule (the rightmost non-pad
    token), which the saved reward model applies too; it is the last token unless the sequence ends in the pad id
    (a tokenizer whose pad is its EOS)."""
    for tokens, offset in ((response, len(prompt)), (prompt, 0)):
        for i in range(len(tokens) - 1, -1, -1):
            if tokens[i] != pad_id:
                return offset + i
    return 0


class _Targets:
    """The prompt targets of a micro-batch being built: tokens 1.. of each prompt, predicted from the position
    before each."""

    def __init__(self):
        self.pos, self.ids, self.seq = [], [], []

    def add(self, start: int, prompt: list[int], seq: int) -> None:
        self.pos.extend(range(start, start + len(prompt) - 1))
        self.ids.extend(prompt[1:])
        self.seq.extend([seq] * (len(prompt) - 1))

    def fields(self) -> dict[str, torch.Tensor]:
        as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
        return {"prompt_pos": as_long(self.pos), "prompt_target_ids": as_long(self.ids),
                "prompt_seq": as_long(self.seq)}
