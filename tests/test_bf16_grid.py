"""bf16 compute from fp32 weights that sit on bf16 rounding ties (a Q4 GGUF de-quantized to fp32 has 8% of them):
the policy's trained linear weights are set to the bf16 values autocast computes with (`modeling.round_to_bf16`),
so the forward is unchanged and a run behaves as from a bf16 checkpoint."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

from trinity_dpo.config.loader import load_config
from trinity_dpo.engine import policy
from trinity_dpo.engine.modeling import round_to_bf16
from trinity_dpo.run import train

STEP = 2.0 ** -7  # bf16's spacing in [1, 2)


def _on_ties(t: torch.Tensor) -> torch.Tensor:
    """`t` with each value moved to the midpoint just above its bf16 truncation (fp32 bits xxxx8000): a tie."""
    return ((t.view(torch.int32) & -65536) | 0x8000).view(torch.float32)


def _bf16_values(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def test_rounding_hand_worked(llama_dir):
    """Ties go to the even neighbour, values off a tie to the nearest, bf16 values stay; the embeddings, norms,
    the (untied) LM head and frozen layers keep their values. The count is of values that changed."""
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    round_to_bf16(model)  # the random init's values, out of the way of the count
    q = model.model.layers[0].self_attn.q_proj.weight
    given = [1.0, 1 + STEP / 2, 1 + 3 * STEP / 2, 1 + STEP / 4, 1 + STEP / 2 + 2.0 ** -20, -(1 + STEP / 2)]
    expected = [1.0, 1.0, 1 + 2 * STEP, 1.0, 1 + STEP, -1.0]
    tie = 1 + STEP / 2
    frozen = model.model.layers[1].mlp.down_proj.weight
    frozen.requires_grad_(False)
    with torch.no_grad():
        q[0, :6] = torch.tensor(given)
        for p in (model.model.embed_tokens.weight, model.lm_head.weight, model.model.layers[0].input_layernorm.weight,
                  model.model.norm.weight, frozen):
            p.view(-1)[0] = tie
    assert round_to_bf16(model) == 5  # all but the bf16 value 1.0
    assert q[0, :6].tolist() == expected
    for p in (model.model.embed_tokens.weight, model.lm_head.weight, model.model.layers[0].input_layernorm.weight,
              model.model.norm.weight, frozen):
        assert p.view(-1)[0].item() == tie
    assert round_to_bf16(model) == 0  # a second time changes nothing


def _forward(model, ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states under bf16 autocast (the LM head runs apart, in fp32: logprobs.py)."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model.base_model(input_ids=ids).last_hidden_state


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_first_forward_is_unchanged_to_the_bit(arch, qwen_dir):
    """Qwen2 (biases, tied head) and GPT-2 (Conv1D layers): half the linear weights put on ties, half left as fp32
    values; rounding them leaves the bf16-autocast forward bitwise equal. Rounding the embeddings too would
    change it: autocast looks them up in fp32, so they are not rounded."""
    if arch == "qwen2":
        model = AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.float32)
    else:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4,
                                                            n_positions=64))
    model.eval()
    embed = model.get_input_embeddings().weight
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and p is not embed:
                p.view(-1)[::2] = _on_ties(p.view(-1)[::2])
            elif "bias" in name and ("attn" in name or "proj" in name):
                p.normal_(std=0.02)  # biases start at zero: give the bias casts something to round
    ids = torch.tensor([[3, 17, 42, 9, 101, 5, 77]])
    before = _forward(model, ids)
    assert round_to_bf16(model) > 0
    assert torch.equal(_forward(model, ids), before)
    with torch.no_grad():
        embed.copy_(_bf16_values(embed))
    assert not torch.equal(_forward(model, ids), before)


def _tie_folders(qwen_dir, tmp_path):
    """The same tiny Qwen2 twice: in fp32 with every linear weight of its layers on a tie, and in bf16 (config.json
    says bf16) with those weights as bf16 rounds them. Embeddings (tied to the head) and norms are bf16 values in
    both, so the two differ only in the ties."""
    model = AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_linear = name.startswith("model.layers.") and "norm" not in name
            p.copy_(_on_ties(p) if is_linear and p.dim() == 2 else _bf16_values(p))
    tied, rounded = tmp_path / "ties_fp32", tmp_path / "rounded_bf16"
    model.save_pretrained(tied)
    model.to(torch.bfloat16).save_pretrained(rounded)
    for folder in (tied, rounded):
        AutoTokenizer.from_pretrained(qwen_dir).save_pretrained(folder)
    assert json.loads((rounded / "config.json").read_text())["dtype"] == "bfloat16"
    return tied, rounded


@pytest.mark.slow
def test_a_bf16_run_from_ties_is_the_run_from_the_bf16_checkpoint(make_config, qwen_dir, tmp_path, monkeypatch):
    """Two steps of 4 pairs at lr 1e-7: Adam moves each weight by about 1e-7, far below half a bf16 step at these
    weights (|w| ~ 0.02: 6e-5). Under bf16 the run from the fp32 ties equals the run from their bf16 rounding to the
    bit, and its step-2 loss and margin are the fp32 run's within 1e-4 and 3e-4 (measured: 8e-6 and 1.4e-5).
    Without the rounding the same checks fail (measured: 1.3e-3 and 2.6e-3): every tie whose update points away
    from autocast's pick jumps a whole bf16 step, whatever the learning rate."""
    tied, rounded = _tie_folders(qwen_dir, tmp_path)

    def run(name, folder, precision):
        main = {"name": name, "buffer": {"batch_size": 4}, "trainer": {"total_steps": 2, "precision": precision}}
        path = make_config(main=main, model=folder, verl={"actor_rollout_ref": {"actor": {"optim": {"lr": 1e-7}}}})
        return [json.loads(line) for line in (train.run(load_config(path)) / "metrics.jsonl").read_text().splitlines()]

    def off(run_, ref):  # step 2's loss and margin against the fp32 run's
        return abs(run_[1]["loss"] - ref[1]["loss"]), abs(run_[1]["rewards/margins"] - ref[1]["rewards/margins"])

    fp32 = run("fp32", tied, "fp32")
    from_ties = run("ties", tied, "bf16")
    from_bf16 = run("bf16", rounded, "bf16")
    keys = ("loss", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected",
            "grad_norm")
    assert [[r[k] for k in keys] for r in from_ties] == [[r[k] for k in keys] for r in from_bf16]
    loss_off, margin_off = off(from_ties, fp32)
    assert loss_off < 1e-4 and margin_off < 3e-4

    monkeypatch.setattr(policy, "round_to_bf16", lambda model: 0)
    unrounded = run("unrounded", tied, "bf16")
    assert unrounded[0]["loss"] == from_ties[0]["loss"]  # step 1, before any update: the same forward
    loss_off, margin_off = off(unrounded, fp32)
    assert loss_off > 1e-4 and margin_off > 3e-4


