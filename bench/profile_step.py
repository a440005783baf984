"""trinity-dpo's training step under torch.profiler, on compare_trl.py's job: where a step's time goes.

    python bench/profile_step.py [--precision bf16] [--lora-rank 16] [--no-checkpointing] [--steps 5] [--batch 4]
                                 [--max-length 512] [--trainer dpo|reward|kto]

Runs our side of `bench/compare_trl.py` (same model, pairs, config), or with `--trainer reward|kto` our side of
`bench/compare_trl_kto.py`, in the environment `trinity run` gives itself (engine/host_heap.py). After the first
step, every other step is profiled and the others are only timed: the report gives both, since the profiler slows a
step. Prints the operators by self CPU time, the matrix products' rate (FLOPs from their recorded shapes), and the
share of the steps' time in matrix products against the matrix-product peak measured in the same process.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_trl  # noqa: E402

from trinity_dpo.engine import host_heap  # noqa: E402
from trinity_dpo.run import train  # noqa: E402

# Matrix products, with where their two operands sit among the recorded input shapes. aten::matmul and aten::linear
# dispatch to these, so counting them too would count a product twice.
PRODUCTS = {"aten::mm": 0, "aten::addmm": 1, "aten::addmm_": 1, "aten::bmm": 0, "aten::baddbmm": 1}


def product_flops(name: str, shapes: list) -> float:
    """2 x M x K x N (times the batch for bmm) of one call, from its recorded input shapes; 0 for other operators."""
    if name not in PRODUCTS or not shapes:
        return 0.0
    a, b = shapes[PRODUCTS[name]], shapes[PRODUCTS[name] + 1]
    return 2.0 * torch.Size(a).numel() * b[-1]


def profiled(steps: list, plain: list, stacks: bool):
    """`train.train_step` that profiles every other call after the first (kept in `steps`) and times the others
    (`plain`), so the report can show what the profiler adds. No `with_flops`: it made each profiled step fault
    ~500k pages in again and take 50-100% longer (fp32, 2026-12-07); products' FLOPs come from the shapes."""
    inner = train.train_step
    calls = []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) % 2:
            record = inner(*args, **kwargs)
            if len(calls) > 1:
                plain.append(record["step_time_s"])
            return record
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_stack=stacks) as prof:
            record = inner(*args, **kwargs)
        averages = prof.key_averages(group_by_input_shape=True, group_by_stack_n=5 if stacks else 0)
        steps.append((record["step_time_s"], averages))
        return record
    return step


def report(steps: list, plain: list, peak: float, rows: int, precision: str = "fp32", shapes: bool = False) -> str:
    total = sum(t for t, _ in steps)
    merged: dict[str, list[float]] = {}
    for _, averages in steps:
        for e in averages:
            key = e.key + (f" {e.input_shapes}" if shapes and e.input_shapes else "")
            if shapes and e.stack:
                key += " @ " + " < ".join(f.split("/")[-1] for f in e.stack[:4])
            row = merged.setdefault(key, [0.0, 0.0, 0])
            row[0] += e.self_cpu_time_total / 1e6
            row[1] += product_flops(e.key, e.input_shapes) * e.count
            row[2] += e.count
    unprofiled = f"{sum(plain) / len(plain):.2f} s a step unprofiled" if plain else "no unprofiled step to compare"
    lines = [f"{len(steps)} profiled steps, {total:.2f} s in all ({total / len(steps):.2f} s a step; {unprofiled}); "
             f"{precision} matrix-product peak {peak / 1e9:.0f} GFLOP/s",
             f"{'operator':40s} {'self s':>8s} {'share':>6s} {'calls':>7s} {'GFLOP/s':>8s}"]
    for key, (secs, flops, count) in sorted(merged.items(), key=lambda kv: -kv[1][0])[:rows]:
        rate = f"{flops / secs / 1e9:8.0f}" if flops and secs else " " * 8
        lines.append(f"{key[:400]:40s} {secs:8.2f} {secs / total:6.1%} {count:7d} {rate}")
    products = [v for k, v in merged.items() if k.split(" ")[0] in PRODUCTS]
    mm_s, mm_f = sum(v[0] for v in products), sum(v[1] for v in products)
    lines.append(f"matrix products: {mm_s:.2f} s ({mm_s / total:.0%} of the steps), {mm_f / 1e12:.2f} TFLOP, "
                 f"{mm_f / mm_s / 1e9:.0f} GFLOP/s ({mm_f / mm_s / peak:.0%} of the peak)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lora-rank", type=int, default=0)
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "qwen2.5-1.5b-shape"])
    parser.add_argument("--layers", type=int)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--shapes", action="store_true", help="one row per operator and input shapes")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--trainer", default="dpo", choices=["dpo", "reward", "kto"])
    args = parser.parse_args()
    # The heap and kernel cache `trinity run` gives itself: with glibc's defaults a step faults its activations in
    # again, and that time lands on whichever operator first writes fresh memory (engine/host_heap.py).
    host_heap.restart_tuned()
    host_heap.bound_kernel_cache()
    args.device, args.objective = "cpu", "dpo"
    steps: list = []
    plain: list = []
    train.train_step = profiled(steps, plain, args.shapes)
    with tempfile.TemporaryDirectory(prefix="profile_step_") as tmp:
        work = Path(tmp)
        model = compare_trl.build_model(args.model, work, args.layers)
        if args.trainer == "dpo":
            data, _ = compare_trl.pairs_file(work, args.steps * args.batch)
            compare_trl.run_ours(model, data, args, work)
        else:  # compare_trl_kto.py's job: pairs that fit --max-length, KTO's as TRL's unpaired rows
            import compare_trl_kto

            args.model_path, args.ours_checkpointing = model, "on" if args.checkpointing else "off"
            pairs, _, _ = compare_trl_kto.fitting_pairs(work, args)
            args.data = str(compare_trl_kto.write_rows(args.trainer, pairs, work))
            compare_trl_kto.run_ours(args, work)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    print(report(steps, plain, compare_trl.matmul_peak(dtype), args.rows, args.precision, args.shapes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
