"""The config contract: the document's YAML, Trinity's newer spelling, verl's trainer file, and every error path."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from trinity_dpo.errors import ConfigError
from trinity_dpo.config.loader import load_config
from trinity_dpo.sources.local import localize

DATA = Path(__file__).parent / "data"


def doc_config(tmp_path, model_dir, data_file, trainer_file=DATA / "trinity_train_dpo.yaml") -> Path:
    """The document's dpo.yaml with only its /PATH/TO/ placeholders and the trainer file path changed."""
    text = (DATA / "doc_dpo.yaml").read_text()
    text = (text.replace("/PATH/TO/CHECKPOINT/", str(tmp_path / "ckpt"))
            .replace("/PATH/TO/MODEL/", str(model_dir)).replace("/PATH/TO/DATASET/", str(data_file))
            .replace("examples/dpo_humanlike/train_dpo.yaml", str(trainer_file)))
    path = tmp_path / "dpo.yaml"
    path.write_text(text)
    return path


def test_document_yaml_and_trinity_trainer_file(tmp_path, qwen_dir, pairs_file, caplog):
    path = doc_config(tmp_path, qwen_dir, pairs_file)
    with caplog.at_level(logging.INFO):
        cfg = load_config(path, ["cluster.gpu_per_node=1"])
    assert cfg.project == "<project_name>" and cfg.name == "<experiment_name>"
    assert cfg.buffer.train_batch_size == 64 and cfg.buffer.total_epochs == 2
    assert cfg.algorithm.policy_loss_fn_args.beta == 0.1
    assert cfg.trainer.save_interval == 30
    opt = cfg.algorithm.optimizer
    assert (opt.lr, opt.lr_warmup_steps_ratio, opt.min_lr_ratio, opt.lr_scheduler_type) == (5e-7, 0.03, 0.1, "cosine")
    assert opt.betas == [0.9, 0.95]
    # Trinity 0.3+ replaced the trainer file's 783 with its own count; its DPO reader never cut rows by the
    # trainer file's lengths nor read `truncation`.
    assert cfg.trainer.total_steps is None and cfg.buffer.total_steps is None
    assert cfg.trainer.trainer_config.trainer.total_training_steps == 783
    assert (cfg.model.max_prompt_tokens, cfg.model.max_response_tokens) == (None, None)
    assert cfg.trainer.trainer_config.data.max_prompt_length == 1792
    assert "data.truncation" in next(r.getMessage() for r in caplog.records if r.getMessage().startswith("ignored"))
    assert cfg.trainer.trainer_config.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu == 2
    assert cfg.trainer.trainer_config.actor_rollout_ref.model.enable_gradient_checkpointing is True
    ignored = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ignored")]
    assert len(ignored) == 1
    for section in ("trainer config: data.tokenizer", "actor_rollout_ref.rollout", " critic", " algorithm",
                    "actor_rollout_ref.ref", "actor_rollout_ref.actor.clip_ratio"):
        assert section in ignored[0]


def test_newer_trinity_spelling(make_config, tmp_path):
    path = make_config(main={
        "buffer": {"batch_size": None, "train_batch_size": 16, "total_steps": 5},
        "algorithm": {"optimizer": {"lr": 2e-5, "warmup_style": "cosine", "betas": [0.8, 0.9]},
                      "policy_loss_fn_args": {"beta": 0.3, "label_smoothing": 0.1}},
        "model": {"max_prompt_tokens": 50, "max_response_tokens": 40, "max_model_len": 80},
        "trainer": {"trainer_config_path": None, "actor_kl_loss_coef": None, "grad_clip": 0.5,
                    "trainer_config": {"actor_rollout_ref": {"actor": {"ppo_micro_batch_size_per_gpu": 2}}}},
    })
    cfg = load_config(path)
    assert cfg.buffer.train_batch_size == 16 and cfg.buffer.total_steps == 5
    assert cfg.algorithm.optimizer.lr_scheduler_type == "cosine"  # warmup_style: the older spelling
    assert cfg.algorithm.optimizer.lr == 2e-5 and cfg.algorithm.optimizer.betas == [0.8, 0.9]
    assert cfg.algorithm.policy_loss_fn_args.beta == 0.3 and cfg.algorithm.policy_loss_fn_args.label_smoothing == 0.1
    assert (cfg.model.max_prompt_tokens, cfg.model.max_response_tokens, cfg.model.max_model_len) == (50, 40, 80)
    assert cfg.trainer.grad_clip == 0.5
    assert cfg.trainer.trainer_config.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu == 2


