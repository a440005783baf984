"""The step schedule: how many optimizer steps a run takes, which examples each step takes, and how each process
splits them into micro-batches, answered in one place for the training loop, the reference pass, the memory check
and evaluation.

The reference pass scores the first epoch in the very micro-batches the loop trains it in, so that at step 1 the
policy and its reference agree to the bit (bf16 sums depend on what shares a micro-batch); both take them from
`Schedule._shares`, the one code path that builds a step.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator

from ..config.loader import get_field
from ..config.schema import SUPERSEDED_STEPS, Config
from .batching import epoch_order, shard_step, step_indices, steps_per_epoch
from .dataset import Data


@dataclass(frozen=True)
class Step:
    """One optimizer step as one process runs it."""

    index: int  # 0-based
    epoch: int
    examples: list  # the whole step's examples, on every process: losses are means over all of them
    micro_batches: list[list]  # this process's share (`shard_step`): as many on every process, padding included


@dataclass(frozen=True)
class _Ref:
    """An example as the plan sees it: its index and tokens. The plan is made of these, so a million examples are
    planned without building one; `source` is the example a padding micro-batch copies (index -1)."""

    index: int
    n_tokens: int
    source: int


@dataclass(frozen=True)
class Plan:
    """Micro-batches over one set of examples, by process; `n_rows` is the set's size (the rows of its statistics
    tables), `label` names it ("train", "eval") and `digest` is what the micro-batches hold (the examples' tokens
    and which share a micro-batch), the reference cache's key. `groups(rank)` builds a process's micro-batches as
    they are asked for."""

    label: str
    n_rows: int
    world: int
    digest: str
    _groups: Callable[[int], Iterator[list]]

    def groups(self, rank: int) -> Iterator[list]:
        return self._groups(rank)

    @property
    def per_rank(self) -> list[list[list]]:
        """Every process's micro-batches at once (small sets and tests; a run walks `groups`)."""
        return [list(self.groups(rank)) for rank in range(self.world)]


class Schedule:
    """Steps and micro-batches of a run over `train` (and its held-out `held_out`) on `world` processes. The
    examples are a sequence (a list, or `Examples`, a view of the token table with `n_tokens` per example)."""

    def __init__(self, train, held_out, *, batch_size: int, seed: int, total: int, world: int,
                 micro_pairs: int | None, token_budget: int | None):
        self.train, self.eval = train, held_out
        self.batch_size, self.seed, self.total, self.world = batch_size, seed, total, world
        self.micro_pairs, self.token_budget = micro_pairs, token_budget
        self._tokens = _n_tokens(train)  # by example: an array, read by each step's plan
        self._order: tuple = (None, None)  # (epoch, its order): the steps of an epoch come one after the other

    @classmethod
    def of(cls, cfg: Config, data: Data, world: int) -> "Schedule":
        return cls(data.train, data.eval, batch_size=cfg.buffer.train_batch_size, seed=cfg.trainer.seed,
                   total=total_steps_of(cfg, len(data.train)), world=world, **_micro_settings(cfg))

    @property
    def per_epoch(self) -> int:
        return steps_per_epoch(len(self.train), self.batch_size)

    def step(self, index: int, rank: int) -> Step:
        """Step `index` (0-based) as process `rank` runs it."""
        epoch, indices, shares = self._shares(index)
        return Step(index, epoch, [self.train[i] for i in indices], [self._build(g) for g in shares[rank]])

    def first_epoch(self) -> Plan:
        """Every training example the run visits in its first epoch (at most `total` steps), in the micro-batches
        each process trains it in: what the reference pass scores."""
        steps = range(min(self.total, self.per_epoch))

        def groups(rank: int) -> Iterator[list]:
            for index in steps:
                yield from (self._build(g) for g in self._shares(index)[2][rank])

        h = hashlib.blake2b(_content_digest(self.train).encode(), digest_size=16)
        for index in steps:
            for rank, share in enumerate(self._shares(index)[2]):
                h.update(f"|{rank}:".encode() + ";".join(",".join(str(r.index) for r in g) for g in share).encode())
        return Plan("train", len(self.train), self.world, h.hexdigest(), groups)

    def held_out(self) -> Plan:
        """The held-out examples as one step, split over the processes like a training step, in micro-batches no
        larger than a training step's share (the memory check's bound): a whole held-out set in one forward pass
        could hold many times the activations that check saw."""
        refs = _refs(range(len(self.eval)), _n_tokens(self.eval))
        micro = self.micro_pairs or (None if self.token_budget else math.ceil(self.batch_size / self.world))
        shares = (shard_step(refs, self.world, micro, self.token_budget) if refs else [[] for _ in range(self.world)])
        h = hashlib.blake2b(_content_digest(self.eval).encode(), digest_size=16)
        h.update(repr([[[r.index for r in g] for g in share] for share in shares]).encode())
        return Plan("eval", len(self.eval), self.world, h.hexdigest(),
                    lambda rank: (self._build(g, self.eval) for g in shares[rank]))

    def micro_tokens(self) -> int:
        """The most tokens a micro-batch can hold, whatever the shuffle (the memory check's activations): the
        token budget (a longer example goes alone), else examples per micro-batch x the longest example's tokens
        (a shared prompt counted once)."""
        if hasattr(self.train, "longest"):
            longest = self.train.longest()
        else:
            longest = max((len(s[0][0]) + sum(len(r) for _, r, _ in s) for s in (e.sequences() for e in self.train)),
                          default=0)
        if self.token_budget:
            return max(self.token_budget, longest)
        return (self.micro_pairs or math.ceil(self.batch_size / self.world)) * longest

    def _shares(self, index: int) -> tuple[int, list[int], list[list[list[_Ref]]]]:
        """(epoch, example indices, `[rank][micro-batch]` of references) of step `index`: the one place a step is
        planned."""
        epoch = index // self.per_epoch
        if self._order[0] != epoch:
            self._order = (epoch, epoch_order(epoch, len(self.train), self.seed))
        epoch, indices = step_indices(index, len(self.train), self.batch_size, self.seed, self._order[1])
        return epoch, indices, shard_step(_refs(indices, self._tokens), self.world, self.micro_pairs,
                                          self.token_budget)

    def _build(self, group: list[_Ref], examples=None) -> list:
        """The examples of a planned micro-batch; a padding one is a copy of its source example with index -1."""
        examples = self.train if examples is None else examples
        return [examples[r.index] if r.index >= 0 else dataclasses.replace(examples[r.source], index=-1)
                for r in group]


