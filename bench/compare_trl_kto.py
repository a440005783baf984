"""trinity-dpo against TRL's KTOTrainer and RewardTrainer on the same SmolLM2 job (issue 27).

    python bench/compare_trl_kto.py [--trainer kto|reward|both] [--steps 8] [--batch 4] [--max-length 512]
                                    [--precisions fp32,bf16] [--ours-checkpointing on|off] [--out docs/benchmarks.md]

Same model (the built-in SmolLM2-135M-Instruct; the reward model is that causal LM with a new score head on both
sides), same rows, same batches in the same order, same length limit, precision and number of steps; AdamW, lr 1e-6
constant, no weight decay, clipping at 1.0, one epoch, no saving, no evaluation. `--batch` counts pairs: the reward
model trains on B pairs a step, KTO on the 2B unpaired examples that B pairs' worth of rows make.

Rows: the first steps x batch pairs of the real Human-Like data (bench/compare_trl.py's `pairs_file`) whose prompt
and longer answer fit `--max-length` tokens through the chat template, so neither side cuts a sequence (TRL's reward
trainer drops longer pairs, its KTO cuts on the right, trinity-dpo cuts the prompt's start). Both sides read the
same file of chat messages. KTO's rows are TRL's unpaired shape, made by `trl.unpair_preference_dataset` (each pair a
desirable chosen and an undesirable rejected completion). TRL reads the rows in trinity-dpo's step order, each step's
rows in file order, with its sequential sampler: each step trains the same examples, and KTO's KL baseline pairs the
same examples (TRL rotates completions within a batch, trinity-dpo within a step in file order).

Each side in its fastest configuration here: TRL without gradient checkpointing (its configs default to on) and,
for KTO, with the reference log-probs computed before training (`precompute_ref_log_probs=True`); trinity-dpo
with `enable_gradient_checkpointing` as `--ours-checkpointing` says (off by default: the faster in the DPO runs of
docs/benchmarks.md). Each side runs in its own process, so its peak memory (max RSS) is its own. Reported:
examples/s (KTO: unpaired examples; reward: pairs) and s/step over the steps after the first, peak memory, wall
time from loading the model, step-1 loss, and the ratios against the issue's targets.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_trl import REPO, build_model, pairs_file, replace_section  # noqa: E402

from trinity_dpo.engine import host_heap  # noqa: E402

SEED = 42  # our step order and both sides' seed (the reward head is drawn from it on both sides)
BETA = 0.1  # KTOConfig's default
LR = 1e-6
TARGET_SPEED, TARGET_MEMORY = 2.0, 0.5  # issue 27: >= 2x TRL's examples/s at <= 0.5x its peak memory
KEYS = ["examples/s", "s/step", "peak memory (GB)", "step-1 loss", "wall (s)", "examples (all steps)",
        "tokens (all steps)"]
TITLES = {"kto": "KTO vs TRL KTOTrainer", "reward": "reward model vs TRL RewardTrainer"}
UNITS = {"kto": "unpaired examples", "reward": "pairs"}


def n_tokens(tok, messages: list[dict]) -> int:
    return len(tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"])


def fitting_pairs(work: Path, args) -> tuple[list[dict], str, int]:
    """(the first steps x batch pairs that fit `--max-length` as chat messages, their source, pairs passed over)."""
    from transformers import AutoTokenizer

    tok, n, max_length = AutoTokenizer.from_pretrained(args.model_path), args.steps * args.batch, args.max_length
    path, source = pairs_file(work, 10 ** 9)
    kept, skipped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        prompt = [{"role": "user", "content": r["prompt"]}]
        conv = {"prompt": prompt, "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}]}
        if max(n_tokens(tok, prompt + conv[k]) for k in ("chosen", "rejected")) <= max_length:
            kept.append(conv)
        else:
            skipped += 1
        if len(kept) == n:
            return kept, source, skipped
    raise SystemExit(f"only {len(kept)} of the {n} pairs needed fit --max-length {max_length}")


def write_rows(trainer: str, pairs: list[dict], work: Path) -> Path:
    """The file both sides read: the pairs, or for KTO the unpaired rows TRL would make of them."""
    rows = pairs
    if trainer == "kto":
        from datasets import Dataset
        from trl import unpair_preference_dataset

        rows = unpair_preference_dataset(Dataset.from_list(pairs)).to_list()
    path = work / f"{trainer}.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def examples_per_step(args) -> int:
    return 2 * args.batch if args.trainer == "kto" else args.batch


def run_ours(args, work: Path) -> dict:
    import yaml

    from trinity_dpo.config.loader import load_config
    from trinity_dpo.run import train

    algorithm = {"algorithm_type": "kto", "policy_loss_fn_args": {
        "beta": BETA, "loss_type": "kto", "desirable_weight": 1.0, "undesirable_weight": 1.0}} \
        if args.trainer == "kto" else {"algorithm_type": "reward_model"}
    algorithm["optimizer"] = {"lr": LR, "weight_decay": 0.0, "lr_scheduler_type": "constant"}
    cfg = {"project": "bench", "name": f"ours_{args.trainer}_{args.precision}", "checkpoint_root_dir": str(work),
           "model": {"model_path": args.model_path, "max_prompt_tokens": args.max_length,
                     "max_response_tokens": args.max_length, "max_model_len": args.max_length},
           "algorithm": algorithm,
           "buffer": {"train_batch_size": examples_per_step(args), "total_epochs": 1, "trainer_input": {
               "experience_buffer": {"path": args.data, "format": {"prompt_type": "messages"}}}},
           "cluster": {"device": "cpu"},
           "trainer": {"precision": args.precision, "save_interval": 0, "eval_samples": 0, "seed": SEED,
                       "grad_clip": 1.0, "trainer_config": {"actor_rollout_ref": {"model": {
                           "enable_gradient_checkpointing": args.ours_checkpointing != "off",
                           **({"gradient_checkpointing_every": 2} if args.ours_checkpointing == "every2" else {})}}}}}
    (work / "ours.yaml").write_text(yaml.safe_dump(cfg))
    start = time.perf_counter()
    run_dir = train.run(load_config(work / "ours.yaml"))
    wall = time.perf_counter() - start
    steps = [s for s in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "step_time_s" in s]
    return {"steps": [{"time": s["step_time_s"], "examples": s.get("pairs", s.get("rows")), "tokens": s["tokens"]}
                      for s in steps],
            "loss1": steps[0]["loss"], "wall": wall}


def trl_order(n: int, batch: int) -> list[int]:
    """Our run's steps, each step's rows in file order: what TRL's sequential sampler should read."""
    from trinity_dpo.data.batching import step_indices, steps_per_epoch

    return [i for s in range(steps_per_epoch(n, batch)) for i in sorted(step_indices(s, n, batch, SEED)[1])]


