"""Metrics: one JSON object per optimizer step in `metrics.jsonl`, and a progress display.

On a terminal a tqdm bar shows the main figures; otherwise plain lines every `log_interval` steps, so logs
written to files stay readable.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

log = logging.getLogger(__name__)

SHOWN = ("loss", "rewards/accuracies", "rewards/margins", "lr")


class MetricsLog:
    def __init__(self, run_dir: Path, total_steps: int, first_step: int, log_interval: int):
        self.path = run_dir / "metrics.jsonl"
        self.file = open(self.path, "a", encoding="utf-8")
        self.total, self.interval = total_steps, log_interval
        self.bar = self._redirect = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total_steps, initial=first_step, desc="dpo", dynamic_ncols=True)
            self._redirect = logging_redirect_tqdm()  # log lines print above the bar instead of through it
            self._redirect.__enter__()

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        shown = {k: record[k] for k in SHOWN if k in record}
        if self.bar is not None:
            self.bar.set_postfix({k.split("/")[-1]: _short(v) for k, v in shown.items()}, refresh=False)
            self.bar.update(1)
        elif record["step"] % self.interval == 0 or record["step"] in (1, self.total):
            text = "  ".join(f"{k} {_short(v)}" for k, v in shown.items())
            log.info("step %d/%d  %s  %.1f tok/s", record["step"], self.total, text, record.get("tokens_per_s", 0))

    def close(self) -> None:
        if self.bar is not None:
            self._redirect.__exit__(None, None, None)
            self.bar.close()
        self.file.close()


def _short(v: float) -> str:
    if isinstance(v, float) and (abs(v) >= 1e-3 or v == 0 or not math.isfinite(v)):
        return f"{v:.4f}"
    return f"{v:.3g}" if isinstance(v, float) else str(v)
