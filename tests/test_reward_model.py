"""The reward model (`algorithm.algorithm_type: reward_model`): the Bradley-Terry loss worked by hand, three AdamW
steps equal to TRL 1.16's RewardTrainer (loss and its metrics, with and without margin and centring), the new head's
initialisation, micro-batches and shared prompts equal one batch, bitwise resume, checkpoints that
AutoModelForSequenceClassification (and PEFT) load with the scores training computed, `trinity eval`, and the
one-line errors."""
from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import need_extra
from test_resume import records, run_killed_in_step
from test_trl_parity import rows
from trinity_dpo.config.loader import load_config
from trinity_dpo.data.batching import collate
from trinity_dpo.data.conversations import Conversation, DataReport
from trinity_dpo.data.pairs import Limits, build_pairs
from trinity_dpo.engine import score_head
from trinity_dpo.errors import ConfigError, DataError
from trinity_dpo.objective import objectives
from trinity_dpo.objective.reward import bradley_terry
from trinity_dpo.run import train

trl = need_extra("trl")

LR, STEPS, SEED, TOL = 1e-3, 3, 42, 1e-5
TRL_METRICS = ("accuracy", "margin", "min_reward", "mean_reward", "max_reward")
MARGINS = [0.5, -0.25, 1.0, 0.0]


def test_bradley_terry_loss_by_hand():
    """Two pairs, scores r_c = (1.0, 0.5), r_r = (0.0, 1.5): differences 1 and -1.
    No margin: -log sigmoid(1) = log(1 + e^-1) = 0.3132617, -log sigmoid(-1) = log(1 + e) = 1.3132617.
    Margins (0.5, -1.0): z = 1 - 0.5 = 0.5 and -1 + 1 = 0: log(1 + e^-0.5) = 0.4740770 and ln 2 = 0.6931472.
    Centring 0.1: + 0.1 (1 + 0)^2 = 0.1 and + 0.1 (0.5 + 1.5)^2 = 0.4: 0.4132617, 1.7132617; TRL's batch loss
    mean(-log sigmoid) + 0.1 mean((r_c + r_r)^2) = 0.8132617 + 0.1 (1 + 4) / 2 = 1.0632617, their mean."""
    chosen, rejected = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.5])
    zero, margin = torch.zeros(2), torch.tensor([0.5, -1.0])
    expect = lambda got, values: torch.testing.assert_close(got, torch.tensor(values), atol=1e-6, rtol=0)  # noqa
    expect(bradley_terry(chosen, rejected, zero, None), [0.3132617, 1.3132617])
    expect(bradley_terry(chosen, rejected, margin, None), [0.4740770, 0.6931472])
    expect(bradley_terry(chosen, rejected, zero, 0.1), [0.4132617, 1.7132617])
    assert abs(bradley_terry(chosen, rejected, zero, 0.1).mean().item() - 1.0632617) < 1e-6
    expect(bradley_terry(chosen, rejected, margin, 0.1), [0.5740770, 1.0931472])


def test_reward_objective_metrics_by_hand():
    """The same pairs through the objective (slot-major scores: chosen 1.0, 0.5, then rejected 0.0, 1.5):
    accuracy (1 > 0, 0.5 < 1.5) = (1, 0), mean 0.5; margin (1, -1), mean 0; mean_reward: the mean of the four
    scores (1 + 0.5 + 0 + 1.5) / 4 = 0.75, as the mean of each pair's (1 + 0) / 2 and (0.5 + 1.5) / 2; min_reward
    0.0 and max_reward 1.5 over all four (each pair gives its own extreme, the step reduces by min and max)."""
    cfg = reward_algorithm({"algorithm_type": "reward_model"})
    objective = objectives.build(cfg)
    assert (objective.needs_reference, objective.sequences, objective.stats) == (False, 2, ("score", "margin"))
    stats = {"score": torch.tensor([1.0, 0.5, 0.0, 1.5]), "margin": torch.tensor([0.5, -1.0, 0.5, -1.0])}
    losses, metrics = objective.compute(stats, None, {"examples": 2})
    torch.testing.assert_close(losses, torch.tensor([0.4740770, 0.6931472]), atol=1e-6, rtol=0)
    assert [metrics["accuracy"].mean().item(), metrics["margin"].mean().item(),
            metrics["mean_reward"].mean().item()] == [0.5, 0.0, 0.75]
    assert (metrics["min_reward"].min().item(), metrics["max_reward"].max().item()) == (0.0, 1.5)
    assert objective.extrema == {"min_reward": "min", "max_reward": "max"}


