"""LoRA (PEFT adapters): the three spellings of its settings, a run's numbers (step 1 is ln 2, only adapters train,
resume is bitwise), its checkpoints (PEFT's layout, the merged model), `trinity eval` of an adapter, and three AdamW
steps against TRL 1.16's DPOTrainer on a PEFT model."""
from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from trinity_dpo.run import checkpoint, lock as run_lock, train
from trinity_dpo import cli
from trinity_dpo.errors import ConfigError
from trinity_dpo.config.loader import load_config
from trinity_dpo.sources.local import localize

from test_resume import records, run_killed_in_step

LORA = {"lora_configs": [{"name": "demo", "lora_rank": 4, "lora_alpha": 8}]}


def lora_settings(make_config, main=None, verl=None):
    return load_config(make_config(main=main, verl=verl)).model.lora


def test_trinity_and_verl_spellings_fold_into_model_lora(make_config):
    """Trinity's entry takes Trinity's defaults (alpha 32, all-linear), verl's lora_rank takes verl's (alpha 16);
    the same value under two spellings is one setting; lora_rank 0 is no LoRA."""
    lora = lora_settings(make_config, {"model": {"lora_configs": [{"lora_rank": 8}]}})
    assert (lora.rank, lora.alpha, lora.target_modules, lora.path) == (8, 32, "all-linear", None)
    lora = lora_settings(make_config, verl={"actor_rollout_ref": {"model": {
        "lora_rank": 16, "target_modules": ["q_proj", "v_proj"]}}})
    assert (lora.rank, lora.alpha, lora.target_modules) == (16, 16, ["q_proj", "v_proj"])
    lora = lora_settings(make_config, {"model": {"lora_configs": [{"lora_rank": 8, "lora_alpha": 16}]}},
                         {"actor_rollout_ref": {"model": {"lora_rank": 8}}})
    assert (lora.rank, lora.alpha) == (8, 16)
    assert lora_settings(make_config, verl={"actor_rollout_ref": {"model": {"lora_rank": 0}}}).rank == 0
    assert lora_settings(make_config, {"model": {"lora": {"rank": 2, "save_merged": "never"}}}).alpha == 32


LORA_ERRORS = [
    ({"model": {"lora_configs": [{"lora_rank": 8}]}}, {"actor_rollout_ref": {"model": {"lora_rank": 16}}},
     "conflicting values for one setting: model.lora_configs[0].lora_rank=8, actor_rollout_ref.model.lora_rank=16"),
    ({"model": {"lora_configs": [{"lora_rank": 8}, {"lora_rank": 4}]}}, None,
     "model.lora_configs: 2 adapters given; one adapter is trained at a time"),
    ({"model": {"lora_configs": [{"lora_rank": 8, "target_modules": ["q_proj", "lm_head"]}]}}, None,
     "model.lora.target_modules: the LM head is scored from its weight in fp32 chunks"),
    ({"model": {"lora_configs": [{"lora_rank": 8, "target_modules": ["no_such_layer"]}]}}, None, None),
    ({"model": {"lora_configs": [{"path": "/nonexistent/adapter"}]}}, None,
     "model.lora.path: /nonexistent/adapter is not a PEFT adapter folder (no adapter_config.json)"),
    ({"model": {"lora": {"rank": 8, "load_in_4bit": True}}}, None,
     "model.lora.load_in_4bit: QLoRA's 4-bit base weights need a CUDA device (bitsandbytes)"),
    ({"model": {"lora": {"rank": 0, "load_in_4bit": True}}}, None, "model.lora.load_in_4bit needs LoRA on"),
    ({"model": {"lora": {"rank": 4, "alpha": 0}}}, None, "model.lora.alpha must be > 0, got 0"),
]


