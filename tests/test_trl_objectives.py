"""Every objective equals TRL 1.16 on the same token ids: each DPO loss type and option against `DPOTrainer`, CPO,
SimPO and ORPO against the experimental `CPOTrainer` / `ORPOTrainer` (per-batch loss and logged metrics), and three
AdamW steps of `train.run` against TRL's loss on the same batches (CPU, fp32, the tiny Qwen2 model)."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import need_extra

trl = need_extra("trl")

from test_trl_parity import BETA, our_pairs, rows, trl_trainer  # noqa: E402
from trinity_dpo.objective import losses as L  # noqa: E402
from trinity_dpo.objective import objectives, reference
from trinity_dpo.run import train  # noqa: E402
from trinity_dpo.engine.attention import use_varlen  # noqa: E402
from trinity_dpo.data.batching import collate  # noqa: E402
from trinity_dpo.config.objective_checks import validate_objective  # noqa: E402
from trinity_dpo.config.schema import AlgorithmConfig, LossArgs  # noqa: E402
from trinity_dpo.config.loader import load_config  # noqa: E402
from trinity_dpo.engine.logprobs import sequence_stats  # noqa: E402
from trinity_dpo.engine.modeling import Runtime  # noqa: E402
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402

TOL = 1e-5
CPU = Runtime(torch.device("cpu"), bf16=False)
ALL_STATS = ("logps", "logps_shared", "tokens", "prompt_logps", "prompt_tokens", "mean_logits", "entropy", "top1",
             "wpo")
DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy")
# TRL's CPO/ORPO average logits/* over every padded position of the batch, ours over response tokens (as TRL's DPO).
CPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected")

# Every DPO loss type alone (label smoothing where the type reads it), then MPO, LD-DPO, WPO, the f-divergences, and
# sigmoid with label smoothing: conservative DPO here, while TRL's sigmoid ignores it; since -log sigmoid(-z) =
# -log sigmoid(z) + z, ours must be TRL's sigmoid loss + eps * mean(z), and mean(z) is TRL's rewards/margins.
# The sorting losses take beta 1: at beta 0.1 a reordering of the pairs moves their loss by less than the tolerance.
EXTRA = {"exo_pair": dict(label_smoothing=0.1), "robust": dict(label_smoothing=0.1), "discopop": dict(discopop_tau=0.2),
         "aot": dict(label_smoothing=0.1, beta=1.0), "aot_unpaired": dict(label_smoothing=0.1, beta=1.0)}
DPO_CASES = [dict(loss_type=[t], **EXTRA.get(t, {})) for t in L.DPO_LOSS_TYPES] + [
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    dict(loss_type=["sigmoid"], ld_alpha=0.5),
    dict(loss_type=["ipo", "bco_pair"], ld_alpha=0.5),
    dict(loss_type=["sigmoid"], use_weighting=True),
    dict(loss_type=["hinge", "apo_zero"], loss_weights=[0.5, 2.0], use_weighting=True),
    dict(loss_type=["sigmoid"], f_divergence_type="forward_kl"),
    dict(loss_type=["sigmoid"], f_divergence_type="js_divergence"),
    dict(loss_type=["sigmoid"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5),
    CONSERVATIVE := dict(loss_type=["sigmoid"], label_smoothing=0.1),
]
CPO_CASES = [("cpo", dict(loss_type=["sigmoid"])), ("cpo", dict(loss_type=["sigmoid"], label_smoothing=0.1)),
             ("cpo", dict(loss_type=["hinge"])), ("cpo", dict(loss_type=["ipo"])),
             ("cpo", dict(loss_type=["simpo"], cpo_alpha=1.0, gamma=0.5, beta=2.0)),
             ("simpo", dict(gamma=0.5, beta=2.0)), ("simpo", dict(gamma=1.0, beta=2.5, cpo_alpha=0.3)),
             ("orpo", dict(beta=0.1)), ("orpo", dict(beta=0.5))]


def perturb(model, seed=1):
    """Move the policy away from the reference (and from uniform logits), so that no loss is a trivial value."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


def build(fn, **args):
    algorithm = AlgorithmConfig(policy_loss_fn=fn, policy_loss_fn_args=LossArgs(**args))
    validate_objective(algorithm)
    return objectives.build(algorithm)


def our_stats(model, pairs, pad_id):
    """All per-sequence statistics of the policy `model`, on a packed copy of it (TRL's stays untouched)."""
    model = copy.deepcopy(model)
    use_varlen(model)
    mb = collate(pairs, pad_id)
    with torch.no_grad():
        return mb, sequence_stats(model, mb, contextlib.nullcontext(), ALL_STATS)


def close(a: float, b: float) -> bool:
    """Within 1e-5, relative for values over 1 in size: summed log-probs (~ -100) differ by up to ~1e-5 in fp32
    between TRL's padded forward and our packed one (summation order), and sppo_hard (~43) by 4e-5."""
    return abs(a - b) <= TOL * max(1.0, abs(b))