def test_env_interpolation_and_overrides(make_config, tmp_path, monkeypatch, qwen_dir):
    path = make_config(main={"model": {"model_path": "${oc.env:TEST_MODEL_DIR,/nowhere}"},
                             "buffer": {"batch_size": "${oc.env:TEST_BATCH,8}"}})
    monkeypatch.setenv("TEST_MODEL_DIR", str(qwen_dir))
    cfg = load_config(path, ["trainer.trainer_config.actor_rollout_ref.actor.optim.lr=3e-4", "name=other"])
    assert cfg.model.model_path == str(qwen_dir) and cfg.buffer.train_batch_size == 8
    assert cfg.algorithm.optimizer.lr == 3e-4 and cfg.name == "other"
    monkeypatch.setenv("TEST_BATCH", "4")
    assert load_config(path).buffer.train_batch_size == 4
    # An override of one spelling replaces the files' other spellings of the same setting.
    assert load_config(path, ["algorithm.optimizer.lr=1e-5"]).algorithm.optimizer.lr == 1e-5


def test_trainer_file_relative_to_cwd_first(make_config, tmp_path, monkeypatch):
    path = make_config()
    other = tmp_path / "cwd"
    other.mkdir()
    (other / "train_dpo.yaml").write_text(yaml.safe_dump({"actor_rollout_ref": {"actor": {"optim": {"lr": 7e-6}}}}))
    monkeypatch.chdir(other)
    assert load_config(path).algorithm.optimizer.lr == 7e-6
    monkeypatch.chdir(tmp_path)
    assert load_config(path).algorithm.optimizer.lr == 1e-3


