"""Parity with TRL's DPOTrainer (a test-only dependency) on identical data and batches."""
from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import need_extra
from trinity_dpo.engine.attention import use_varlen
from trinity_dpo.data.batching import collate
from trinity_dpo.config.loader import load_config
from trinity_dpo.data.conversations import Conversation, DataReport
from trinity_dpo.engine.logprobs import sequence_logps
from trinity_dpo.objective.losses import smoothed_sigmoid
from trinity_dpo.engine.modeling import Runtime
from trinity_dpo.data.pairs import Limits, build_pairs
from trinity_dpo.objective.reference import score
from trinity_dpo.run import train

trl = need_extra("trl")

BETA = 0.1


def rows(n=4):
    return [{"prompt": [{"role": "user", "content": f"what do you think about pizza {i}?"}],
             "chosen": [{"role": "assistant", "content": "oh pizza is great! " * (i + 1)}],
             "rejected": [{"role": "assistant", "content": "as an ai language model I do not eat."}]}
            for i in range(n)]


def trl_trainer(model_dir, tmp_path, **kwargs):
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], beta=BETA, max_length=None, use_cpu=True,
                         bf16=False, logging_steps=1, save_strategy="no", disable_tqdm=True, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    return trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows()), processing_class=tok), tok


def our_pairs(tok):
    convs = [Conversation(i + 1, r["prompt"], r["chosen"], r["rejected"]) for i, r in enumerate(rows())]
    return build_pairs(convs, tok, Limits(10_000, 10_000), DataReport("x"))


@pytest.mark.parametrize("fixture", ["qwen_dir", "llama3_dir"])
def test_tokenization_logps_and_loss_equal_trl(request, tmp_path, fixture):
    model_dir = request.getfixturevalue(fixture)
    trainer, tok = trl_trainer(model_dir, tmp_path, per_device_train_batch_size=4)
    pairs = our_pairs(tok)
    for pair, ex in zip(pairs, trainer.train_dataset):
        assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == (
            ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"])

    # Move the policy away from the reference so the loss is not ln 2.
    torch.manual_seed(1)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.train()
    trl_loss = trainer._compute_loss(trainer.model, batch, False)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        out = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                            fused_lm_head=True, use_cache=False)
    trl_chosen, trl_rejected = out.log_probs.sum(1).chunk(2)

    cpu = Runtime(torch.device("cpu"), bf16=False)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    use_varlen(reference)
    use_varlen(trainer.model)
    ref = score(reference, [pairs], len(pairs), tok.pad_token_id, cpu)["logps"]
    mb = collate(pairs, tok.pad_token_id)
    chosen, rejected = sequence_logps(trainer.model, mb, contextlib.nullcontext()).chunk(2)
    losses = smoothed_sigmoid(BETA * ((chosen - ref[:, 0]) - (rejected - ref[:, 1])), 0.0)
    assert torch.allclose(chosen, trl_chosen, atol=1e-5) and torch.allclose(rejected, trl_rejected, atol=1e-5)
    assert abs(losses.mean().item() - trl_loss.item()) < 1e-5
    assert abs(trl_loss.item() - math.log(2)) > 1e-3  # the comparison is not the trivial one


def test_training_losses_equal_trl(tmp_path, qwen_dir, make_config):
    """Three optimizer steps on the same 4 pairs (one full batch per epoch): the logged losses agree."""
    trainer, _ = trl_trainer(qwen_dir, tmp_path, per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3,
                             lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, seed=0)
    trainer.train()
    trl_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    path = make_config(main={"buffer": {"batch_size": 4, "total_epochs": 3, "trainer_input": {"experience_buffer": {
        "path": str(data), "format": {"prompt_type": "messages"}}}}},
        verl={"actor_rollout_ref": {"actor": {"ppo_micro_batch_size_per_gpu": 2, "grad_clip": 1.0,
                                              "optim": {"lr": 1e-3, "weight_decay": 0.0}}}})
    run_dir = train.run(load_config(path))
    ours = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(trl_losses) == len(ours) == 3
    assert abs(ours[0] - math.log(2)) < 1e-6
    for a, b in zip(ours, trl_losses):
        assert abs(a - b) < 1e-5, (ours, trl_losses)


IMPLICIT = {
    # TRL's standard implicit-prompt format: texts, no chat template, EOS appended by TRL.
    "texts": [{"chosen": f"what about pizza {i}? oh pizza is great!", "rejected": f"what about pizza {i}? no."}
              for i in range(3)],
    # trl-lib/ultrafeedback_binarized: whole conversations.
    "conversations": [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows(3)],
}


@pytest.mark.parametrize("shape", sorted(IMPLICIT))
def test_implicit_prompt_tokens_equal_trl(tmp_path, qwen_dir, shape):
    """Rows with only chosen and rejected (prompt_type: chatpair) give TRL's token ids for prompt and responses."""
    from trinity_dpo.config.schema import FormatConfig
    from trinity_dpo.data.conversations import to_conversation

    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], max_length=None, use_cpu=True)
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    model = AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.float32)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(IMPLICIT[shape]),
                             processing_class=tok)
    convs = [to_conversation(r, i + 1, FormatConfig(prompt_type="chatpair")) for i, r in enumerate(IMPLICIT[shape])]
    pairs = build_pairs(convs, tok, Limits(), DataReport("x"))
    assert len(pairs) == len(IMPLICIT[shape])
    for pair, ex in zip(pairs, trainer.train_dataset):
        assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == (
            ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"])