@pytest.mark.slow
def test_two_processes_round_their_shards(make_config, qwen_dir, tmp_path):
    """Two workers (FSDP2; each fills only its rows of each weight from the folder) under bf16: the run from the
    fp32 ties equals, to the bit, two workers from their bf16 rounding; each worker rounds its own shard."""
    tied, rounded = _tie_folders(qwen_dir, tmp_path)
    runs = {}
    for name, folder in (("ties2", tied), ("bf16x2", rounded)):
        main = {"name": name, "trainer": {"total_steps": 2, "precision": "bf16"}}
        path = make_config(main=main, model=folder, verl={"actor_rollout_ref": {"actor": {"optim": {"lr": 1e-7}}}})
        proc = subprocess.run([sys.executable, "-m", "trinity_dpo.cli", "run", "--config", str(path),
                               "cluster.gpu_per_node=2"], capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "starting 2 worker processes" in proc.stderr
        assert ("exactly halfway between two): set to the bf16 values" in proc.stderr) is (folder == tied)
        runs[name] = [json.loads(line) for line in
                      (tmp_path / "ckpt" / "proj" / name / "metrics.jsonl").read_text().splitlines()]
    drop = ("tokens_per_s", "step_time_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in runs["ties2"]] == \
        [{k: v for k, v in r.items() if k not in drop} for r in runs["bf16x2"]]
