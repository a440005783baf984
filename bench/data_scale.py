"""Data at scale: reading and tokenizing 10^4-10^6 preference pairs (and long SFT conversations), first run and
cache hit, against TRL's DPOTrainer on the same file.

    python bench/data_scale.py --pairs 10000 100000 [--sft 20000] [--out docs/benchmarks.md]

Each job is a whole process, as a user starts it: a tiny Llama (2 layers, hidden 64) with SmolLM2's tokenizer and
chat template, so that the time is reading + tokenizing + start-up, one optimizer step. Rows are the real
Human-Like pairs (../shared/data, else the built-in demo set) repeated with a unique number in each prompt.
trinity-dpo runs `trinity run` with `policy_loss_fn: simpo` (no reference pass) twice on the same file under two
run names: the first tokenizes, the second finds the token table. TRL runs `DPOTrainer` with `dataset_num_proc`
set to the core count and `precompute_ref_log_probs` off. Reported: wall time of the whole process, time from
start to the first optimizer step (ours: the first line of metrics.jsonl), rows/s of the data preparation, and
the peak of the summed proportional set size (PSS: a page shared by several processes counts once in all) of the
process and its children, sampled every 0.2 s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
REAL = REPO.parent / "shared" / "data" / "human_like_dpo_dataset"


def tiny_model(work: Path) -> str:
    """A 2-layer Llama with SmolLM2's tokenizer (the built-in model's folder gives the tokenizer and template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from bench.compare_trl import smollm2_folder

    folder = work / "tiny-smollm2-tok"
    if not (folder / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(smollm2_folder(work, weights=False))
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        tok.save_pretrained(folder)
    return str(folder)


def source_rows() -> list[dict]:
    from trinity_dpo.data.conversations import read_rows
    from trinity_dpo.sources import builtin

    source = str(REAL) if REAL.is_dir() else builtin.data_path("builtin:human-like-demo")
    return read_rows(source, "train")


def write_pairs(path: Path, n: int) -> Path:
    rows = source_rows()
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            r = rows[i % len(rows)]
            fh.write(json.dumps({"prompt": f"{r['prompt']} (#{i})", "chosen": r["chosen"],
                                 "rejected": r["rejected"]}, ensure_ascii=False) + "\n")
    return path


def write_sft(path: Path, n: int, tokens: int = 4700) -> Path:
    """Mixture-of-Thoughts-shaped conversations: a question, and a long reasoning answer (~`tokens` tokens)."""
    rows = source_rows()
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            r = rows[i % len(rows)]
            answer = " ".join(rows[(i + k) % len(rows)]["chosen"] for k in range(tokens // 180))  # ~180 tokens each
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"{r['prompt']} (#{i})"},
                                              {"role": "assistant", "content": answer}]}, ensure_ascii=False) + "\n")
    return path


def measure(cmd: list[str], env: dict, first_step: Path | None = None) -> dict:
    """Wall time, time to `first_step` existing with a line, and peak summed PSS of `cmd` and its children."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, stepped, out = [0.0], [None], []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        total = 0
        for p in [root, *root.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except (psutil.Error, OSError):
                pass
        peak[0] = max(peak[0], total)
        if first_step is not None and stepped[0] is None and first_step.is_file() and first_step.read_text().strip():
            stepped[0] = time.perf_counter() - start
        time.sleep(0.2)
    reader.join()
    if proc.returncode:
        raise RuntimeError(f"{cmd[:4]} failed:\n{''.join(out)[-3000:]}")
    return {"wall_s": time.perf_counter() - start, "first_step_s": stepped[0], "peak_gb": peak[0] / 1e9,
            "log": "".join(out)}


def ours(model: str, data: Path, work: Path, name: str, sft: bool, env: dict, processes: int = 1) -> dict:
    config = {
        "project": "scale", "name": name, "mode": "train", "checkpoint_root_dir": str(work / "runs"),
        "cluster": {"gpu_per_node": processes, "device": "cpu"},
        "algorithm": {"algorithm_type": "sft" if sft else "dpo", "policy_loss_fn": "sft" if sft else "simpo"},
        "model": {"model_path": model},
        "buffer": {"batch_size": 8, "total_epochs": 1, "trainer_input": {"experience_buffer": {
            "path": str(data), "format": {"prompt_type": "messages", "messages_key": "messages"} if sft else {
                "prompt_type": "plaintext"}}}},
        "trainer": {"total_steps": 1, "save_interval": 0, "precision": "fp32", "eval_samples": 0,
                    "trainer_config": {"actor_rollout_ref": {"actor": {"ppo_micro_batch_size_per_gpu": 1}}}},
    }
    path = work / f"{name}.yaml"
    path.write_text(json.dumps(config))
    metrics = work / "runs" / "scale" / name / "metrics.jsonl"
    r = measure([sys.executable, "-m", "trinity_dpo.cli", "run", "--config", str(path)], env, metrics)
    line = next((ln for ln in r["log"].splitlines() if "tokenized " in ln and " rows of " in ln), "")
    r["tokenize_line"] = line.split(" INFO ")[-1]
    return r


TRL = """
import os, sys, time
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer
model_path, data, out = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(model_path)
rows = load_dataset("json", data_files=data, split="train")
rows = rows.map(lambda r: {"prompt": [{"role": "user", "content": r["prompt"]}],
                           "chosen": [{"role": "assistant", "content": r["chosen"]}],
                           "rejected": [{"role": "assistant", "content": r["rejected"]}]}, num_proc=os.cpu_count())