ERRORS = [
    ({"buffer": {"batch_sise": 4}}, None, "unknown key 'buffer.batch_sise'; did you mean 'buffer.batch_size'?"),
    ({"modell": {}}, None, "unknown key 'modell'; did you mean 'model'?"),
    (None, {"actor_rollout_ref": {"actor": {"ppo_micro_batch_size_per_gpo": 2}}},
     "did you mean 'trainer.trainer_config.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu'?"),
    ({"buffer": {"batch_size": "eight"}}, None, "buffer.batch_size: expected an integer, got 'eight' (str)"),
    ({"buffer": {"total_epochs": 1.5}}, None, "buffer.total_epochs: expected an integer, got 1.5"),
    ({"trainer": {"actor_use_kl_loss": "maybe"}}, None, "trainer.actor_use_kl_loss: expected true or false"),
    ({"buffer": {"trainer_input": {"experience_buffer": {"format": {"prompt_type": "chat"}}}}}, None,
     "prompt_type: 'chat' is not one of 'plaintext', 'messages', 'chatpair'"),
    ({"mode": "both"}, None, "mode: 'both' is not one of 'train'"),
    ({"algorithm": {"algorithm_type": "ppo"}}, None, "algorithm.algorithm_type: 'ppo' is not one of 'dpo'"),
    ({"buffer": {"batch_size": 0}}, None, "buffer.train_batch_size must be a positive integer, got 0"),
    ({"buffer": {"total_epochs": -1}}, None, "buffer.total_epochs must be a positive integer, got -1"),
    ({"trainer": {"actor_kl_loss_coef": 0.0}}, {"actor_rollout_ref": {"actor": {"kl_loss_coef": 0.0}}},
     "policy_loss_fn_args.beta must be > 0, got 0.0"),
    ({"algorithm": {"policy_loss_fn_args": {"label_smoothing": 0.5}}}, None, "label_smoothing must be in [0, 0.5)"),
    (None, {"actor_rollout_ref": {"actor": {"optim": {"lr": -1}}}}, "algorithm.optimizer.lr must be > 0, got -1.0"),
    (None, {"actor_rollout_ref": {"actor": {"optim": {"lr_warmup_steps_ratio": 2}}}}, "must be in [0, 1], got 2.0"),
    (None, {"actor_rollout_ref": {"actor": {"ppo_micro_batch_size_per_gpu": 3}}},
     "buffer.batch_size (8) must be divisible by ppo_micro_batch_size_per_gpu (3) x processes (1)"),
    (None, {"actor_rollout_ref": {"actor": {"ppo_micro_batch_size_per_gpu": 0}}}, "must be a positive integer, got 0"),
    ({"algorithm": {"policy_loss_fn_args": {"beta": 0.2}}}, None, "conflicting values for one setting: "
     "algorithm.policy_loss_fn_args.beta=0.2, trainer.actor_kl_loss_coef=0.1"),
    ({"cluster": {"gpu_per_node": 3}}, None, "buffer.batch_size (8) must be divisible by the number of processes, "
     "cluster.node_num x cluster.gpu_per_node (3)"),
    ({"cluster": {"node_num": 2, "gpu_per_node": 2}}, {"actor_rollout_ref": {"actor": {"ppo_micro_batch_size_per_gpu": 4}}},
     "buffer.batch_size (8) must be divisible by ppo_micro_batch_size_per_gpu (4) x processes (4)"),
    (None, {"actor_rollout_ref": {"nccl_timeout": 0}}, "nccl_timeout must be a positive number of seconds"),
    ({"model": {"model_path": ""}}, None, "model.model_path is required"),
    ({"trainer": {"trainer_config_path": "missing.yaml"}}, None,
     "trainer.trainer_config_path: file not found: missing.yaml"),
    ({"checkpoint_root_dir": "/etc/hostname/runs"}, None, "is not a folder"),
    ({"model": {"model_path": "${oc.env:NO_SUCH_VAR_X}"}}, None, "Environment variable 'NO_SUCH_VAR_X' not found"),
    ({"buffer": [1, 2]}, None, "buffer: expected a mapping, got [1, 2] (list)"),
    ({"buffer": {"trainer_input": {"eval_fraction": 0.1, "eval_buffer": {"path": "held_out.jsonl"}}}}, None,
     "buffer.trainer_input.eval_fraction holds out part of the training data, and eval_buffer.path gives held-out "
     "data of its own: set one of them"),
    ({"name": "run_${foo"}, None, "dpo.yaml: no viable alternative at input '${foo'"),
    ({"algorithm": {"optimizer": {"betas": [0.9], "beta1": 0.8}}}, None,
     "algorithm.optimizer.betas must be two numbers in [0, 1), got [0.9]"),
    ({"trainer": {"trainer_config": {"actor_rollout_ref": {"actor": {"grad_clip": 0.5}}}}}, {"actor_rollout_ref": [1, 2]},
     "trainer.trainer_config over"),
]
# The objective's settings: each combination TRL refuses, with TRL's reason.
_ARGS = "algorithm.policy_loss_fn_args."
OBJECTIVE_ERRORS = [
    ({"loss_type": "dpo_plus"}, "dpo", f"{_ARGS}loss_type: 'dpo_plus' is not a loss type of policy_loss_fn 'dpo'"),
    ({"loss_type": "bco_pair"}, "cpo", "'bco_pair' is not a loss type of policy_loss_fn 'cpo'; choose from sigmoid, "
     "hinge, ipo, simpo (the loss types of dpo need policy_loss_fn: dpo)"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "dpo",
     "loss_weights must have the same length as loss_type when combining multiple losses: got 1 weights for 2"),
    ({"loss_type": ["sigmoid", "ipo"]}, "cpo", "a list of loss types (MPO) needs policy_loss_fn: dpo"),
    ({"loss_type": "bco_pair", "f_divergence_type": "js_divergence"}, "dpo",
     "f_divergence_type: 'js_divergence' is only supported for the loss types"),
    ({"loss_type": "aot", "use_weighting": True}, "dpo", "WPO weighting is not implemented for 'aot' or "
     "'aot_unpaired'"),
    ({"loss_type": ["sigmoid", "sft"], "use_weighting": True}, "dpo", "use_weighting with loss_type sft"),
    ({"loss_type": "exo_pair"}, "dpo", "label_smoothing must be greater than 0.0 when using 'exo_pair' loss"),
    ({"ld_alpha": 1.5}, "dpo", "ld_alpha must be in [0, 1], got 1.5"),
    ({"ld_alpha": 0.5}, "simpo", "ld_alpha, use_weighting, loss_weights and f_divergence_type apply to "
     "policy_loss_fn: dpo only"),
    ({"cpo_alpha": 1.0}, "orpo", "cpo_alpha applies to policy_loss_fn cpo/simpo"),
    ({"f_divergence_type": "kl"}, "dpo", "f_divergence_type: 'kl' is not one of 'reverse_kl', 'forward_kl'"),
    ({}, "kto", "algorithm.policy_loss_fn: 'kto' does not go with algorithm_type 'dpo'"),
    ({}, "ipo", "algorithm.policy_loss_fn: 'ipo' is not one of 'dpo', 'simpo', 'cpo', 'orpo'"),
    ({"gamma": 0.3, "simpo_gamma": 0.4}, "simpo", "conflicting values for one setting: "
     "algorithm.policy_loss_fn_args.gamma=0.3, algorithm.policy_loss_fn_args.simpo_gamma=0.4"),
    # Settings the chosen objective never reads: refused rather than dropped.
    ({"label_smoothing": 0.1}, "orpo", f"{_ARGS}label_smoothing: not read by policy_loss_fn orpo with loss_type "
     "sigmoid (it applies to policy_loss_fn dpo, simpo or cpo); remove it"),
    ({"gamma": 2.0}, "dpo", f"{_ARGS}gamma: not read by policy_loss_fn dpo with loss_type sigmoid (it applies to "
     "policy_loss_fn simpo, or cpo with loss_type simpo)"),
    ({"gamma": 2.0}, "cpo", f"{_ARGS}gamma: not read by policy_loss_fn cpo with loss_type sigmoid"),
    ({"discopop_tau": 0.5}, "dpo", f"{_ARGS}discopop_tau: not read by policy_loss_fn dpo with loss_type sigmoid (it "
     "applies to loss_type discopop)"),
    ({"f_alpha_divergence_coef": 0.2}, "dpo", f"{_ARGS}f_alpha_divergence_coef: not read by policy_loss_fn dpo"),
]


