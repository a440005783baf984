"""End-to-end runs on tiny models: the document's YAML, golden step-1 loss, micro-batching, determinism."""
from __future__ import annotations

import json
import logging
import math
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from trinity_dpo.data import dataset
from trinity_dpo.run import train
from trinity_dpo.data.batching import step_indices
from trinity_dpo.errors import ConfigError, DataError, RunFolderError
from trinity_dpo.config.loader import load_config
from trinity_dpo.engine.modeling import load_model

from test_config import doc_config
from tiny import write_pairs
from conftest import REPO

TRL_NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected", "grad_norm", "lr", "tokens_per_s", "step_time_s")


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir, step):
    return load_file(str(run_dir / f"global_step_{step}" / "model.safetensors"))


def test_document_yaml_end_to_end(tmp_path, llama_dir, pairs_file):
    """The document's dpo.yaml with only paths changed, plus the overrides a CPU run needs; checkpoints reload."""
    trainer_file = tmp_path / "train_dpo.yaml"
    trainer_file.write_text((REPO / "examples/dpo_humanlike/train_dpo.yaml").read_text())
    path = doc_config(tmp_path, llama_dir, pairs_file, trainer_file)
    cfg = load_config(path, ["cluster.gpu_per_node=1", "buffer.batch_size=8", "trainer.save_interval=2",
                             "algorithm.optimizer.lr=1e-3"])
    run_dir = train.run(cfg)
    assert run_dir == tmp_path / "ckpt" / "<project_name>" / "<experiment_name>"
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 7))  # ceil(24 / 8) * 2 epochs
    assert all(name in rows[0] for name in TRL_NAMES)
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-6 and rows[0]["rewards/margins"] == 0.0
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert sorted(p.name for p in run_dir.glob("global_step_*")) == [
        "global_step_2", "global_step_4", "global_step_6"]
    ckpt = run_dir / "global_step_6"
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.chat_template and (ckpt / "generation_config.json").is_file()
    original = AutoModelForCausalLM.from_pretrained(llama_dir)
    assert not torch.equal(model.lm_head.weight, original.lm_head.weight)  # trained, and saved
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["buffer"]["train_batch_size"] == 8 and saved["algorithm"]["policy_loss_fn_args"]["beta"] == 0.1


# Objectives whose terms are token means over the whole step (sft, CPO's and ORPO's NLL, the token metrics) or
# that read extra statistics (LD-DPO's shared part, WPO's weights, ORPO's prompt log-probs).
MICRO_OBJECTIVES = {
    "dpo": {},
    "mpo_ld": {"policy_loss_fn_args": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "ld_alpha": 0.5}},
    "wpo_ipo": {"policy_loss_fn_args": {"loss_type": ["ipo", "bco_pair"], "use_weighting": True}},
    "cpo": {"policy_loss_fn": "cpo"},
    "orpo": {"policy_loss_fn": "orpo"},
}


@pytest.mark.parametrize("objective", sorted(MICRO_OBJECTIVES))
def test_micro_batched_step_equals_full_batch_step(make_config, tmp_path, objective):
    runs = {}
    for micro in (8, 2):
        path = make_config(main={"name": f"micro{micro}", "trainer": {"total_steps": 2},
                                 "algorithm": MICRO_OBJECTIVES[objective]},
                           verl={"actor_rollout_ref": {"actor": {"ppo_micro_batch_size_per_gpu": micro}}})
        runs[micro] = train.run(load_config(path))
    full, micro = metrics(runs[8]), metrics(runs[2])
    assert full[0]["loss"] != pytest.approx(full[1]["loss"])
    for a, b in zip(full, micro):
        assert a.keys() == b.keys()
        for key in a.keys() - {"tokens_per_s", "step_time_s", "pad_share", "positions"}:
            assert abs(a[key] - b[key]) < 1e-5 * max(1.0, abs(a[key])), key
    wa, wb = weights(runs[8], 2), weights(runs[2], 2)
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < 1e-5, worst  # Adam divides by the gradient scale: rounding of near-zero gradients shows


