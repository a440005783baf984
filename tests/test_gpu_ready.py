"""What a GPU run depends on that CPU can check: weight files hashed once, bf16 only where native, the memory check
before loading, loading under FSDP2 without a whole model per process."""
from __future__ import annotations

import builtins
import os
import shutil

import torch

from trinity_dpo import reference


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


def test_bf16_counts_only_native_support(monkeypatch):
    """V100 and T4 emulate bf16 slower than fp32: `precision: auto` must not pick it there."""
    from trinity_dpo.config import Config
    from trinity_dpo.modeling import pick_runtime

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

    from trinity_dpo import memory, train
    from trinity_dpo.config import ConfigError
    from trinity_dpo.config_loader import load_config

    monkeypatch.setattr(memory, "device_bytes", lambda device, procs: 80e9)
    seven_b = {"params": 7_000_000_000, "linear_in_out": 7_000_000_000 // 2000, "hidden": 4096, "layers": 32,
               "intermediate": 11008}
    monkeypatch.setattr(memory, "model_shape", lambda path, trust: seven_b)
    loaded = []
    monkeypatch.setattr(train, "load_model", lambda *a, **k: loaded.append(1))
    with pytest.raises(ConfigError) as err:
        train.run(load_config(make_config()))
    message = str(err.value)
    assert message.startswith("memory: this run needs at least 113.6 GB per process (112.0 GB of weights, "
                              "gradients and AdamW states") and "\n" not in message, message
    assert "for 7.00B parameters over 1 process" in message and "but cpu has 80.0 GB" in message
    assert "2 or more GPUs (cluster.gpu_per_node, cluster.node_num)" in message
    assert "LoRA (model.lora_configs: [{lora_rank: 16}])" in message and not loaded
    cfg = load_config(make_config(main={"name": "lora", "model": {"lora": {"rank": 16}}}))
    memory.check_fits(cfg, torch.device("cpu"), 1, 4096)  # 28 GB of frozen weights + a small adapter: fits


def test_model_shape_reads_the_config_only(qwen_dir):
    from transformers import AutoModelForCausalLM

    from trinity_dpo import memory

    shape = memory.model_shape(str(qwen_dir), False)
    model = AutoModelForCausalLM.from_pretrained(qwen_dir)
    assert shape["params"] == sum(p.numel() for p in model.parameters())
    assert shape["hidden"] == model.config.hidden_size and shape["layers"] == model.config.num_hidden_layers


def test_memory_check_steps_aside_when_the_shape_cannot_be_read(make_config, monkeypatch, caplog):
    """An architecture that cannot be built on the meta device gets no estimate, and so no refusal."""
    import logging

    from trinity_dpo import memory
    from trinity_dpo.config_loader import load_config

    def unreadable(path, trust):
        raise ValueError("custom code needs a real device")

    monkeypatch.setattr(memory, "model_shape", unreadable)
    monkeypatch.setattr(memory, "device_bytes", lambda device, procs: 1.0)  # would refuse anything
    with caplog.at_level(logging.INFO):
        memory.check_fits(load_config(make_config()), torch.device("cpu"), 1, 4096)
    assert "memory check skipped: the model's shape could not be read (custom code needs a real device)" in caplog.text