@pytest.mark.parametrize("main,verl,message", LORA_ERRORS)
def test_lora_settings_errors_are_one_line(make_config, main, verl, message):
    if message is None:  # a target that matches nothing is found when the adapters go on: still one line
        cfg = load_config(make_config(main=main, verl=verl))
        with pytest.raises(ConfigError) as err:
            train.run(cfg)
        message = "model.lora.target_modules: Target modules {'no_such_layer'} not found in the base model"
        assert not run_lock.held()  # the run that could not start gave its folder back
    else:
        with pytest.raises(ConfigError) as err:
            localize(load_config(make_config(main=main, verl=verl)))  # the adapter path is read when made local
    assert message in str(err.value) and "\n" not in str(err.value)


def lora_config(root, qwen_dir, name):
    """DPO with a rank-4 adapter (gradient checkpointing, shared prompts, 2 micro-batches a step) on 18 training
    pairs: 3 steps, a checkpoint after each."""
    import yaml

    from tiny import write_pairs

    data = root / "pairs.json"
    if not data.is_file():
        write_pairs(data, n=24)
    cfg = {"project": "p", "name": name, "checkpoint_root_dir": str(root / "ckpt"),
           "model": {"model_path": str(qwen_dir), **LORA},
           "algorithm": {"algorithm_type": "dpo", "optimizer": {"lr": 1e-2}},
           "buffer": {"total_epochs": 1, "batch_size": 8, "trainer_input": {"eval_fraction": 0.25, "experience_buffer": {
               "path": str(data), "format": {"prompt_type": "plaintext"}}}},
           "trainer": {"precision": "fp32", "save_interval": 1, "eval_interval": 2, "eval_samples": 1,
                       "eval_max_new_tokens": 4, "trainer_config": {"actor_rollout_ref": {
                           "model": {"enable_gradient_checkpointing": True},
                           "actor": {"ppo_micro_batch_size_per_gpu": 4}}}}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, qwen_dir):
    """(config path, run folder) of the whole 3-step run."""
    root = tmp_path_factory.mktemp("lora")
    path = lora_config(root, qwen_dir, "whole")
    return path, train.run(load_config(path))


def test_lora_run_step_one_is_ln2_and_only_adapters_train(lora_run, qwen_dir):
    _, run_dir = lora_run
    rows = records(run_dir)
    steps = [r for r in rows if "loss" in r and "eval" not in json.dumps(list(r))]
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-7 and steps[0]["rewards/margins"] == 0.0
    assert steps[-1]["loss"] < steps[0]["loss"] - 1e-3  # the adapter trained
    ckpt = run_dir / "global_step_3"
    files = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "merged"} <= files and "model.safetensors" not in files
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    # The trainer state keeps only what trains, and its optimizer state: no base weight.
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(ckpt / "trainer_state" / "dcp")).read_metadata().state_dict_metadata
    weights = [k for k in keys if k.startswith("model.")]
    assert weights and all(".lora_" in k for k in weights), weights
    assert not (run_dir / "global_step_2" / "merged").exists()  # save_merged: final


def test_saved_adapter_loads_in_peft_and_merged_equals_merge_and_unload(lora_run, qwen_dir):
    _, run_dir = lora_run
    ckpt = run_dir / "global_step_3"
    base = AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(ckpt))
    reference = peft_model.merge_and_unload().state_dict()
    merged = load_file(str(ckpt / "merged" / "model.safetensors"))
    original = load_file(str(qwen_dir / "model.safetensors"))
    assert set(merged) == set(original)
    assert max((merged[k] - reference[k]).abs().max().item() for k in merged) <= 1e-6
    assert any(not torch.equal(merged[k], original[k]) for k in merged)
    plain = AutoModelForCausalLM.from_pretrained(ckpt / "merged")  # a plain HF folder
    assert type(plain).__name__ == type(base).__name__


def test_trinity_eval_takes_an_adapter_folder(lora_run, capsys):
    path, run_dir = lora_run
    code = cli.main(["eval", "--model", str(run_dir / "global_step_3"), "--config", str(path), "name=evaluated"])
    out = capsys.readouterr().out
    final = [r for r in records(run_dir) if "eval/loss" in r][-1]["eval/loss"]
    loss_line = next(line for line in out.splitlines() if line.strip().startswith("loss"))
    assert code == 0 and float(loss_line.split()[-1]) == pytest.approx(final, abs=5e-4), (out, final)