def reward_algorithm(algorithm: dict):
    from trinity_dpo.config.schema import AlgorithmConfig, LossArgs

    args = LossArgs(**algorithm.pop("policy_loss_fn_args", {}))
    return AlgorithmConfig(policy_loss_fn="reward_model", policy_loss_fn_args=args, **algorithm)


def write_rows(path, data):
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return path


def rm_config(make_config, data, main=None, verl=None, **args):
    """A reward model on `data` (messages rows): batch 4, micro-batches of 2, constant lr, no clipping."""
    main = main or {}
    algorithm = {"algorithm_type": "reward_model", "policy_loss_fn_args": args, **main.pop("algorithm", {})}
    buffer = {"batch_size": 4, "total_epochs": STEPS, "trainer_input": {"experience_buffer": {
        "path": str(data), "format": {"prompt_type": "messages"}}}}
    buffer.update(main.pop("buffer", {}))
    actor = {"ppo_micro_batch_size_per_gpu": 2, "grad_clip": 1e9, "optim": {"lr": LR, "weight_decay": 0.0}}
    return make_config(main={"algorithm": algorithm, "buffer": buffer, **main},
                       verl={"actor_rollout_ref": {"actor": actor}, **(verl or {})})


def trl_history(model_dir, tmp_path, pairs, margins, coef):
    """TRL's RewardTrainer on our pairs' token ids (prompt + response, pre-tokenized: TRL's own tokenization of the
    rows gives the same ids, checked below), 4 pairs a step, 3 steps; its logged records."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = [{"chosen_ids": p.prompt_ids + p.chosen_ids, "rejected_ids": p.prompt_ids + p.rejected_ids,
             **({"margin": m} if margins else {})} for p, m in zip(pairs, margins or [0] * len(pairs))]
    args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
                            logging_steps=1, save_strategy="no", disable_tqdm=True, per_device_train_batch_size=4,
                            max_steps=STEPS, learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
                            max_grad_norm=1e9, seed=SEED, center_rewards_coefficient=coef, max_length=None)
    trainer = trl.RewardTrainer(model=str(model_dir), args=args, train_dataset=Dataset.from_list(data),
                                processing_class=tok)
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


CASES = {"plain": (None, None), "margin": (MARGINS, None), "centring": (None, 0.01), "both": (MARGINS, 0.01)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_three_adamw_steps_equal_trl_reward_trainer(tmp_path, qwen_dir, make_config, case):
    """From the causal LM folder: TRL seeds and reads AutoModelForSequenceClassification (a new head from the
    seed), this tool draws its head from the same seed; each step is the whole set (batch 4 of 4 pairs), here in
    two micro-batches of 2: loss and TRL's five metrics agree within 1e-5 at every step."""
    margins, coef = CASES[case]
    pairs = rm_pairs(AutoTokenizer.from_pretrained(qwen_dir))
    theirs = trl_history(qwen_dir, tmp_path, pairs, margins, coef)
    data = write_rows(tmp_path / "rows.jsonl", rm_rows(margins))
    args = {} if coef is None else {"center_rewards_coefficient": coef}
    run_dir = train.run(load_config(rm_config(make_config, data, trainer_seed(), **args)))
    ours = records(run_dir)
    assert len(ours) == len(theirs) == STEPS
    for a, b in zip(ours, theirs):
        for key in ("loss", *TRL_METRICS):
            assert abs(a[key] - b[key]) <= TOL * max(1.0, abs(b[key])), (case, a["step"], key, a[key], b[key])
    assert abs(ours[-1]["loss"] - ours[0]["loss"]) > 1e-3 and abs(ours[0]["loss"] - math.log(2)) > 1e-4


def trainer_seed():
    return {"trainer": {"seed": SEED}}


