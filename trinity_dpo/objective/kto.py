"""KTO, as TRL 1.16's `KTOTrainer` computes it: single completions labelled desirable or undesirable
(`data/unpaired.py`).

With r the summed log-ratio log pi(y|x) - log ref(y|x) of an example's completion, w its label's weight
(`desirable_weight`, `undesirable_weight`) and z the step's KL baseline, an example's loss is

    kto                desirable: w (1 - sigmoid(beta (r - z)))    undesirable: w (1 - sigmoid(beta (z - r)))
    apo_zero_unpaired  desirable: w (1 - sigmoid(beta r))          undesirable: w sigmoid(beta r)

and a step's loss is their mean over the step's examples (TRL's mean over its batch: the weights are in the
numerator only).

The KL baseline z (loss type kto) has no gradient and is the same for every example of a step: each example is
paired with the completion of the example before it, the step's examples taken in file order (the first takes the
last one's), which is TRL's rotation by one within a batch when its sequential sampler makes a step one batch; z is
the mean over the step's examples of the policy's minus the reference's summed log-prob of these mismatched
sequences, clamped at 0. So that a step split into micro-batches and processes is the full-batch step:
1. `before_step` runs a no-grad pass over the step's KL sequences in this process's micro-batches and sums
   policy - reference; one all-reduce gives z to every process before any micro-batch's loss;
2. the training pass over the matched sequences then adds each micro-batch's share of the mean, as for every
   objective. (TRL also scores the KL sequences in a forward of their own, without gradient.)

A KL sequence's reference depends on which examples share its step, and every epoch reshuffles the steps, so the
reference pass scores the KL sequences of every step the run will take before the first update
(`reference_plan`), in the micro-batches `before_step` uses (at step 1 policy and reference agree to the bit: z is
0), after the first epoch's matched sequences. Rows of that table: example i's matched sequence at row i, its KL
sequence in epoch e at row n (1 + e) + i, n being the training examples. It is cached in the run folder like any
reference table (its fingerprint covers the plan of every step), so a resume reads the same numbers and its steps
are the same to the bit. The labels reach the loss as a per-example table beside the reference's (`data_tables`).

Held-out figures take the held-out set as one batch: its examples hold their KL sequence (the same rotation over
the whole set in file order) as a second sequence that shares their prompt.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np
import torch

from .objectives import Objective, Stats
from ..config.schema import LossArgs
from ..data.batching import by_slot, collate, is_padding
from ..data.schedule import Plan, Schedule, Step
from ..data.unpaired import Unpaired
from ..engine.logprobs import sequence_stats
from ..engine.modeling import inference_mode

METRICS = ("kl", "rewards/chosen", "logps/chosen", "rewards/rejected", "logps/rejected", "rewards/margins",
           "logits/chosen", "logits/rejected", "entropy")  # TRL's names


def kto_losses(loss_type: str, logratios: torch.Tensor, desirable: torch.Tensor, kl: float, beta: float,
               desirable_weight: float, undesirable_weight: float) -> torch.Tensor:
    """Each example's weighted loss [n] from its completion's log-ratio r [n], its label (`desirable`, bool [n])
    and the step's KL baseline z (see the module docstring)."""
    if loss_type == "kto":
        good, bad = 1 - torch.sigmoid(beta * (logratios - kl)), 1 - torch.sigmoid(beta * (kl - logratios))
    else:  # apo_zero_unpaired: a desirable completion is pushed above the reference, an undesirable one below
        good, bad = 1 - torch.sigmoid(beta * logratios), torch.sigmoid(beta * logratios)
    return torch.where(desirable, desirable_weight * good, undesirable_weight * bad)


def kl_baseline(kl_logratios: torch.Tensor, n: int) -> float:
    """z from the KL sequences' summed policy - reference log-probs of `n` examples (their sum may be this
    process's share, already summed over processes): their mean, clamped at 0."""
    return max(kl_logratios.double().sum().item() / max(n, 1), 0.0)


def kto(args: LossArgs, held_out: bool = False) -> Objective:
    """The KTO objective of `args`; `held_out`: the held-out figures' (one batch, KL sequences as slot 1)."""
    loss_type = args.loss_type if isinstance(args.loss_type, str) else args.loss_type[0]
    with_kl = loss_type == "kto"
    k = 2 if held_out and with_kl else 1

    def compute(policy: Stats, reference: Stats, totals: dict):
        n = totals["examples"]
        logps, ref = by_slot(policy["logps"], k)[0], by_slot(reference["logps"], k)[0]
        desirable = reference["label"] > 0.5
        counts = totals if "desirable" in totals else _counts(desirable, by_slot(policy["tokens"], k)[0])
        kl = totals.get("kl", 0.0)
        if with_kl and "kl" not in totals:  # the held-out set, one batch: its KL sequences are slot 1
            kl = kl_baseline(by_slot(policy["logps"], 2)[1] - by_slot(reference["logps"], 2)[1], n)
        logratios = logps - ref
        losses = kto_losses(loss_type, logratios, desirable, kl, args.beta, args.desirable_weight,
                            args.undesirable_weight)
        return losses, _metrics(args.beta * logratios.detach(), logps.detach(), desirable, policy, k, counts, n, kl)

    return Objective("kto", k, True, ("logps", "tokens", "mean_logits", "entropy"), ("logps",), METRICS, compute,
                     reference_plan=reference_plan if with_kl and not held_out else None, data_tables=data_tables,
                     before_step=None if held_out else _before_step(with_kl))


