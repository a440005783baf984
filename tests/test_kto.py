"""KTO (issue 27): the losses worked by hand, the unpaired data shapes through the token cache, one-line errors, and
runs: micro-batched equals full batch, 2 processes equal 1, resume is bitwise. Equality with TRL's `KTOTrainer`:
test_kto_trl.py."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from test_resume import assert_same_run, run_killed_in_step
from trinity_dpo.config.loader import load_config
from trinity_dpo.config.schema import FormatConfig, LossArgs
from trinity_dpo.data.conversations import BadRow
from trinity_dpo.data.dataset import load_data
from trinity_dpo.data.pairs import Limits
from trinity_dpo.data.unpaired import to_unpaired, tokenize_unpaired
from trinity_dpo.errors import ConfigError, DataError
from trinity_dpo.objective import kto
from trinity_dpo.run import train

LN3 = math.log(3.0)  # sigmoid(ln 3) = 3/4


def test_kto_loss_by_hand():
    """beta 1, desirable_weight 0.5, undesirable_weight 2; an imbalanced batch of 2 desirable, 1 undesirable.
    KL sequences' log-ratios 0.5, -0.1, 0.2: z = mean = 0.2 (above 0, kept).
    desirable r = 0.2 + ln 3: 1 - sigmoid(ln 3) = 0.25, x 0.5 = 0.125
    desirable r = 0.2:        1 - sigmoid(0)    = 0.5,  x 0.5 = 0.25
    undesirable r = 0.2 - ln 3: 1 - sigmoid(z - r) = 1 - sigmoid(ln 3) = 0.25, x 2 = 0.5
    loss = (0.125 + 0.25 + 0.5) / 3 = 0.291666..."""
    z = kto.kl_baseline(torch.tensor([0.5, -0.1, 0.2]), 3)
    assert abs(z - 0.2) < 1e-7
    r = torch.tensor([0.2 + LN3, 0.2, 0.2 - LN3])
    losses = kto.kto_losses("kto", r, torch.tensor([True, True, False]), z, 1.0, 0.5, 2.0)
    assert torch.allclose(losses, torch.tensor([0.125, 0.25, 0.5]), atol=1e-6)
    assert abs(losses.mean().item() - 0.875 / 3) < 1e-6


def test_kto_kl_baseline_is_clamped_at_zero():
    """KL log-ratios -0.3 and 0.1: mean -0.1, clamped to z = 0. beta 0.5, weights 1:
    desirable r = 2 ln 3: 1 - sigmoid(0.5 x 2 ln 3) = 0.25; undesirable r = 0: 1 - sigmoid(0) = 0.5."""
    z = kto.kl_baseline(torch.tensor([-0.3, 0.1]), 2)
    assert z == 0.0
    losses = kto.kto_losses("kto", torch.tensor([2 * LN3, 0.0]), torch.tensor([True, False]), z, 0.5, 1.0, 1.0)
    assert torch.allclose(losses, torch.tensor([0.25, 0.5]), atol=1e-6)


def test_apo_zero_unpaired_loss_by_hand():
    """beta 0.5, desirable_weight 2, undesirable_weight 1; no KL baseline (a z passed in is not read).
    desirable r = 2 ln 3:    1 - sigmoid(ln 3) = 0.25, x 2 = 0.5
    undesirable r = -2 ln 3: sigmoid(-ln 3)    = 0.25, x 1 = 0.25
    undesirable r = 0:       sigmoid(0)        = 0.5,  x 1 = 0.5
    loss = 1.25 / 3"""
    r = torch.tensor([2 * LN3, -2 * LN3, 0.0])
    losses = kto.kto_losses("apo_zero_unpaired", r, torch.tensor([True, False, False]), 7.0, 0.5, 2.0, 1.0)
    assert torch.allclose(losses, torch.tensor([0.5, 0.25, 0.5]), atol=1e-6)


def test_metrics_are_shares_that_add_up_over_micro_batches():
    """Four examples (3 desirable), beta 0.5, z = 0.1 given by the step: per example r = logp - ref =
    1, 2, 3 (desirable) and -2 (undesirable); rewards/chosen = 0.5 x mean(1, 2, 3) = 1, rewards/rejected = -1,
    margins 2; logps/chosen = mean(-10, -11, -12) = -11; logits/chosen = (0.3 + 0.3 + 0.6) / (2 + 2 + 2) tokens =
    0.2; entropy = (4 x 1.2) / 8 tokens = 0.6. Computed in two halves with the step's totals, the shares sum to
    the same figures x 4 examples."""
    objective = kto.kto(LossArgs(loss_type=["kto"], beta=0.5))
    logps = torch.tensor([-10.0, -11.0, -12.0, -14.0])
    policy = {"logps": logps, "tokens": torch.full((4,), 2.0), "mean_logits": torch.tensor([0.3, 0.3, 0.6, 1.0]),
              "entropy": torch.full((4,), 1.2)}
    ref = {"logps": logps - torch.tensor([1.0, 2.0, 3.0, -2.0]), "label": torch.tensor([1.0, 1.0, 1.0, 0.0])}
    totals = {"examples": 4, "kl": 0.1, "desirable": 3, "undesirable": 1, "tokens/desirable": 6,
              "tokens/undesirable": 2}
    halves = [objective.compute({k: v[s] for k, v in policy.items()}, {k: v[s] for k, v in ref.items()}, totals)
              for s in (slice(0, 2), slice(2, 4))]
    summed = {k: sum(h[1][k].sum().item() for h in halves) / 4 for k in halves[0][1]}
    expected = {"kl": 0.1, "rewards/chosen": 1.0, "rewards/rejected": -1.0, "rewards/margins": 2.0,
                "logps/chosen": -11.0, "logps/rejected": -14.0, "logits/chosen": 0.2, "logits/rejected": 0.5,
                "entropy": 0.6}
    assert all(abs(summed[k] - v) < 1e-6 for k, v in expected.items()), summed
    full = objective.compute(policy, ref, totals)[0]
    assert torch.allclose(torch.cat([h[0] for h in halves]), full)


# --------------------------------------------------------------------------- data


def unpaired_rows(n=16, messages=False):
    """Unpaired rows, 3 in 4 desirable: the text shape, or TRL's conversational one with `messages`."""
    rows = []
    for i in range(n):
        good = i % 4 != 3
        prompt = f"what do you think about pizza {i}?"
        completion = f"oh pizza is great {i}! " * (1 + i % 3) if good else "as an ai language model I do not eat."
        if messages:
            prompt = [{"role": "user", "content": prompt}]
            completion = [{"role": "assistant", "content": completion}]
        rows.append({"prompt": prompt, "completion": completion, "label": good})
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def kto_config(make_config, tmp_path, name="kto", rows=None, fmt="plaintext", algorithm=None, batch=8, micro=4,
               trainer=None, buffer=None):
    data = _write(tmp_path / f"{name}.jsonl", rows or unpaired_rows())
    args = {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.4, **(algorithm or {})}
    buffer = dict(buffer or {})
    inputs = {"experience_buffer": {"path": str(data), "format": {"prompt_type": fmt}},
              **buffer.pop("trainer_input", {})}
    return make_config(
        main={"name": name, "algorithm": {"algorithm_type": "kto", "policy_loss_fn_args": args},
              "trainer": {"actor_kl_loss_coef": args["beta"], "eval_samples": 0, **(trainer or {})},
              "buffer": {"batch_size": batch, "total_epochs": 2, **buffer, "trainer_input": inputs}},
        verl={"actor_rollout_ref": {"actor": {"ppo_micro_batch_size_per_gpu": micro, "optim": {"lr": 2e-3}}}})