def rm_rows(margins=None):
    """Four messages rows, the second and fourth with chosen and rejected swapped (so that no head prefers every
    chosen answer), with a margin column if `margins`."""
    out = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} if i % 2 else dict(r) for i, r in enumerate(rows(4))]
    return [{**r, "margin": m} for r, m in zip(out, margins)] if margins is not None else out


def rm_pairs(tok):
    """`rm_rows` as our pairs."""
    convs = [Conversation(i + 1, r["prompt"], r["chosen"], r["rejected"]) for i, r in enumerate(rm_rows())]
    return build_pairs(convs, tok, Limits(), DataReport("x"))


def test_trl_tokenizes_the_rows_to_our_pair_ids(tmp_path, qwen_dir):
    """TRL's RewardTrainer tokenizes each conversation whole (prompt + answer through the chat template): the ids
    are our pairs' prompt + response ids, so the parity above reads what TRL would read from the rows."""
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, max_length=None)
    trainer = trl.RewardTrainer(model=str(qwen_dir), args=args, train_dataset=Dataset.from_list(rm_rows()),
                                processing_class=tok)
    for pair, ex in zip(rm_pairs(tok), trainer.train_dataset):
        assert (pair.prompt_ids + pair.chosen_ids, pair.prompt_ids + pair.rejected_ids) == (
            ex["chosen_ids"], ex["rejected_ids"])


def test_new_head_is_transformers_initialisation_from_the_seed(qwen_dir):
    """`set_seed(s)` then `from_pretrained` of a causal LM as a sequence classifier (what TRL does) draws the head
    that `score_head.fresh_head` draws from s, whatever the global generator's state."""
    from transformers import set_seed

    for seed in (0, 42):
        set_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(qwen_dir, num_labels=1)
        torch.manual_seed(123)
        assert torch.equal(score_head.fresh_head(model, seed), model.score.weight.detach())
        assert model.score.weight.abs().max().item() > 0


# --------------------------------------------------------------------------- runs, checkpoints, resume


@pytest.fixture()
def rm_data(tmp_path):
    """12 pairs with a margin column: 8 train (batch 4: two steps an epoch), 4 held out by eval_fraction."""
    data = [{"prompt": f"what do you think about pizza {i}?", "chosen": "oh pizza is great! " * (1 + i % 3),
             "rejected": "as an ai language model I do not eat." + " no" * (i % 4), "margin": 0.1 * (i % 5)}
            for i in range(12)]
    return write_rows(tmp_path / "rm.jsonl", data)


def rm_run_config(make_config, rm_data, name, micro=2, share=True, **main):
    return rm_config(make_config, rm_data, main={
        "name": name, "buffer": {"total_epochs": 2, "trainer_input": {"eval_fraction": 0.3, "experience_buffer": {
            "path": str(rm_data), "format": {"prompt_type": "plaintext"}}}},
        "trainer": {"save_interval": 2, "eval_interval": 2, "share_prompt": share, "seed": SEED}, **main},
        verl={"actor_rollout_ref": {"actor": {"ppo_micro_batch_size_per_gpu": micro, "grad_clip": 1e9,
                                              "optim": {"lr": LR, "weight_decay": 0.0}}}})


def test_micro_batches_and_shared_prompts_equal_one_batch(make_config, rm_data):
    """Micro-batches of 1 with each pair's prompt computed once, and one micro-batch of 4 with separate sequences:
    the same losses, metrics (min and max reduced over micro-batches), held-out figures and weights."""
    a = train.run(load_config(rm_run_config(make_config, rm_data, "micro", micro=1, share=True)))
    b = train.run(load_config(rm_run_config(make_config, rm_data, "full", micro=4, share=False)))
    ra, rb = records(a), records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and len(ra) > 4
    for x, y in zip(ra, rb):
        for key in x.keys() - {"positions", "pad_share", "tokens_per_s", "step_time_s"}:
            assert abs(x[key] - y[key]) <= 1e-5 * max(1.0, abs(x[key])), (x["step"], key, x[key], y[key])
    assert ra[-1]["eval/accuracy"] >= 0 and "eval/margin" in ra[-1] and "eval/min_reward" in ra[0]
    wa, wb = (load_file(str(run / "global_step_4/model.safetensors")) for run in (a, b))
    assert wa.keys() == wb.keys() and "score.weight" in wa and "lm_head.weight" not in wa
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def hf_scores(folder, pairs, pad_id):
    """Each pair's (chosen, rejected) scores from AutoModelForSequenceClassification, in one right-padded batch."""
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
    seqs = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        scores = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    return scores.view(2, -1)


