"""KTO equals TRL 1.16's `KTOTrainer` on the same token ids and the same batches (CPU, fp32, the tiny Qwen2 model):
tokens and KL completions, one batch's loss and metrics from a policy moved off the reference, and three AdamW
steps of `train.run` (loss and every metric TRL logs), for both loss types, unequal weights and an imbalanced
batch (6 desirable, 2 undesirable).

TRL's settings that make it comparable: `max_length=None` (TRL cuts sequences at 1024 tokens by default, this
tool only where its length settings say), `per_device_train_batch_size` = the step's examples (TRL rotates KL
completions within a device batch in dataset order, this tool within a step in file order: with one batch per step
they are the same pairs), `train_sampling_strategy` sequential (TRL's default for KTO; it requires it), a constant
learning rate without weight decay, and clipping at 1.0 on both sides."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import need_extra

trl = need_extra("trl")

from test_trl_objectives import perturb  # noqa: E402
from trinity_dpo.config.loader import load_config  # noqa: E402
from trinity_dpo.config.schema import FormatConfig, LossArgs  # noqa: E402
from trinity_dpo.data.pairs import Limits  # noqa: E402
from trinity_dpo.data.schedule import Step  # noqa: E402
from trinity_dpo.data.unpaired import to_unpaired, tokenize_unpaired  # noqa: E402
from trinity_dpo.engine.attention import use_varlen  # noqa: E402
from trinity_dpo.engine.distributed import Dist  # noqa: E402
from trinity_dpo.engine.modeling import Runtime  # noqa: E402
from trinity_dpo.objective import kto, reference  # noqa: E402
from trinity_dpo.run import train  # noqa: E402

LABELS = (True, True, False, True, True, True, False, True)  # imbalanced: 6 desirable, 2 undesirable
CASES = {"kto": ("kto", 0.1, 1.0, 1.5), "kto_beta": ("kto", 0.5, 0.7, 1.0),
         "apo_zero_unpaired": ("apo_zero_unpaired", 0.2, 1.3, 0.6)}
METRICS = ("kl", "rewards/chosen", "logps/chosen", "rewards/rejected", "logps/rejected", "rewards/margins",
           "logits/chosen", "logits/rejected", "entropy")
CPU = Runtime(torch.device("cpu"), bf16=False)
LR, STEPS = 2e-3, 3


def kto_rows(labels=LABELS):
    """Conversational unpaired rows (TRL's shape): desirable answers of several lengths, undesirable refusals."""
    return [{"prompt": [{"role": "user", "content": f"what do you think about pizza {i}?"}],
             "completion": [{"role": "assistant", "content": "oh pizza is great! " * (i % 3 + 1) if good
                             else f"as an ai language model I do not eat {i}."}],
             "label": good} for i, good in enumerate(labels)]


def trl_kto(model_dir, tmp_path, case, **kwargs):
    loss_type, beta, wd, wu = case
    args = trl.KTOConfig(output_dir=str(tmp_path / "trl"), report_to=[], max_length=None, use_cpu=True, bf16=False,
                         logging_steps=1, save_strategy="no", disable_tqdm=True, loss_type=loss_type, beta=beta,
                         desirable_weight=wd, undesirable_weight=wu, per_device_train_batch_size=len(LABELS),
                         train_sampling_strategy="sequential", **kwargs)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    return trl.KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(kto_rows()),
                          processing_class=tok), tok