@pytest.mark.parametrize("algorithm,args,message", [
    ("sft", {"label_smoothing": 0.3}, "label_smoothing: not read by policy_loss_fn sft"),
    ("kto", {"gamma": 2.0}, "gamma: not a setting of KTO"),
    ("reward_model", {"discopop_tau": 0.5}, "discopop_tau applies to the preference losses"),
])
def test_loss_settings_other_algorithms_never_read_are_refused(make_config, algorithm, args, message):
    main = {"algorithm": {"algorithm_type": algorithm, "kl_loss_fn": "none", "policy_loss_fn_args": args}}
    with pytest.raises(ConfigError) as err:
        load_config(make_config(main=main))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_loss_settings_their_objective_reads_are_accepted(make_config):
    """The same settings where they apply: SimPO's gamma, DiscoPOP's tau, the alpha-divergence's alpha."""
    for fn, args in (("simpo", {"gamma": 2.0, "label_smoothing": 0.1}), ("cpo", {"loss_type": "simpo", "gamma": 2.0}),
                     ("dpo", {"loss_type": "discopop", "discopop_tau": 0.5}),
                     ("dpo", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.2})):
        load_config(make_config(main={"algorithm": {"policy_loss_fn": fn, "policy_loss_fn_args": args}}))


@pytest.mark.parametrize("args,fn,message", OBJECTIVE_ERRORS)
def test_objective_errors(make_config, args, fn, message):
    main = {"algorithm": {"policy_loss_fn": fn, "policy_loss_fn_args": args}}
    with pytest.raises(ConfigError) as err:
        load_config(make_config(main=main))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_objective_settings_in_trl_spelling(make_config):
    """A loss type given as one name becomes a list; TRL's simpo_gamma is SimPO's gamma."""
    main = {"algorithm": {"policy_loss_fn": "simpo", "policy_loss_fn_args": {"simpo_gamma": 0.8}}}
    args = load_config(make_config(main=main)).algorithm.policy_loss_fn_args
    assert (args.loss_type, args.gamma) == (["sigmoid"], 0.8)
    main = {"algorithm": {"policy_loss_fn_args": {"loss_type": ["sigmoid", "bco_pair"], "loss_weights": [1, 0.5]}}}
    args = load_config(make_config(main=main)).algorithm.policy_loss_fn_args
    assert (args.loss_type, args.loss_weights) == (["sigmoid", "bco_pair"], [1.0, 0.5])