@pytest.mark.parametrize("fmt", ["plaintext", "messages"])
def test_unpaired_rows_through_the_cache_equal_direct_tokenizing(make_config, tmp_path, qwen_dir, fmt):
    """Text and messages rows: the cached examples (a second load reads the table) are those tokenized directly,
    with their labels, in file order."""
    rows = unpaired_rows(messages=fmt == "messages")
    cfg = load_config(kto_config(make_config, tmp_path, rows=rows, fmt=fmt))
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    items = [it for i, row in enumerate(rows) for it in to_unpaired(row, i + 1, FormatConfig(prompt_type=fmt))]
    direct = [e for e, _ in tokenize_unpaired(items, tok, Limits())]
    for _ in range(2):
        examples = load_data(cfg, tok).train
        got = [(e.row, e.prompt_ids, e.completion_ids, e.label) for e in examples]
        assert got == [(e.row, e.prompt_ids, e.completion_ids, e.label) for e in direct]
    assert examples.labels.tolist() == [r["label"] for r in rows]
    assert tok.decode(direct[0].completion_ids).startswith("oh pizza is great 0!")


def test_paired_rows_become_chosen_and_rejected_examples(make_config, tmp_path, qwen_dir, pairs_file):
    """The DPO pair file under algorithm_type kto: each pair is a desirable and an undesirable example with the
    pair's prompt tokens; held out by source row, so both halves of a pair land on one side."""
    cfg = load_config(kto_config(make_config, tmp_path, rows=json.loads(pairs_file.read_text()),
                                 buffer={"trainer_input": {"eval_fraction": 0.25}}))
    data = load_data(cfg, AutoTokenizer.from_pretrained(qwen_dir))
    assert len(data.train) == 2 * 18 and len(data.eval) == 2 * 6
    train_rows, eval_rows = {e.row for e in data.train}, {e.row for e in data.eval}
    assert not train_rows & eval_rows and data.train.labels.sum() == 18
    by_row = {}
    for e in data.train:
        by_row.setdefault(e.row, []).append(e)
    assert all(len(v) == 2 and v[0].prompt_ids == v[1].prompt_ids and v[0].label != v[1].label
               for v in by_row.values())
    assert data.summary["train"]["read"] == 18