def test_lora_resume_after_a_crash_is_bitwise(lora_run, qwen_dir, monkeypatch):
    path, whole = lora_run
    crashed = lora_config(path.parent, qwen_dir, "crashed")
    run_killed_in_step(crashed, 3, monkeypatch)  # dies inside step 3: resumes from global_step_2
    run_dir = whole.parent / "crashed"
    assert checkpoint.latest(run_dir).name == "global_step_2"
    train.run(load_config(crashed))
    assert records(run_dir) == records(whole)
    a = load_file(str(whole / "global_step_3" / "adapter_model.safetensors"))
    b = load_file(str(run_dir / "global_step_3" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_three_adamw_steps_from_an_adapter_equal_trl(tmp_path, qwen_dir, make_config):
    """One adapter (B away from zero, so the adapted policy differs from its base) loaded into both: TRL 1.16 trains
    a PeftModel against a frozen copy of its starting adapter, ours against the starting policy's cached
    log-probs. Batch 4 over the 4 pairs, so each step is the whole set."""
    from conftest import need_extra

    trl = need_extra("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer

    from test_trl_parity import BETA, rows

    lr, steps, adapter = 1e-2, 3, tmp_path / "adapter"
    torch.manual_seed(3)
    start = get_peft_model(AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.float32),
                           PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in start.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    start.save_pretrained(adapter)

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.float32),
                                      str(adapter), is_trainable=True)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], beta=BETA, max_length=None, use_cpu=True,
                         bf16=False, logging_steps=1, save_strategy="no", disable_tqdm=True,
                         per_device_train_batch_size=4, max_steps=steps, learning_rate=lr, lr_scheduler_type="constant",
                         weight_decay=0.0, max_grad_norm=1e9, seed=0)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows()),
                             processing_class=AutoTokenizer.from_pretrained(qwen_dir))
    trainer.train()
    theirs = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    path = make_config(
        main={"model": {"lora": {"path": str(adapter)}}, "trainer": {"actor_kl_loss_coef": BETA},
              "buffer": {"batch_size": 4, "total_epochs": steps, "trainer_input": {"experience_buffer": {
                  "path": str(data), "format": {"prompt_type": "messages"}}}}},
        verl={"actor_rollout_ref": {"actor": {"ppo_micro_batch_size_per_gpu": 2, "grad_clip": 1e9,
                                              "optim": {"lr": lr, "weight_decay": 0.0}}}})
    run_dir = train.run(load_config(path))
    ours = [r["loss"] for r in records(run_dir) if "loss" in r and "pairs" in r]
    assert len(ours) == len(theirs) == steps
    assert all(abs(a - b) < 1e-5 for a, b in zip(ours, theirs)), (ours, theirs)
    assert abs(ours[0] - math.log(2)) < 1e-6 and ours[-1] < ours[0] - 1e-3  # the start is the reference; it trained


def test_reference_cache_is_keyed_by_the_starting_adapter(tmp_path, qwen_dir, make_config):
    """Two adapters to continue from: each run's reference is its own starting policy, so the second run must not
    reuse the first run's cached tables (the cache is searched across sibling runs); the same adapter reuses them."""
    adapters = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        start = get_peft_model(AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.float32),
                               PeftLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, p in start.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2)
        start.save_pretrained(tmp_path / f"adapter{seed}")
        adapters.append(tmp_path / f"adapter{seed}")
    caches = []
    for name, adapter in (("a", adapters[0]), ("b", adapters[1]), ("c", adapters[0])):
        cfg = load_config(make_config(main={"name": name, "model": {"lora": {"path": str(adapter)}},
                                            "trainer": {"total_steps": 1, "eval_samples": 0}}))
        run_dir = train.run(cfg)
        assert abs(records(run_dir)[0]["loss"] - math.log(2)) < 1e-6  # its own start is its reference
        caches.append(sorted(p.name for p in (run_dir / "ref_cache").glob("train-*.pt")))
    assert caches[0] != caches[1] and caches[0] == caches[2]


