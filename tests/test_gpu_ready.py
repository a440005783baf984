"""What a GPU run depends on that CPU can check: weight files hashed once, bf16 only where native, the memory check
before loading, loading under FSDP2 without a whole model per process."""
from __future__ import annotations

import builtins
import json
import os
import shutil

import pytest
import torch

from trinity_dpo.objective import reference
from trinity_dpo.engine.modeling import Runtime

CPU = Runtime(torch.device("cpu"), bf16=False)


def test_weight_files_are_hashed_once_per_process_until_they_change(tmp_path, qwen_dir, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(qwen_dir, model)
    reads, real_open = [], builtins.open

    def counting(file, *args, **kwargs):
        if str(file).endswith(".safetensors"):
            reads.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(reference, "_DIGESTS", {})
    monkeypatch.setattr(builtins, "open", counting)
    first = reference._weights_digest(str(model))
    assert reference._weights_digest(str(model)) == first and len(reads) == 1  # the second start of a run: no read
    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten in place
    assert reference._weights_digest(str(model)) == first and len(reads) == 2  # read again; same bytes, same digest
    # Same weights, another config (rope_theta here): another model, so another reference table.
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rope_theta": 1234.0}))
    assert reference._weights_digest(str(model)) != first


def test_bf16_counts_only_native_support(monkeypatch):
    """V100 and T4 emulate bf16 slower than fp32: `precision: auto` must not pick it there."""
    from trinity_dpo.config.schema import Config
    from trinity_dpo.engine.modeling import pick_runtime

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.append(
        including_emulation) or including_emulation)
    assert pick_runtime(Config()).bf16 is False and asked == [False]


def test_a_run_that_cannot_fit_stops_before_loading_with_what_would_fit(make_config, monkeypatch):
    """SmolLM2-135M's shape (random weights are never built: the check reads config.json on the meta device)
    against an 80 GB GPU with a 7B-sized need: 16 bytes a parameter over 1 process; the message names more GPUs
    and LoRA. With LoRA the same job fits."""
    import pytest

    from trinity_dpo.engine import memory, policy
    from trinity_dpo.run import train
    from trinity_dpo.errors import ConfigError
    from trinity_dpo.config.loader import load_config

    monkeypatch.setattr(memory, "device_bytes", lambda device, procs: 80e9)
    seven_b = {"params": 7_000_000_000, "linear_in_out": 7_000_000_000 // 2000, "hidden": 4096, "layers": 32,
               "intermediate": 11008}
    monkeypatch.setattr(memory, "model_shape", lambda path, trust, reward_model=False: seven_b)
    loaded = []
    monkeypatch.setattr(policy, "load_model", lambda *a, **k: loaded.append(1))
    with pytest.raises(ConfigError) as err:
        train.run(load_config(make_config()))
    message = str(err.value)
    assert message.startswith("memory: this run needs at least 113.6 GB per process (112.0 GB of weights, "
                              "gradients and AdamW states") and "\n" not in message, message
    assert "for 7.00B parameters over 1 process" in message and "but cpu has 80.0 GB" in message
    assert "2 or more GPUs (cluster.gpu_per_node, cluster.node_num)" in message
    assert "LoRA (model.lora_configs: [{lora_rank: 16}])" in message and not loaded
    cfg = load_config(make_config(main={"name": "lora", "model": {"lora": {"rank": 16}}}))
    memory.check_fits(cfg, CPU, 1, 4096)  # 28 GB of frozen weights + a small adapter: fits


def test_model_shape_reads_the_config_only(qwen_dir):
    from transformers import AutoModelForCausalLM

    from trinity_dpo.engine import memory

    shape = memory.model_shape(str(qwen_dir), False)
    model = AutoModelForCausalLM.from_pretrained(qwen_dir)
    assert shape["params"] == sum(p.numel() for p in model.parameters())
    assert shape["hidden"] == model.config.hidden_size and shape["layers"] == model.config.num_hidden_layers
    # A reward model is read as a sequence classifier: its one-output score head, not an untied LM head.
    from transformers import AutoModelForSequenceClassification

    scorer = AutoModelForSequenceClassification.from_pretrained(qwen_dir, num_labels=1)
    assert memory.model_shape(str(qwen_dir), False, reward_model=True)["params"] == sum(
        p.numel() for p in scorer.parameters())