def check_metrics(ours: dict, theirs: dict, names, case) -> None:
    for k in names:
        assert close(ours[k].mean().item(), theirs[k]), (case, k, ours[k].mean().item(), theirs[k])


def test_every_dpo_loss_type_and_option_equals_trl(tmp_path, qwen_dir):
    trainer, tok = trl_trainer(qwen_dir, tmp_path, per_device_train_batch_size=4, use_weighting=True)
    # Pairs 0 and 2 (1 and 3) share their responses under different prompts: near ties in chosen - rejected, whose
    # order the perturbation changes, so that aot's sorting matters.
    base = our_pairs(tok)
    pairs = [dataclasses.replace(p, chosen_ids=base[j % 2].chosen_ids, rejected_ids=base[j % 2].rejected_ids)
             for j, p in enumerate(base)]
    perturb(trainer.model)
    trainer.model.train()
    batch = trainer.data_collator([{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids,
                                    "rejected_ids": p.rejected_ids} for p in pairs])
    mb, stats = our_stats(trainer.model, pairs, tok.pad_token_id)
    ref_model = AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.float32)
    use_varlen(ref_model)
    tables = reference.score(ref_model, [pairs], len(pairs), tok.pad_token_id, CPU, stats=("logps", "logps_shared"))
    ref = reference.rows_of(tables, mb.pair_index, torch.device("cpu"))
    totals = objectives.step_totals(pairs)
    seen = set()
    for case in DPO_CASES:
        args = dict(dict(beta=BETA, loss_weights=None, ld_alpha=None, use_weighting=False, label_smoothing=0.0,
                         f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, discopop_tau=0.05), **case)
        trainer.loss_types = args["loss_type"]
        trainer.loss_weights = args["loss_weights"] or [1.0] * len(args["loss_type"])
        trainer.args.discopop_tau = args.pop("discopop_tau")
        for k in ("beta", "ld_alpha", "use_weighting", "f_divergence_type", "f_alpha_divergence_coef",
                  "label_smoothing"):
            setattr(trainer, k, args[k])
        trainer._metrics["train"].clear()
        with torch.no_grad():
            trl_loss = trainer._compute_loss(trainer.model, batch, False).item()
        logged = trainer._metrics["train"]
        assert all(len(logged[k]) == 1 for k in DPO_METRICS), case  # this case's values only
        if case is CONSERVATIVE:
            trl_loss += args["label_smoothing"] * logged["rewards/margins"][0]
        objective = build("dpo", discopop_tau=trainer.args.discopop_tau, **args)
        assert set(objective.stats) <= set(stats) and set(objective.ref_stats) <= set(ref)
        losses, metrics = objective.compute(stats, ref, totals)
        assert close(losses.mean().item(), trl_loss), (case, losses.mean().item(), trl_loss)
        check_metrics(metrics, {k: v[0] for k, v in logged.items()}, DPO_METRICS, case)
        assert abs(trl_loss - math.log(2)) > 1e-3 and math.isfinite(trl_loss), case
        seen.add(round(trl_loss, 6))
        if case["loss_type"] == ["aot"]:  # the same loss without the sorting is told apart
            (pc, pr), (rc, rr) = stats["logps"].view(2, -1), ref["logps"].view(2, -1)
            unsorted = L.smoothed_sigmoid(args["beta"] * ((pc - rc) - (pr - rr)), args["label_smoothing"]).mean()
            assert abs(unsorted.item() - trl_loss) > 1e-4, (unsorted.item(), trl_loss)
    assert {t for c in DPO_CASES for t in c["loss_type"]} == set(L.DPO_LOSS_TYPES)
    assert len(seen) == len(DPO_CASES)  # the cases really differ (TRL's toggles took effect)
    assert abs(logged["rewards/margins"][0]) > 1e-3  # the policy is off its reference


def trl_batch(pairs, pad_id):
    """TRL's CPO/ORPO batch of our pairs: prompt + response ids, right-padded; labels -100 on prompt and pads."""
    width = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    batch = {}
    for side in ("chosen", "rejected"):
        ids = torch.full((len(pairs), width), pad_id)
        labels, mask = torch.full_like(ids, -100), torch.zeros_like(ids)
        for j, p in enumerate(pairs):
            seq = p.prompt_ids + getattr(p, f"{side}_ids")
            ids[j, :len(seq)], mask[j, :len(seq)] = torch.tensor(seq), 1
            labels[j, len(p.prompt_ids):len(seq)] = torch.tensor(seq[len(p.prompt_ids):])
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    return batch


@pytest.fixture(scope="module")
def reference_free_trainers(tmp_path_factory, qwen_dir):
    """One CPOTrainer and one ORPOTrainer (their `get_batch_loss_metrics` is called with whichever model)."""
    out = tmp_path_factory.mktemp("trl")
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    common = dict(report_to=[], use_cpu=True, bf16=False, max_length=10_000, disable_tqdm=True, save_strategy="no")
    model = lambda: AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.float32)  # noqa: E731
    cpo = CPOTrainer(model=model(), args=CPOConfig(output_dir=str(out / "cpo"), **common),
                     train_dataset=Dataset.from_list(rows()), processing_class=tok)
    orpo = ORPOTrainer(model=model(), args=ORPOConfig(output_dir=str(out / "orpo"), **common),
                       train_dataset=Dataset.from_list(rows()), processing_class=tok)
    return cpo, orpo, tok


