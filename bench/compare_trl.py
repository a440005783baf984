"""trinity-dpo and TRL's DPOTrainer side by side on the same job.

    python bench/compare_trl.py [--steps 6] [--batch 4] [--max-length 512] [--out docs/benchmarks.md]
    python bench/compare_trl.py --device cuda --model qwen2.5-1.5b-shape --precisions bf16 --batch 8 --max-length 1024
    python bench/compare_trl.py --lora-rank 16 [--layers 17]   # LoRA on both sides, plus trinity-dpo's full tuning

The second line is issue 4's GPU job: the Qwen2.5-1.5B-Instruct architecture with random weights from its published
config (hidden 1536, 28 layers, 12 heads, 2 KV heads, intermediate 8960, vocabulary 151936, tied embeddings),
tokenized with SmolLM2's tokenizer (its ids fit the larger vocabulary). Each run replaces its own section of the
output file (one per device and model), so CPU and GPU results sit side by side.

Same model (the built-in SmolLM2-135M-Instruct), same pairs (the first steps x batch pairs of the real Human-Like
data, or of the demo set where that is absent: one epoch for both), same batch, maximum length, precision and
number of steps. Each side runs in its own process so its peak memory (max RSS) is its own. Reported per side:
pairs/s and tokens/s (both sequences of each pair, as TRL counts them) over the steps after the first, MFU against
matrix-product peaks measured in the same run (useful FLOPs: 6 x params per computed token position, plus 2 x params
per reference token where the reference runs inside the step, as TRL's does; a prompt trinity-dpo shares between
the two answers counts once), peak memory, step-1 loss; then the ratios.
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
from trinity_dpo.engine import host_heap  # noqa: E402

REAL = REPO.parent / "shared" / "data" / "human_like_dpo_dataset"
BUNDLE = REPO / ".gpu"  # bench/gpu_bundle.py


QWEN_SHAPE = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                  intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6)


def matmul_peak(dtype: torch.dtype, device: str = "cpu", reps: int = 8) -> float:
    """FLOP/s of a square matrix product in `dtype` on `device` (best of `reps`)."""
    n = 8192 if device == "cuda" else 2048
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build_model(name: str, work: Path, layers: int | None) -> str:
    """The model folder of `--model`: the built-in SmolLM2, or the Qwen2.5-1.5B shape with seeded random weights."""
    if name == "smollm2":
        return smollm2_folder(work)
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(**{**QWEN_SHAPE, **({"num_hidden_layers": layers} if layers else {})})
    folder = work / "qwen2.5-1.5b-shape"
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_folder(work, weights=False)).save_pretrained(folder)
    return str(folder)


def smollm2_folder(work: Path, weights: bool = True) -> str:
    """The built-in SmolLM2; on a machine without its package but with bench/gpu_bundle.py's `.gpu/` (the offline
    GPU machine: the GGUF is too large to travel), a folder of its shape with seeded random weights, its tokenizer
    and config from the bundle (only those, without `weights`: for its tokenizer)."""
    from trinity_dpo.sources import builtin
    from trinity_dpo.errors import ConfigError

    try:
        return builtin.materialize("builtin:smollm2-135m-instruct")
    except ConfigError:
        if not (BUNDLE / "smollm2" / "config.json").is_file():
            raise
        if not weights:
            return str(BUNDLE / "smollm2")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = work / "smollm2-shape-random"
    if not (folder / "config.json").is_file():
        print(f"SmolLM2's package is missing: its shape with random weights, from {BUNDLE / 'smollm2'}", flush=True)
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(BUNDLE / "smollm2")
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
        AutoTokenizer.from_pretrained(BUNDLE / "smollm2").save_pretrained(folder)
    return str(folder)


def pairs_file(work: Path, n: int) -> tuple[Path, str]:
    from trinity_dpo.sources import builtin
    from trinity_dpo.data.conversations import read_rows

    source = str(REAL) if REAL.is_dir() else builtin.data_path("builtin:human-like-demo")
    rows = read_rows(source, "train")[:n]
    path = work / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path, source


def run_ours(model: str, data: Path, args, work: Path) -> dict:
    import yaml

    from trinity_dpo.run import train
    from trinity_dpo.config.loader import load_config

    cfg = {"project": "bench", "name": f"ours_{args.precision}_{getattr(args, 'objective', 'dpo')}", "checkpoint_root_dir": str(work),
           "model": {"model_path": model, "max_prompt_tokens": args.max_length, "max_response_tokens": args.max_length,
                     "max_model_len": args.max_length},
           "algorithm": {"policy_loss_fn": getattr(args, "objective", "dpo")},
           "buffer": {"train_batch_size": args.batch, "total_epochs": 1, "trainer_input": {"experience_buffer": {
               "path": str(data)}}},
           "cluster": {"device": args.device},
           "trainer": {"precision": args.precision, "save_interval": 0, "eval_samples": 0, "trainer_config": {
               "actor_rollout_ref": {"model": {"enable_gradient_checkpointing": args.checkpointing}}}}}
    if args.lora_rank:  # TRL's LoraConfig below: all linear layers, alpha = 2 x rank
        cfg["model"]["lora"] = {"rank": args.lora_rank, "alpha": 2 * args.lora_rank, "save_merged": "never"}
    (work / "ours.yaml").write_text(yaml.safe_dump(cfg))
    start = time.perf_counter()
    run_dir = train.run(load_config(work / "ours.yaml"))
    wall = time.perf_counter() - start
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"steps": [{"time": s["step_time_s"], "tokens": s["tokens"], "computed": s["positions"], "pairs": s["pairs"]}
                      for s in steps],
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
            _sync(args.device)
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            _sync(args.device)
            times.append(time.perf_counter() - self.t)

    config = DPOConfig(output_dir=str(work / "trl"), report_to=[], per_device_train_batch_size=args.batch,
                       max_length=args.max_length, max_steps=args.steps, learning_rate=1e-6, logging_steps=1,
                       save_strategy="no", use_cpu=args.device == "cpu", bf16=args.precision == "bf16", disable_tqdm=True,
                       lr_scheduler_type="constant", seed=42,
                       **({"gradient_checkpointing": False, "precompute_ref_log_probs": True} if args.trl_fastest else {}))
    start = time.perf_counter()
    peft = {}
    if args.lora_rank:
        from peft import LoraConfig

        peft["peft_config"] = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules="all-linear",
                                         task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=policy, args=config, train_dataset=Dataset.from_list(conv), processing_class=tok,
                         callbacks=[Clock()], **peft)
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting
    trainer.train()
    wall = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steps = [{"time": t, "tokens": n, "computed": n, "pairs": args.batch} for t, n in zip(times, tokens)]
    return {"steps": steps, "loss1": losses[0], "ref_tokens_in_step": 0 if args.trl_fastest else 1, "wall": wall,
            "pad_share": None}


def side(args) -> None:
    """Run one side in this process and print its figures as JSON."""
    model = args.model_path
    with tempfile.TemporaryDirectory(prefix=f"bench_{args.side}_") as tmp:  # its checkpoints: GBs per run
        data, source = pairs_file(Path(tmp), args.steps * args.batch)
        result = (run_ours if args.side == "ours" else run_trl)(model, data, args, Path(tmp))
    if args.device == "cuda":  # the GPU's memory is what limits a GPU job
        result["peak_rss_gb"] = torch.cuda.max_memory_allocated() / 1e9
    else:
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    result["params"] = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(
        model).parameters())
    result["source"] = source
    result["lora"] = args.lora_rank > 0
    print("RESULT " + json.dumps(result))


def summarize(r: dict, peak: float) -> dict:
    steps = r["steps"][1:] or r["steps"]  # the first step warms caches and allocators up
    t = sum(s["time"] for s in steps)
    tokens = sum(s["tokens"] for s in steps)
    # Useful FLOPs count the positions a side computes: a prompt shared by both answers counts once.
    # LoRA's backward computes no weight gradient of the frozen base: 4 x params per token instead of 6.
    flops = (6 - 2 * r.get("lora", False) + 2 * r["ref_tokens_in_step"]) * r["params"] * sum(s["computed"] for s in steps)
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
    parser.add_argument("--trl-fastest", action="store_true",
                        help="TRL without gradient checkpointing and with its reference log-probs computed before "
                        "training (precompute_ref_log_probs): its fastest configuration here")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "qwen2.5-1.5b-shape"])
    parser.add_argument("--layers", type=int, help="fewer layers of the Qwen shape (a smoke test of this script)")
    parser.add_argument("--model-path", help=argparse.SUPPRESS)  # set for the side processes
    parser.add_argument("--objective", default="dpo", help=argparse.SUPPRESS)  # bench/objectives.py's side runs
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters of this rank on every linear layer "
                        "(both sides); trinity-dpo's full fine-tuning is measured too")
    parser.add_argument("--out", default=str(REPO / "docs/benchmarks.md"))
    args = parser.parse_args()
    if args.side:
        side(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_model_") as tmp:
        args.model_path = build_model(args.model, Path(tmp), args.layers)
        return compare(args)


def compare(args) -> int:
    """Both sides for each precision, each in its own process; then the doc section."""
    peaks = {p: matmul_peak(getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[p]), args.device)
             for p in args.precisions.split(",")}
    table = {}
    for precision in args.precisions.split(","):
        for who in ("trl", "ours", *(("full",) if args.lora_rank else ())):
            raw = run_side(args, who, precision)
            if raw is None:
                return 1
            table[(precision, who)] = summarize(raw, peaks[precision])
            print(precision, who, json.dumps(table[(precision, who)]), flush=True)
    write_doc(Path(args.out), args, peaks, table, raw["source"])
    return 0


def run_side(args, who: str, precision: str, objective: str = "dpo") -> dict | None:
    """One side's figures from its own process (its peak memory is its own); None, with its output shown, on
    failure."""
    lora_rank = 0 if who == "full" else getattr(args, "lora_rank", 0)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", "ours" if who == "full" else who, "--precision",
           precision, "--steps", str(args.steps), "--batch", str(args.batch), "--max-length", str(args.max_length),
           "--device", args.device, "--model-path", args.model_path, "--objective", objective, "--lora-rank",
           str(lora_rank)]
    cmd += (["--no-checkpointing"] if not args.checkpointing else []) + (["--trl-fastest"] if args.trl_fastest else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if who != "trl":  # the heap and kernel cache `trinity run` gives itself (engine/host_heap.py); TRL's as it is
        env = host_heap.training_environment(env)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        return None
    return json.loads(line[7:])


def write_doc(out: Path, args, peaks, table, source) -> None:
    """Replace (or add) this device's and model's section of `out`; the rest of the file is kept."""
    key = f"{args.device}-{args.model}" + ("" if args.checkpointing else "-no-checkpointing")
    key += "-trl-fastest" if args.trl_fastest else ""
    key += f"-lora{args.lora_rank}" + (f"-{args.layers}layers" if args.layers else "") if args.lora_rank else ""
    replace_section(out, key, _section(args, peaks, table, source))


def replace_section(out: Path, key: str, lines: list[str]) -> None:
    """Replace (or append) the `<!-- bench:key -->` section of `out` by `lines`."""
    begin, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    text = out.read_text() if out.is_file() else "# Benchmarks\n"
    section = "\n".join([begin, *lines, end])
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    out.write_text(text)


def _section(args, peaks, table, source) -> list[str]:
    keys = ["pairs/s", "tokens/s", "s/step", "MFU", "peak memory (GB)", "step-1 loss", "wall (s)"]
    flags = f"--steps {args.steps} --batch {args.batch} --max-length {args.max_length} --precisions {args.precisions}"
    flags += f" --device {args.device} --model {args.model}" + ("" if args.checkpointing else " --no-checkpointing")
    flags += " --trl-fastest" if args.trl_fastest else ""
    flags += (f" --lora-rank {args.lora_rank}" if args.lora_rank else "") + (f" --layers {args.layers}" if args.layers else "")
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        machine = f"{props.name} ({props.total_memory / 2 ** 30:.0f} GiB), torch {torch.__version__}; peak memory is"
        machine += " the GPU's (max allocated)"
    else:
        machine = (f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads; peak memory is the process's max RSS")
    peak_text = ", ".join(f"{p} {peaks[p] / 1e9:.0f} GFLOP/s" for p in peaks)
    model = "SmolLM2-135M-Instruct" if args.model == "smollm2" else "the Qwen2.5-1.5B architecture (random weights)"
    title = f"trinity-dpo vs TRL DPOTrainer on {'a CUDA GPU' if args.device == 'cuda' else 'CPU'}, {model}"
    title += f", LoRA rank {args.lora_rank}" if args.lora_rank else ""
    title += f" ({args.layers} layers)" if args.layers else ""
    lines = [f"## {title}", "",
             "Command (repository root, after the README's test install):", "", "```shell",
             f"python bench/compare_trl.py {flags}", "```", "",
             f"Machine: {machine}. Matrix-product peaks measured in the same run: {peak_text}.", "",
             f"Job: {model}, {args.steps} optimizer steps of {args.batch} pairs (one epoch over the same "
             f"{args.steps * args.batch} pairs of `{Path(source).name}`), max length {args.max_length}. Rates are over "
             "the steps after the first. trinity-dpo computes the reference log-probs once before training (their "
             "time is in its wall time, not in its steps); " + (
                 "so does TRL (`precompute_ref_log_probs=True`). " if args.trl_fastest else
                 "TRL runs its reference model inside every step, so its useful FLOPs count 2 x params per reference "
                 "token too. ") + "Tokens count both sequences of each pair on both "
             "sides; MFU counts the positions each side computes (trinity-dpo computes a pair's prompt once). trinity-dpo runs with gradient checkpointing "
             f"{'on' if args.checkpointing else 'off'} (`enable_gradient_checkpointing`); TRL " + (
                 "without gradient checkpointing and with precomputed reference log-probs, its fastest configuration "
                 "here." if args.trl_fastest else "with its defaults (gradient checkpointing on)."), ""]
    if args.lora_rank:
        lines += [f"LoRA: rank {args.lora_rank}, alpha {2 * args.lora_rank}, every linear layer, on both sides (TRL: "
                  "`peft_config`); the last column is trinity-dpo training every weight on the same job.", ""]
    for precision in args.precisions.split(","):
        trl, ours, full = table[(precision, "trl")], table[(precision, "ours")], table.get((precision, "full"))
        head = "| | TRL | trinity-dpo | ratio |" + (" trinity-dpo, all weights |" if full else "")
        lines += [f"### {precision}", "", head, "| --- | --- | --- | --- |" + (" --- |" if full else "")]
        for k in keys:
            ratio = ours[k] / trl[k] if trl[k] else float("nan")
            fmt = "{:.4f}" if k in ("step-1 loss", "MFU") else "{:.2f}"
            extra = f" {fmt.format(full[k])} |" if full else ""
            lines.append(f"| {k} | {fmt.format(trl[k])} | {fmt.format(ours[k])} | {ratio:.2f}x |{extra}")
        lines.append("")
    return lines


if __name__ == "__main__":
    sys.exit(main())
