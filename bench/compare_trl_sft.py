"""trinity-dpo's SFT and TRL's SFTTrainer side by side on the same multi-turn job; then one long row's memory.

    python bench/compare_trl_sft.py [--steps 6] [--batch 8] [--max-length 1024] [--precisions fp32] [--long-tokens 8192]

Same model (the built-in SmolLM2-135M-Instruct), conversations, batches (in the same order), maximum length,
precision and steps. Every assistant turn trains on both sides: ours `enable_concatenated_multi_turn`, TRL
`assistant_only_loss` with SmolLM2's own template given `{% generation %}` markers around the assistant's content and
`<|im_end|>\\n` (it renders the same text). The conversations are real texts of the Human-Like DPO data (the demo SFT
set where that is absent), consecutive rows stitched by this script into two-turn conversations, and cut here at the
message level to the maximum length (TRL's padding-free collator cuts nothing), so both sides train the same tokens.
Each run is its own process (its peak memory, max RSS, is its own); TRL runs in each of `--trl-variants` and ratios are
against its fastest. Reported: tokens/s (every token of the sequences, on both sides), rows/s, s/step over the steps
after the first, peak memory, step-1 loss (fp32: equal to ~1e-6), wall time. Then one conversation of about
`--long-tokens` tokens (batch 1) trains with trinity-dpo, gradient checkpointing on and off: peak memory, step time.
"""
from __future__ import annotations

import argparse
import itertools
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
from compare_trl import REAL, REPO, _sync, build_model, replace_section  # noqa: E402

# SmolLM2's message line, and the same text with the assistant's content and end of turn marked as generated.
PLAIN = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
MARKED = ("{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}{% generation %}"
          "{{message['content'] + '<|im_end|>' + '\n'}}{% endgeneration %}{% else %}"
          "{{message['content'] + '<|im_end|>' + '\n'}}{% endif %}")
TRL_NAMES = {"pf": "TRL padding-free", "padded": "TRL padded", "pf-gc": "TRL padding-free, checkpointing",
             "padded-gc": "TRL padded, checkpointing"}
OURS_NAMES = {"gc": "trinity-dpo", "nogc": "trinity-dpo, no checkpointing",
              **{f"gc{n}": f"trinity-dpo, checkpointing 1 layer in {n}" for n in range(2, 10)}}
KEYS = ["tokens/s", "rows/s", "s/step", "peak memory (GB)", "step-1 loss", "tokens (all steps)", "wall (s)"]