def test_lora_micro_batches_equal_one_and_bf16_sft_and_orpo_train(make_config, tmp_path):
    """A step in 4 micro-batches equals it in one; SFT (bf16 autocast) and ORPO, which have no reference, train an
    adapter too."""
    from test_sft import sft_rows

    lora = {"lora": {"rank": 4, "alpha": 8}}
    runs = {}
    for micro in (8, 2):
        path = make_config(main={"name": f"micro{micro}", "model": lora, "trainer": {"total_steps": 2}},
                           verl={"actor_rollout_ref": {"actor": {"ppo_micro_batch_size_per_gpu": micro}}})
        runs[micro] = train.run(load_config(path))
    for a, b in zip(records(runs[8]), records(runs[2])):
        for key in a.keys() - {"tokens_per_s", "step_time_s", "pad_share", "positions"}:
            assert abs(a[key] - b[key]) < 1e-5 * max(1.0, abs(a[key])), key
    wa, wb = (load_file(str(r / "global_step_2" / "adapter_model.safetensors")) for r in (runs[8], runs[2]))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sft_rows(8)))
    fmt = {"prompt_type": "messages", "messages_key": "messages"}
    sft = make_config(main={"name": "sft", "model": lora, "algorithm": {"algorithm_type": "sft"},
                            "trainer": {"total_steps": 3, "precision": "bf16", "eval_samples": 0},
                            "buffer": {"batch_size": 4, "trainer_input": {"experience_buffer": {
                                "path": str(data), "format": fmt}}}})
    orpo = make_config(main={"name": "orpo", "model": lora, "algorithm": {"policy_loss_fn": "orpo"},
                             "trainer": {"total_steps": 3, "eval_samples": 0}})
    for path in (sft, orpo):
        run_dir = train.run(load_config(path))
        losses = [r["loss"] for r in records(run_dir)]
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
        assert (run_dir / "global_step_3" / "adapter_model.safetensors").is_file()
        assert (run_dir / "global_step_3" / "merged" / "model.safetensors").is_file()


def test_an_adapter_folder_as_model_path_is_one_line(make_config, tmp_path):
    adapter = tmp_path / "adapter_only"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError) as err:
        localize(load_config(make_config(model=adapter)))
    assert str(err.value) == (f"model.model_path: {adapter} is a LoRA adapter, not a model: give its merged/ folder, "
                              "or the base model here and the adapter as model.lora.path")


def test_fresh_adapter_reference_pass_runs_with_adapters_off(make_config, monkeypatch):
    """A fresh adapter adds exactly zero, so the numbers cannot tell: the reference pass must still skip the
    adapters' work (the base alone), and training must run with them on again."""
    from peft.tuners.lora import LoraLayer

    seen, real = [], train.cached_score

    def spying(scoring, *args, **kwargs):
        seen.append({m.disable_adapters for m in scoring.policy.model.modules() if isinstance(m, LoraLayer)})
        return real(scoring, *args, **kwargs)

    monkeypatch.setattr(train, "cached_score", spying)
    cfg = load_config(make_config(main={"model": {"lora": {"rank": 4}}, "trainer": {"total_steps": 1,
                                                                                    "eval_samples": 0}}))
    model_seen = []
    real_step = train.train_step
    monkeypatch.setattr(train, "train_step", lambda model, *a, **k: model_seen.append(
        {m.disable_adapters for m in model.modules() if isinstance(m, LoraLayer)}) or real_step(model, *a, **k))
    train.run(cfg)
    assert seen and all(s == {True} for s in seen) and model_seen == [{False}]


