"""Runtime helpers of modeling.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from transformers import AutoModelForCausalLM

from trinity_dpo.engine import modeling
from trinity_dpo.config.schema import Config
from trinity_dpo.engine.modeling import Runtime, for_model


def _rss_mb() -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(modeling._MALLOC_TRIM is None or not Path("/proc/self/status").exists(), reason="glibc on Linux")
@pytest.mark.parametrize("checkpointing", [True, False])
def test_release_host_memory_returns_freed_heap_pages_under_checkpointing(checkpointing, llama_dir, monkeypatch):
    """250 MB of 64 KiB tensors (below glibc's mmap threshold, so on its heap), 15 of every 16 freed: glibc keeps
    their pages, since live blocks sit between them. With gradient checkpointing on, the release hands at least
    150 MB of them back; with it off the runtime never calls malloc_trim and keeps them (a trimmed page faults in
    again: speed first)."""
    trims, trim = [], modeling._MALLOC_TRIM
    monkeypatch.setattr(modeling, "_MALLOC_TRIM", lambda pad: trims.append(pad) or trim(pad))
    cfg = Config()
    cfg.trainer.trainer_config.actor_rollout_ref.model.enable_gradient_checkpointing = checkpointing
    runtime = for_model(Runtime(torch.device("cpu"), bf16=False), cfg, AutoModelForCausalLM.from_pretrained(llama_dir))
    assert runtime.trim_heap is checkpointing
    keep, drop = [], []
    for i in range(4000):
        (keep if i % 16 == 0 else drop).append(torch.ones(16 * 1024))
    del drop
    held = _rss_mb()
    runtime.release_host_memory()
    assert trims == ([0] if checkpointing else [])
    assert (held - _rss_mb() > 150) is checkpointing
    assert all(float(t[0]) == 1.0 for t in keep)  # the live blocks are untouched


@pytest.mark.parametrize("attention, asked, shared", [("sdpa", True, True), ("sdpa", False, False),
                                                      ("eager", True, False)])
def test_prompts_shared_only_where_asked_and_on_this_tools_attention(llama_dir, attention, asked, shared):
    """Eager (or any other) attention cannot see a prompt outside its segment: such a model gets unshared rows
    even with `trainer.share_prompt` on."""
    model = AutoModelForCausalLM.from_pretrained(llama_dir, attn_implementation=attention)
    modeling.use_varlen(model)  # as load_model does: only SDPA models switch to attention.py
    cfg = Config()
    cfg.trainer.share_prompt = asked
    assert for_model(Runtime(torch.device("cpu"), bf16=False), cfg, model).share_prompt is shared


def test_a_corrupt_config_json_is_one_line(qwen_dir, tmp_path):
    """A model folder whose config.json is not JSON stops in one line from the loader (ConfigError: exit 2), not
    with a traceback from reading its stored dtype."""
    import shutil

    from trinity_dpo.errors import ConfigError

    folder = tmp_path / "model"
    shutil.copytree(qwen_dir, folder)
    (folder / "config.json").write_text("{not json")
    cfg = Config()
    cfg.model.model_path = str(folder)
    with pytest.raises(ConfigError, match=r"^cannot load the model from .*model: ") as err:
        modeling.load_model(cfg, torch.device("cpu"), bf16=True)
    assert "\n" not in str(err.value)


def test_fused_nodes_survive_train_and_eval(llama_dir):
    """transformers (5.x, with `kernels` installed) re-kernelizes a model at every `train()` and `eval()`, setting
    the forward of each RMSNorm again: a loaded policy keeps its norms and MLPs on the fused nodes after both
    switches (the reference pass runs in eval mode, the steps in train mode)."""
    from trinity_dpo.engine import fused_ops

    cfg = Config()
    cfg.model.model_path = str(llama_dir)
    model, _ = modeling.load_model(cfg, torch.device("cpu"))
    for switch in (model.eval, model.train):
        switch()
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                assert norm.forward.__func__ is fused_ops._norm_forward
            assert layer.mlp.forward.__func__ is fused_ops._mlp_forward
