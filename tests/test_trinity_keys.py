"""Trinity's newer config keys, each honoured or refused in one line: checkpoints' Hugging Face weights and how many
are kept, the trainer-level token budget, the chat template file, the keys that only Trinity's rollout reads,
optimizer switches through verl's override_optimizer_config, parallelism and monitors."""
from __future__ import annotations

import logging
import os
import signal

import pytest
import torch
import yaml

from test_resume import records, run_killed_in_step
from trinity_dpo.config.loader import load_config
from trinity_dpo.engine.optim import build_optimizer
from trinity_dpo.errors import ConfigError
from trinity_dpo.run import checkpoint, train
from trinity_dpo.sources.local import localize

_ACTOR = "trainer.trainer_config.actor_rollout_ref.actor"


def _three_steps(make_config, name, **trainer):
    """24 pairs, batch 8: three steps, a checkpoint after each."""
    return make_config(main={"name": name, "trainer": {"save_interval": 1, "eval_samples": 0, **trainer}})


def _has_weights(run_dir, step):
    return (run_dir / f"global_step_{step}" / "model.safetensors").is_file()


@pytest.mark.parametrize("setting,expected", [("always", [True, True, True]), ("last", [False, False, True]),
                                              ("never", [False, False, False])])
@pytest.mark.slow
def test_save_hf_checkpoint_chooses_which_checkpoints_hold_the_weights_and_every_one_resumes(
        make_config, monkeypatch, setting, expected):
    """Trinity's periodic saves hold the HF weights only with `always`, its last save unless `never`. A checkpoint
    without them still resumes (trainer_state/ holds the fp32 masters and the optimizer), to the same run."""
    whole = train.run(load_config(_three_steps(make_config, f"whole_{setting}", save_hf_checkpoint=setting)))
    assert [_has_weights(whole, s) for s in (1, 2, 3)] == expected
    config = _three_steps(make_config, f"killed_{setting}", save_hf_checkpoint=setting)
    run_killed_in_step(config, 3, monkeypatch)  # the newest checkpoint is step 2
    run_dir = whole.parent / f"killed_{setting}"
    assert checkpoint.verify(run_dir / "global_step_2") is None
    train.run(load_config(config))
    assert records(run_dir) == records(whole)
    assert [_has_weights(run_dir, s) for s in (1, 2, 3)] == expected


def test_last_includes_the_checkpoint_a_signal_stops_at(make_config, monkeypatch):
    """Stopped by SIGINT in step 2, the run saves then: its last checkpoint, so with `last` it holds the weights."""
    real_step, calls = train.train_step, []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", interrupting)
    run_dir = train.run(load_config(_three_steps(make_config, "stopped", save_interval=0, save_hf_checkpoint="last")))
    assert checkpoint.latest(run_dir).name == "global_step_2" and _has_weights(run_dir, 2)


def test_a_checkpoint_without_weights_is_not_a_model(make_config):
    run_dir = train.run(load_config(_three_steps(make_config, "never", save_hf_checkpoint="never")))
    with pytest.raises(ConfigError, match="saved without its Hugging Face weights"):
        localize(load_config(make_config(main={"model": {"model_path": str(run_dir / "global_step_3")}})))


def test_max_checkpoints_to_keep_zero_keeps_all(make_config):
    run_dir = train.run(load_config(_three_steps(make_config, "all", max_checkpoints_to_keep=0)))
    assert sorted(p.name for p in run_dir.glob("global_step_*")) == [f"global_step_{s}" for s in (1, 2, 3)]
    verl_spelling = load_config(make_config(verl={"trainer": {"max_actor_ckpt_to_keep": 0}}))
    assert verl_spelling.trainer.max_checkpoints_to_keep == 0
    with pytest.raises(ConfigError, match="trainer.max_checkpoints_to_keep must be >= 0, got -1"):
        load_config(make_config(main={"trainer": {"max_checkpoints_to_keep": -1}}))


def test_trainer_level_token_budget_fills_the_actor_where_the_trainer_file_leaves_it_unset(make_config, caplog):
    """Trinity copies trainer.use_dynamic_bsz and max_token_len_per_gpu onto the actor only where the actor's own
    setting is unset (set_if_none): the trainer file's value wins, logged."""
    cfg = load_config(make_config(main={"trainer": {"use_dynamic_bsz": True, "max_token_len_per_gpu": 3000}}))
    actor = cfg.trainer.trainer_config.actor_rollout_ref.actor
    assert (actor.use_dynamic_bsz, actor.ppo_max_token_len_per_gpu) == (True, 3000)
    caplog.set_level(logging.INFO)
    cfg = load_config(make_config(main={"trainer": {"use_dynamic_bsz": False, "max_token_len_per_gpu": 3000}},
                                  verl={"actor_rollout_ref": {"actor": {"use_dynamic_bsz": True,
                                                                        "ppo_max_token_len_per_gpu": 5000}}}))
    actor = cfg.trainer.trainer_config.actor_rollout_ref.actor
    assert (actor.use_dynamic_bsz, actor.ppo_max_token_len_per_gpu) == (True, 5000)
    assert any(f"{_ACTOR}.ppo_max_token_len_per_gpu=5000 is used over trainer.max_token_len_per_gpu=3000"
               in r.getMessage() for r in caplog.records)