def _n_tokens(examples):
    """Each example's tokens as the micro-batch plan counts them: the token table's array when there (a Python
    list of a million ints would be 36 MB in every process)."""
    if hasattr(examples, "n_tokens") and not isinstance(examples, list):
        return examples.n_tokens
    return [e.n_tokens for e in examples]


def _refs(indices, n_tokens) -> list[_Ref]:
    return [_Ref(i, int(n_tokens[i]), i) for i in indices]


def _content_digest(examples) -> str:
    """What the examples hold: the token table's checksums and entries, or (a list) every example's token ids."""
    if hasattr(examples, "digest"):
        return examples.digest()
    h = hashlib.blake2b(digest_size=16)
    for e in examples:
        h.update(repr((e.index, e.sequences())).encode())
    return h.hexdigest()


def _micro_settings(cfg: Config) -> dict:
    """Examples per micro-batch, and the token budget per micro-batch (verl's use_dynamic_bsz), as the actor
    settings say; a budget overrides the count."""
    actor = cfg.trainer.trainer_config.actor_rollout_ref.actor
    return {"micro_pairs": actor.ppo_micro_batch_size_per_gpu,
            "token_budget": actor.ppo_max_token_len_per_gpu if actor.use_dynamic_bsz else None}


def total_steps_of(cfg: Config, n_examples: int) -> int:
    """Optimizer steps of the run, as Trinity 0.3+ counts them: `buffer.total_steps` if set (the data repeats),
    else `total_epochs` passes; `trainer.total_steps` caps either."""
    total = (cfg.buffer.total_steps
             or steps_per_epoch(n_examples, cfg.buffer.train_batch_size) * cfg.buffer.total_epochs)
    return min(total, cfg.trainer.total_steps) if cfg.trainer.total_steps else total


def explain_steps(cfg: Config, n_examples: int) -> str:
    """Which setting gives the step count, and the trainer file's step counts that do not apply."""
    total, per_epoch = total_steps_of(cfg, n_examples), steps_per_epoch(n_examples, cfg.buffer.train_batch_size)
    if cfg.trainer.total_steps and total == cfg.trainer.total_steps:
        why = f"trainer.total_steps caps the run at {total}"
    elif cfg.buffer.total_steps:
        why = f"buffer.total_steps={cfg.buffer.total_steps}"
    else:
        why = f"buffer.total_epochs={cfg.buffer.total_epochs} x {per_epoch} steps per epoch"
    stale = {key: get_field(cfg, key) for key in SUPERSEDED_STEPS if get_field(cfg, key) not in (None, -1, 0)}
    if stale:
        why += "; not applied (Trinity 0.3+ replaces them with this count): " + ", ".join(
            f"{key.replace('trainer.trainer_config.', 'trainer file ')}={value}" for key, value in stale.items())
    return f"{total} optimizer steps ({why})"