def test_memory_check_steps_aside_when_the_shape_cannot_be_read(make_config, monkeypatch, caplog):
    """An architecture that cannot be built on the meta device gets no estimate, and so no refusal."""
    import logging

    from trinity_dpo.engine import memory
    from trinity_dpo.config.loader import load_config

    def unreadable(path, trust, reward_model=False):
        raise ValueError("custom code needs a real device")

    monkeypatch.setattr(memory, "model_shape", unreadable)
    monkeypatch.setattr(memory, "device_bytes", lambda device, procs: 1.0)  # would refuse anything
    with caplog.at_level(logging.INFO):
        memory.check_fits(load_config(make_config()), CPU, 1, 4096)
    assert "memory check skipped: the model's shape could not be read (custom code needs a real device)" in caplog.text


_LOAD_WORKER = """
import json, os, resource, sys
import psutil, torch
from trinity_dpo.engine import distributed
from trinity_dpo.engine.policy import build_policy
from trinity_dpo.config.loader import load_config
from trinity_dpo.engine.modeling import pick_runtime

cfg = load_config(sys.argv[1])
runtime = pick_runtime(cfg)
d = distributed.setup(cfg, runtime.device)
before = psutil.Process().memory_info().rss
model = build_policy(cfg, runtime, d).model
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
local = sum(p.to_local().numel() * 4 for p in model.parameters())
tied = model.lm_head.weight is model.model.embed_tokens.weight
meta = any(p.to_local().is_meta for p in model.parameters())
with open(os.path.join(sys.argv[2], f"rank{d.rank}.json"), "w") as f:
    json.dump({"growth": peak - before, "local": local, "tied": tied, "meta": meta}, f)
distributed.teardown(d)
"""