def run_trl(args, work: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer

    start = time.perf_counter()  # wall time from here: data and model loading, as in ours
    rows = [json.loads(x) for x in Path(args.data).read_text(encoding="utf-8").splitlines()]
    batch = examples_per_step(args)
    dataset = Dataset.from_list([rows[i] for i in trl_order(len(rows), batch)])
    tok = AutoTokenizer.from_pretrained(args.model_path)
    common = dict(output_dir=str(work / "trl"), report_to=[], per_device_train_batch_size=batch,
                  gradient_accumulation_steps=1, max_length=args.max_length, max_steps=args.steps, learning_rate=LR,
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
                  save_strategy="no", eval_strategy="no", use_cpu=True, bf16=args.precision == "bf16",
                  disable_tqdm=True, seed=SEED, gradient_checkpointing=False, train_sampling_strategy="sequential")
    if args.trainer == "kto":
        from trl import KTOConfig, KTOTrainer

        config = KTOConfig(**common, beta=BETA, loss_type="kto", desirable_weight=1.0, undesirable_weight=1.0,
                           precompute_ref_log_probs=True)
        trainer = KTOTrainer(model=args.model_path, args=config, train_dataset=dataset, processing_class=tok)
    else:
        from trl import RewardConfig, RewardTrainer

        trainer = RewardTrainer(model=args.model_path, args=RewardConfig(**common), train_dataset=dataset,
                                processing_class=tok)
    if len(trainer.train_dataset) != len(rows):  # a dropped row would shift every later batch off ours
        raise SystemExit(f"TRL kept {len(trainer.train_dataset)} of {len(rows)} rows")
    times, batches = instrument(trainer)
    trainer.train()
    wall = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"steps": [{"time": t, **b} for t, b in zip(times, batches)], "loss1": losses[0], "wall": wall}


def instrument(trainer) -> tuple[list[float], list[dict]]:
    """(each step's seconds, each batch's examples and tokens), filled as `trainer` trains. Two lists, zipped
    afterwards: the data loader may collate the next batch before the current step ends."""
    from transformers import TrainerCallback

    times, batches, collate = [], [], trainer.data_collator

    def counting(examples):
        out = collate(examples)
        # The trained sequences' tokens (KTO: not its KL sequences), prompts included, as ours counts them.
        batches.append({"examples": len(examples), "tokens": int(out["attention_mask"].sum())})
        return out

    class Clock(TrainerCallback):  # CPU only: nothing runs asynchronously to wait for
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    trainer.data_collator = counting
    trainer.add_callback(Clock())
    return times, batches