def held_out_figures(scores, margins):
    chosen, rejected = scores
    loss = bradley_terry(chosen, rejected, torch.tensor(margins), None).mean().item()
    return {"eval/loss": loss, "eval/accuracy": (chosen > rejected).float().mean().item(),
            "eval/margin": (chosen - rejected).mean().item(), "eval/mean_reward": scores.mean().item(),
            "eval/min_reward": scores.min().item(), "eval/max_reward": scores.max().item()}


def test_checkpoint_loads_as_sequence_classifier_with_the_scores_training_computed(make_config, rm_data, tmp_path):
    """The last checkpoint is a sequence-classification folder: AutoModelForSequenceClassification's scores of the
    held-out pairs give the run's last held-out figures (loss with the margins, accuracy, margin, rewards). A run
    from that folder keeps its head: its step-0 figures are the same."""
    from trinity_dpo.data.dataset import load_data
    from trinity_dpo.engine.modeling import load_tokenizer

    cfg = load_config(rm_run_config(make_config, rm_data, "ckpt"))
    run_dir = train.run(cfg)
    folder = run_dir / "global_step_4"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification")
    assert len(config["id2label"]) == 1  # num_labels 1
    tok = load_tokenizer(cfg)
    assert config["pad_token_id"] == tok.pad_token_id
    data = load_data(cfg, tok)
    pairs = list(data.eval)
    last = [r for r in records(run_dir) if "eval/loss" in r][-1]
    mine = held_out_figures(hf_scores(folder, pairs, tok.pad_token_id), [p.margin for p in pairs])
    assert any(p.margin for p in pairs)
    for key, value in mine.items():
        assert abs(value - last[key]) < 1e-5, (key, value, last[key])
    again = train.run(load_config(rm_run_config(make_config, rm_data, "again", model={"model_path": str(folder)},
                                                trainer={"total_steps": 1, "seed": SEED})))
    first = [r for r in records(again) if "eval/loss" in r][0]
    assert all(abs(first[k] - last[k]) < 1e-5 for k in mine), (first, last)


def test_resume_after_a_crash_is_bitwise(make_config, rm_data, monkeypatch):
    whole = train.run(load_config(rm_run_config(make_config, rm_data, "whole")))
    crashed = rm_run_config(make_config, rm_data, "crashed")
    run_killed_in_step(crashed, 4, monkeypatch)
    run_dir = whole.parent / "crashed"
    train.run(load_config(crashed))
    from test_resume import assert_same_run

    assert_same_run(whole, run_dir, 4)