def _metrics(rewards, logps, desirable, policy: Stats, k: int, counts: dict, n: int, kl: float) -> dict:
    """TRL's KTO metrics as each example's share of the step's figure: means over the desirable (chosen) or the
    undesirable (rejected) examples, token means over their completions, and z."""
    good, bad = desirable.float(), (~desirable).float()
    share = lambda values, mask, count: values.detach() * mask * n / max(count, 1)  # noqa: E731
    chosen, rejected = share(rewards, good, counts["desirable"]), share(rewards, bad, counts["undesirable"])
    mean_logits, entropy = by_slot(policy["mean_logits"], k)[0], by_slot(policy["entropy"], k)[0]
    tokens = counts["tokens/desirable"] + counts["tokens/undesirable"]
    return {"kl": torch.full_like(logps, kl), "rewards/chosen": chosen, "logps/chosen": share(logps, good,
            counts["desirable"]), "rewards/rejected": rejected, "logps/rejected": share(logps, bad,
            counts["undesirable"]), "rewards/margins": chosen - rejected,
            "logits/chosen": share(mean_logits, good, counts["tokens/desirable"]),
            "logits/rejected": share(mean_logits, bad, counts["tokens/undesirable"]),
            "entropy": share(entropy, 1.0, tokens)}


def _counts(desirable: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
    """`label_counts` of a batch held whole (the held-out set): from its labels and completion token counts."""
    return {"desirable": int(desirable.sum()), "undesirable": int((~desirable).sum()),
            "tokens/desirable": float(tokens[desirable].sum()), "tokens/undesirable": float(tokens[~desirable].sum())}


def label_counts(examples) -> dict[str, float]:
    """A step's desirable and undesirable examples and their completions' tokens."""
    good = [e for e in examples if e.label]
    bad = [e for e in examples if not e.label]
    return {"desirable": len(good), "undesirable": len(bad),
            "tokens/desirable": sum(len(e.completion_ids) for e in good),
            "tokens/undesirable": sum(len(e.completion_ids) for e in bad)}


def data_tables(examples) -> dict[str, torch.Tensor]:
    """The labels [n, 1] (1: desirable) of `examples`, read by `compute` beside the reference's tables."""
    labels = examples.labels if hasattr(examples, "labels") else [e.label for e in examples]
    return {"label": torch.as_tensor(np.asarray(labels, np.float32)).reshape(-1, 1)}


def kl_views(step: Step, n_train: int) -> list[list[Unpaired]]:
    """This process's micro-batches of `step` as KL sequences (see the module docstring), each example at its
    reference-table row; a padding micro-batch stays as it is (run, never read)."""
    order = sorted(step.examples, key=lambda e: e.index)  # the step in file order
    before = {e.index: order[p - 1] for p, e in enumerate(order)}
    base = n_train * (1 + step.epoch)

    def view(e: Unpaired) -> Unpaired:
        if e.index < 0:
            return e
        return dataclasses.replace(e, index=base + e.index, completion_ids=before[e.index].completion_ids,
                                   kl_ids=None)

    return [[view(e) for e in group] for group in step.micro_batches]


def reference_plan(schedule: Schedule) -> Plan:
    """What the reference pass scores: the first epoch's micro-batches (matched sequences, rows 0..n-1), then every
    step's KL sequences in the micro-batches `before_step` runs them in (rows by epoch, see the module
    docstring)."""
    first, n_train = schedule.first_epoch(), len(schedule.train)
    epochs = math.ceil(schedule.total / schedule.per_epoch) if schedule.total else 0

    def groups(rank: int):
        yield from first.groups(rank)
        for index in range(schedule.total):
            yield from kl_views(schedule.step(index, rank), n_train)

    # Later epochs' steps follow from the first epoch's plan and these settings (`Schedule._shares`).
    h = hashlib.blake2b(first.digest.encode(), digest_size=16)
    h.update(f"kto-kl|1|{schedule.seed}|{schedule.batch_size}|{schedule.total}|{schedule.micro_pairs}|"
             f"{schedule.token_budget}".encode())
    return Plan("train", n_train * (1 + epochs), schedule.world, h.hexdigest(), groups)


def _before_step(with_kl: bool):
    def before_step(model, step: Step, context) -> dict:
        """The step's label counts and (loss type kto) its KL baseline, before any of its micro-batches."""
        totals = label_counts(step.examples)
        if with_kl:
            totals["kl"] = _step_kl(model, step, context)
        return totals

    return before_step


def _step_kl(model, step: Step, context) -> float:
    """z of `step`: the no-grad pass over this process's KL sequences, summed over processes."""
    runtime, ref = context.runtime, context.ref
    total = torch.zeros(1, dtype=torch.float64, device=runtime.device)
    with inference_mode(model):  # FSDP2 reshards after it, as after any forward without a backward
        for group in kl_views(step, ref["label"].shape[0]):
            mb = collate(group, context.pad_id, share_prompt=runtime.share_prompt).to(runtime.device)
            logps = sequence_stats(model, mb, runtime.autocast(), ("logps",))["logps"]
            if not is_padding(group):
                reference = ref["logps"][mb.pair_index.cpu(), 0].to(runtime.device)
                total += (logps.float() - reference).double().sum()
    return kl_baseline(context.d.all_sum(total), len(step.examples))