def test_bad_labels_are_skipped_or_stop_the_run_in_one_line(make_config, tmp_path, qwen_dir, caplog):
    rows = unpaired_rows()
    rows[2]["label"], rows[5]["label"] = "yes", 1
    del rows[7]["label"]
    cfg = load_config(kto_config(make_config, tmp_path, rows=rows))
    data = load_data(cfg, AutoTokenizer.from_pretrained(qwen_dir))
    assert len(data.train) == 13
    assert data.summary["train"]["dropped"] == {"'label' not true or false": 2, "missing key 'label'": 1}
    assert "'label' must be true (desirable) or false (undesirable), got 'yes'" in caplog.text
    cfg.buffer.trainer_input.experience_buffer.on_bad_row = "error"
    with pytest.raises(DataError, match=r"row 3: 'label' must be true") as e:
        load_data(cfg, AutoTokenizer.from_pretrained(qwen_dir))
    assert "\n" not in str(e.value)
    with pytest.raises(BadRow, match="missing key 'completion'"):
        to_unpaired({"prompt": "hi", "label": True}, 1, FormatConfig())


@pytest.mark.parametrize("patch,message", [
    ({"algorithm": {"kl_loss_fn": "k2"}}, "algorithm.kl_loss_fn: k2 adds Trinity's KL term"),
    ({"algorithm": {"policy_loss_fn_args": {"loss_type": "sigmoid"}}}, "loss_type: ['sigmoid'] is not a loss type"),
    ({"algorithm": {"policy_loss_fn": "dpo"}}, "'dpo' does not go with algorithm_type 'kto'"),
    ({"algorithm": {"policy_loss_fn_args": {"label_smoothing": 0.1}}}, "label_smoothing: not a setting of KTO"),
    ({"algorithm": {"policy_loss_fn_args": {"undesirable_weight": -1}}}, "undesirable_weight must be >= 0"),
    ({"buffer": {"batch_size": 1}}, "buffer.batch_size must be at least 2 for loss_type kto"),
    ({"algorithm": {"algorithm_type": "dpo", "policy_loss_fn": "dpo"}}, "desirable_weight and undesirable_weight "
                                                                       "apply to algorithm_type kto only"),
])
def test_settings_kto_does_not_take_are_refused_in_one_line(make_config, tmp_path, patch, message):
    from conftest import _deep_update

    path = kto_config(make_config, tmp_path, micro=1)
    import yaml

    raw = yaml.safe_load(path.read_text())
    _deep_update(raw, patch)
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert message in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- runs


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_micro_batched_equals_full_batch(make_config, tmp_path):
    """16 examples, batch 8, two epochs: micro-batches of 2 give the full batch's steps (loss and every metric,
    the KL baseline included, whose pass runs first over all of a step's micro-batches), with a held-out set."""
    buffer = {"trainer_input": {"eval_fraction": 0.25}}
    trainer = {"eval_interval": 2}
    full = train.run(load_config(kto_config(make_config, tmp_path, "full", micro=8, buffer=buffer, trainer=trainer)))
    micro = train.run(load_config(kto_config(make_config, tmp_path, "micro", micro=2, buffer=buffer,
                                             trainer=trainer)))
    a, b = _records(full), _records(micro)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key in x.keys() - {"tokens_per_s", "step_time_s", "pad_share"}:
            assert abs(x[key] - y[key]) <= 1e-5 * max(1.0, abs(x[key])), (x["step"], key, x[key], y[key])
    steps = [r for r in a if "loss" in r]
    assert steps[0]["kl"] == 0.0 and max(r["kl"] for r in steps) > 0  # step 1: policy = reference, to the bit
    # Step 1 at policy = reference: every r is 0 to the bit, so each loss is 0.5 x its weight (1 or 1.4).
    assert min(abs(steps[0]["loss"] - 0.5 * (d + 1.4 * (8 - d)) / 8) for d in range(9)) < 1e-7
    assert any("eval/kl" in r for r in a) and (full / "kto_kl.png").is_file()
    # `trinity eval` of the last checkpoint gives the run's last held-out figures.
    from trinity_dpo.run.evaluate import evaluate_checkpoint

    text = evaluate_checkpoint(load_config(full.parent.parent.parent / "dpo.yaml"), str(full / "global_step_4"), 0)
    last = a[-1]
    assert f"{last['eval/loss']:>8.3f}" in text.splitlines()[-1] and "examples" in text.splitlines()[0], text