@pytest.mark.parametrize("main,verl,message", ERRORS)
def test_config_errors(make_config, main, verl, message):
    path = make_config(main=main, verl=verl)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


# Paths that are not there: loading the config only parses and checks it; the names become local folders (and are
# found missing) in the one step that makes them local, which the command runs before a run or an evaluation.
PATH_ERRORS = [("model", "/no/such/model", "model.model_path: folder not found: /no/such/model"),
               ("model", "/tmp", "model.model_path: /tmp has no config.json"),
               ("data", "/no/data.json", "buffer.trainer_input.experience_buffer.path: not found: /no/data.json")]


@pytest.mark.parametrize("what,path,message", PATH_ERRORS)
def test_missing_paths_are_found_when_made_local(make_config, what, path, message):
    cfg = load_config(make_config(**{what: path}))  # pure: no path is looked at
    with pytest.raises(ConfigError) as err:
        localize(cfg)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_document_wins_over_trainer_file_as_in_trinity(make_config, caplog):
    """Trinity copied dpo.yaml's actor_kl_loss_coef and actor_grad_clip over the trainer file's kl_loss_coef and
    grad_clip, and algorithm.optimizer over actor.optim; the trainer file's grad_clip wins over trainer.grad_clip."""
    path = make_config(main={"trainer": {"actor_kl_loss_coef": 0.3, "actor_grad_clip": 0.7},
                             "algorithm": {"optimizer": {"lr": 2e-6, "lr_scheduler_type": "cosine"}}},
                       verl={"actor_rollout_ref": {"actor": {"kl_loss_coef": 0.1, "grad_clip": 2.0,
                                                             "optim": {"lr": 1e-3, "warmup_style": "constant"}}}})
    with caplog.at_level(logging.INFO):
        cfg = load_config(path)
    assert cfg.algorithm.policy_loss_fn_args.beta == 0.3 and cfg.trainer.grad_clip == 0.7
    assert cfg.algorithm.optimizer.lr == 2e-6 and cfg.algorithm.optimizer.lr_scheduler_type == "cosine"
    assert ("trainer.actor_kl_loss_coef=0.3 is used over trainer.trainer_config.actor_rollout_ref.actor.kl_loss_coef"
            "=0.1, as Trinity gives it precedence") in caplog.text
    cfg = load_config(make_config(main={"trainer": {"grad_clip": 0.5}},
                                  verl={"actor_rollout_ref": {"actor": {"grad_clip": 2.0}}}))
    assert cfg.trainer.grad_clip == 2.0
    cfg = load_config(make_config(main={"algorithm": {"optimizer": {"clip_grad": 0.25}}}))
    assert cfg.trainer.grad_clip == 0.25
    # The trainer file's optim.clip_grad (verl's Megatron and newer engines' spelling) is used over trainer.grad_clip
    # where the file gives no actor.grad_clip, which verl's FSDP actor clips by and which Trinity's files carry too.
    cfg = load_config(make_config(main={"trainer": {"grad_clip": 0.5}},
                                  verl={"actor_rollout_ref": {"actor": {"optim": {"clip_grad": 0.3}}}}))
    assert cfg.trainer.grad_clip == 0.3
    cfg = load_config(make_config(verl={"actor_rollout_ref": {"actor": {"grad_clip": 2.0, "optim": {"clip_grad": 1.0}}}}))
    assert cfg.trainer.grad_clip == 2.0


def test_eval_buffer_takes_its_own_defaults(make_config):
    """An eval_buffer with a path and no split reads split 'test' (StorageConfig's own default is 'train')."""
    cfg = load_config(make_config(main={"buffer": {"trainer_input": {"eval_buffer": {"path": "/tmp"}}}}))
    assert cfg.buffer.trainer_input.eval_buffer.split == "test"
    assert cfg.buffer.trainer_input.eval_buffer.name == "eval_buffer"
    assert cfg.buffer.trainer_input.experience_buffer.split == "train"