def n_tokens(tok, messages) -> int:
    return len(tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"])


def fit(tok, messages: list[dict], limit: int) -> list[dict] | None:
    """`messages` cut to at most `limit` tokens: the longest character prefix of their contents that ends inside (or
    after) an assistant message; None if not even one assistant character fits."""
    def cut(c):
        out = []
        for m in messages:
            if c <= 0:
                break
            out.append({**m, "content": m["content"][:c]})
            c -= len(m["content"])
        while out and (out[-1]["role"] != "assistant" or not out[-1]["content"].strip()):
            out.pop()
        return out

    if n_tokens(tok, messages) <= limit:
        return messages
    lo, hi = 0, sum(len(m["content"]) for m in messages)
    while lo < hi:  # the token count only grows with the characters kept
        mid = (lo + hi + 1) // 2
        kept = cut(mid)
        lo, hi = (mid, hi) if not kept or n_tokens(tok, kept) <= limit else (lo, mid - 1)
    return cut(lo) or None


def conversations(tok, n: int, limit: int) -> tuple[list[dict], str]:
    """`n` two-turn conversations of consecutive real rows, each cut to `limit` tokens."""
    from trinity_dpo.sources import builtin
    from trinity_dpo.sources.files import read_rows

    if REAL.is_dir():
        source, rows = str(REAL), read_rows(str(REAL), "train")
        talks = [[{"role": "user", "content": a["prompt"]}, {"role": "assistant", "content": a["chosen"]},
                  {"role": "user", "content": b["prompt"]}, {"role": "assistant", "content": b["chosen"]}]
                 for a, b in zip(rows[0::2], rows[1::2])]
    else:
        source = builtin.data_path("builtin:human-like-sft-demo")
        talks = [r["messages"] for r in read_rows(source, "train")]
    kept = (fit(tok, talks[i % len(talks)], limit) for i in range(10 * n))
    out = list(itertools.islice(({"messages": k} for k in kept if k), n))
    if len(out) < n:
        raise SystemExit(f"fewer than {n} conversations fit --max-length {limit}")
    return out, source


def long_row(tok, target: int) -> dict:
    """One user turn and one assistant answer of real chosen texts repeated to about `target` tokens."""
    from trinity_dpo.sources.files import read_rows

    rows = read_rows(str(REAL), "train") if REAL.is_dir() else [{"prompt": "Tell me everything about your day.",
                                                                 "chosen": "Oh man, where do I even start? " * 40}]
    answer = []
    while sum(map(len, answer)) < 5 * target:  # ~4 characters a token, with a margin; `fit` cuts
        answer.append(rows[len(answer) % len(rows)]["chosen"])
    return {"messages": fit(tok, [{"role": "user", "content": rows[0]["prompt"]},
                                  {"role": "assistant", "content": "\n\n".join(answer)}], target)}


def run_ours(args, work: Path) -> dict:
    import yaml

    from trinity_dpo.run import train
    from trinity_dpo.config.loader import load_config

    actor = {"use_dynamic_bsz": True, "ppo_max_token_len_per_gpu": args.token_budget} if args.token_budget else {}
    fmt = {"prompt_type": "messages", "messages_key": "messages", "enable_concatenated_multi_turn": True}
    cfg = {"project": "bench", "name": f"sft_{args.precision}_{args.variant}", "checkpoint_root_dir": str(work),
           "model": {"model_path": args.model_path, "max_model_len": args.max_length},
           "algorithm": {"algorithm_type": "sft", "optimizer": {"lr": 1e-5, "weight_decay": 0.0}},
           "buffer": {"train_batch_size": args.batch, "total_epochs": 1, "trainer_input": {"experience_buffer": {
               "path": args.data, "format": fmt}}},
           "cluster": {"device": "cpu"},
           "trainer": {"precision": args.precision, "save_interval": 0, "eval_samples": 0, "grad_clip": 1.0,
                       "trainer_config": {"data": {"truncation": "right"}, "actor_rollout_ref": {
                           "model": _checkpointing(args.variant), "actor": actor}}}}
    (work / "ours.yaml").write_text(yaml.safe_dump(cfg))
    start = time.perf_counter()
    run_dir = train.run(load_config(work / "ours.yaml"))
    wall = time.perf_counter() - start
    steps = [s for s in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "step_time_s" in s]
    return {"steps": [{"time": s["step_time_s"], "tokens": s["tokens"], "rows": s["rows"]} for s in steps],
            "loss1": steps[0]["loss"], "wall": wall}


def _checkpointing(variant: str) -> dict:
    """Our side's variants: gc (every layer recomputes), gcN (every N-th layer), nogc."""
    if variant == "nogc":
        return {"enable_gradient_checkpointing": False}
    return {"enable_gradient_checkpointing": True, "gradient_checkpointing_every": int(variant[2:] or 1)}


def run_trl(args, work: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from trinity_dpo.data.batching import step_indices

    start = time.perf_counter()  # wall time from here: model loading and data preparation, as in ours
    rows = [json.loads(x) for x in Path(args.data).read_text().splitlines()]
    # Our run's batches, in its order: TRL reads them sequentially, so each step trains the same rows on both sides.
    order = [i for s in range(args.steps) for i in step_indices(s, len(rows), args.batch, 42)[1]]
    tok = AutoTokenizer.from_pretrained(args.model_path)
    plain = tok.chat_template
    assert PLAIN in plain, "SmolLM2's chat template changed: update PLAIN"
    tok.chat_template = plain.replace(PLAIN, MARKED)
    for r in rows:  # the markers add no text
        assert tok.apply_chat_template(r["messages"], tokenize=False) == tok.apply_chat_template(
            r["messages"], tokenize=False, chat_template=plain)
    policy = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    times, tokens = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            _sync("cpu")
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            _sync("cpu")
            times.append(time.perf_counter() - self.t)

    padding_free = args.variant.startswith("pf")
    config = SFTConfig(output_dir=str(work / "trl"), report_to=[], per_device_train_batch_size=args.batch,
                       gradient_accumulation_steps=1, max_length=None if padding_free else args.max_length,
                       padding_free=padding_free, packing=False, gradient_checkpointing=args.variant.endswith("-gc"),
                       assistant_only_loss=True, max_steps=args.steps, learning_rate=1e-5,
                       lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                       logging_steps=1, save_strategy="no", use_cpu=True, bf16=args.precision == "bf16",
                       disable_tqdm=True, seed=42, train_sampling_strategy="sequential")
    trainer = SFTTrainer(model=policy, args=config, train_dataset=Dataset.from_list([rows[i] for i in order]),
                         processing_class=tok, callbacks=[Clock()])
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        mask = batch.get("attention_mask")
        tokens.append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())  # padding-free: no pad
        return batch

    trainer.data_collator = counting
    trainer.train()
    wall = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"steps": [{"time": t, "tokens": n, "rows": args.batch} for t, n in zip(times, tokens)],
            "loss1": losses[0], "wall": wall}


