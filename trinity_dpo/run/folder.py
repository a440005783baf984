"""The run folder: `<checkpoint_root_dir>/<project>/<name>/`, deciding whether a run starts fresh or resumes, and
the small files a run keeps there (resolved config, history carried from the run resumed from).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import yaml

from . import checkpoint, lock as run_lock
from ..config.schema import Config
from ..errors import RunFolderError, UserError
from ..engine.distributed import Dist
from .metrics import load_lines


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.checkpoint_root_dir) / cfg.project / cfg.name


def prepare_run_dir(cfg: Config, d: Dist) -> tuple[Path, checkpoint.Resume | None]:
    """The run folder, and the checkpoint to resume from (None: a fresh start) as `trainer.resume_mode` says.
    Rank 0 takes the folder's lock for all processes, decides and tidies; every process must see the same folder
    (shared storage across nodes)."""
    run_dir = run_dir_of(cfg)
    decision = launch = None
    if d.main:
        try:
            decision, launch = _prepare_run_dir(cfg, run_dir), str(time.time_ns())
            (run_dir / ".launch").write_text(launch)
        except UserError as e:  # told to every process, which would otherwise wait for rank 0's answer
            decision = e
    decision, launch = d.from_main((decision, launch))
    if isinstance(decision, UserError):
        raise decision
    seen = run_dir / ".launch"
    if not seen.is_file() or seen.read_text() != launch:
        raise RunFolderError(f"checkpoint_root_dir: this process does not see rank 0's run folder {run_dir}; with "
                          "several nodes it must be on storage they all share")
    return run_dir, None if decision is None else checkpoint.resume_of(*decision)


def _prepare_run_dir(cfg: Config, run_dir: Path) -> tuple[list[str], bool] | None:
    """(the checkpoint to resume from and its fallbacks, whether the user named it), or None: a fresh start."""
    run_dir.mkdir(parents=True, exist_ok=True)
    run_lock.acquire(run_dir)  # before anything is written: a second run must leave the folder as it found it
    checkpoint.clean_incomplete(run_dir)
    if cfg.trainer.resume_from_path:
        path = Path(cfg.trainer.resume_from_path)
        reason = checkpoint.verify(path)
        if reason is not None:
            raise checkpoint.cannot_resume([(path, reason)], explicit=True)
        return [str(path)], True
    if cfg.trainer.resume_mode == "auto":
        found = checkpoint.choose(run_dir)
        if found is not None:
            return [str(found.path), *map(str, found.fallback)], False
    elif any(run_dir.glob("global_step_*")) or (run_dir / "metrics.jsonl").is_file():
        raise RunFolderError(f"run folder {run_dir} is not empty and trainer.resume_mode is 'disable': choose a new "
                          "`name`, remove the folder, or set resume_mode: auto to continue it")
    for stale in ("metrics.jsonl", "samples.json", "samples_base.json"):
        (run_dir / stale).unlink(missing_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    return None


def carry_history(source: Path, run_dir: Path) -> None:
    """Resuming another run's checkpoint into a new folder: start from that run's metrics and base answers."""
    for name in ("metrics.jsonl", "samples_base.json"):
        if (source / name).is_file() and not (run_dir / name).is_file() and source.resolve() != run_dir.resolve():
            shutil.copyfile(source / name, run_dir / name)


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop what was logged after the checkpoint resumed from, so the file reads as one uninterrupted run."""
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        keep = [line for line, record in load_lines(path) if record["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
