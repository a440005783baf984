"""trinity-dpo and TRL's DPOTrainer side by side on the same job.

    python bench/compare_trl.py [--steps 6] [--batch 4] [--max-length 512] [--out docs/benchmarks.md]

Same model (the built-in SmolLM2-135M-Instruct), same pairs (the first steps x batch pairs of the real Human-Like
data, or of the demo set where that is absent: one epoch for both), same batch, maximum length, precision and
number of steps. Each side runs in its own process so its peak memory (max RSS) is its own. Reported per side:
pairs/s and tokens/s over the steps after the first, MFU against matrix-product peaks measured in the same run
(useful FLOPs: 6 x params per trained token, plus 2 x params per reference token where the reference runs inside
the step, as TRL's does), peak memory, step-1 loss; then the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
REAL = REPO.parent / "shared" / "data" / "human_like_dpo_dataset"


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 8) -> float:
    """FLOP/s of an n x n x n matrix product in `dtype` on this CPU (best of `reps`)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def pairs_file(work: Path, n: int) -> tuple[Path, str]:
    from trinity_dpo import builtin
    from trinity_dpo.data import read_rows

    source = str(REAL) if REAL.is_dir() else builtin.data_path("builtin:human-like-demo")
    rows = read_rows(source, "train")[:n]
    path = work / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path, source


def run_ours(model: str, data: Path, args, work: Path) -> dict:
    import yaml

    from trinity_dpo import train
    from trinity_dpo.config_loader import load_config

    cfg = {"project": "bench", "name": f"ours_{args.precision}", "checkpoint_root_dir": str(work),
           "model": {"model_path": model, "max_prompt_tokens": args.max_length, "max_response_tokens": args.max_length,
                     "max_model_len": args.max_length},
           "buffer": {"train_batch_size": args.batch, "total_epochs": 1, "trainer_input": {"experience_buffer": {
               "path": str(data)}}},
           "trainer": {"precision": args.precision, "save_interval": 0, "eval_samples": 0, "trainer_config": {
               "actor_rollout_ref": {"model": {"enable_gradient_checkpointing": args.checkpointing}}}}}
    (work / "ours.yaml").write_text(yaml.safe_dump(cfg))
    start = time.perf_counter()
    run_dir = train.run(load_config(work / "ours.yaml"))
    wall = time.perf_counter() - start
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"steps": [{"time": s["step_time_s"], "tokens": s["tokens"], "pairs": s["pairs"]} for s in steps],
            "loss1": steps[0]["loss"], "ref_tokens_in_step": 0, "wall": wall, "pad_share": steps[0]["pad_share"]}


def run_trl(model: str, data: Path, args, work: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(x) for x in data.read_text().splitlines()]
    conv = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    tok = AutoTokenizer.from_pretrained(model)
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    times, tokens = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    config = DPOConfig(output_dir=str(work / "trl"), report_to=[], per_device_train_batch_size=args.batch,
                       max_length=args.max_length, max_steps=args.steps, learning_rate=1e-6, logging_steps=1,
                       save_strategy="no", use_cpu=True, bf16=args.precision == "bf16", disable_tqdm=True,
                       lr_scheduler_type="constant", seed=42)
    start = time.perf_counter()
    trainer = DPOTrainer(model=policy, args=config, train_dataset=Dataset.from_list(conv), processing_class=tok,
                         callbacks=[Clock()])
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting
    trainer.train()
    wall = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steps = [{"time": t, "tokens": n, "pairs": args.batch} for t, n in zip(times, tokens)]
    return {"steps": steps, "loss1": losses[0], "ref_tokens_in_step": 1, "wall": wall, "pad_share": None}


def side(args) -> None:
    """Run one side in this process and print its figures as JSON."""
    from trinity_dpo import builtin

    model = builtin.materialize("builtin:smollm2-135m-instruct")
    work = Path(tempfile.mkdtemp(prefix=f"bench_{args.side}_"))
    data, source = pairs_file(work, args.steps * args.batch)
    result = (run_ours if args.side == "ours" else run_trl)(model, data, args, work)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    result["params"] = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(
        model).parameters())
    result["source"] = source
    print("RESULT " + json.dumps(result))


def summarize(r: dict, peak: float) -> dict:
    steps = r["steps"][1:] or r["steps"]  # the first step warms caches and allocators up
    t = sum(s["time"] for s in steps)
    tokens = sum(s["tokens"] for s in steps)
    flops = (6 + 2 * r["ref_tokens_in_step"]) * r["params"] * tokens
    return {"pairs/s": sum(s["pairs"] for s in steps) / t, "tokens/s": tokens / t, "s/step": t / len(steps),
            "MFU": flops / t / peak, "peak memory (GB)": r["peak_rss_gb"], "step-1 loss": r["loss1"],
            "wall (s)": r["wall"]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", choices=["ours", "trl"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                        help="trinity-dpo without gradient checkpointing (faster here, more memory)")
    parser.add_argument("--out", default=str(REPO / "docs/benchmarks.md"))
    args = parser.parse_args()
    if args.side:
        side(args)
        return 0
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    table = {}
    for precision in args.precisions.split(","):
        for who in ("trl", "ours"):
            cmd = [sys.executable, __file__, "--side", who, "--precision", precision, "--steps", str(args.steps),
                   "--batch", str(args.batch), "--max-length", str(args.max_length)]
            if not args.checkpointing:
                cmd.append("--no-checkpointing")
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(proc.stdout[-3000:], proc.stderr[-3000:])
                return 1
            raw = json.loads(line[7:])
            table[(precision, who)] = summarize(raw, peaks[precision])
            print(precision, who, json.dumps(table[(precision, who)]), flush=True)
    write_doc(Path(args.out), args, peaks, table, raw["source"])
    return 0


def write_doc(out: Path, args, peaks, table, source) -> None:
    keys = ["pairs/s", "tokens/s", "s/step", "MFU", "peak memory (GB)", "step-1 loss", "wall (s)"]
    lines = ["# Benchmarks", "", "## trinity-dpo vs TRL DPOTrainer on CPU", "",
             "Command (repository root, after the README's test install):", "", "```shell",
             f"python bench/compare_trl.py --steps {args.steps} --batch {args.batch} --max-length {args.max_length}",
             "```", "",
             f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads. Matrix-product peaks measured in the same run: "
             f"fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s.", "",
             f"Job: SmolLM2-135M-Instruct, {args.steps} optimizer steps of {args.batch} pairs (one epoch over the same "
             f"{args.steps * args.batch} pairs of `{Path(source).name}`), max length {args.max_length}. Rates are over "
             "the steps after the first. trinity-dpo computes the reference log-probs once before training (their "
             "time is in its wall time, not in its steps); TRL runs its reference model inside every step, so its "
             "useful FLOPs count 2 x params per reference token too. trinity-dpo runs with gradient checkpointing "
             f"{'on' if args.checkpointing else 'off'} (`enable_gradient_checkpointing`); TRL with its defaults.", ""]
    for precision in args.precisions.split(","):
        trl, ours = table[(precision, "trl")], table[(precision, "ours")]
        lines += [f"### {precision}", "", "| | TRL | trinity-dpo | ratio |", "| --- | --- | --- | --- |"]
        for k in keys:
            ratio = ours[k] / trl[k] if trl[k] else float("nan")
            fmt = "{:.4f}" if k in ("step-1 loss", "MFU") else "{:.2f}"
            lines.append(f"| {k} | {fmt.format(trl[k])} | {fmt.format(ours[k])} | {ratio:.2f}x |")
        lines.append("")
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