def _peft_linear(bias: bool):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(24, 40, bias=bias))
    model = get_peft_model(base, PeftLoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # a trained adapter: B is no longer zero
    return model, layer


@pytest.mark.parametrize("bias", [True, False])
def test_fused_lora_linear_equals_peft_values_and_gradients(bias):
    """The fused layer computes x W^T + b + 2 (x A^T) B^T (alpha 8 / rank 4 = scaling 2), PEFT's sum in another
    order: output and the gradients of x, A and B agree with PEFT's forward to fp32 rounding (1e-5 relative), the
    frozen base weight gets none, and with the adapter disabled the output is the base layer's, bit for bit."""
    from trinity_dpo.engine import lora_linear

    model, layer = _peft_linear(bias)
    x = torch.randn(3, 5, 24)

    def run():
        xg = x.clone().requires_grad_(True)
        y = model(xg)
        (y * torch.linspace(-1, 1, 40)).sum().backward()
        grads = [xg.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]
        model.zero_grad(set_to_none=True)
        return y.detach(), grads

    y_peft, g_peft = run()
    assert lora_linear.fuse(model) == 1
    y_fused, g_fused = run()
    assert type(model(x).grad_fn.next_functions[0][0]).__name__.startswith("_LoraLinear")  # the fused product ran, not PEFT's
    torch.testing.assert_close(y_fused, y_peft, rtol=1e-5, atol=1e-6)
    for fused, peft in zip(g_fused, g_peft):
        torch.testing.assert_close(fused, peft, rtol=1e-5, atol=1e-6)
    assert layer.base_layer.weight.grad is None
    with model.disable_adapter():
        assert torch.equal(model(x), layer.base_layer(x))


def test_fused_lora_linear_under_bf16_autocast_matches_peft():
    """Under bf16 autocast the fused layer makes autocast's casts itself: output in bf16, and output and the
    adapter's fp32 gradients agree with PEFT's autocast forward to bf16 rounding (2e-2 relative)."""
    from trinity_dpo.engine import lora_linear

    model, layer = _peft_linear(True)
    x = torch.randn(6, 24)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().square().sum().backward()
        grads = [layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]
        model.zero_grad(set_to_none=True)
        return y, grads

    y_peft, g_peft = run()
    lora_linear.fuse(model)
    y_fused, g_fused = run()
    assert y_fused.dtype == y_peft.dtype == torch.bfloat16
    torch.testing.assert_close(y_fused.float(), y_peft.float(), rtol=2e-2, atol=2e-2)
    for fused, peft in zip(g_fused, g_peft):
        assert fused.dtype == torch.float32
        torch.testing.assert_close(fused, peft, rtol=2e-2, atol=2e-1)


def test_bf16_lora_keeps_a_bf16_checkpoints_frozen_base_in_bf16_with_the_same_numbers(make_config, qwen_dir,
                                                                                        tmp_path, monkeypatch, caplog):
    """Under bf16 compute, from a checkpoint stored in bf16, the adapted layers' frozen base weights are kept in
    bf16 (half their memory). Every product casts them to bf16 anyway and their values are the file's, so two steps
    give the same losses, metrics, adapter and merged model, to the bit, as keeping them in fp32."""
    import logging
    import shutil

    from trinity_dpo.engine import lora

    folder = tmp_path / "bf16_model"
    AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.bfloat16).save_pretrained(folder)
    for f in qwen_dir.iterdir():
        if "token" in f.name or f.name.endswith(".jinja"):
            shutil.copy(f, folder / f.name)
    casts = []
    original = lora.base_in_bf16
    monkeypatch.setattr(lora, "base_in_bf16", lambda m: casts.append(m) or original(m))
    runs = {}
    for keep in (True, False):
        if not keep:
            monkeypatch.setattr(lora, "frozen_in_bf16", lambda *a: False)
        path = make_config(main={"name": f"bf16base{keep}", "model": {"model_path": str(folder), **LORA},
                                 "trainer": {"total_steps": 2, "precision": "bf16", "eval_samples": 0,
                                             "save_interval": 2}})
        with caplog.at_level(logging.INFO):
            runs[keep] = train.run(load_config(path))
    assert len(casts) == 1 and "the frozen base of 14 adapted layers kept in bf16" in caplog.text
    bases = [p for n, p in casts[0].named_parameters() if ".base_layer." in n]
    assert bases and all(p.dtype == torch.bfloat16 for p in bases)
    assert all(p.dtype == torch.float32 for n, p in casts[0].named_parameters() if ".base_layer." not in n)
    for a, b in zip(records(runs[True]), records(runs[False])):
        assert {k: v for k, v in a.items() if k not in ("tokens_per_s", "step_time_s")} == \
               {k: v for k, v in b.items() if k not in ("tokens_per_s", "step_time_s")}
    for name in ("adapter_model.safetensors", "merged/model.safetensors"):
        wa, wb = (load_file(str(r / "global_step_2" / name)) for r in (runs[True], runs[False]))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_an_fp32_checkpoint_or_fp32_compute_keeps_the_frozen_base_in_fp32():
    from trinity_dpo.config.schema import LoraConfig
    from trinity_dpo.engine.lora import frozen_in_bf16

    on = LoraConfig(rank=4)
    assert frozen_in_bf16(on, True, torch.bfloat16)
    assert not frozen_in_bf16(on, False, torch.bfloat16) and not frozen_in_bf16(on, True, torch.float32)
    assert not frozen_in_bf16(LoraConfig(rank=0), True, torch.bfloat16)
    assert not frozen_in_bf16(LoraConfig(rank=4, load_in_4bit=True), True, torch.bfloat16)