def test_a_partial_eval_format_keeps_the_training_formats_other_fields(make_config):
    """An eval format naming one column reads the rest as the training data's format says (prompt_type, the
    chat template's enable_thinking), not as the defaults; what training rows may not have, held-out rows may not
    either, and one chat template renders both."""
    fmt = {"prompt_type": "messages", "messages_key": "conversation", "system_prompt": "Be brief."}
    main = {"model": {"enable_thinking": False}, "buffer": {"trainer_input": {
        "experience_buffer": {"format": fmt}, "eval_buffer": {"path": "/tmp", "format": {"messages_key": "chat"}}}}}
    held = load_config(make_config(main=main)).buffer.trainer_input.eval_buffer.format
    assert (held.prompt_type, held.messages_key, held.system_prompt, held.enable_thinking) == (
        "messages", "chat", "Be brief.", False)
    for extra, message in (({"image_key": "images"}, "format.image_key/video_key: multimodal rows are not supported"),
                           ({"chat_template": "{{ messages }}"}, "buffer.trainer_input.eval_buffer.format.chat_template:"
                            " held-out rows are rendered with the model's chat template")):
        main["buffer"]["trainer_input"]["eval_buffer"]["format"] = extra
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_config(make_config(main=main))


def test_format_columns_the_algorithm_never_reads_are_logged(make_config, caplog):
    """SFT's answer column given to DPO, KTO's columns given to DPO: said to be unused, one line (tools are read
    by every algorithm)."""
    fmt = {"response_key": "answer", "tools_key": "functions", "completion_key": "c"}
    with caplog.at_level(logging.INFO):
        load_config(make_config(main={"buffer": {"trainer_input": {"experience_buffer": {"format": fmt}}}}))
    assert ("ignored, not used by offline DPO: config: buffer.trainer_input.experience_buffer.format.completion_key, "
            "buffer.trainer_input.experience_buffer.format.response_key\n") in caplog.text + "\n"


@pytest.mark.parametrize("main,override,field,value", [
    ({"model": {"lora_configs": [{"lora_rank": 8}]}}, "model.lora.rank=16", "model.lora.rank", 16),
    ({"model": {"lora_configs": [{"lora_rank": 8}]}}, "model.lora_configs.0.lora_rank=4", "model.lora.rank", 4),
    ({"algorithm": {"optimizer": {"betas": [0.9, 0.95]}}}, "algorithm.optimizer.beta2=0.99",
     "algorithm.optimizer.betas", [0.9, 0.99]),
    ({"continue_from_checkpoint": False}, "trainer.resume_mode=auto", "trainer.resume_mode", "auto"),
    ({"algorithm": {"use_token_level_loss": True}}, "algorithm.loss_agg_mode=seq-mean-token-mean",
     "algorithm.loss_agg_mode", "seq-mean-token-mean"),
])
def test_an_override_of_one_spelling_replaces_the_files_other(make_config, main, override, field, value):
    """As for every alias group: what the command line says under one spelling wins over the file's other
    spelling, where the two in one file would conflict."""
    from trinity_dpo.config.checks import get_field

    assert get_field(load_config(make_config(main=main), [override]), field) == value


def test_continue_from_checkpoint(make_config):
    assert load_config(make_config(main={"continue_from_checkpoint": False})).trainer.resume_mode == "disable"
    assert load_config(make_config(main={"continue_from_checkpoint": True})).trainer.resume_mode == "auto"
    with pytest.raises(ConfigError, match="continue_from_checkpoint=False, trainer.resume_mode='auto'"):
        load_config(make_config(main={"continue_from_checkpoint": False, "trainer": {"resume_mode": "auto"}}))