print("trainer", time.time(), flush=True)
args = DPOConfig(output_dir=out, per_device_train_batch_size=8, max_steps=1, report_to=[], save_strategy="no",
                 dataset_num_proc=os.cpu_count(), logging_steps=1, use_cpu=True, precompute_ref_log_probs=False)
trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_path), args=args, train_dataset=rows,
                     processing_class=tok)
print("prepared", time.time(), flush=True)
trainer.train()
"""


def trl(model: str, data: Path, work: Path, env: dict) -> dict:
    """TRL's whole process; `prepare_s`: the `DPOTrainer` constructor, which tokenizes (the bench's own map to
    messages, before it, is left out)."""
    r = measure([sys.executable, "-c", TRL, model, str(data), str(work / "trl")], env)
    stamps = {ln.split()[0]: float(ln.split()[1]) for ln in r["log"].splitlines()
              if ln.startswith(("trainer ", "prepared "))}
    r["prepare_s"] = stamps["prepared"] - stamps["trainer"]
    return r


def micro(n: int, work: Path) -> None:
    """Tokenizing alone, in this process: the direct path (read, convert, `build_pairs`) against the cache's
    builder with 1 and 2 worker processes, rows/s."""
    from transformers import AutoTokenizer

    from bench.compare_trl import smollm2_folder
    from trinity_dpo.config.schema import FormatConfig, StorageConfig
    from trinity_dpo.data import prepare
    from trinity_dpo.data.conversations import load_conversations
    from trinity_dpo.data.pairs import Limits, build_pairs

    folder = smollm2_folder(work, weights=False)
    tok = AutoTokenizer.from_pretrained(folder)
    storage = StorageConfig(path=str(write_pairs(work / f"micro_{n}.jsonl", n)),
                            format=FormatConfig(prompt_type="plaintext"))
    start = time.perf_counter()
    convs, report = load_conversations(storage)
    build_pairs(convs, tok, Limits(), report)
    print(f"direct path: {n / (time.perf_counter() - start):.0f} rows/s", flush=True)
    for workers in (1, 2):
        start = time.perf_counter()
        prepare.load_table(storage, "x", tok, folder, prepare.Recipe("pairs", limits=Limits()),
                           work / f"micro_cache_{workers}", workers)
        print(f"cache builder, {workers} worker(s): {n / (time.perf_counter() - start):.0f} rows/s", flush=True)


def _footprint(config: str, barrier, out) -> None:
    """One process's data memory: what loading the data and planning its first steps adds to its anonymous
    memory, and its proportional share (Pss) of the token table's mapped pages, read from /proc/self/smaps while
    every process holds its data (`barrier`)."""
    from trinity_dpo.config.loader import load_config
    from trinity_dpo.data.dataset import load_data
    from trinity_dpo.data.schedule import Schedule
    from trinity_dpo.engine.modeling import load_tokenizer
    from trinity_dpo.sources.local import localize

    cfg = localize(load_config(config))
    tokenizer = load_tokenizer(cfg)
    before = _smaps()
    data = load_data(cfg, tokenizer)
    schedule = Schedule.of(cfg, data, 1)
    schedule.step(0, 0), schedule.micro_tokens()
    barrier.wait()
    after = _smaps()
    barrier.wait()
    out.put((after["anon"] - before["anon"], after["table"]))


def _smaps() -> dict:
    """kB of anonymous memory (Pss) and of the token tables' mapped pages (Pss), this process."""
    totals, table, name = {"anon": 0, "table": 0}, False, ""
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()
            if line[0] in "0123456789abcdef" and "-" in head[0]:
                name = head[5] if len(head) > 5 else ""
                table = "/tokens/" in name
            elif head[0] == "Pss:":
                kb = int(head[1])
                totals["table" if table else "anon"] += kb if (table or not name or name.startswith("[heap")) else 0
    return {k: v * 1024 for k, v in totals.items()}