CURRENT_EXAMPLE_TRAINER = """
save_interval: 30
total_steps: 200
use_dynamic_bsz: false
max_token_len_per_gpu: 16384
ulysses_sequence_parallel_size: 1
trainer_config:
  actor_rollout_ref:
    model:
      use_remove_padding: false
    actor:
      ppo_micro_batch_size_per_gpu: 2
    ref:
      log_prob_micro_batch_size_per_gpu: 2
  trainer:
    balance_batch: false
"""  # Trinity's current dpo_humanlike and dpo_human_in_the_loop examples (yanxi-chen/Trinity-RFT@c670d0a4, @2f1e0201)


def test_the_current_examples_trainer_section(make_config):
    cfg = load_config(make_config(main={"trainer": {"trainer_config_path": None, **yaml.safe_load(
        CURRENT_EXAMPLE_TRAINER)}}))
    actor = cfg.trainer.trainer_config.actor_rollout_ref.actor
    assert (actor.use_dynamic_bsz, actor.ppo_max_token_len_per_gpu, actor.ppo_micro_batch_size_per_gpu) == (
        False, 16384, 2)
    assert (cfg.trainer.ulysses_sequence_parallel_size, cfg.trainer.total_steps) == (1, 200)


def test_chat_template_path_is_read_as_the_chat_template(make_config, tmp_path, monkeypatch):
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    (tmp_path / "chat.jinja").write_text(template)
    monkeypatch.chdir(tmp_path.parent)  # a relative path is found beside the config too
    cfg = load_config(make_config(main={"model": {"chat_template_path": "chat.jinja"}}))
    assert cfg.model.custom_chat_template == template
    inline = load_config(make_config(main={"model": {"chat_template_path": "chat.jinja",
                                                     "custom_chat_template": "{{ x }}"}}))
    assert inline.model.custom_chat_template == "{{ x }}"  # Trinity reads the file only without an inline one
    with pytest.raises(ConfigError, match="model.chat_template_path: cannot read missing.jinja"):
        load_config(make_config(main={"model": {"chat_template_path": "missing.jinja"}}))


def test_rollout_only_keys_are_accepted_and_named_as_ignored(make_config, caplog):
    """Trinity applies model.enable_prompt_truncation and format.reply_prefix only when its explorer generates;
    its SFT and DPO formatters never read them."""
    caplog.set_level(logging.INFO)
    load_config(make_config(main={"model": {"enable_prompt_truncation": True}, "buffer": {"trainer_input": {
        "experience_buffer": {"format": {"reply_prefix": "Sure"}}}}}))
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ignored")]
    assert "model.enable_prompt_truncation" in line and "format.reply_prefix" in line


@pytest.mark.parametrize("switches,fused,foreach", [(None, True, None), ({"fused": False}, False, None),
                                                   ({"foreach": True}, None, True)])
def test_override_optimizer_config_chooses_adamws_implementation(make_config, switches, fused, foreach):
    cfg = load_config(make_config(verl={"actor_rollout_ref": {"actor": {"optim": {
        "override_optimizer_config": switches}}}}))
    optimizer = build_optimizer(torch.nn.Linear(2, 2), cfg.algorithm.optimizer)
    assert (optimizer.defaults["fused"], optimizer.defaults["foreach"]) == (fused, foreach)


REFUSED = [
    (None, {"actor_rollout_ref": {"actor": {"optim": {"override_optimizer_config": {"eps": 1e-6}}}}},
     "actor.optim.override_optimizer_config.eps: not supported; AdamW's settings are algorithm.optimizer's"),
    (None, {"actor_rollout_ref": {"actor": {"optim": {"override_optimizer_config": {"fused": True, "foreach": True}}}}},
     "fused and foreach cannot both be true"),
    ({"algorithm": {"optimizer": {"fused": True}}}, None, "unknown key 'algorithm.optimizer.fused'"),
    ({"trainer": {"ulysses_sequence_parallel_size": 2}}, None, "sequence parallelism is not supported"),
    (None, {"actor_rollout_ref": {"actor": {"ulysses_sequence_parallel_size": 4}}},
     "trainer.ulysses_sequence_parallel_size (or the trainer file's actor's): 4: sequence parallelism"),
    ({"trainer": {"trainer_strategy": "megatron"}}, None, "megatron is not supported; this tool shards with FSDP2"),
    (None, {"actor_rollout_ref": {"actor": {"strategy": "megatron"}}}, "megatron is not supported"),
    ({"monitor": {"monitor_type": "mlflow"}}, None,
     "monitor.monitor_type: mlflow is not supported; the monitors are tensorboard and wandb"),
]


@pytest.mark.parametrize("main,verl,message", REFUSED)
def test_refused_in_one_line(make_config, main, verl, message):
    with pytest.raises(ConfigError) as err:
        load_config(make_config(main=main, verl=verl))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_accepted_parallelism_settings(make_config):
    cfg = load_config(make_config(main={"trainer": {"ulysses_sequence_parallel_size": 1, "trainer_strategy": "fsdp"}},
                                  verl={"actor_rollout_ref": {"actor": {"strategy": "fsdp2"}}}))
    assert (cfg.trainer.ulysses_sequence_parallel_size, cfg.trainer.trainer_strategy) == (1, "fsdp2")
