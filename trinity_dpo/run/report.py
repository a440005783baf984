"""Pictures and a report of a run, rebuilt from the files in its run folder.

    trinity report RUN_DIR

Reads `metrics.jsonl` (and, where present, `config.yaml`, `data_summary.json`, `samples.json`) and writes PNG
charts plus `report.html` into the run folder.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from .metrics import load_lines

CHARTS = [  # file, title, series (key, label) from train records, eval key drawn on the same axes
    ("loss.png", "loss", [("loss", "train")], "eval/loss"),
    ("ppl.png", "perplexity of the trained tokens", [("ppl", "train")], "eval/ppl"),
    ("accuracies.png", "reward accuracy", [("rewards/accuracies", "train")], "eval/rewards/accuracies"),
    ("margins.png", "reward margin", [("rewards/margins", "train")], "eval/rewards/margins"),
    ("rewards.png", "implicit rewards", [("rewards/chosen", "chosen"), ("rewards/rejected", "rejected")], None),
    ("kl.png", "KL term (before kl_coef)", [("actor/kl_loss", "KL")], None),
    ("kto_kl.png", "KTO's KL baseline (clamped at 0)", [("kl", "KL")], "eval/kl"),
    ("entropy.png", "entropy of the responses (before entropy_coef)", [("actor/entropy_loss", "entropy")], None),
    ("token_accuracy.png", "top-1 token accuracy", [("mean_token_accuracy", "train")], "eval/mean_token_accuracy"),
    # a reward model's (TRL's RewardTrainer names)
    ("rm_accuracy.png", "reward model accuracy", [("accuracy", "train")], "eval/accuracy"),
    ("rm_margin.png", "score margin (chosen - rejected)", [("margin", "train")], "eval/margin"),
    ("rm_rewards.png", "scores", [("min_reward", "min"), ("mean_reward", "mean"), ("max_reward", "max")], None),
    ("lr.png", "learning rate", [("lr", "lr")], None),
]


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of `metrics.jsonl`."""
    records = [record for _, record in load_lines(run_dir / "metrics.jsonl")]
    return [r for r in records if "loss" in r], [r for r in records if "eval/loss" in r]


def new_axes(width: float, height: float):
    """(figure, axes) of a chart of `width` x `height` inches at 100 dpi. A Figure of its own, saved by the Agg
    canvas its file name or format picks: no pyplot (0.24 s to import, and a figure manager per chart) and no
    backend switch for the process."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    return fig, fig.subplots()


def _plot(path: Path, title: str, train: list[dict], series, evals: list[dict], eval_key) -> None:
    fig, ax = new_axes(6, 3.4)
    for key, label in series:
        points = [(r["step"], r[key]) for r in train if key in r]
        if points:  # markers where the points are few enough to tell apart (held-out curves)
            ax.plot(*zip(*points), label=label, linewidth=1.4, marker="o" if len(points) <= 12 else None)
    if eval_key and evals:
        ax.plot([r["step"] for r in evals], [r[eval_key] for r in evals], "o--", label="held-out", linewidth=1.2)
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def write_charts(run_dir: Path) -> list[str]:
    train, evals = read_metrics(run_dir)
    names = []
    for name, title, series, eval_key in CHARTS:
        if any(key in r for r in train for key, _ in series):
            _plot(run_dir / name, title, train, series, evals, eval_key)
            names.append(name)
    eval_series = [("eval/rewards/accuracies", "reward accuracy"), ("eval/prefers_chosen", "prefers chosen")]
    if any(key in r for r in evals for key, _ in eval_series):
        _plot(run_dir / "eval.png", "held-out evaluation", evals, eval_series, [], None)
        names.append("eval.png")
    return names


def _read(run_dir: Path, name: str):
    path = run_dir / name
    if not path.is_file():
        return None
    return path.read_text() if path.suffix == ".yaml" else read_run_file(path)


def write_output(path: Path, text: str, key: str) -> Path:
    """Write a page or file the user asked for at `path` (its folder made); what the OS refuses (a folder of that
    name, a file where a folder should be, no permission) is one line naming `key`, the option that gave it."""
    from ..errors import ConfigError

    try:
        if path.is_dir():
            raise IsADirectoryError(21, "is a folder", str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{key}: cannot write {path} ({e.strerror or e})") from None
    return path


def read_run_file(path: Path):
    """A run folder's JSON or YAML file, parsed; one that is empty or damaged (a crash while it was written, an
    edit) is a one-line RunFolderError naming it."""
    import yaml

    from ..errors import RunFolderError

    try:
        text = path.read_text(encoding="utf-8")
        return yaml.safe_load(text) if path.suffix == ".yaml" else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        reason = " ".join(str(e).split())[:200]
        raise RunFolderError(f"{path}: cannot be read ({reason}); restore it or delete it") from None


def write_report(run_dir: str | Path) -> Path:
    """Write the charts and `report.html` of `run_dir`; return the HTML path."""
    run_dir = Path(run_dir)
    charts = write_charts(run_dir)
    _, evals = read_metrics(run_dir)
    e = html.escape
    parts = [f"<h1>trinity-dpo run: {e(run_dir.name)}</h1>", f"<p><code>{e(str(run_dir.resolve()))}</code></p>"]
    if len(evals) >= 1:
        first, last = evals[0], evals[-1]
        rows = "".join(f"<tr><td>{e(k[5:])}</td><td>{first[k]:.4f}</td><td>{last[k]:.4f}</td></tr>"
                       for k in sorted(first) if k.startswith("eval/"))
        parts.append(f"<h2>Held-out evaluation</h2><table><tr><th>metric</th><th>step {first['step']}</th>"
                     f"<th>step {last['step']}</th></tr>{rows}</table>")
    parts.append("<h2>Charts</h2>" + "".join(f'<img src="{c}" alt="{c}">' for c in charts))
    samples = _read(run_dir, "samples.json")
    if samples:
        rows = "".join(f"<tr><td>{e(s['prompt'])}</td><td>{e(s['base'])}</td><td>{e(s['trained'])}</td></tr>"
                       for s in samples)
        parts.append(f"<h2>Answers before and after</h2><table><tr><th>prompt</th><th>base model</th>"
                     f"<th>trained model</th></tr>{rows}</table>")
    summary = _read(run_dir, "data_summary.json")
    if summary:
        parts.append("<h2>Data</h2>" + "".join(
            f"<h3>{e(split)}</h3><pre>{e(json.dumps(info, indent=1, ensure_ascii=False))}</pre>"
            for split, info in summary.items() if info))
    config = _read(run_dir, "config.yaml")
    if config:
        parts.append(f"<h2>Resolved configuration</h2><pre>{e(config)}</pre>")
    style = ("body{font-family:sans-serif;max-width:1300px;margin:2em auto}img{margin:4px;border:1px solid #ddd}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}"
             "pre{background:#f6f6f6;padding:8px;overflow:auto}")
    return write_output(run_dir / "report.html", f"<!doctype html><html><head><meta charset='utf-8'><title>"
                        f"trinity-dpo {e(run_dir.name)}</title><style>{style}</style></head><body>{''.join(parts)}"
                        "</body></html>", "the run folder")