def side(args) -> None:
    """Run one side in this process and print its figures as JSON."""
    with tempfile.TemporaryDirectory(prefix=f"bench_{args.trainer}_{args.side}_") as tmp:
        result = (run_ours if args.side == "ours" else run_trl)(args, Path(tmp))
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print("RESULT " + json.dumps(result))


def run_side(args, trainer: str, who: str, precision: str, data: Path) -> dict:
    """One side's figures from its own process (its peak memory is its own); stops, its output shown, on failure."""
    flags = {"--side": who, "--trainer": trainer, "--precision": precision, "--data": data, "--steps": args.steps,
             "--batch": args.batch, "--max-length": args.max_length, "--model-path": args.model_path,
             "--ours-checkpointing": args.ours_checkpointing}
    cmd = [sys.executable, str(Path(__file__).resolve()), *(str(x) for item in flags.items() for x in item)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if who == "ours":  # the heap and kernel cache `trinity run` gives itself (engine/host_heap.py); TRL's as it is
        env = host_heap.training_environment(env)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    found = [x[len("RESULT "):] for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if not found:
        raise SystemExit(f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{trainer} {who} {precision} failed")
    out = figures(json.loads(found[-1]))
    print(trainer, who, precision, json.dumps(out), flush=True)
    return out


def figures(raw: dict) -> dict:
    """The table's figures of one side's RESULT; rates leave the first step out (it warms caches and allocators)."""
    rest, every = raw["steps"][1:] or raw["steps"], raw["steps"]
    seconds = sum(s["time"] for s in rest)
    return {"examples/s": sum(s["examples"] for s in rest) / seconds, "s/step": seconds / len(rest),
            "peak memory (GB)": raw["peak_rss_gb"], "step-1 loss": raw["loss1"], "wall (s)": raw["wall"],
            "examples (all steps)": sum(s["examples"] for s in every),
            "tokens (all steps)": sum(s["tokens"] for s in every), "step tokens": [s["tokens"] for s in every]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trainer", default="both", choices=["kto", "reward", "both"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="pairs a step (KTO: the 2 x batch examples they make)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--ours-checkpointing", default="off", choices=["on", "off", "every2"],
                        help="trinity-dpo's enable_gradient_checkpointing (off: faster, more memory; every2: every "
                        "second layer, gradient_checkpointing_every: 2)")
    parser.add_argument("--trl-from", type=Path, help="TRL's figures from this earlier run's output (its lines "
                        "'<trainer> trl <precision> {...}') instead of running TRL again: same job, same machine")
    parser.add_argument("--out", default=str(REPO / "docs/benchmarks.md"))
    for hidden in ("--side", "--precision", "--data", "--model-path"):  # set for the side processes
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    (side if args.side else compare)(args)
    return 0


def compare(args) -> None:
    """Both sides of each trainer and precision, each in its own process; then each trainer's doc section."""
    with tempfile.TemporaryDirectory(prefix="bench_kto_") as tmp:
        args.model_path = build_model("smollm2", Path(tmp), None)
        pairs, source, skipped = fitting_pairs(Path(tmp), args)
        for trainer in (("kto", "reward") if args.trainer == "both" else (args.trainer,)):
            data = write_rows(trainer, pairs, Path(tmp))
            earlier = _earlier_trl(args.trl_from, trainer) if args.trl_from else {}
            table = {(p, who): earlier[p] if who == "trl" and p in earlier else run_side(args, trainer, who, p, data)
                     for p in args.precisions.split(",") for who in ("trl", "ours")}
            key = f"cpu-smollm2-{trainer}" + {"on": "", "off": "-no-checkpointing", "every2": "-checkpointing-every-2"}[
                args.ours_checkpointing]
            replace_section(Path(args.out), key, _section(args, trainer, table, source, skipped))


def _earlier_trl(log: Path, trainer: str) -> dict:
    """{precision: TRL's figures} from the lines an earlier run of this script printed."""
    found = {}
    for line in log.read_text().splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4 and parts[0] == trainer and parts[1] == "trl":
            found[parts[2]] = json.loads(parts[3])
            print(line + "  (from " + str(log) + ")", flush=True)
    return found


def _machine() -> str:
    import transformers
    import trl

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    return (f"{os.cpu_count()} CPU cores ({cpu}, {platform.machine()}), torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, transformers {transformers.__version__}, TRL {trl.__version__}; "
            "peak memory is each process's max RSS")


def _job(args, trainer: str, source: str, skipped: int) -> str:
    n = args.steps * args.batch
    fit = f"the first {n} pairs of `{Path(source).name}` whose prompt and longer answer fit {args.max_length} tokens"
    fit += f" ({skipped} longer pairs before them passed over)" if skipped else " (none passed over)"
    if trainer == "kto":
        data = (f"{fit}, made into {2 * n} unpaired examples by `trl.unpair_preference_dataset` (chosen desirable, "
                f"rejected undesirable); {args.steps} optimizer steps of {2 * args.batch} examples ({args.batch} "
                f"pairs' worth). KTO loss, beta {BETA}, weights 1 and 1. trinity-dpo computes the reference "
                "log-probs (the KL sequences' too) before training, TRL likewise (`precompute_ref_log_probs=True`): "
                "in the wall time, not in the steps; each step scores its KL sequences in a no-grad forward on both "
                "sides")
    else:
        data = (f"{fit}; {args.steps} optimizer steps of {args.batch} pairs. Both start from the causal LM with a new "
                f"score head drawn from seed {SEED} (TRL: `AutoModelForSequenceClassification`, `num_labels=1`; "
                "trinity-dpo: `algorithm_type: reward_model`); no reference model")
    lr = f"{LR:.0e}".replace("e-0", "e-")
    return (f"Job: SmolLM2-135M-Instruct, {data}. The same rows in the same batches on both sides, as chat "
            f"messages; max length {args.max_length} (no sequence cut), AdamW lr {lr} constant, no weight decay, "
            "clipping at 1.0, one epoch, no saving or evaluation. TRL: gradient checkpointing off (its default is "
            "on; off is faster), sequential sampler in trinity-dpo's step order. trinity-dpo: gradient checkpointing "
            f"{args.ours_checkpointing} (`enable_gradient_checkpointing`). Rates are over the steps after the first; "
            f"examples are {UNITS[trainer]}, tokens those of the trained sequences (prompt included); wall time is "
            "the whole run from loading the model.")


def _table(trl: dict, ours: dict) -> list[str]:
    lines = ["| | TRL | trinity-dpo | ratio |", "| --- | --- | --- | --- |"]
    for k in KEYS:
        fmt = "{:.4f}" if k == "step-1 loss" else "{:.0f}" if k.endswith("(all steps)") else "{:.2f}"
        ratio = f"{ours[k] / trl[k]:.2f}x" if trl[k] else "-"
        lines.append(f"| {k} | {fmt.format(trl[k])} | {fmt.format(ours[k])} | {ratio} |")
    same = "the same" if trl["step tokens"] == ours["step tokens"] else "NOT the same"
    return lines + ["", f"Tokens step by step, TRL {trl['step tokens']}, trinity-dpo {ours['step tokens']}: {same}.",
                    ""]


def _target(precision: str, trl: dict, ours: dict) -> str:
    speed, memory = ours["examples/s"] / trl["examples/s"], ours["peak memory (GB)"] / trl["peak memory (GB)"]
    return (f"| {precision} | {ours['examples/s']:.3f} / {trl['examples/s']:.3f} = {speed:.2f}x | "
            f"{'yes' if speed >= TARGET_SPEED else 'no'} | {ours['peak memory (GB)']:.2f} / "
            f"{trl['peak memory (GB)']:.2f} GB = {memory:.2f}x | {'yes' if memory <= TARGET_MEMORY else 'no'} |")


def _section(args, trainer: str, table: dict, source: str, skipped: int) -> list[str]:
    flags = (f"--trainer {args.trainer} --steps {args.steps} --batch {args.batch} --max-length {args.max_length} "
             f"--precisions {args.precisions} --ours-checkpointing {args.ours_checkpointing}")
    flags += "" if Path(args.out).resolve() == (REPO / "docs/benchmarks.md").resolve() else f" --out {args.out}"
    flags += f" --trl-from {args.trl_from.name}" if args.trl_from else ""
    lines = [f"## trinity-dpo {TITLES[trainer]} on CPU, SmolLM2-135M-Instruct", "",
             "Command (repository root, after the README's test install):", "", "```shell",
             f"python bench/compare_trl_kto.py {flags}", "```", "", f"Machine: {_machine()}.", "",
             _job(args, trainer, source, skipped), ""]
    if args.trl_from:
        lines += [f"TRL's columns come from an earlier run of this script on the same machine and job (its output, "
                  f"`{args.trl_from.name}`): TRL was not run again for these trinity-dpo figures.", ""]
    precisions = args.precisions.split(",")
    for p in precisions:
        lines += [f"### {p}", "", *_table(table[(p, "trl")], table[(p, "ours")])]
    return lines + [f"### Against the targets (issue 27: >= {TARGET_SPEED:g}x TRL's examples/s at <= "
                    f"{TARGET_MEMORY:g}x its peak memory)", "",
                    "| precision | examples/s, trinity-dpo / TRL | met | peak memory, trinity-dpo / TRL | met |",
                    "| --- | --- | --- | --- | --- |", *(_target(p, table[(p, "trl")], table[(p, "ours")])
                                                      for p in precisions), ""]


if __name__ == "__main__":
    sys.exit(main())
