"""Whole processes, as a user starts them: `trinity run --config` against a TRL DPOTrainer script, on the same job.

    python bench/whole_run.py [--steps 8] [--batch 4] [--max-length 512] [--precisions fp32,bf16] [--runs 3]
                              [--ours-checkpointing on|off] [--out docs/benchmarks.md]

Job (issue 29): SmolLM2-135M-Instruct (built in), the first steps x batch real Human-Like pairs, steps optimizer
steps of batch pairs, max length 512, one epoch, lr 1e-6 constant, no evaluation; each side ends by writing the
trained model (TRL: `save_model`; trinity-dpo: its final checkpoint, the Hugging Face folder and the resumable state
with the optimizer's moments). TRL runs
in its fastest configuration here: reference log-probs computed before training (`precompute_ref_log_probs`),
gradient checkpointing off. Each side is a fresh Python process started from here; its wall time runs from the
start to the exit (imports, loading, data, reference pass, steps, the end of the run), its peak memory is its own
max RSS (`os.wait4`). Runs alternate (TRL, trinity-dpo, TRL, ...) so a slow spell of the machine hits both sides.
trinity-dpo's phases come from its log's timestamps (`bench/profile_run.py` prints them for one run).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_trl import REPO, build_model, pairs_file, replace_section  # noqa: E402

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
SPEED, MEMORY = 3.0, 0.4  # issue 29: >= 3x TRL's pairs/s, whole process, at <= 0.4x its peak memory


def ours_config(work: Path, model: str, data: Path, args, precision: str) -> Path:
    import yaml

    cfg = {"project": "bench", "name": f"whole_{precision}", "checkpoint_root_dir": str(work / "runs"),
           "model": {"model_path": model, "max_prompt_tokens": args.max_length, "max_response_tokens": args.max_length,
                     "max_model_len": args.max_length},
           "algorithm": {"policy_loss_fn": "dpo"},
           "buffer": {"train_batch_size": args.batch, "total_epochs": 1,
                      "trainer_input": {"experience_buffer": {"path": str(data)}}},
           "cluster": {"device": "cpu"},
           "trainer": {"precision": precision, "save_interval": 0, "eval_samples": 0,
                       "trainer_config": {"actor_rollout_ref": {"model": {
                           "enable_gradient_checkpointing": args.ours_checkpointing == "on"}}}}}
    path = work / f"ours_{precision}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def trl_side(args) -> None:
    """TRL's job in this process (started by `run` as its own process)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(x) for x in Path(args.data).read_text().splitlines()]
    conv = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    config = DPOConfig(output_dir=str(Path(args.work) / "trl"), report_to=[], per_device_train_batch_size=args.batch,
                       max_length=args.max_length, max_steps=args.steps, learning_rate=1e-6, logging_steps=1,
                       save_strategy="no", use_cpu=True, bf16=args.precision == "bf16", disable_tqdm=True,
                       lr_scheduler_type="constant", seed=42, gradient_checkpointing=False,
                       precompute_ref_log_probs=True)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32), args=config,
                         train_dataset=Dataset.from_list(conv), processing_class=AutoTokenizer.from_pretrained(args.model))
    trainer.train()
    trainer.save_model(str(Path(args.work) / "trl" / "final"))  # the trained model on disk, as ours ends
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print("RESULT " + json.dumps({"loss1": losses[0], "steps": len(losses)}))


def run(cmd: list[str], work: Path, env: dict) -> dict:
    """One process: wall seconds, peak RSS (GB) and its stdout."""
    out = work / "out.txt"
    with open(out, "w") as fh:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=work)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = out.read_text()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text[-3000:]}")
    return {"wall": wall, "peak_gb": usage.ru_maxrss / 1024 ** 2, "out": text}


def ours_result(run_dir: Path) -> dict:
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "step_time_s" in s]
    return {"loss1": steps[0]["loss"], "steps": len(steps), "step_s": sum(s["step_time_s"] for s in steps)}


def measure(args, work: Path, model: str, data: Path) -> dict:
    results: dict = {}
    for r in range(args.runs):
        for precision in args.precisions.split(","):
            for side in ("trl", "ours"):
                # A fresh data cache each run: every run tokenizes, as a first run does.
                env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
                       "TRINITY_DPO_CACHE": str(work / f"cache_{r}_{precision}")}
                if side == "trl":
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--trl-side", "--precision", precision,
                           "--data", str(data), "--model", model, "--work", str(work), "--steps", str(args.steps),
                           "--batch", str(args.batch), "--max-length", str(args.max_length)]
                else:
                    cmd = [sys.executable, "-m", "trinity_dpo.cli", "run", "--config",
                           str(ours_config(work, model, data, args, precision))]
                got = run(cmd, work, env)
                if side == "trl":
                    line = next(x for x in got["out"].splitlines() if x.startswith("RESULT "))
                    got.update(json.loads(line[7:]))
                else:
                    run_dir = max((work / "runs").glob(f"bench/whole_{precision}*"), key=lambda p: p.stat().st_mtime)
                    got.update(ours_result(run_dir))
                got.pop("out")
                results.setdefault((precision, side), []).append(got)
                print(r, precision, side, json.dumps(got), flush=True)
                subprocess.run(["rm", "-rf", str(work / "runs"), str(work / "trl")])
    return results