def configure(trainers, fn, args):
    """The TRL trainer of `fn`, set to our `args`, and our objective."""
    cpo, orpo, _ = trainers
    args = {"beta": 0.1, **args}
    objective = build(fn, **args)
    if fn == "orpo":
        orpo.beta = args["beta"]
        return orpo, objective
    loss_type = "simpo" if fn == "simpo" else args["loss_type"][0]
    cpo.loss_type, cpo.beta, cpo.label_smoothing = loss_type, args["beta"], args.get("label_smoothing", 0.0)
    cpo.simpo_gamma = args.get("gamma", 0.5)
    cpo.cpo_alpha = args["cpo_alpha"] if args.get("cpo_alpha") is not None else (0.0 if fn == "simpo" else 1.0)
    return cpo, objective


def test_cpo_simpo_orpo_equal_trl(reference_free_trainers):
    _, _, tok = reference_free_trainers
    model = reference_free_trainers[0].model
    perturb(model, seed=2)
    pairs = our_pairs(tok)
    batch = trl_batch(pairs, tok.pad_token_id)
    _, stats = our_stats(model, pairs, tok.pad_token_id)
    totals = objectives.step_totals(pairs)
    for fn, args in CPO_CASES:
        trainer, objective = configure(reference_free_trainers, fn, args)
        with torch.no_grad():
            trl_loss, logged = trainer.get_batch_loss_metrics(model, batch)
        losses, metrics = objective.compute(stats, None, totals)
        case = (fn, args)
        assert close(losses.mean().item(), trl_loss.item()), (case, losses.mean().item(), trl_loss.item())
        names = CPO_METRICS + tuple(k for k in ("nll_loss", "log_odds_ratio", "log_odds_chosen") if k in metrics)
        check_metrics(metrics, logged, names, case)
        if trainer is reference_free_trainers[0]:
            assert ("nll_loss" in metrics) == (trainer.cpo_alpha != 0), case
            assert trainer.cpo_alpha == 0 or logged["nll_loss"] > 0.5, case
        else:
            assert logged["nll_loss"] > 0.5 and logged["log_odds_ratio"] < -0.1, case
        assert abs(trl_loss.item() - math.log(2)) > 1e-3 and math.isfinite(trl_loss.item()), case


TRAINING = {
    "dpo_mpo": ("dpo", dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], beta=BETA)),
    "simpo": ("simpo", dict(gamma=0.5, beta=2.0)),
    "orpo": ("orpo", dict(beta=0.1)),
}
LR, STEPS = 1e-3, 3


def trl_losses(name, tmp_path, qwen_dir, trainers):
    fn, args = TRAINING[name]
    if fn == "dpo":
        trainer, _ = trl_trainer(qwen_dir, tmp_path, per_device_train_batch_size=4, max_steps=STEPS, learning_rate=LR,
                                 lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1e9, seed=0,
                                 loss_type=args["loss_type"], loss_weights=args["loss_weights"])
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]
    trainer, _ = configure(trainers, fn, args)
    model = AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.float32)
    batch = trl_batch(our_pairs(trainers[2]), trainers[2].pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    out = []
    for _ in range(STEPS):
        loss, _ = trainer.get_batch_loss_metrics(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        out.append(loss.item())
    return out


@pytest.mark.parametrize("name", sorted(TRAINING))
def test_three_adamw_steps_equal_trl(tmp_path, qwen_dir, make_config, reference_free_trainers, name):
    """Batch 4 over the 4 pairs: each step is the whole set (in another order), in two micro-batches of 2."""
    fn, args = TRAINING[name]
    theirs = trl_losses(name, tmp_path, qwen_dir, reference_free_trainers)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    path = make_config(
        main={"algorithm": {"policy_loss_fn": fn, "policy_loss_fn_args": args,
                            "kl_loss_fn_args": {"kl_coef": 0}},  # TRL has no Trinity KL term
              "trainer": {"actor_kl_loss_coef": args["beta"]},
              "buffer": {"batch_size": 4, "total_epochs": STEPS, "trainer_input": {"experience_buffer": {
                  "path": str(data), "format": {"prompt_type": "messages"}}}}},
        verl={"actor_rollout_ref": {"actor": {"ppo_micro_batch_size_per_gpu": 2, "grad_clip": 1e9,
                                              "optim": {"lr": LR, "weight_decay": 0.0}}}})
    run_dir = train.run(load_config(path))
    ours = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(ours) == len(theirs) == STEPS
    for a, b in zip(ours, theirs):
        assert abs(a - b) < TOL, (ours, theirs)
    assert abs(ours[-1] - ours[0]) > 1e-3 and abs(ours[0] - math.log(2)) > 1e-3  # it trained; not the trivial loss