@pytest.mark.slow
def test_two_workers_each_load_half_the_model(tmp_path, make_config):
    """FSDP2 loading builds the model on the meta device and each worker reads only its rows of each weight: with
    2 gloo workers and a 112M-parameter model (450 MB in fp32), each worker's peak host memory grows by about half
    of that during loading, not all of it (loading whole, as before, each grew by at least the full 450 MB). Tied
    embeddings stay one parameter."""
    import json
    import subprocess
    import sys

    from tiny import make_model_dir

    model_dir = make_model_dir(tmp_path / "model", "qwen2", hidden=1024, layers=12)
    full = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))  # fp32 on disk: the model state
    assert full > 400e6
    config = make_config(main={"cluster": {"gpu_per_node": 2}}, model=model_dir)
    (tmp_path / "worker.py").write_text(_LOAD_WORKER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(tmp_path / "worker.py"), str(config), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["tied"] and not r["meta"]
        assert abs(r["local"] - full / 2) < 0.02 * full  # each holds its half of every weight
        assert r["growth"] < 0.65 * full, (r["growth"] / 1e6, full / 1e6)


def test_a_folder_whose_names_do_not_match_is_loaded_whole(tmp_path, qwen_dir, make_config, caplog):
    """Sharded loading reads each parameter under its own name; a checkpoint stored under other names (here one
    weight renamed, as legacy checkpoints that from_pretrained converts) is left to from_pretrained, and says so."""
    import logging

    from safetensors.torch import load_file, save_file

    from trinity_dpo.config.loader import load_config
    from trinity_dpo.engine.modeling import load_model, weights_reader

    model = tmp_path / "renamed"
    shutil.copytree(qwen_dir, model)
    tensors = load_file(str(model / "model.safetensors"))
    tensors["model.norm.gamma"] = tensors.pop("model.norm.weight")
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    cfg = load_config(make_config(model=model))
    skeleton, _ = load_model(cfg, torch.device("cpu"), empty=True)
    assert all(p.is_meta for p in skeleton.parameters())
    with caplog.at_level(logging.INFO):
        assert weights_reader(cfg, skeleton) is None
    assert "loading " + str(model) + " whole in every process: model.norm.weight has no stored" in caplog.text
    cfg = load_config(make_config(model=qwen_dir))
    read = weights_reader(cfg, load_model(cfg, torch.device("cpu"), empty=True)[0])
    rows = read("model.embed_tokens.weight", (slice(3, 5),))
    assert torch.equal(rows, load_file(str(qwen_dir / "model.safetensors"))["model.embed_tokens.weight"][3:5])


def test_a_fresh_adapter_starts_the_same_however_the_model_is_built():
    """A fresh adapter's values depend on the seed and the weight's name only (a skeleton on the meta device
    draws nothing from the global generator): A is uniform in +-1/sqrt(fan_in), as PEFT's default (kaiming
    uniform with a = sqrt(5) gives bound sqrt(6 / (1 + 5)) / sqrt(fan_in) = 1/sqrt(64) = 0.125 here), B is 0."""
    from trinity_dpo.engine.lora import fresh_value

    name = "model.layers.0.self_attn.q_proj.lora_A.default.weight"
    a = fresh_value(name, torch.Size([8, 64]), seed=1)
    torch.manual_seed(123)
    assert torch.equal(a, fresh_value(name, torch.Size([8, 64]), seed=1))
    assert not torch.equal(a, fresh_value(name, torch.Size([8, 64]), seed=2))
    assert not torch.equal(a, fresh_value(name.replace("q_proj", "k_proj"), torch.Size([8, 64]), seed=1))
    assert a.abs().max() <= 0.125 and a.abs().max() > 0.1 and abs(a.mean()) < 0.02
    assert not fresh_value(name.replace("lora_A", "lora_B"), torch.Size([64, 8]), seed=1).any()


def test_memory_check_counts_the_layers_that_keep_activations(make_config, monkeypatch):
    """Activation bytes per token in the estimate, 7B shape (32 layers, hidden 4096, intermediate 11008), 2 bytes
    a value: a recomputing layer keeps its input (4096 values), a layer that does not keeps 10 x 4096 + 2 x 11008 =
    62976. At 4096 tokens a micro-batch: every layer recomputing 32 x 4096 x 2 x 4096 = 1.07 GB; every 2nd layer
    (16 + 16) (16 x 4096 + 16 x 62976) x 2 x 4096 = 8.79 GB; every 3rd layer (layers 0, 3, ..., 30: 11 of 32)
    (11 x 4096 + 21 x 62976) x 2 x 4096 = 11.20 GB; none 32 x 62976 x 2 x 4096 = 16.51 GB."""
    import pytest

    from trinity_dpo.engine import memory
    from trinity_dpo.errors import ConfigError
    from trinity_dpo.config.loader import load_config

    monkeypatch.setattr(memory, "device_bytes", lambda device, procs: 1.0)
    monkeypatch.setattr(memory, "model_shape", lambda path, trust, reward_model=False: {
        "params": 1, "linear_in_out": 1, "hidden": 4096, "layers": 32, "intermediate": 11008})
    for gc, every, gb in ((True, 1, "1.1"), (True, 2, "8.8"), (True, 3, "11.2"), (False, 1, "16.5")):
        model = {"enable_gradient_checkpointing": gc, "gradient_checkpointing_every": every}
        cfg = load_config(make_config(verl={"actor_rollout_ref": {"model": model}}))
        with pytest.raises(ConfigError, match=f", {gb} GB of activations for 4096 tokens a micro-batch"):
            memory.check_fits(cfg, CPU, 1, 4096)


def test_memory_check_counts_a_bf16_frozen_base_at_two_bytes(make_config, monkeypatch):
    """7B shape with LoRA rank 16 (56M trained: 16 x 3.5M in + out features), 6.5B of it in linear weights,
    checkpointing on (1.07 GB of activations at 4096 tokens), 24 GB of device memory. fp32 base: 4 x 7 = 28 GB
    frozen + 16 x 0.056 = 0.90 GB trained + 1.07 = 30.0 GB: refused. Under bf16 compute from a bf16 checkpoint the
    adapted linears are kept in bf16: 28 - 2 x 6.5 = 15 GB frozen, 17.0 GB in all: it fits."""
    import pytest

    from trinity_dpo.engine import memory
    from trinity_dpo.errors import ConfigError
    from trinity_dpo.config.loader import load_config

    monkeypatch.setattr(memory, "device_bytes", lambda device, procs: 24e9)
    monkeypatch.setattr(memory, "stored_dtype", lambda path: torch.bfloat16)
    monkeypatch.setattr(memory, "model_shape", lambda path, trust, reward_model=False: {
        "params": 7_000_000_000, "linear_in_out": 3_500_000, "linear_weights": 6_500_000_000, "hidden": 4096,
        "layers": 32, "intermediate": 11008})
    cfg = load_config(make_config(main={"model": {"lora": {"rank": 16}}},
                                  verl={"actor_rollout_ref": {"model": {"enable_gradient_checkpointing": True}}}))
    with pytest.raises(ConfigError, match=r"needs at least 30\.0 GB per process \(28\.9 GB of weights"):
        memory.check_fits(cfg, CPU, 1, 4096)
    memory.check_fits(cfg, Runtime(torch.device("cpu"), bf16=True), 1, 4096)
    monkeypatch.setattr(memory, "stored_dtype", lambda path: torch.float32)  # an fp32 file keeps an fp32 base
    with pytest.raises(ConfigError, match=r"needs at least 30\.0 GB"):
        memory.check_fits(cfg, Runtime(torch.device("cpu"), bf16=True), 1, 4096)
