"""Never lose a run: exact resume after a crash or SIGKILL, atomic checkpoints, clean stops, numeric faults."""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from trinity_dpo.run import checkpoint, train
from trinity_dpo.objective import losses
from trinity_dpo.errors import ConfigError, DataError
from trinity_dpo.config.loader import load_config

TIMING = ("tokens_per_s", "step_time_s")


def records(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir, step):
    return load_file(str(run_dir / f"global_step_{step}" / "model.safetensors"))


def assert_same_run(a, b, step):
    assert records(a) == records(b)
    wa, wb = final_weights(a, step), final_weights(b, step)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # bitwise


def run_killed_in_step(config, step: int, monkeypatch) -> None:
    """Run `config` until a simulated kill inside the `step`-th optimizer step this run takes."""
    real_step, calls = train.train_step, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt("simulated kill")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        train.run(load_config(config))
    monkeypatch.setattr(train, "train_step", real_step)


@pytest.fixture()
def six_steps(make_config):
    """A 6-step run (24 pairs, batch 8, 2 epochs) with checkpoints every 2 steps and held-out evals."""
    def make(name, **trainer):
        return make_config(main={"name": name, "buffer": {"total_epochs": 2, "trainer_input": {"eval_fraction": 0.25}},
                                 "trainer": {"save_interval": 2, "eval_interval": 3, "eval_samples": 1,
                                             "eval_max_new_tokens": 4, **trainer}})
    return make


