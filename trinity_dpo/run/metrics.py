"""Metrics: one JSON object per optimizer step (and per evaluation) in `metrics.jsonl`, a progress display, and
the optional sinks users pick with Trinity's `monitor.monitor_type` or verl's `trainer.logger` list: TensorBoard
event files in the run folder and Weights & Biases (offline unless the user's environment says otherwise).

On a terminal a tqdm bar shows the main figures; otherwise plain lines every `log_interval` steps, so logs
written to files stay readable.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path

from ..config.checks import sinks_of
from ..errors import RunFolderError
from ..config.schema import Config
from ..errors import RunFolderError

log = logging.getLogger(__name__)

SHOWN = ("loss", "rewards/accuracies", "rewards/margins", "accuracy", "margin", "ppl", "lr")  # those logged
EVAL_SHOWN = (("loss", "eval/loss"), ("accuracy", "eval/rewards/accuracies"), ("margin", "eval/rewards/margins"),
              ("accuracy", "eval/accuracy"), ("margin", "eval/margin"),  # a reward model's
              ("prefers chosen", "eval/prefers_chosen"), ("ppl", "eval/ppl"),
              ("token accuracy", "eval/mean_token_accuracy"))
def load_lines(path: Path) -> list[tuple[str, dict]]:
    """Each line of a metrics.jsonl with its record. A last line that is no record was cut off by a crash in
    mid-write: it is left out, with a warning that shows it. Any other such line stops with a RunFolderError."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and "step" in record:
            out.append((line, record))
        elif i == len(lines):
            log.warning("%s: the last line was cut off by a crash in mid-write and is dropped: %r", path, line[:120])
        else:
            raise RunFolderError(f"{path}: line {i} is not a metrics record (edited by hand?); correct or delete it")
    return out


class MetricsLog:
    def __init__(self, run_dir: Path, cfg: Config, total_steps: int, first_step: int = 0):
        self.path = run_dir / "metrics.jsonl"
        self.file = open(self.path, "a", encoding="utf-8")
        self.total, self.interval = total_steps, cfg.trainer.log_interval
        self.bar = self._redirect = self.tb = self.wandb = None
        sinks = sinks_of(cfg)
        if "tensorboard" in sinks:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if "wandb" in sinks:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")  # no network unless the user configured wandb for it
            self.wandb = wandb.init(project=cfg.project, name=cfg.name, dir=str(run_dir),
                                    config=dataclasses.asdict(cfg), reinit="finish_previous")
        if sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total_steps, initial=first_step, desc="dpo", dynamic_ncols=True)
            self._redirect = logging_redirect_tqdm()  # log lines print above the bar instead of through it
            self._redirect.__enter__()

    def _sinks(self, record: dict) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:  # a full disk: the checkpoints so far are whole, and resuming cuts the file back
            raise RunFolderError(f"{self.path}: cannot write ({e.strerror or e}); free space and run the same "
                                 "command again to resume") from None
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k not in ("step", "epoch") and isinstance(v, (int, float))}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key if key.startswith("eval/") else f"train/{key}", value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({k if k.startswith("eval/") else f"train/{k}": v for k, v in scalars.items()}, step=step)

    def write(self, record: dict) -> None:
        self._sinks(record)
        shown = {k: record[k] for k in SHOWN if k in record}
        if self.bar is not None:
            self.bar.set_postfix({k.split("/")[-1]: _short(v) for k, v in shown.items()}, refresh=False)
            self.bar.update(1)
        elif record["step"] % self.interval == 0 or record["step"] in (1, self.total):
            text = "  ".join(f"{k} {_short(v)}" for k, v in shown.items())
            log.info("step %d/%d  %s  %.1f tok/s", record["step"], self.total, text, record.get("tokens_per_s", 0))

    def write_eval(self, step: int, record: dict) -> None:
        self._sinks({"step": step, **record})
        shown = {label: record[k] for label, k in EVAL_SHOWN if k in record}
        log.info("eval at step %d: %s", step, "  ".join(f"{label} {_short(v)}" for label, v in shown.items()))

    def close(self) -> None:
        if self.bar is not None:
            self._redirect.__exit__(None, None, None)
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.file.close()


class NullLog:
    """The metrics log of processes other than rank 0: the figures are reduced over processes, rank 0 writes them."""

    def write(self, record: dict) -> None:
        pass

    def write_eval(self, step: int, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _short(v: float) -> str:
    if isinstance(v, float) and (abs(v) >= 1e-3 or v == 0 or not math.isfinite(v)):
        return f"{v:.4f}"
    return f"{v:.3g}" if isinstance(v, float) else str(v)
