"""The step schedule: how many optimizer steps a run takes, which examples each step takes, and how each process
splits them into micro-batches, answered in one place for the training loop, the reference pass, the memory check
and evaluation.

The reference pass scores the first epoch in the very micro-batches the loop trains it in, so that at step 1 the
policy and its reference agree to the bit (bf16 sums depend on what shares a micro-batch); both take them from
`Schedule._shares`, the one code path that builds a step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config.loader import get_field
from ..config.schema import SUPERSEDED_STEPS, Config
from .batching import shard_step, step_indices, steps_per_epoch
from .dataset import Data


@dataclass(frozen=True)
class Step:
    """One optimizer step as one process runs it."""

    index: int  # 0-based
    epoch: int
    examples: list  # the whole step's examples, on every process: losses are means over all of them
    micro_batches: list[list]  # this process's share (`shard_step`): as many on every process, padding included


@dataclass(frozen=True)
class Plan:
    """Micro-batches over one set of examples, `[rank][micro-batch]`; `n_rows` is the set's size (the rows of its
    statistics tables) and `label` names it ("train", "eval")."""

    label: str
    per_rank: list[list[list]]
    n_rows: int


class Schedule:
    """Steps and micro-batches of a run over `train` (and its held-out `held_out`) on `world` processes."""

    def __init__(self, train: list, held_out: list, *, batch_size: int, seed: int, total: int, world: int,
                 micro_pairs: int | None, token_budget: int | None):
        self.train, self.eval = train, held_out
        self.batch_size, self.seed, self.total, self.world = batch_size, seed, total, world
        self.micro_pairs, self.token_budget = micro_pairs, token_budget

    @classmethod
    def of(cls, cfg: Config, data: Data, world: int) -> "Schedule":
        return cls(data.train, data.eval, batch_size=cfg.buffer.train_batch_size, seed=cfg.trainer.seed,
                   total=total_steps_of(cfg, len(data.train)), world=world, **_micro_settings(cfg))

    @property
    def per_epoch(self) -> int:
        return steps_per_epoch(len(self.train), self.batch_size)

    def step(self, index: int, rank: int) -> Step:
        """Step `index` (0-based) as process `rank` runs it."""
        epoch, examples, shares = self._shares(index)
        return Step(index, epoch, examples, shares[rank])

    def first_epoch(self) -> Plan:
        """Every training example the run visits in its first epoch (at most `total` steps), in the micro-batches
        each process trains it in: what the reference pass scores."""
        per_rank: list[list[list]] = [[] for _ in range(self.world)]
        for index in range(min(self.total, self.per_epoch)):
            for rank, groups in enumerate(self._shares(index)[2]):
                per_rank[rank] += groups
        return Plan("train", per_rank, len(self.train))

    def held_out(self) -> Plan:
        """The held-out examples as one step, split over the processes like a training step."""
        examples = self.eval
        per_rank = (shard_step(examples, self.world, self.micro_pairs, self.token_budget) if examples
                    else [[] for _ in range(self.world)])
        return Plan("eval", per_rank, len(examples))

    def micro_tokens(self) -> int:
        """The most tokens a micro-batch can hold, whatever the shuffle (the memory check's activations): the
        token budget (a longer example goes alone), else examples per micro-batch x the longest example's tokens
        (a shared prompt counted once)."""
        longest = max((len(s[0][0]) + sum(len(r) for _, r, _ in s) for s in (e.sequences() for e in self.train)),
                      default=0)
        if self.token_budget:
            return max(self.token_budget, longest)
        return (self.micro_pairs or math.ceil(self.batch_size / self.world)) * longest

    def _shares(self, index: int) -> tuple[int, list, list[list[list]]]:
        """(epoch, examples, `[rank][micro-batch]`) of step `index`: the one place a step is built."""
        epoch, indices = step_indices(index, len(self.train), self.batch_size, self.seed)
        examples = [self.train[i] for i in indices]
        return epoch, examples, shard_step(examples, self.world, self.micro_pairs, self.token_budget)


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