def test_lora_kto_starts_at_the_reference(make_config, tmp_path):
    """A fresh adapter (B = 0) is the reference: at step 1 the KL baseline is exactly 0 and every example's loss
    is 0.5 x its weight; the adapter trains."""
    path = kto_config(make_config, tmp_path, "lora", trainer={"total_steps": 2})
    cfg = load_config(path, ["model.lora.rank=4", "model.lora.alpha=8"])
    steps = [r for r in _records(train.run(cfg)) if "loss" in r]
    assert steps[0]["kl"] == 0.0 and steps[0]["rewards/chosen"] == 0.0 and steps[0]["rewards/rejected"] == 0.0
    assert min(abs(steps[0]["loss"] - 0.5 * (d + 1.4 * (8 - d)) / 8) for d in range(9)) < 1e-7
    assert steps[1]["rewards/margins"] != 0.0


def test_resume_is_bitwise_and_reuses_every_steps_kl_reference(make_config, tmp_path, monkeypatch):
    """Killed in step 3 of 4 (the second epoch, whose KL pairs differ from the first's): the run resumes from
    step 2 and ends as the uninterrupted one, to the bit, without scoring the reference again."""
    trainer = {"save_interval": 1}
    whole = train.run(load_config(kto_config(make_config, tmp_path, "whole", trainer=trainer)))
    path = kto_config(make_config, tmp_path, "cut", trainer=trainer)
    run_killed_in_step(path, 3, monkeypatch)
    scored = []
    real = train.score
    monkeypatch.setattr("trinity_dpo.objective.reference.score", lambda *a, **k: scored.append(1) or real(*a, **k))
    cut = train.run(load_config(path))
    assert not scored
    assert_same_run(whole, cut, 4)


@pytest.mark.slow
def test_two_processes_equal_one(make_config, tmp_path):
    """9 training examples, batch 8, two epochs: steps of 8 and 1 example; in the short one the second worker runs
    a padding micro-batch (in the KL pass too). The KL baseline is summed over both workers before any loss."""
    from test_distributed import assert_close_runs, cli

    path = kto_config(make_config, tmp_path, "one", rows=unpaired_rows(12), micro=2,
                      buffer={"trainer_input": {"eval_fraction": 0.25}}, trainer={"eval_interval": 2})
    one = train.run(load_config(path))
    proc = cli(path, "cluster.gpu_per_node=2", "name=two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close_runs(one, one.parent / "two", 4)
    assert [r["rows"] for r in _records(one) if "loss" in r] == [8, 1, 8, 1]