def test_shared_prompt_run_equals_unshared(make_config, monkeypatch):
    """`trainer.share_prompt` (on by default) computes fewer positions and changes no number beyond float
    rounding; pad_share counts pads among computed positions, so it stays 0 rather than going negative."""
    runs, positions = {}, {True: 0, False: 0}
    collate = train.collate

    def counting(*args, **kwargs):
        mb = collate(*args, **kwargs)
        positions[share] += mb.n_real
        return mb

    monkeypatch.setattr(train, "collate", counting)
    for share in (True, False):
        path = make_config(main={"name": f"share{share}", "trainer": {"total_steps": 2, "share_prompt": share}})
        runs[share] = metrics(train.run(load_config(path)))
    for a, b in zip(runs[True], runs[False]):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
            assert abs(a[key] - b[key]) < 1e-5, key
        assert a["tokens"] == b["tokens"] and a["pad_share"] == 0 and b["pad_share"] == 0
    assert positions[True] < positions[False] == sum(r["tokens"] for r in runs[False])
    assert runs[True][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_same_config_same_numbers_and_epoch_reshuffle(make_config):
    results = []
    for name in ("a", "b"):
        run_dir = train.run(load_config(make_config(main={"name": name, "buffer": {"total_epochs": 2}})))
        results.append([{k: v for k, v in r.items() if k not in ("tokens_per_s", "step_time_s")}
                        for r in metrics(run_dir)])
    assert results[0] == results[1]
    first = [i for s in range(3) for i in step_indices(s, 24, 8, seed=42)[1]]
    second = [i for s in range(3, 6) for i in step_indices(s, 24, 8, seed=42)[1]]
    assert sorted(first) == sorted(second) == list(range(24)) and first != second
    assert step_indices(0, 24, 8, seed=1)[1] != step_indices(0, 24, 8, seed=42)[1]


def test_schedule_over_the_run(make_config):
    """total = ceil(24 / 8) * 2 = 6 steps; warmup int(0.34 * 6) = 2; cosine to 0.1 * lr."""
    path = make_config(main={"buffer": {"total_epochs": 2}}, verl={"actor_rollout_ref": {"actor": {"optim": {
        "lr": 1e-3, "lr_warmup_steps_ratio": 0.34, "warmup_style": "cosine", "min_lr_ratio": 0.1}}}})
    lrs = [r["lr"] for r in metrics(train.run(load_config(path)))]
    expected = [0.0, 0.5e-3] + [1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * k / 4))) for k in range(4)]
    assert lrs == pytest.approx(expected)


def test_gradient_checkpointing_and_bf16(make_config):
    base = metrics(train.run(load_config(make_config(main={"name": "plain", "trainer": {"total_steps": 2}}))))
    ckpt = metrics(train.run(load_config(make_config(
        main={"name": "gc", "trainer": {"total_steps": 2}},
        verl={"actor_rollout_ref": {"model": {"enable_gradient_checkpointing": True}}}))))
    assert [r["loss"] for r in ckpt] == pytest.approx([r["loss"] for r in base], abs=1e-6)
    cfg = load_config(make_config(verl={"actor_rollout_ref": {"model": {"enable_gradient_checkpointing": True}}}))
    assert load_model(cfg, torch.device("cpu"))[0].is_activation_checkpointing  # the switch really took
    # Selective checkpointing: layers 0, 2, 4, ... recompute, the others keep their activations; same numbers.
    every = {"actor_rollout_ref": {"model": {"enable_gradient_checkpointing": True, "gradient_checkpointing_every": 2}}}
    layers = load_model(load_config(make_config(verl=every)), torch.device("cpu"))[0].model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [i % 2 == 0 for i in range(len(layers))]
    assert len(layers) >= 2
    half = metrics(train.run(load_config(make_config(main={"name": "gc2", "trainer": {"total_steps": 2}}, verl=every))))
    assert [r["loss"] for r in half] == pytest.approx([r["loss"] for r in base], abs=1e-6)
    bf16 = metrics(train.run(load_config(make_config(main={"name": "bf16", "trainer": {"total_steps": 2,
                                                                                       "precision": "bf16"}}))))
    # The reference pass ran the very micro-batches of step 1: policy and reference agree to the bit in bf16 too.
    assert bf16[0]["rewards/margins"] == 0.0 and bf16[0]["rewards/accuracies"] == 0.0
    assert abs(bf16[0]["loss"] - math.log(2)) < 1e-7
    assert bf16[1]["loss"] == pytest.approx(base[1]["loss"], abs=0.05)