def side(args) -> None:
    """Run one side in this process and print its figures as JSON."""
    with tempfile.TemporaryDirectory(prefix=f"bench_sft_{args.side}_") as tmp:
        result = (run_ours if args.side == "ours" else run_trl)(args, Path(tmp))
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print("RESULT " + json.dumps(result))


def run_side(args, who: str, variant: str, precision: str, data: Path, max_length: int, steps: int,
             batch: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", who, "--variant", variant, "--precision",
           precision, "--data", str(data), "--max-length", str(max_length), "--steps", str(steps), "--batch",
           str(batch), "--model-path", args.model_path, "--token-budget", str(args.token_budget or 0)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise SystemExit(f"{who} {variant} {precision} failed")
    raw = json.loads(line[7:])
    steps_ = raw["steps"][1:] or raw["steps"]  # the first step warms caches and allocators up
    t = sum(s["time"] for s in steps_)
    out = {"tokens/s": sum(s["tokens"] for s in steps_) / t, "rows/s": sum(s["rows"] for s in steps_) / t,
           "s/step": t / len(steps_), "peak memory (GB)": raw["peak_rss_gb"], "step-1 loss": raw["loss1"],
           "tokens (all steps)": sum(s["tokens"] for s in raw["steps"]), "wall (s)": raw["wall"]}
    print(who, variant, precision, json.dumps(out), flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8, help="conversations per optimizer step")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--precisions", default="fp32")
    parser.add_argument("--trl-variants", default="pf,padded", help=f"of {','.join(TRL_NAMES)}")
    parser.add_argument("--ours-variants", default="gc",
                        help="gc (gradient checkpointing on), gcN (on in every N-th layer), nogc")
    parser.add_argument("--token-budget", type=int, default=0,
                        help="ours: use_dynamic_bsz with this ppo_max_token_len_per_gpu (0: the whole batch at once)")
    parser.add_argument("--long-tokens", type=int, default=8192, help="the long row's tokens (0: skip that part)")
    parser.add_argument("--long-steps", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "docs/benchmarks.md"))
    for hidden in ("--side", "--variant", "--precision", "--data", "--model-path"):  # set for the side processes
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        side(args)
        return 0
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="bench_sft_") as tmp:
        work = Path(tmp)
        args.model_path = build_model("smollm2", work, None)
        tok = AutoTokenizer.from_pretrained(args.model_path)
        rows, source = conversations(tok, args.steps * args.batch, args.max_length)
        data = work / "conversations.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        table = {}
        for precision in args.precisions.split(","):
            for who, variants in (("trl", args.trl_variants), ("ours", args.ours_variants)):
                for v in variants.split(","):
                    table[(precision, who, v)] = run_side(args, who, v, precision, data, args.max_length, args.steps,
                                                          args.batch)
        long_table, long_len = {}, 0
        if args.long_tokens:
            row = long_row(tok, args.long_tokens)
            long_len = n_tokens(tok, row["messages"])
            long_data = work / "long.jsonl"
            long_data.write_text((json.dumps(row, ensure_ascii=False) + "\n") * args.long_steps, encoding="utf-8")
            for v in ("gc", "nogc"):
                long_table[v] = run_side(args, "ours", v, "fp32", long_data, long_len, args.long_steps, 1)
    replace_section(Path(args.out), "cpu-smollm2-sft", _section(args, table, long_table, long_len, source))
    return 0