def cpu() -> tuple[str, list[str]]:
    info = Path("/proc/cpuinfo").read_text().splitlines()
    name = next((x.split(":", 1)[1].strip() for x in info if x.startswith("model name")), platform.processor())
    flags = next((x.split(":", 1)[1].split() for x in info if x.startswith("flags")), [])
    return name, [f for f in FLAGS if f in flags]


def section(args, results: dict, source: str) -> list[str]:
    import torch

    name, flags = cpu()
    pairs = args.steps * args.batch
    cmd = (f"python bench/whole_run.py --steps {args.steps} --batch {args.batch} --max-length {args.max_length} "
           f"--precisions {args.precisions} --runs {args.runs} --ours-checkpointing {args.ours_checkpointing}")
    lines = [f"## Whole processes: trinity-dpo vs TRL DPOTrainer, {args.steps} steps, CPU, SmolLM2-135M-Instruct", "",
             "Command (repository root, after the README's test install):", "", "```shell", cmd, "```", "",
             f"Machine: {os.cpu_count()} CPU cores ({name}; flags {', '.join(flags) or 'none of ' + ', '.join(FLAGS)}),"
             f" torch {torch.__version__}. Job: {args.steps} optimizer steps of {args.batch} pairs ({pairs} pairs of "
             f"`{Path(source).name}`), max length {args.max_length}, one epoch, the trained model saved at the end. "
             "Each figure is a whole process from start to exit; median of the runs, with the smallest and largest in brackets. TRL: "
             "`precompute_ref_log_probs=True`, gradient checkpointing off. trinity-dpo: `trinity run --config` (which "
             "starts itself again with its glibc heap settings, `trinity_dpo/engine/host_heap.py`; TRL's process keeps "
             f"glibc's defaults), gradient checkpointing {args.ours_checkpointing}.", "",
             "| precision | TRL wall (s) | trinity-dpo wall (s) | pairs/s ratio | TRL peak (GB) | trinity-dpo peak (GB) "
             "| memory ratio | trinity-dpo steps (s) | step-1 loss TRL / ours |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    verdicts = []
    for p in args.precisions.split(","):
        t, o = results[(p, "trl")], results[(p, "ours")]
        tw, ow = [x["wall"] for x in t], [x["wall"] for x in o]
        tm, om = [x["peak_gb"] for x in t], [x["peak_gb"] for x in o]
        speed, mem = statistics.median(tw) / statistics.median(ow), statistics.median(om) / statistics.median(tm)
        lines.append(f"| {p} | {_spread(tw, 1)} | {_spread(ow, 1)} | {speed:.2f}x | {_spread(tm, 2)} | "
                     f"{_spread(om, 2)} | {mem:.2f}x | {_spread([x['step_s'] for x in o], 1)} | "
                     f"{t[0]['loss1']:.4f} / {o[0]['loss1']:.4f} |")
        verdicts.append(f"{p}: {speed:.2f}x TRL's pairs/s ({'met' if speed >= SPEED else 'not met'}), "
                        f"{mem:.2f}x its peak memory ({'met' if mem <= MEMORY else 'not met'})")
    return lines + ["", f"Against issue 29's targets (>= {SPEED:g}x, <= {MEMORY:g}x): " + "; ".join(verdicts) + ".",
                    ""]


def _spread(values: list[float], digits: int) -> str:
    f = f"{{:.{digits}f}}"
    return f.format(statistics.median(values)) + (f" [{f.format(min(values))}-{f.format(max(values))}]"
                                                  if len(values) > 1 else "")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ours-checkpointing", default="on", choices=["on", "off"])
    parser.add_argument("--out", default=str(REPO / "docs/benchmarks.md"))
    for hidden in ("--precision", "--data", "--model", "--work"):  # the TRL side process
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--trl-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_side:
        trl_side(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="whole_run_") as tmp:
        work = Path(tmp)
        model = build_model("smollm2", work, None)
        data, source = pairs_file(work, args.steps * args.batch)
        results = measure(args, work, model, data)
    key = f"whole-run-{args.steps}-steps" + ("" if args.ours_checkpointing == "on" else "-no-checkpointing")
    replace_section(Path(args.out), key, section(args, results, source))
    return 0


if __name__ == "__main__":
    sys.exit(main())