def test_user_errors_before_training(make_config, tmp_path):
    train.run(load_config(make_config(main={"trainer": {"total_steps": 1}})))
    with pytest.raises(RunFolderError, match="is not empty and trainer.resume_mode is 'disable': choose a new `name`"):
        train.run(load_config(make_config(main={"trainer": {"total_steps": 1, "resume_mode": "disable"}})))
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps([{"prompt": "q", "chosen": "same", "rejected": "same"}]))
    with pytest.raises(DataError, match="no usable preference pairs"):
        train.run(load_config(make_config(main={"name": "empty"}, data=empty)))


@pytest.mark.slow
def test_cli_user_error_is_one_line_exit_2(make_config, tmp_path):
    path = make_config(main={"buffer": {"batch_sise": 3}})
    proc = subprocess.run([sys.executable, "-m", "trinity_dpo.cli", "run", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "trinity: error: unknown key 'buffer.batch_sise'; did you mean 'buffer.batch_size'?")


@pytest.mark.slow
def test_cli_runs(make_config):
    path = make_config(main={"trainer": {"total_steps": 2}})
    proc = subprocess.run([sys.executable, "-m", "trinity_dpo.cli", "run", "--config", str(path), "name=cli"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "step 2/2" in proc.stderr and proc.stdout.startswith("run folder: ")


def test_document_yaml_with_trinity_trainer_file(tmp_path, qwen_dir, caplog):
    """Trinity's published train_dpo.yaml (truncation: error, max_response_length 256, 783 steps, gradient
    checkpointing, micro 2) beside the document's total_epochs: 2, on 17 pairs in batches of 8. As in Trinity 0.3+
    the run is 2 epochs of 3 steps, not 783, and says so; a response over max_response_length is kept whole, not
    refused nor cut."""
    from test_config import DATA

    data = write_pairs(tmp_path / "pairs.json", n=17)
    rows = json.loads(data.read_text())
    rows[0]["chosen"] = "oh totally! " + "pizza is awesome and I love it so much " * 40
    data.write_text(json.dumps(rows))
    path = doc_config(tmp_path, qwen_dir, data, DATA / "trinity_train_dpo.yaml")
    with caplog.at_level(logging.INFO):
        run_dir = train.run(load_config(path, ["cluster.gpu_per_node=1", "buffer.batch_size=8"]))
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and abs(rows[0]["loss"] - math.log(2)) < 1e-6
    assert ("17 pairs, batch 8: 6 optimizer steps (buffer.total_epochs=2 x 3 steps per epoch; not applied (Trinity "
            "0.3+ replaces them with this count): trainer file trainer.total_training_steps=783, trainer file "
            "actor_rollout_ref.actor.optim.total_training_steps=783)") in caplog.text
    summary = json.loads((run_dir / "data_summary.json").read_text())["train"]
    assert summary["kept"] == 17 and summary["kept_whole"] == {"response over data.max_response_length": 1}


def test_chatpair_and_custom_template_end_to_end(make_config, tmp_path):
    u = {"role": "user", "content": "what about pizza?"}
    rows = [{"chosen": [u, {"role": "assistant", "content": f"oh pizza is awesome {i}!"}],
             "rejected": [u, {"role": "assistant", "content": "as an ai I do not eat."}]} for i in range(8)]
    data = tmp_path / "chat.json"
    data.write_text(json.dumps(rows))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    path = make_config(main={"model": {"custom_chat_template": template}, "trainer": {"total_steps": 1},
                             "buffer": {"trainer_input": {"experience_buffer": {
                                 "format": {"prompt_type": "chatpair"}}}}}, data=data)
    run_dir = train.run(load_config(path))
    assert metrics(run_dir)[0]["pairs"] == 8
    assert AutoTokenizer.from_pretrained(run_dir / "global_step_1").chat_template == template


def test_reference_cache_equals_on_the_fly_and_is_reused(make_config, monkeypatch, caplog):
    import logging

    from trinity_dpo.objective import reference
    from trinity_dpo.engine.attention import use_varlen
    from trinity_dpo.data.batching import collate
    from trinity_dpo.engine.logprobs import sequence_logps

    path = make_config(main={"name": "first", "trainer": {"total_steps": 2}})
    run_dir = train.run(load_config(path))
    [cache] = list((run_dir / "ref_cache").glob("train-*.pt"))
    table = torch.load(cache, weights_only=True)["tables"]["logps"]
    # On the fly: the untouched model scoring each used pair alone, padded, as a separate reference would.
    cfg = load_config(path)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.model_path, dtype=torch.float32)
    use_varlen(model)
    tok = AutoTokenizer.from_pretrained(cfg.model.model_path)
    data = dataset.load_data(cfg, tok)
    used = [i for i in range(len(data.train)) if not torch.isnan(table[i, 0])]
    assert len(used) == 16  # two steps of 8 pairs
    with torch.no_grad():
        for i in used:
            logps = sequence_logps(model, collate([data.train[i]], tok.pad_token_id, pack=False), torch.autocast(
                "cpu", enabled=False))
            assert torch.allclose(table[i], logps, atol=1e-5)

    calls = []
    monkeypatch.setattr(reference, "score", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(AssertionError))
    with caplog.at_level(logging.INFO):
        second = train.run(load_config(make_config(main={"name": "second", "trainer": {"total_steps": 2}})))
    assert not calls and "reused from" in caplog.text
    assert metrics(second) and (second / "ref_cache" / cache.name).is_file()
    assert [r["loss"] for r in metrics(second)] == [r["loss"] for r in metrics(run_dir)]


def test_objective_without_reference_runs_no_reference_pass(make_config, monkeypatch):
    """An objective declaring needs_reference=False gets no reference pass and no reference cache; its loss (here
    the chosen responses' mean token NLL) trains, and held-out evaluation runs on the policy alone."""
    from trinity_dpo.data.batching import by_slot
    from trinity_dpo.objective.objectives import Objective

    def nll(policy, reference, totals):
        assert reference is None and totals["examples"] in (8, 6)  # a step of 8 pairs, or the 6 held-out pairs
        chosen, _ = by_slot(policy["logps"] / policy["tokens"], 2)
        return -chosen, {"logps/chosen": chosen.detach()}

    objective = Objective("nll", 2, False, ("logps", "tokens"), (), ("logps/chosen",), nll)
    monkeypatch.setattr(train, "build_objective", lambda algorithm, terms=True, held_out=False: objective)
    calls = []
    monkeypatch.setattr(train, "cached_score", lambda *a, **k: calls.append(1))
    run_dir = train.run(load_config(make_config(main={"buffer": {"trainer_input": {"eval_fraction": 0.25}},
                                                      "trainer": {"total_steps": 2, "eval_samples": 0}})))
    assert not calls and not (run_dir / "ref_cache").exists()
    rows = [r for r in metrics(run_dir) if "loss" in r]
    assert rows[1]["loss"] < rows[0]["loss"] and set(rows[0]) >= {"loss", "logps/chosen"}
    evals = [r for r in metrics(run_dir) if "eval/loss" in r]
    assert [e["step"] for e in evals] == [0, 2] and evals[1]["eval/loss"] < evals[0]["eval/loss"]