@pytest.mark.slow
def test_crash_mid_run_then_resume_equals_uninterrupted(six_steps, monkeypatch):
    whole = train.run(load_config(six_steps("whole")))
    # dies inside step 4: the newest checkpoint is step 2, metrics has steps 1-3
    run_killed_in_step(six_steps("crashed"), 4, monkeypatch)
    run_dir = whole.parent / "crashed"
    assert checkpoint.latest(run_dir).name == "global_step_2"
    assert max(json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    train.run(load_config(six_steps("crashed")))
    assert_same_run(whole, run_dir, 6)
    assert json.loads((run_dir / "samples.json").read_text()) == json.loads((whole / "samples.json").read_text())


def _cli(config, *extra):
    return [sys.executable, "-m", "trinity_dpo.cli", "run", "--config", str(config), *extra]


def _wait_for_lines(path, n, proc, timeout=120):
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_sigkill_at_any_moment_then_same_command(make_config):
    def config(name):
        return make_config(main={"name": name, "buffer": {"total_epochs": 20},
                                 "trainer": {"save_interval": 7, "eval_samples": 0}})

    whole = train.run(load_config(config("whole")))
    run_dir = whole.parent / "killed"
    for lines in (9, 23):  # twice: once mid-run, once again after resuming
        proc = subprocess.Popen(_cli(config("killed")), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_lines(run_dir / "metrics.jsonl", lines, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = subprocess.run(_cli(config("killed")), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert_same_run(whole, run_dir, 60)


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_exits_0(make_config):
    config = make_config(main={"name": "stopped", "buffer": {"total_epochs": 40},
                               "trainer": {"save_interval": 0, "eval_samples": 0}})
    run_dir = config.parent / "ckpt" / "proj" / "stopped"
    proc = subprocess.Popen(_cli(config), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for_lines(run_dir / "metrics.jsonl", 5, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "run the same command again to resume" in err
    saved = checkpoint.latest(run_dir)
    assert saved is not None and int(saved.name[12:]) == len(records(run_dir)) < 120


def test_failed_checkpoint_write_keeps_the_previous_one(six_steps, monkeypatch):
    real_write, calls = checkpoint._write, []

    def disk_full(tmp, *args):
        calls.append(1)
        if len(calls) == 2:  # the second save (step 4) runs out of space half-way
            (tmp / "trainer_state").mkdir(parents=True)
            (tmp / "config.json").write_text("{")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(tmp, *args)

    monkeypatch.setattr(checkpoint, "_write", disk_full)
    with pytest.raises(checkpoint.CheckpointError, match=r"saving checkpoint 4 .* failed \(No space left on device\); "
                                                         r"the previous checkpoint global_step_2 is intact"):
        train.run(load_config(six_steps("full")))
    run_dir = load_config(six_steps("full")).checkpoint_root_dir
    folder = next(p for p in __import__("pathlib").Path(run_dir).glob("*/full"))
    assert not list(folder.glob(".tmp_*")) and checkpoint.latest(folder).name == "global_step_2"
    (folder / ".tmp_global_step_4").mkdir()  # what a SIGKILL during a write leaves
    monkeypatch.setattr(checkpoint, "_write", real_write)
    train.run(load_config(six_steps("full")))
    assert not list(folder.glob(".tmp_*")) and checkpoint.latest(folder).name == "global_step_6"


@pytest.mark.slow
def test_keep_newest_checkpoints_but_never_the_resumed_one(six_steps):
    run_dir = train.run(load_config(six_steps("keep", total_steps=4, max_actor_ckpt_to_keep=1)))
    assert sorted(p.name for p in run_dir.glob("global_step_*")) == ["global_step_4"]
    train.run(load_config(six_steps("keep", max_actor_ckpt_to_keep=1)))  # resumes from 4, runs to 6
    assert sorted(p.name for p in run_dir.glob("global_step_*")) == ["global_step_4", "global_step_6"]


@pytest.mark.slow
def test_resume_from_path_and_errors(six_steps):
    first = train.run(load_config(six_steps("src", total_steps=2)))
    path = first / "global_step_2"
    run_dir = train.run(load_config(six_steps("from_path", resume_from_path=str(path))))
    steps = [r["step"] for r in records(run_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # the source run's history up to its checkpoint, then this run's steps
    assert records(run_dir)[:3] == records(first)[:3]
    with pytest.raises(ConfigError, match="is not a checkpoint folder of this tool"):
        load_config(six_steps("x", resume_from_path=str(first)))
    with pytest.raises(ConfigError, match="resume_mode is 'resume_path' but trainer.resume_from_path is not set"):
        load_config(six_steps("x", resume_mode="resume_path"))


def test_non_finite_steps_are_skipped_and_counted_then_abort(six_steps, monkeypatch):
    real, real_step, current = losses.dpo_loss, train.train_step, {"step": 0}

    def counting(*args, **kwargs):
        current["step"] += 1
        return real_step(*args, **kwargs)

    def sometimes_nan(*args):
        out = real(*args)
        return out * float("nan") if current["step"] == 2 else out

    monkeypatch.setattr(train, "train_step", counting)
    monkeypatch.setattr(losses, "dpo_loss", sometimes_nan)
    run_dir = train.run(load_config(six_steps("nan", total_steps=2, save_interval=1)))
    rows = [r for r in records(run_dir) if "loss" in r]
    assert [r["skipped"] for r in rows] == [0, 1] and rows[1]["skipped_steps"] == 1 and math.isnan(rows[1]["loss"])
    w1, w2 = final_weights(run_dir, 1), final_weights(run_dir, 2)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # the skipped step left the weights untouched

    monkeypatch.setattr(losses, "dpo_loss", lambda *a: real(*a) * float("nan"))
    with pytest.raises(train.NumericError, match="2 optimizer steps in a row had a non-finite loss"):
        train.run(load_config(six_steps("diverge", max_consecutive_skips=2)))


def test_fail_fast_unwritable_root_and_rows_not_matching_prompt_type(make_config, monkeypatch, tmp_path):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if mode == os.W_OK else real_access(p, mode))
    with pytest.raises(ConfigError, match=r"checkpoint_root_dir: .* is not writable"):
        load_config(make_config())
    monkeypatch.setattr(os, "access", real_access)
    # A plaintext file read as prompt_type messages: every row is skipped, and the run stops before training.
    path = make_config(main={"buffer": {"trainer_input": {"experience_buffer": {"format": {"prompt_type": "messages"}}}}})
    with pytest.raises(DataError, match=r"no usable preference pairs .*dropped: 24 'prompt' not messages"):
        train.run(load_config(path))


def test_security_defaults():
    from trinity_dpo.config.schema import Config

    assert Config().model.trust_remote_code is False


@pytest.mark.slow
def test_resume_is_exact_when_checkpoints_store_bf16(make_config, qwen_dir, tmp_path, monkeypatch):
    """A model folder that declares bf16 gets bf16 HF checkpoints under bf16 compute, its config.json saying bf16,
    the tied LM head stored once (as the embedding) through the cast; resuming must use the fp32 master copy."""
    from trinity_dpo.engine.modeling import stored_dtype

    bf16_dir = _bf16_folder(qwen_dir, tmp_path)

    def cfg(name):
        return make_config(main={"name": name, "buffer": {"total_steps": 4},  # 4 steps over 3-step epochs
                                 "trainer": {"save_interval": 2, "eval_samples": 0, "save_dtype": "auto",
                                             "precision": "bf16"}},
                           model=bf16_dir)

    whole = train.run(load_config(cfg("whole")))
    stored = load_file(str(whole / "global_step_4" / "model.safetensors"))
    assert stored["model.norm.weight"].dtype == torch.bfloat16
    assert "model.embed_tokens.weight" in stored and "lm_head.weight" not in stored
    assert stored_dtype(str(whole / "global_step_4")) == torch.bfloat16  # its config.json says what it stores
    run_killed_in_step(cfg("crashed"), 3, monkeypatch)
    run_dir = train.run(load_config(cfg("crashed")))
    assert_same_run(whole, run_dir, 4)


def _bf16_folder(qwen_dir, tmp_path):
    bf16_dir = tmp_path / "bf16_model"
    shutil.copytree(qwen_dir, bf16_dir)
    config = json.loads((bf16_dir / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (bf16_dir / "config.json").write_text(json.dumps(config))
    return bf16_dir


def test_fp32_run_of_a_bf16_folder_writes_its_fp32_weights(make_config, qwen_dir, tmp_path):
    """`save_dtype: auto` under fp32 compute writes the fp32 masters, whatever the folder stores: a bf16 file
    would round away every update below bf16's resolution (the demo's checkpoint scored 0.227 held-out loss
    against the run's 0.001). The HF copy equals, bit for bit, the master weights in `trainer_state/`."""
    from trinity_dpo.engine import distributed
    from trinity_dpo.engine.modeling import load_model, stored_dtype
    from trinity_dpo.engine.optim import build_optimizer

    cfg = load_config(make_config(main={"name": "fp32", "buffer": {"total_steps": 2}, "trainer": {"eval_samples": 0}},
                                  model=_bf16_folder(qwen_dir, tmp_path)))
    assert cfg.trainer.precision == "fp32" and cfg.trainer.save_dtype == "auto"
    step = train.run(cfg) / "global_step_2"
    assert stored_dtype(str(step)) == torch.float32
    saved, _ = load_model(cfg, torch.device("cpu"), str(step))
    masters, _ = load_model(cfg, torch.device("cpu"))
    distributed.load_state(step / "trainer_state" / "dcp", masters, build_optimizer(masters, cfg.algorithm.optimizer))
    a, b = saved.state_dict(), masters.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_checkpoint_of_the_earlier_single_file_layout_still_resumes(six_steps):
    """Checkpoints from before `trainer_state/dcp/` (fp32 weights in the HF copy, the optimizer's own
    optimizer.pt) resume exactly: a run cut back to such a step 2 finishes as it first did."""
    from trinity_dpo.engine import distributed
    from trinity_dpo.engine.modeling import load_model
    from trinity_dpo.engine.optim import build_optimizer

    cfg = load_config(six_steps("legacy"))
    run_dir = train.run(cfg)
    expected, expected_weights = records(run_dir), final_weights(run_dir, 6)
    for step in (4, 6):
        shutil.rmtree(run_dir / f"global_step_{step}")
    old = run_dir / "global_step_2" / "trainer_state"
    model, _ = load_model(cfg, torch.device("cpu"), str(run_dir / "global_step_2"))
    optimizer = build_optimizer(model, cfg.algorithm.optimizer)
    distributed.load_state(old / "dcp", model, optimizer)
    torch.save(optimizer.state_dict(), old / "optimizer.pt")
    shutil.rmtree(old / "dcp")
    (old / "manifest.json").unlink()  # that layout predates manifests
    assert checkpoint.latest(run_dir).name == "global_step_2"
    train.run(load_config(six_steps("legacy")))
    assert records(run_dir) == expected
    weights = final_weights(run_dir, 6)
    assert all(torch.equal(weights[k], expected_weights[k]) for k in expected_weights)


def test_state_saved_without_zip_checksums_loads_back(tmp_path, monkeypatch):
    """DCP's records are written without their zip CRC-32 (the manifest's xxh3 checks the files), the option is
    restored afterwards, and the weights and AdamW's moments read back as they were."""
    import torch.distributed.checkpoint as dcp

    from trinity_dpo.engine import distributed

    def trained():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step()
        return model, optimizer

    seen, real_save = [], dcp.save
    monkeypatch.setattr(dcp, "save", lambda *a, **k: seen.append(torch.serialization.get_crc32_options())
                        or real_save(*a, **k))
    model, optimizer = trained()
    distributed.save_state(tmp_path / "dcp", model, optimizer)
    assert seen == [False] and torch.serialization.get_crc32_options() is True
    fresh = torch.nn.Linear(4, 3)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    fresh(torch.ones(2, 4)).sum().backward()
    fresh_optimizer.step()  # moments exist, with other values
    distributed.load_state(tmp_path / "dcp", fresh, fresh_optimizer)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    for p, q in zip(model.parameters(), fresh.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[p][key], fresh_optimizer.state[q][key])
