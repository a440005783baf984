"""Reference-free objectives against sigmoid DPO on the same job: wall time, step time and peak memory.

    python bench/objectives.py [--steps 6] [--batch 4] [--max-length 512] [--precision fp32] [--objectives dpo,simpo,orpo]

Each objective trains SmolLM2-135M-Instruct (built in) on the same pairs as bench/compare_trl.py, in its own process
(its peak memory is its own), and the results replace the `objectives` section of docs/benchmarks.md. DPO's wall
time includes its reference pass (SimPO and ORPO have none); ORPO's step also runs the LM head over the chosen
prompts (its NLL term covers prompt and response tokens, as in TRL).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_trl import REPO, build_model, replace_section, run_side  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--objectives", default="dpo,simpo,orpo")
    parser.add_argument("--out", default=str(REPO / "docs/benchmarks.md"))
    args = parser.parse_args()
    args.device, args.checkpointing, args.trl_fastest = "cpu", True, False
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench_model_") as tmp:
        args.model_path = build_model("smollm2", Path(tmp), None)
        for objective in args.objectives.split(","):
            raw = run_side(args, "ours", args.precision, objective)
            if raw is None:
                return 1
            steps = raw["steps"][1:] or raw["steps"]
            seconds = sum(s["time"] for s in steps)
            rows[objective] = {"pairs/s": sum(s["pairs"] for s in steps) / seconds, "s/step": seconds / len(steps),
                               "peak memory (GB)": raw["peak_rss_gb"], "wall (s)": raw["wall"],
                               "step-1 loss": raw["loss1"]}
            print(objective, rows[objective], flush=True)
    replace_section(Path(args.out), "objectives", _section(args, rows, raw["source"]))
    return 0


def _section(args, rows: dict, source: str) -> list[str]:
    flags = (f"--steps {args.steps} --batch {args.batch} --max-length {args.max_length} --precision {args.precision} "
             f"--objectives {args.objectives}")
    machine = (f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads; peak memory is the process's max RSS")
    lines = ["## Objectives: SimPO and ORPO against sigmoid DPO, CPU, SmolLM2-135M-Instruct", "",
             "Command (repository root, after the README's test install):", "", "```shell",
             f"python bench/objectives.py {flags}", "```", "",
             f"Machine: {machine}. Job: {args.steps} optimizer steps of {args.batch} pairs of `{Path(source).name}`, "
             f"max length {args.max_length}, {args.precision}, gradient checkpointing on. Step rates are over the "
             "steps after the first; wall time is the whole run (DPO's includes its reference pass).", "",
             "| objective | pairs/s | s/step | peak memory (GB) | wall (s) | step-1 loss |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['pairs/s']:.3f} | {r['s/step']:.2f} | {r['peak memory (GB)']:.2f} | "
                     f"{r['wall (s)']:.1f} | {r['step-1 loss']:.4f} |")
    return lines + [""]


if __name__ == "__main__":
    sys.exit(main())