REFUSED = [
    ({"algorithm": {"algorithm_type": "dpo", "policy_loss_fn": "simpo", "kl_loss_fn": "k3"}}, None,
     "algorithm.kl_loss_fn: k3 is a KL term against the reference, and simpo has no reference"),
    ({"algorithm": {"kl_loss_fn": "k5"}}, None, "algorithm.kl_loss_fn"),
    ({"buffer": {"trainer_input": {"experience_buffer": {"format": {"image_key": "images"}}}}}, None,
     "multimodal rows are not supported"),
    (None, {"actor_rollout_ref": {"model": {"override_config": {"attention_dropout": 0.1}}}},
     "override_config: changing the model's config is not supported"),
    (None, {"actor_rollout_ref": {"model": {"external_lib": "my_models"}}}, "external_lib: importing custom model"),
    (None, {"actor_rollout_ref": {"model": {"gradient_checkpointing_every": 2}}},
     "gradient_checkpointing_every applies with enable_gradient_checkpointing: true"),
    (None, {"actor_rollout_ref": {"model": {"enable_gradient_checkpointing": True, "gradient_checkpointing_every": 0}}},
     "gradient_checkpointing_every must be a positive integer, got 0"),
    ({"stages": [{"stage_name": "sft"}]}, None, "has stages: each stage is a run of its own"),  # config.stages reads it
    ({"algorithm": {"optimizer": {"optimizer_type": "sgd"}}}, None,
     "optimizer_type: 'sgd' is not supported; this tool trains with AdamW"),
    ({"trainer": {"trainer_config": "..."}, }, None,
     "trainer.trainer_config: '...' is a placeholder (as in Trinity's docs), not settings"),
    (None, {"actor_rollout_ref": "..."},
     "trainer.trainer_config.actor_rollout_ref: '...' is a placeholder (as in Trinity's docs), not settings"),
]


@pytest.mark.parametrize("main,verl,message", REFUSED)
def test_settings_that_would_change_training_are_refused(make_config, main, verl, message):
    with pytest.raises(ConfigError) as err:
        load_config(make_config(main=main, verl=verl))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_settings_that_match_plain_dpo_are_accepted(make_config):
    cfg = load_config(make_config(main={"algorithm": {"kl_loss_fn": "k2", "kl_loss_fn_args": {"kl_coef": 0},
                                                      "entropy_loss_fn_args": {"entropy_coef": 0.0},
                                                      "optimizer": {"optimizer_type": "adam"}},
                                        "model": {"lora_configs": None}},
                                  verl={"actor_rollout_ref": {"model": {"lora_rank": 0, "override_config": {}},
                                                              "actor": {"optim": {"optimizer": "AdamW"}}}}))
    assert cfg.algorithm.optimizer.optimizer_type == "adam"


KL_BY_VERSION = [
    ({}, "none", 0.0, 0.0),  # the document's shape (Trinity before 0.2): DPO alone, beta from actor_kl_loss_coef
    ({"policy_loss_fn": "dpo"}, "k2", 0.001, 0.0),  # a 0.2+ config: k2 x 0.001 unless told otherwise
    ({"kl_loss_fn": "none"}, "k2", 0.001, 0.0),  # Trinity's check turns DPO's 'none' into k2
    ({"kl_loss_fn": "k1", "kl_loss_fn_args": {"kl_coef": 0.1}}, "k1", 0.1, 0.0),  # the current examples
    ({"kl_loss_fn": "low_var_kl", "kl_loss_fn_args": {"kl_coef": 0}}, "none", 0.0, 0.0),  # the way to turn it off
    ({"entropy_loss_fn_args": {"entropy_coef": 0.01}}, "k2", 0.001, 0.01),
    ({"algorithm_type": "sft", "entropy_loss_fn_args": {"entropy_coef": 0.01}}, "none", 0.0, 0.01),
    ({"entropy_loss_fn": "none", "entropy_loss_fn_args": {"entropy_coef": 0.01}}, "k2", 0.001, 0.0),
]


@pytest.mark.parametrize("algorithm,kl,coef,entropy", KL_BY_VERSION)
def test_kl_and_entropy_terms_as_each_trinity_version_adds_them(make_config, algorithm, kl, coef, entropy):
    cfg = load_config(make_config(main={"algorithm": {"algorithm_type": "dpo", **algorithm}}))
    algo = cfg.algorithm
    assert (algo.kl_loss_fn, algo.kl_loss_fn_args.kl_coef, algo.entropy_loss_fn_args.entropy_coef) == (
        kl, coef, entropy)


def test_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("project: x\n  name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ invalid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping of keys at the top"):
        load_config(bad)


def test_override_syntax(make_config):
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(make_config(), ["justakey"])
    with pytest.raises(ConfigError, match="unknown key 'trainer.nope'"):
        load_config(make_config(), ["trainer.nope=1"])
