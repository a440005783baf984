"""`stages:` (Trinity's multi-stage runs): SFT then DPO in one command, each stage's config as Trinity builds it,
a restart that skips finished stages, and every stage's config checked before any stage runs."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import _deep_update
from test_resume import records
from trinity_dpo import cli
from trinity_dpo.config.loader import config_for_eval, load_config
from trinity_dpo.config.stages import load_stages
from trinity_dpo.errors import ConfigError
from trinity_dpo.run import checkpoint, train
from trinity_dpo.run.stages import run_stages


def sft_rows(n=12):
    return [{"messages": [{"role": "user", "content": f"hi there {i}"},
                          {"role": "assistant", "content": "hello friend " * (i % 3 + 1)}]} for i in range(n)]


@pytest.fixture()
def staged(make_config, tmp_path):
    """A config in Trinity's shape: the global config is DPO (24 pairs, batch 8: 3 steps); stage `sft` replaces
    algorithm, buffer and trainer (12 rows, batch 4: 3 steps); stage `dpo` gives nothing, so it is the global."""

    def make(stages=None, main=None):
        base = {"trainer": {"eval_samples": 0, "save_interval": 1}}
        _deep_update(base, main or {})
        path = make_config(main=base)
        data = path.parent / "sft.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in sft_rows()))
        sft = {"stage_name": "sft", "mode": "train", "algorithm": {"algorithm_type": "sft"},
               "buffer": {"batch_size": 4, "total_epochs": 1, "trainer_input": {"experience_buffer": {
                   "name": "sft_warmup_dataset", "path": str(data),
                   "format": {"prompt_type": "messages", "messages_key": "messages"}}}},
               "trainer": {"trainer_config_path": "train_dpo.yaml", "precision": "fp32", "eval_samples": 0}}
        cfg = yaml.safe_load(path.read_text())
        cfg["stages"] = stages if stages is not None else [sft, {"stage_name": "dpo"}]
        path.write_text(yaml.safe_dump(cfg))
        return path

    return make


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sft_then_dpo_in_one_command(staged, tmp_path, qwen_dir):
    """Both stages run in order; the DPO stage starts from the SFT stage's last checkpoint, which is also its
    reference: its first step's loss is ln 2 (the SFT weights moved away from the base model)."""
    config = staged()
    assert cli.main(["run", "--config", str(config)]) == 0
    root = tmp_path / "ckpt" / "proj" / "run"
    sft_final = root / "sft" / "global_step_3"
    # `trinity eval --config` compares the last stage with its own reference (it took the base model before).
    from trinity_dpo.config.stages import load_stages
    from trinity_dpo.errors import RunFolderError
    from trinity_dpo.run.stages import eval_reference

    assert eval_reference(load_stages(config)) == str(sft_final.resolve())
    ledger = (root / "stages.json").read_text()
    (root / "stages.json").unlink()
    with pytest.raises(RunFolderError, match="stage sft has not finished, so the last stage's reference"):
        eval_reference(load_stages(config))
    (root / "stages.json").write_text(ledger)
    assert checkpoint.final_of(root / "sft") == sft_final and checkpoint.final_of(root / "dpo") is not None
    assert json.loads((root / "stages.json").read_text())["finished"] == [
        {"stage_name": "sft", "checkpoint": str(sft_final.resolve())},
        {"stage_name": "dpo", "checkpoint": str((root / "dpo" / "global_step_3").resolve())}]
    dpo_config = yaml.safe_load((root / "dpo" / "config.yaml").read_text())
    assert dpo_config["model"]["model_path"] == str(sft_final.resolve()) and dpo_config["name"] == "run/dpo"
    first = records(root / "dpo")[0]
    assert abs(first["loss"] - math.log(2)) < 1e-6 and first["rewards/margins"] == 0.0
    assert "ppl" in records(root / "sft")[0]  # the SFT stage trained SFT
    # The hand-off holds the SFT stage's fp32 weights, which are not the base model's.
    trained, base = load_file(str(sft_final / "model.safetensors")), load_file(str(qwen_dir / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in trained.values())
    assert any(not torch.equal(trained[k], base[k]) for k in base)


@pytest.mark.slow
def test_killed_in_the_dpo_stage_resumes_it_and_never_redoes_the_sft_stage(staged, monkeypatch, tmp_path):
    """Killed inside the DPO stage's second step (its first checkpoint written), the same command skips the
    finished SFT stage (its folder untouched, no step of it taken again) and resumes the DPO stage, which then
    equals a run never interrupted."""
    whole = run_stages(load_stages(staged(main={"name": "whole"})))
    real_step, calls = train.train_step, []

    def counting(*args, kill_at=None, **kwargs):
        calls.append(1)
        if len(calls) == kill_at:
            raise KeyboardInterrupt("simulated kill")
        return real_step(*args, **kwargs)

    config = staged(main={"name": "killed"})
    monkeypatch.setattr(train, "train_step", lambda *a, **k: counting(*a, kill_at=5, **k))  # SFT 3 steps, DPO's 2nd
    with pytest.raises(KeyboardInterrupt):
        run_stages(load_stages(config))
    root = tmp_path / "ckpt" / "proj" / "killed"
    assert [r["stage_name"] for r in json.loads((root / "stages.json").read_text())["finished"]] == ["sft"]
    assert checkpoint.latest(root / "dpo").name == "global_step_1"
    before = _snapshot(root / "sft")
    calls.clear()
    monkeypatch.setattr(train, "train_step", lambda *a, **k: counting(*a, **k))
    assert run_stages(load_stages(config)) == root / "dpo"
    assert len(calls) == 2  # the DPO stage's steps 2 and 3, nothing of the SFT stage
    assert _snapshot(root / "sft") == before
    assert records(root / "dpo") == records(whole.parent / "dpo")
    assert [r["stage_name"] for r in json.loads((root / "stages.json").read_text())["finished"]] == ["sft", "dpo"]
    calls.clear()
    run_stages(load_stages(config))  # everything finished: nothing runs again
    assert not calls


def test_each_stage_config_is_the_global_with_the_stages_sections_replaced_whole(staged):
    """As Trinity's Config.__iter__: a section a stage gives replaces the global one whole (its other fields take
    their defaults, the global trainer file included); a section it leaves out is the global one. Overrides:
    `stages.N.key=value` changes stage N; any other applies to every stage after its sections replaced the global."""
    sft = yaml.safe_load(staged().read_text())["stages"][0]
    path = staged(stages=[sft, {"stage_name": "dpo"}, {"stage_name": "more", "trainer": {"eval_samples": 0}}],
                  main={"trainer": {"grad_clip": 0.5, "save_hf_checkpoint": "never"}})
    sft, dpo, more = load_stages(path, ["stages.0.trainer.total_steps=2", "trainer.seed=7"])
    assert [(s.name, s.cfg.name) for s in (sft, dpo, more)] == [("sft", "run/sft"), ("dpo", "run/dpo"),
                                                                 ("more", "run/more")]
    assert sft.cfg.algorithm.algorithm_type == "sft" and dpo.cfg.algorithm.algorithm_type == "dpo"
    assert (sft.cfg.trainer.grad_clip, dpo.cfg.trainer.grad_clip, more.cfg.trainer.grad_clip) == (1.0, 0.5, 1.0)
    micro = [s.cfg.trainer.trainer_config.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu
             for s in (sft, dpo, more)]
    assert micro == [4, 4, None]  # `more` gave a trainer section without the trainer file
    assert sft.cfg.algorithm.optimizer.lr == 1e-3  # the trainer file's, under a replaced algorithm section
    assert (sft.cfg.trainer.total_steps, dpo.cfg.trainer.total_steps) == (2, None)
    assert sft.cfg.trainer.seed == dpo.cfg.trainer.seed == more.cfg.trainer.seed == 7
    # Each stage starts from the previous one's last checkpoint: its Hugging Face folder, in full precision.
    assert [s.cfg.trainer.save_hf_checkpoint for s in (sft, dpo, more)] == ["always", "last", "always"]
    assert [s.cfg.trainer.save_dtype for s in (sft, dpo, more)] == ["float32", "float32", "auto"]
    assert config_for_eval(str(path), None, None, []).name == "run/more"  # the last stage's data
    with pytest.raises(ConfigError, match="has stages: each stage is a run of its own"):
        load_config(path)


def _sft_stage(**extra):
    return {"stage_name": "sft", "algorithm": {"algorithm_type": "sft"}, **extra}


BAD_STAGES = [
    ({"stage_name": "x"}, "stages: expected a list of stages"),
    (["sft"], "stages[0]: expected a mapping"),
    ([{"algorithm": {"algorithm_type": "sft"}}], "stages[0].stage_name is required"),
    ([{"stage_name": "a/b"}], "stages[0].stage_name: 'a/b' must be a folder name"),
    ([{"stage_name": "a"}, {"stage_name": "a"}], "stages[1].stage_name: 'a' is also stages[0]'s"),
    ([{"stage_name": "a", "model": {"model_path": "x"}}], "unknown key 'stages[0].model'; a stage sets stage_name"),
    ([{"stage_name": "a"}, {"stage_name": "b", "trainer": {"save_interval": -1}}],
     "stages[1].trainer.save_interval must be >= 0, got -1"),
    ([{"stage_name": "a", "buffer": {"batch_sise": 4}}],
     "unknown key 'stages[0].buffer.batch_sise'; did you mean 'stages[0].buffer.batch_size'?"),
    ([{"stage_name": "a", "mode": "both"}], "stages[0].mode: 'both' is not one of 'train'"),
    ([{"stage_name": "a", "trainer": {"resume_from_path": "/x"}}, {"stage_name": "b"}],
     "trainer.resume_from_path"),
]


@pytest.mark.parametrize("stages,message", BAD_STAGES)
def test_a_bad_stage_stops_the_command_before_any_stage_runs(staged, tmp_path, capsys, stages, message):
    path = staged(stages=stages)
    with pytest.raises(ConfigError) as err:
        load_stages(path)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert cli.main(["run", "--config", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()  # no stage started


def test_an_error_in_what_a_stage_takes_from_the_global_config_names_the_stage(staged):
    path = staged(stages=[_sft_stage(trainer={"eval_samples": 0}), {"stage_name": "dpo"}],
                  main={"trainer": {"grad_clip": -1.0}})
    with pytest.raises(ConfigError, match=r"^stages\[1\] \(dpo\), from the global config: trainer.grad_clip must be"):
        load_stages(path)


def test_lora_stages_hand_over_the_merged_model(staged):
    path = staged(stages=[_sft_stage(), {"stage_name": "dpo"}],
                  main={"model": {"lora": {"rank": 4, "save_merged": "never"}}})
    with pytest.raises(ConfigError, match="model.lora.save_merged: never leaves stage sft without a whole model"):
        load_stages(path)


@pytest.mark.slow
def test_two_worker_processes_run_each_stage_once_in_one_process_group(staged, tmp_path):
    """`cluster.gpu_per_node: 2` on CPU: the command starts two workers, each runs both stages (one process group
    for both), and the result equals one process's."""
    import subprocess
    import sys

    micro = "trainer.trainer_config.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"
    path = staged()
    one = run_stages(load_stages(path, [micro, "name=one"]))
    proc = subprocess.run([sys.executable, "-m", "trinity_dpo.cli", "run", "--config", str(path), micro, "name=two",
                           "cluster.gpu_per_node=2"], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "ckpt" / "proj" / "two"
    assert [r["stage_name"] for r in json.loads((two / "stages.json").read_text())["finished"]] == ["sft", "dpo"]
    for stage in ("sft", "dpo"):
        ours, theirs = records(two / stage), records(one.parent / stage)
        assert [r["step"] for r in ours] == [1, 2, 3]  # each step once: no stage ran twice
        for a, b in zip(ours, theirs):
            assert all(abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(b[k])) for k in b), (stage, a, b)


def test_a_signal_after_a_stage_stops_before_the_next(staged, tmp_path, monkeypatch, caplog):
    """SIGTERM while the first stage writes its answers and report, after its last step: the next stage trains no
    step (a fresh handler per stage forgot the signal and trained it to its end); exit 0, and the same command goes
    on with it. Every process checks together, before the stage's first step."""
    import os
    import signal

    from trinity_dpo.run import train

    real = train._finish

    def finish(*args, **kwargs):
        real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train, "_finish", finish)
    config = staged()
    with caplog.at_level("WARNING"):
        assert cli.main(["run", "--config", str(config)]) == 0
    root = tmp_path / "ckpt" / "proj" / "run"
    assert "stopped by SIGTERM before step 1; run the same command again to resume" in caplog.text
    assert checkpoint.final_of(root / "sft") is not None and not list((root / "dpo").glob("global_step_*"))