def our_examples(tok):
    fmt = FormatConfig(prompt_type="messages")
    items = [item for i, row in enumerate(kto_rows()) for item in to_unpaired(row, i + 1, fmt)]
    return [example for example, _ in tokenize_unpaired(items, tok, Limits())]


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_batch_equals_trl(tmp_path, qwen_dir, name):
    """One step of this tool's loop (`train.train_step`, in micro-batches of 3, 2 and 3 examples, its KL pass
    first) on a policy moved off the reference, against TRL's `_compute_loss` on the batch of the same 8 examples:
    token ids, KL completions, loss and TRL's logged metrics within 1e-5."""
    case = CASES[name]
    trainer, tok = trl_kto(qwen_dir, tmp_path, case)
    examples = our_examples(tok)
    for ex, row in zip(examples, trainer.train_dataset, strict=True):
        assert (ex.prompt_ids, ex.completion_ids, ex.label) == (row["prompt_ids"], row["completion_ids"],
                                                                row["label"])
    step = Step(0, 0, examples, [examples[:3], examples[3:5], examples[5:]])
    kl_groups = kto.kl_views(step, len(examples))
    if case[0] == "kto":
        kl_rows = {v.index - len(examples): v.completion_ids for g in kl_groups for v in g}
        assert [kl_rows[i] for i in range(len(examples))] == [row["KL_completion_ids"] for row in trainer.train_dataset]
    perturb(trainer.model, seed=4)  # a policy whose KL baseline is above 0 (with seed 1 it is clamped to 0)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(examples))])
    trainer.model.train()
    trainer._metrics["train"].clear()
    with torch.no_grad():
        trl_loss = trainer._compute_loss(trainer.model, batch, False).item()
    logged = {k: v[0] for k, v in trainer._metrics["train"].items()}

    ref_model = AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.float32)
    use_varlen(ref_model)
    ref = reference.score(ref_model, step.micro_batches + kl_groups, 2 * len(examples), tok.pad_token_id, CPU, 1)
    objective = kto.kto(LossArgs(loss_type=[case[0]], beta=case[1], desirable_weight=case[2],
                                 undesirable_weight=case[3]))
    ref.update(objective.data_tables(examples))
    policy = copy.deepcopy(trainer.model)
    use_varlen(policy)
    context = train.StepContext(objective, ref, None, CPU, tok.pad_token_id, float("inf"), Dist())
    record = train.train_step(policy, torch.optim.SGD(policy.parameters(), lr=0.0), step, 0.0, context)
    assert abs(record["loss"] - trl_loss) < 1e-5, (record["loss"], trl_loss)
    for key in METRICS:
        assert abs(record[key] - logged[key]) <= 1e-5 * max(1.0, abs(logged[key])), (key, record[key], logged[key])
    assert case[0] != "kto" or logged["kl"] > 1e-3  # the KL baseline is not the trivial 0
    assert abs(trl_loss - 0.5 * (6 * case[2] + 2 * case[3]) / 8) > 1e-3  # nor the loss at policy = reference


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", sorted(CASES))
def test_three_adamw_steps_equal_trl(tmp_path, qwen_dir, make_config, name):
    """The 8 examples are one step (TRL: one batch per epoch, three epochs; here three epochs of one step, in
    two micro-batches of 4, reshuffled, KL pairs by file order): loss, grad_norm and every metric TRL logs agree
    within 1e-5 at each of the three steps."""
    case = CASES[name]
    trainer, _ = trl_kto(qwen_dir, tmp_path, case, max_steps=STEPS, learning_rate=LR, lr_scheduler_type="constant",
                         weight_decay=0.0, max_grad_norm=1.0, seed=0)
    trainer.train()
    theirs = [h for h in trainer.state.log_history if "loss" in h]

    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in kto_rows()))
    loss_type, beta, wd, wu = case
    path = make_config(
        main={"algorithm": {"algorithm_type": "kto", "policy_loss_fn_args": {
                  "loss_type": loss_type, "beta": beta, "desirable_weight": wd, "undesirable_weight": wu}},
              "trainer": {"actor_kl_loss_coef": beta, "eval_samples": 0},
              "buffer": {"batch_size": len(LABELS), "total_epochs": STEPS, "trainer_input": {"experience_buffer": {
                  "path": str(data), "format": {"prompt_type": "messages"}}}}},
        verl={"actor_rollout_ref": {"actor": {"ppo_micro_batch_size_per_gpu": 4, "grad_clip": 1.0,
                                              "optim": {"lr": LR, "weight_decay": 0.0}}}})
    ours = _metrics(train.run(load_config(path)))
    assert len(ours) == len(theirs) == STEPS
    for a, b in zip(ours, theirs):
        for key in ("loss", "grad_norm", *METRICS):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), (a["step"], key, a[key], b[key])
    assert sum(r["tokens"] for r in ours) == theirs[-1]["num_tokens"]  # TRL counts prompt + completion tokens too
    assert abs(ours[-1]["loss"] - ours[0]["loss"]) > 1e-3  # it trained
    assert loss_type != "kto" or max(r["kl"] for r in ours) > 1e-4, ours  # the baseline took part
    assert all(math.isfinite(r["loss"]) for r in ours)


def test_paired_rows_are_unpaired_in_trls_order(tmp_path, qwen_dir):
    """Paired rows (1100: two of `unpair_preference_dataset`'s 1000-row batches) become two examples each, chosen
    desirable and rejected undesirable, in TRL's order: a batch's chosen completions, then its rejected ones."""
    from trinity_dpo.data.dataset import load_data

    n = 1100
    rows = [{"prompt": f"what about {i}?", "chosen": f"yes {i}!", "rejected": f"no {i}.", "id": i} for i in range(n)]
    expected = trl.unpair_preference_dataset(Dataset.from_list(rows))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "kto.yaml").write_text(json.dumps({
        "algorithm": {"algorithm_type": "kto"}, "checkpoint_root_dir": str(tmp_path / "ckpt"),
        "model": {"model_path": str(qwen_dir)}, "buffer": {"batch_size": 8, "trainer_input": {"experience_buffer": {
            "path": str(data), "format": {"prompt_type": "plaintext"}}}}}))
    cfg = load_config(tmp_path / "kto.yaml")
    examples = load_data(cfg, AutoTokenizer.from_pretrained(qwen_dir)).train
    assert len(examples) == 2 * n
    ours = [(examples[i].row - 1, examples[i].label) for i in range(len(examples))]
    assert ours == list(zip(expected["id"], expected["label"]))
    assert examples[0].prompt_ids == examples[1000].prompt_ids  # a pair's halves share the prompt's tokens