def test_a_bf16_read_base_keeps_computed_buffers_in_fp32(tmp_path):
    """Gemma builds its embedding scale sqrt(hidden) as a buffer when the model is made: under a bf16 read it would
    be 6.3125 for hidden 40, not 6.3246. The bf16 base takes such buffers from an fp32 build, so hidden states
    under bf16 autocast equal the fp32-read model's exactly."""
    from transformers import Gemma3TextConfig

    from trinity_dpo.engine.distributed import Dist
    from trinity_dpo.engine.modeling import Runtime
    from trinity_dpo.engine.policy import build_policy
    from trinity_dpo.config.schema import Config

    config = Gemma3TextConfig(vocab_size=300, hidden_size=40, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=20, max_position_embeddings=128,
                              sliding_window=16)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path)
    hidden = {}
    for bf16 in (False, True):
        cfg = Config()
        cfg.model.model_path, cfg.model.lora.rank, cfg.model.lora.alpha = str(tmp_path), 4, 8
        model = build_policy(cfg, Runtime(torch.device("cpu"), bf16=bf16), Dist()).model
        assert (model.model.layers[0].mlp.gate_proj.base_layer.weight.dtype == torch.bfloat16) is bf16
        scale = dict(model.named_buffers())["model.embed_tokens.embed_scale"]
        assert scale.dtype == torch.float32 and scale.item() == torch.tensor(40 ** 0.5).item()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            hidden[bf16] = model.model(input_ids=torch.tensor([[1, 5, 7, 9, 11]])).last_hidden_state
    assert torch.equal(hidden[False], hidden[True])


def test_adapters_with_a_bias_or_dora_are_computed_or_refused_never_wrong():
    """An adapter continued from model.lora.path may carry PEFT's lora_bias (lora_B with a bias) or be DoRA. The fused
    product had no bias term (outputs off by the bias, which got no gradient) and the merge ignored both: now the
    biased adapter runs through PEFT's forward and merges its bias (scaled), and DoRA's merged model is not written,
    with a warning (its training already ran through PEFT's forward)."""
    from peft import LoraConfig as PeftLora, get_peft_model

    from trinity_dpo.engine import lora, lora_linear

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(6, 5)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    for options in ({"lora_bias": True}, {"use_dora": True}):
        base = Tiny()
        peft_model = get_peft_model(base, PeftLora(r=2, lora_alpha=4, target_modules=["proj"], **options))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.normal_()
        x = torch.randn(3, 6)
        expected = peft_model(x)
        state = {k: v.detach().clone() for k, v in base.state_dict().items()}
        lora_linear.fuse(base)
        assert torch.equal(peft_model(x), expected)
        if "use_dora" in options:  # no merged model, said; the run's own checkpoint is saved (raising lost it)
            assert lora.merged_weights(base, state) is None
            continue
        plain = Tiny()
        plain.load_state_dict(lora.merged_weights(base, state))
        assert torch.allclose(plain(x), expected, atol=1e-5)
