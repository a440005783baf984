"""Evidence that DPO changes a real chat model: SmolLM2-135M-Instruct on the real Human-Like DPO data.

    python bench/human_like_evidence.py [--data ../shared/data/human_like_dpo_dataset] [--out docs/results.md]

Trains on 512 pairs for one epoch, measures held-out preference accuracy on 256 other pairs (target >= 0.95),
and answers 32 held-out prompts greedily with the base and the trained model. The answers are scored by style
markers of the data's `chosen` side: an emoji, an exclamation mark, a question back to the user (one point each,
0-3 per answer), and the share of answers that disclaim being an AI; the trained score must rise clearly (by at
least 0.5 points). On-topic check: the share of answers that reuse a content word of their prompt; all answers are
written out to read. Everything goes to docs/results.md with the command and the wall time.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trinity_dpo.run import train  # noqa: E402
from trinity_dpo.config.loader import load_config  # noqa: E402
from trinity_dpo.data.conversations import read_rows  # noqa: E402

EMOJI = re.compile("[\U0001F300-\U0001FAFF\u2600-\u27BF]")
AI_DISCLAIMER = re.compile(r"\b(as an ai|language model|artificial intelligence|i don't have personal|"
                           r"i do not have personal|i'm an ai|i am an ai)\b", re.I)
STOP = set("a an the and or but of to in on for with about do you your is are was were be have has had what how "
           "why when where who which that this it its any some me my i we they them our ever there here just so "
           "can could would should will if than then too very really like get got go going".split())


def style_markers(answer: str) -> dict[str, int]:
    return {"emoji": int(bool(EMOJI.search(answer))), "exclamation": int("!" in answer),
            "question back": int("?" in answer), "ai disclaimer": int(bool(AI_DISCLAIMER.search(answer)))}


def on_topic(prompt: str, answer: str) -> bool:
    words = {w for w in re.findall(r"[a-z']+", prompt.lower()) if len(w) > 3 and w not in STOP}
    return not words or any(w in answer.lower() for w in words)


def score(samples: list[dict], side: str) -> dict[str, float]:
    marks = [style_markers(s[side]) for s in samples]
    n = len(samples)
    out = {k: sum(m[k] for m in marks) / n for k in marks[0]}
    out["style score (0-3)"] = sum(m["emoji"] + m["exclamation"] + m["question back"] for m in marks) / n
    out["on topic"] = sum(on_topic(s["prompt"], s[side]) for s in samples) / n
    return out


def split(data: Path, work: Path, seed: int = 0) -> tuple[Path, Path]:
    rows = read_rows(str(data))
    random.Random(seed).shuffle(rows)
    train_rows, eval_rows = rows[:512], rows[512:512 + 256]
    paths = []
    for name, part in (("train", train_rows), ("eval", eval_rows)):
        path = work / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/human_like_dpo_dataset"))
    parser.add_argument("--out", default=str(REPO / "docs/results.md"))
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    if not Path(args.data).exists():
        print(f"skipped: {args.data} not found")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    start = time.time()
    work = Path(tempfile.mkdtemp(prefix="evidence_"))
    train_path, eval_path = split(Path(args.data), work)
    config = {
        "project": "evidence", "name": "smollm2_human_like", "mode": "train", "checkpoint_root_dir": str(work),
        "algorithm": {"algorithm_type": "dpo", "policy_loss_fn_args": {"beta": 0.1},
                      "optimizer": {"lr": args.lr, "lr_warmup_steps_ratio": 0.1, "warmup_style": "cosine",
                                    "min_lr_ratio": 0.1}},
        "model": {"model_path": "builtin:smollm2-135m-instruct", "max_prompt_tokens": 256,
                  "max_response_tokens": 256},
        "buffer": {"total_epochs": 1, "train_batch_size": args.batch, "trainer_input": {
            "experience_buffer": {"path": str(train_path)}, "eval_buffer": {"path": str(eval_path)}}},
        "trainer": {"save_interval": 0, "eval_samples": 32, "eval_max_new_tokens": 128,
                    "trainer_config": {"actor_rollout_ref": {"actor": {"ppo_micro_batch_size_per_gpu": 4}}}},
    }
    (work / "dpo.yaml").write_text(yaml.safe_dump(config))
    run_dir = train.run(load_config(work / "dpo.yaml"))
    wall = time.time() - start
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/loss" in r]
    steps = [r for r in records if "loss" in r]
    samples = json.loads((run_dir / "samples.json").read_text())
    base, trained = score(samples, "base"), score(samples, "trained")
    accuracy = evals[-1]["eval/rewards/accuracies"]
    passed = accuracy >= 0.95 and trained["style score (0-3)"] >= base["style score (0-3)"] + 0.5
    write_doc(Path(args.out), args, evals, steps, base, trained, samples, wall, passed)
    print(f"held-out accuracy {accuracy:.3f}; style score {base['style score (0-3)']:.2f} -> "
          f"{trained['style score (0-3)']:.2f}; wall {wall / 60:.1f} min; {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


def write_doc(out: Path, args, evals, steps, base, trained, samples, wall, passed) -> None:
    first, last = evals[0], evals[-1]
    cpu = platform.processor() or platform.machine()
    lines = [
        "# Evidence: DPO on real Human-Like data changes SmolLM2-135M-Instruct", "",
        "Command (from the repository root, after the README's install):", "",
        "```shell", f"python bench/human_like_evidence.py --lr {args.lr} --batch {args.batch}", "```", "",
        f"Machine: {torch.get_num_threads()} CPU threads ({cpu}), torch {torch.__version__}. "
        f"Wall time of the whole script: {wall / 60:.1f} min "
        f"({sum(s['step_time_s'] for s in steps) / 60:.1f} min in {len(steps)} optimizer steps). "
        f"Result: **{'PASS' if passed else 'FAIL'}**.", "",
        "Setup: the real data (`../shared/data/human_like_dpo_dataset`, 1,528 pairs) shuffled with seed 0; the first "
        "512 pairs train one epoch (batch {}, lr {}, beta 0.1, cosine with 10% warmup, bf16 autocast where the CPU "
        "has fast bf16), the next 256 are held out. Prompts and responses are cut at 256 tokens.".format(
            args.batch, args.lr), "",
        "## Held-out preference figures (256 pairs)", "",
        "| metric | before training | after one epoch |", "| --- | --- | --- |",
        *[f"| {k[5:]} | {first[k]:.4f} | {last[k]:.4f} |" for k in sorted(first) if k.startswith("eval/")], "",
        "`rewards/accuracies` must reach 0.95 (it is 0 before training, where every implicit reward is 0); "
        "`prefers_chosen` is the share of pairs whose chosen answer has the higher mean per-token log-prob under "
        "the model itself.", "",
        "## Style of greedy answers to 32 held-out prompts", "",
        "Markers of the `chosen` side, per answer: an emoji, an exclamation mark, a question back to the user "
        "(style score = their sum, 0-3); also the share of answers disclaiming to be an AI, and the share that "
        "reuse a content word of the prompt (on topic).", "",
        "| marker | base model | trained model |", "| --- | --- | --- |",
        *[f"| {k} | {base[k]:.3f} | {trained[k]:.3f} |" for k in base], "",
        "## The answers", "",
    ]
    for i, s in enumerate(samples, 1):
        lines += [f"**{i}. {s['prompt']}**", "", f"- base: {s['base']}", f"- trained: {s['trained']}", ""]
    out.write_text("\n".join(lines).replace("\r", ""), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