def _section(args, table: dict, long_table: dict, long_len: int, source: str) -> list[str]:
    flags = (f"--steps {args.steps} --batch {args.batch} --max-length {args.max_length} --precisions {args.precisions}"
             f" --trl-variants {args.trl_variants} --ours-variants {args.ours_variants} --long-tokens "
             f"{args.long_tokens} --long-steps {args.long_steps}")
    flags += f" --token-budget {args.token_budget}" if args.token_budget else ""
    flags += "" if Path(args.out).resolve() == (REPO / "docs/benchmarks.md").resolve() else f" --out {args.out}"
    machine = (f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads; peak memory is the process's max RSS")
    micro = (f"micro-batches of at most {args.token_budget} tokens (`use_dynamic_bsz`)" if args.token_budget else
             "the whole batch packed into one micro-batch (`ppo_micro_batch_size_per_gpu` unset)")
    real = REAL.is_dir()
    data = (f"real texts of `{Path(source).name}` (its `prompt` and `chosen`), two consecutive rows stitched into "
            "one two-turn conversation (user, assistant, user, assistant) by this script (the stitching is ours, "
            "not the dataset's)" if real else f"the demo SFT conversations `{Path(source).name}`")
    lines = ["## trinity-dpo SFT vs TRL SFTTrainer on CPU, SmolLM2-135M-Instruct", "",
             "Command (repository root, after the README's test install):", "", "```shell",
             f"python bench/compare_trl_sft.py {flags}", "```", "",
             f"Machine: {machine}.", "",
             f"Job: {args.steps} optimizer steps of {args.batch} conversations ({args.steps * args.batch} in all, "
             f"one epoch), the same rows in the same batches on both sides: {data}. Rows longer than "
             f"{args.max_length} tokens are cut here at the message level so both sides train the same tokens "
             "(trinity-dpo: `model.max_model_len` with `data.truncation: right`, a no-op on these rows; TRL: "
             "`max_length`, or none with padding-free, which does not cut). Every assistant turn trains "
             "(`enable_concatenated_multi_turn: true`; TRL `assistant_only_loss=True` with SmolLM2's template given "
             "`{% generation %}` markers, rendering the same text). AdamW, lr 1e-5 constant, no weight decay, "
             f"grad clip 1.0. trinity-dpo: {micro}. TRL: `use_cpu`, no packing, sequential sampler (our batch order), "
             "gradient checkpointing off unless the column says on (its SFTConfig's default is on; off is faster). "
             "Rates are over the steps after the first; tokens count every token of the sequences, prompt "
             "included, on both sides; wall time is the whole run from loading the model. The ratio is the first trinity-dpo run against the fastest TRL run.", ""]
    for precision in args.precisions.split(","):
        runs = {k[1:]: v for k, v in table.items() if k[0] == precision}
        trl_best = max((k for k in runs if k[0] == "trl"), key=lambda k: runs[k]["tokens/s"])
        ours = next(k for k in runs if k[0] == "ours")
        names = [(TRL_NAMES if w == "trl" else OURS_NAMES)[v] for w, v in runs]
        lines += [f"### {precision}", "", f"| | {' | '.join(names)} | ratio (vs {TRL_NAMES[trl_best[1]]}) |",
                  "| --- |" + " --- |" * (len(runs) + 1)]
        for k in KEYS:
            fmt = "{:.6f}" if k == "step-1 loss" else "{:.0f}" if k.startswith("tokens") else "{:.2f}"
            ratio = f"{runs[ours][k] / runs[trl_best][k]:.2f}x" if k != "step-1 loss" else "largest difference " + (
                f"{max(abs(r[k] - runs[ours][k]) for r in runs.values()):.1e}")
            lines.append(f"| {k} | {' | '.join(fmt.format(r[k]) for r in runs.values())} | {ratio} |")
        lines.append("")
    if long_table:
        lines += ["### One long row", "",
                  f"One conversation of {long_len} tokens (a real prompt and one assistant answer of real chosen texts "
                  f"repeated), batch 1, {args.long_steps} steps, fp32, trinity-dpo with `model.max_model_len` "
                  f"{long_len}; step time over the steps after the first.", "",
                  "| gradient checkpointing | peak memory (GB) | s/step | tokens/s | step-1 loss |",
                  "| --- | --- | --- | --- | --- |"]
        for v, r in long_table.items():
            lines.append(f"| {'on' if v == 'gc' else 'off'} | {r['peak memory (GB)']:.2f} | {r['s/step']:.2f} | "
                         f"{r['tokens/s']:.0f} | {r['step-1 loss']:.6f} |")
        lines.append("")
    return lines


if __name__ == "__main__":
    sys.exit(main())