def test_lora_trains_the_head_with_the_adapters(make_config, rm_data, qwen_dir):
    """Adapters and the score head train (PEFT's modules_to_save, as TRL advises); the adapter folder loads into
    the base read as a sequence classifier, and merged/ with AutoModelForSequenceClassification: both give the
    run's held-out figures."""
    from peft import PeftModel

    from trinity_dpo.data.dataset import load_data
    from trinity_dpo.engine.modeling import load_tokenizer

    cfg = load_config(rm_run_config(make_config, rm_data, "lora", model={"model_path": str(qwen_dir), "lora": {
        "rank": 4, "alpha": 8}}))
    run_dir = train.run(cfg)
    folder = run_dir / "global_step_4"
    adapter = json.loads((folder / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    saved = load_file(str(folder / "adapter_model.safetensors"))
    head = [v for k, v in saved.items() if "score" in k]
    start = score_head.fresh_head(AutoModelForSequenceClassification.from_pretrained(qwen_dir, num_labels=1), SEED)
    assert len(head) == 1 and (head[0] - start).abs().max().item() > 1e-4  # the head trained
    tok = load_tokenizer(cfg)
    pairs = list(load_data(cfg, tok).eval)
    last = [r for r in records(run_dir) if "eval/loss" in r][-1]
    merged = held_out_figures(hf_scores(folder / "merged", pairs, tok.pad_token_id), [p.margin for p in pairs])
    base = AutoModelForSequenceClassification.from_pretrained(qwen_dir, num_labels=1, pad_token_id=tok.pad_token_id)
    peft_model = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    tmp = run_dir / "peft_loaded"
    peft_model.save_pretrained(tmp)
    loaded = held_out_figures(hf_scores(tmp, pairs, tok.pad_token_id), [p.margin for p in pairs])
    for key in merged:
        assert abs(merged[key] - last[key]) < 1e-5 and abs(loaded[key] - last[key]) < 1e-5, key
    assert abs(last["eval/loss"] - [r for r in records(run_dir) if "eval/loss" in r][0]["eval/loss"]) > 1e-4


def test_trinity_eval_of_a_reward_model_reports_accuracy_and_margin(make_config, rm_data, qwen_dir, capsys):
    """`trinity eval --data pairs --ref BASE` of a reward-model checkpoint: held-out accuracy and margin of the base
    (its fresh head) and of the checkpoint, over every pair of the file; --generate is refused in one line."""
    from trinity_dpo import cli

    run_dir = train.run(load_config(rm_run_config(make_config, rm_data, "evaluated")))
    code = cli.main(["eval", "--model", str(run_dir / "global_step_4"), "--data", str(rm_data), "--ref",
                     str(qwen_dir)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "reward accuracy (score)" in out and "mean score margin" in out and "(12 pairs)" in out
    code = cli.main(["eval", "--model", str(run_dir / "global_step_4"), "--data", str(rm_data), "--ref",
                     str(qwen_dir), "--generate", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "a reward model scores answers and writes none" in err and err.count("\n") == 1


# --------------------------------------------------------------------------- one-line errors


ERRORS = [
    ({"algorithm": {"algorithm_type": "reward_model", "policy_loss_fn": "dpo"}},
     "algorithm.policy_loss_fn: 'dpo' does not go with algorithm_type 'reward_model'"),
    ({"algorithm": {"algorithm_type": "dpo", "policy_loss_fn": "reward_model"}},
     "algorithm.policy_loss_fn: 'reward_model' does not go with algorithm_type 'dpo'"),
    ({"algorithm": {"algorithm_type": "reward_model", "kl_loss_fn": "k1", "kl_loss_fn_args": {"kl_coef": 0.1}}},
     "algorithm.kl_loss_fn: k1 is a KL term of the LM head's log-probs against a reference"),
    ({"algorithm": {"algorithm_type": "reward_model", "entropy_loss_fn_args": {"entropy_coef": 0.01}}},
     "algorithm.entropy_loss_fn_args.entropy_coef: the entropy term reads the LM head's"),
    ({"algorithm": {"algorithm_type": "reward_model", "policy_loss_fn_args": {"loss_type": "ipo"}}},
     "algorithm.policy_loss_fn_args.loss_type: 'ipo': a reward model has one loss"),
    ({"algorithm": {"algorithm_type": "reward_model", "policy_loss_fn_args": {"label_smoothing": 0.1}}},
     "algorithm.policy_loss_fn_args.label_smoothing applies to the preference losses"),
    ({"algorithm": {"algorithm_type": "reward_model", "policy_loss_fn_args": {"center_rewards_coefficient": -1}}},
     "algorithm.policy_loss_fn_args.center_rewards_coefficient must be >= 0, got -1.0"),
    ({"algorithm": {"algorithm_type": "dpo", "policy_loss_fn_args": {"center_rewards_coefficient": 0.01}}},
     "algorithm.policy_loss_fn_args.center_rewards_coefficient applies to algorithm_type reward_model only"),
]


@pytest.mark.parametrize("main,message", ERRORS)
def test_bad_combinations_are_one_line(make_config, main, message):
    with pytest.raises(ConfigError) as e:
        load_config(make_config(main=main))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_reward_model_defaults(make_config, caplog):
    """algorithm_type reward_model alone: its loss, no KL term even with Trinity 0.2+ keys, no greedy answers (a
    count given for them is said to be unused)."""
    with caplog.at_level("INFO"):
        cfg = load_config(make_config(main={"algorithm": {"algorithm_type": "reward_model", "kl_loss_fn": "none"},
                                            "trainer": {"eval_samples": 3}}))
    assert (cfg.algorithm.policy_loss_fn, cfg.algorithm.kl_loss_fn, cfg.trainer.eval_samples) == (
        "reward_model", "none", 0)
    assert "trainer.eval_samples: 3 not used: a reward model scores answers and generates none" in caplog.text


@pytest.mark.parametrize("bad,message", [
    ([0.5, "x", 0.1, 0.2], "row 2: 'margin' must be a finite number, got 'x'"),
    ([0.5, None, 0.1, 0.2], "row 2 has no 'margin' while other rows have one (1 of 4 pairs lack it)"),
])
def test_bad_margin_column_is_one_line(make_config, tmp_path, bad, message):
    from trinity_dpo.data.dataset import load_data
    from trinity_dpo.engine.modeling import load_tokenizer

    data = write_rows(tmp_path / "bad.jsonl", [{k: v for k, v in r.items() if v is not None}
                                                for r in rm_rows(bad)])
    cfg = load_config(rm_config(make_config, data))
    with pytest.raises(DataError) as e:
        load_data(cfg, load_tokenizer(cfg))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_score_position_is_the_last_token_that_is_not_the_pad_id():
    """transformers' rule: the rightmost token that is not the pad id (0 when none), in both packed layouts."""
    from trinity_dpo.data.pairs import Pair

    pairs = [Pair(0, 1, [5, 6], [7, 8], [9]), Pair(1, 2, [5], [7, 0], [0, 0])]  # pad id 0
    mb = collate(pairs, 0)
    # sequences: [5 6 7 8] [5 7 0] [5 6 9] [5 0 0] end to end at 0, 4, 7, 10
    assert mb.score_pos.tolist() == [3, 5, 9, 10]
    shared = collate(pairs, 0, share_prompt=True)
    # pieces: [5 6 | 7 8 | 9] at 0..4, [5 | 7 0 | 0 0] at 5..9
    assert shared.score_pos.tolist() == [3, 6, 4, 5]


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_two_processes_equal_one(make_config, rm_data, lora):
    """9 train pairs in steps of 4, 4 and 1 (the short step's second worker runs a padding micro-batch), FSDP2 over
    2 CPU workers that build the model on the meta device and read their shards (the new head drawn from the seed
    in each): the same losses, metrics, held-out figures and weights as one process. With LoRA the head is PEFT's
    trained copy, read from the same draw."""
    from test_distributed import assert_close_runs, cli

    extra = {"model": {"lora": {"rank": 4, "alpha": 8}}} if lora else {}
    main = {"buffer": {"total_epochs": 2, "trainer_input": {"eval_fraction": 0.25, "experience_buffer": {
        "path": str(rm_data), "format": {"prompt_type": "plaintext"}}}}, **extra}
    config = rm_config(make_config, rm_data, main={**main, "trainer": {"save_interval": 2, "eval_interval": 3,
                                                                        "seed": SEED}})
    one = train.run(load_config(config, ["name=one"]))
    proc = cli(config, "cluster.gpu_per_node=2", "name=two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "whole in every process" not in proc.stderr  # each worker read only its shards
    assert [r["pairs"] for r in records(one.parent / "two") if "pairs" in r] == [4, 4, 1] * 2
    files = ("adapter_model.safetensors", "merged/model.safetensors") if lora else ("model.safetensors",)
    assert_close_runs(one, one.parent / "two", 6, files=files)


def test_a_reward_model_stage_before_a_policy_stage_is_one_line(make_config):
    """A reward model's checkpoint is a sequence classifier: no later DPO or SFT stage can start from it."""
    import yaml

    from trinity_dpo.config.stages import load_stages

    path = make_config()
    cfg = yaml.safe_load(path.read_text())
    cfg["stages"] = [{"stage_name": "rm", "algorithm": {"algorithm_type": "reward_model"}}, {"stage_name": "dpo"}]
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError) as e:
        load_stages(path)
    assert "stage rm trains a reward model (a sequence classifier), which stage dpo cannot start from" in str(e.value)
    assert "\n" not in str(e.value)
    cfg["stages"] = cfg["stages"][::-1]  # DPO, then a reward model on its result: fine
    path.write_text(yaml.safe_dump(cfg))
    assert [s.cfg.algorithm.algorithm_type for s in load_stages(path)] == ["dpo", "reward_model"]
