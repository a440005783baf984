"""`trinity report RUN RUN ... -o page.html`: several runs side by side on one self-contained page.

The page overlays the runs' curves (one chart per figure, one line per run, the images inside the page as data
URIs so that it can be mailed or moved), lists the settings in which the runs differ and each run's final
held-out figures, and puts the runs' answers to the same held-out prompts next to each other.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from ..errors import ConfigError
from .report import new_axes, read_metrics, read_run_file, write_output

# (title, key in train records, key in eval records): drawn where some run has it
CURVES = [
    ("loss", "loss", "eval/loss"),
    ("reward accuracy", "rewards/accuracies", "eval/rewards/accuracies"),
    ("reward margin", "rewards/margins", "eval/rewards/margins"),
    ("chosen preferred per token (held-out)", None, "eval/prefers_chosen"),
    ("reward model: accuracy", "accuracy", "eval/accuracy"),
    ("reward model: margin", "margin", "eval/margin"),
    ("perplexity of the trained tokens", "ppl", "eval/ppl"),
    ("next-token accuracy of the trained tokens", "mean_token_accuracy", "eval/mean_token_accuracy"),
    ("KTO's KL baseline", "kl", "eval/kl"),
    ("KL term", "actor/kl_loss", None),
    ("learning rate", "lr", None),
]


def compare(run_dirs: list[str], out: str) -> Path:
    """Write the comparison page of `run_dirs` to `out`; return its path."""
    runs = [_load(Path(r)) for r in run_dirs]
    labels = _labels(runs)
    e = html.escape
    parts = [f"<h1>trinity-dpo: {len(runs)} runs side by side</h1><ul>"
             + "".join(f"<li><b>{e(lab)}</b>: <code>{e(str(r['dir'].resolve()))}</code></li>"
                       for lab, r in zip(labels, runs)) + "</ul>"]
    parts.append(_settings_table(runs, labels))
    parts.append(_final_table(runs, labels))
    charts = [_chart(title, runs, labels, train_key, eval_key) for title, train_key, eval_key in CURVES]
    parts.append("<h2>Curves</h2>" + "".join(c for c in charts if c))
    parts.append(_answers_table(runs, labels))
    style = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto}img{margin:4px;border:1px solid #ddd}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}")
    return write_output(Path(out), "<!doctype html><html><head><meta charset='utf-8'><title>trinity-dpo runs</title>"
                        f"<style>{style}</style></head><body>{''.join(parts)}{_IMAGE_CHECK}</body></html>", "-o")


# Marks on the page how many of its images a browser could draw (a test reads it; a reader sees nothing).
_IMAGE_CHECK = ("<script>window.addEventListener('load',function(){var m=document.images,ok=0;"
                "for(var i=0;i<m.length;i++){if(m[i].complete&&m[i].naturalWidth>0){ok++;}}"
                "document.body.setAttribute('data-images',ok+'/'+m.length);});</script>")


def _load(run_dir: Path) -> dict:
    if not (run_dir / "metrics.jsonl").is_file():
        raise ConfigError(f"{run_dir}: no metrics.jsonl here; give run folders")
    train, evals = read_metrics(run_dir)
    config = run_dir / "config.yaml"
    samples = run_dir / "samples.json"
    return {"dir": run_dir, "train": train, "evals": evals,
            "config": _flat(read_run_file(config) or {}) if config.is_file() else {},
            "samples": read_run_file(samples) if samples.is_file() else []}


def _labels(runs: list[dict]) -> list[str]:
    """Each run's name: the shortest end of its folder's path that no other run's shares (its folder's name, then
    with the project's in front, ...); a folder given twice is numbered."""
    paths = [r["dir"].resolve().parts for r in runs]
    labels = []
    for i, parts in enumerate(paths):
        others = [p for j, p in enumerate(paths) if j != i and p != parts]
        depth = next((d for d in range(1, len(parts) + 1) if all(p[-d:] != parts[-d:] for p in others)), len(parts))
        labels.append("/".join(parts[-depth:]))
    return [f"{lab} ({labels[:i].count(lab) + 1})" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def _settings_table(runs: list[dict], labels: list[str]) -> str:
    """The settings whose values differ between the runs (the name and the paths of their own folders aside)."""
    keys = sorted({k for r in runs for k in r["config"]})
    own = ("name", "checkpoint_root_dir")
    differ = [k for k in keys if k not in own and len({repr(r["config"].get(k)) for r in runs}) > 1]
    if not differ:
        return "<h2>Settings</h2><p>The runs' resolved configurations differ only in their names.</p>"
    head = "".join(f"<th>{html.escape(lab)}</th>" for lab in labels)
    rows = "".join(f"<tr><td><code>{html.escape(k)}</code></td>"
                   + "".join(f"<td>{html.escape(json.dumps(r['config'].get(k, '-'), default=str))}</td>" for r in runs)
                   + "</tr>" for k in differ)
    return f"<h2>Settings that differ</h2><table><tr><th>setting</th>{head}</tr>{rows}</table>"


def _final_table(runs: list[dict], labels: list[str]) -> str:
    finals = [r["evals"][-1] if r["evals"] else {} for r in runs]
    keys = sorted({k for f in finals for k in f if k.startswith("eval/")})
    if not keys:
        return "<h2>Final held-out figures</h2><p>No run has held-out figures.</p>"
    head = "".join(f"<th>{html.escape(lab)}</th>" for lab in labels)
    rows = "".join(f"<tr><td>{html.escape(k[5:])}</td>"
                   + "".join(f"<td>{f[k]:.4f}</td>" if k in f else "<td>-</td>" for f in finals) + "</tr>"
                   for k in keys)
    steps = "".join(f"<td>{f.get('step', '-')}</td>" for f in finals)
    return (f"<h2>Final held-out figures</h2><table><tr><th>figure</th>{head}</tr><tr><td>at step</td>{steps}</tr>"
            f"{rows}</table>")


def _chart(title: str, runs: list[dict], labels: list[str], train_key, eval_key) -> str | None:
    """One overlaid chart as an <img> with its PNG inside, or None where no run has the figure."""
    series = []  # a run keeps one colour: its training curve solid, its held-out one dashed
    for i, (run, label) in enumerate(zip(runs, labels)):
        if train_key:
            points = [(r["step"], r[train_key]) for r in run["train"] if train_key in r]
            series += [(f"{label}", points, f"C{i % 10}-")] if points else []
        if eval_key:
            points = [(r["step"], r[eval_key]) for r in run["evals"] if eval_key in r]
            series += [(f"{label} (held-out)", points, f"C{i % 10}o--")] if points else []
    if not series:
        return None
    fig, ax = new_axes(6.4, 3.6)
    for name, points, style in series:
        ax.plot(*zip(*points), style, label=name, linewidth=1.3, markersize=3)
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'


def _answers_table(runs: list[dict], labels: list[str]) -> str:
    """Each held-out prompt once, with the base model's answer (from the first run that has it) and every run's."""
    prompts: dict[str, dict] = {}
    for i, run in enumerate(runs):
        for s in run["samples"]:
            entry = prompts.setdefault(s["prompt"], {"base": s.get("base", ""), "runs": {}})
            entry["runs"][i] = s.get("trained", "")
    if not prompts:
        return "<h2>Answers</h2><p>No run kept held-out answers (trainer.eval_samples: 0).</p>"
    e = html.escape
    head = "".join(f"<th>{e(lab)}</th>" for lab in labels)
    rows = "".join(f"<tr><td>{e(p)}</td><td>{e(v['base'])}</td>"
                   + "".join(f"<td>{e(v['runs'].get(i, '-'))}</td>" for i in range(len(runs))) + "</tr>"
                   for p, v in prompts.items())
    return (f"<h2>Answers to the same held-out prompts</h2><table><tr><th>prompt</th><th>base model</th>{head}</tr>"
            f"{rows}</table>")