def data_memory(n: int, processes: int, work: Path) -> str:
    """The data memory of `processes` processes holding the same n-pair data at once (each: anonymous growth +
    its share of the mapped token table), summed, against one process."""
    import multiprocessing as mp

    env = {"TRINITY_DPO_CACHE": str(work / "cache")}
    os.environ.update(env)
    model = tiny_model(work)
    data = write_pairs(work / f"pairs_{n}.jsonl", n)
    config = work / "footprint.yaml"
    ours(model, data, work, "footprint_build", False, {**os.environ, "PYTHONPATH": str(REPO)})  # builds the table
    config.write_text((work / "footprint_build.yaml").read_text())
    results = {}
    for count in (1, processes):
        ctx = mp.get_context("spawn")
        barrier, out = ctx.Barrier(count), ctx.Queue()
        procs = [ctx.Process(target=_footprint, args=(str(config), barrier, out)) for _ in range(count)]
        for p in procs:
            p.start()
        parts = [out.get() for _ in procs]
        for p in procs:
            p.join()
        results[count] = (sum(a for a, _ in parts), sum(t for _, t in parts))
    (a1, t1), (an, tn) = results[1], results[processes]
    return (f"data memory, {n:,} pairs: 1 process {(a1 + t1) / 1e6:.1f} MB (anonymous {a1 / 1e6:.1f}, token table "
            f"{t1 / 1e6:.1f}); {processes} processes together {(an + tn) / 1e6:.1f} MB (anonymous {an / 1e6:.1f}, "
            f"token table {tn / 1e6:.1f}): {(an + tn) / (a1 + t1):.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, nargs="*", default=[10000, 100000])
    parser.add_argument("--sft", type=int, nargs="*", default=[])
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--trl-only", action="store_true", help="only TRL's run on each pairs file (its rows/s)")
    parser.add_argument("--processes", type=int, default=1, help="also a cache-hit run with this many CPU processes")
    parser.add_argument("--micro", type=int, metavar="N", help="only tokenize N pairs in this process, three ways")
    parser.add_argument("--data-memory", type=int, metavar="N", help="only the data memory of N pairs in 1 and "
                        "--processes processes at once")
    parser.add_argument("--work", type=Path, help="work in this folder (an earlier run's: its token tables are found)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="data_scale_"))
    if args.micro:
        micro(args.micro, work)
        return 0
    if args.data_memory:
        print(data_memory(args.data_memory, max(args.processes, 2), work), flush=True)
        return 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRINITY_DPO_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(work / "hf_datasets")}
    model = tiny_model(work)
    lines, base = [], {}
    if args.processes > 1:  # what a cache hit costs without data: subtracted to give the data's own memory
        small = write_pairs(work / "pairs_100.jsonl", 100)
        ours(model, small, work, "base_first", False, env)
        base = {1: ours(model, small, work, "base_1", False, env)["peak_gb"],
                args.processes: ours(model, small, work, "base_n", False, env, args.processes)["peak_gb"]}
        print(f"cache hit on 100 pairs: {base[1]:.2f} GB with 1 process, {base[args.processes]:.2f} GB with "
              f"{args.processes}", flush=True)
    for n, sft in [(n, False) for n in args.pairs] + [(n, True) for n in args.sft]:
        data = (write_sft if sft else write_pairs)(work / f"{'sft' if sft else 'pairs'}_{n}.jsonl", n)
        if args.trl_only:
            t = trl(model, data, work, env)
            print(f"| {n:,} pairs | TRL {t['wall_s']:.0f} s, {t['peak_gb']:.2f} GB (DPOTrainer's tokenizing: "
                  f"{t['prepare_s']:.1f} s, {n / t['prepare_s']:.0f} rows/s) |", flush=True)
            continue
        first = ours(model, data, work, f"first_{n}_{sft}", sft, env)
        again = ours(model, data, work, f"again_{n}_{sft}", sft, env)
        row = {"rows": n, "kind": "SFT" if sft else "pairs", "first": first, "again": again}
        if args.processes > 1:
            row["again_n"] = ours(model, data, work, f"again{args.processes}_{n}_{sft}", sft, env, args.processes)
        if not args.no_trl and not sft:
            row["trl"] = trl(model, data, work, env)
        lines.append(_line(row, base, args.processes))
        print(lines[-1], flush=True)
    print(f"machine: {os.cpu_count()} cores; work folder {work}")
    return 0


def _line(row: dict, base: dict, processes: int) -> str:
    f, a, t = row["first"], row["again"], row.get("trl")
    ours_part = (f"| {row['rows']:,} {row['kind']} | {f['wall_s']:.0f} s, {f['peak_gb']:.2f} GB | "
                 f"{a['wall_s']:.0f} s (first step at {a['first_step_s'] or float('nan'):.0f} s), {a['peak_gb']:.2f} GB")
    trl_part = (f" | {t['wall_s']:.0f} s, {t['peak_gb']:.2f} GB (DPOTrainer's tokenizing: {t['prepare_s']:.1f} s, "
                f"{row['rows'] / t['prepare_s']:.0f} rows/s) |" if t else " | - |")
    n = row.get("again_n")
    more = ""
    if n:
        one, many = a["peak_gb"] - base[1], n["peak_gb"] - base[processes]
        more = (f" cache hit with {processes} processes: {n['wall_s']:.0f} s, {n['peak_gb']:.2f} GB; data memory "
                f"(over 100 pairs) {one:.3f} GB with 1, {many:.3f} GB with {processes} ({many / one:.2f}x) |")
    return ours_part + trl_part + more + f" {f['tokenize_line']}"


if __name__ == "__main__":
    sys.exit(main())
