"""The run folder: `<checkpoint_root_dir>/<project>/<name>/`, deciding whether a run starts fresh or resumes, and
the small files a run keeps there (resolved config, history carried from the run resumed from).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

import yaml

from . import checkpoint, lock as run_lock
from ..config.schema import ALIASES, Config
from ..errors import RunFolderError, UserError
from ..engine.distributed import Dist
from .metrics import load_lines

log = logging.getLogger(__name__)


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
        except OSError as e:  # a full disk, a read-only folder: the user's to fix, and every process is told
            decision = RunFolderError(f"run folder {run_dir}: {e.strerror or e}"
                                      f"{f' ({e.filename})' if e.filename else ''}; free space or fix its permissions")
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
        changed = _changed_settings(cfg, path)
        if changed:
            log.warning("continuing %s with changed settings: %s", path, changed)
        checkpoint.set_aside_newer(run_dir, path)
        _write_config(run_dir, cfg)
        return [str(path)], True
    if cfg.trainer.resume_mode == "auto":
        found = checkpoint.choose(run_dir)
        if found is not None:
            changed = _changed_settings(cfg, found.path)
            if changed:
                raise RunFolderError(f"run folder {run_dir}: its checkpoint {found.path.name} was trained with other "
                                     f"settings ({changed}); to continue it with these, name it in "
                                     "trainer.resume_from_path; to start afresh, give this run another `name`")
            return [str(found.path), *map(str, found.fallback)], False
    elif any(run_dir.glob("global_step_*")) or (run_dir / "metrics.jsonl").is_file():
        raise RunFolderError(f"run folder {run_dir} is not empty and trainer.resume_mode is 'disable': choose a new "
                          "`name`, remove the folder, or set resume_mode: auto to continue it")
    for stale in ("metrics.jsonl", "samples.json", "samples_base.json"):
        (run_dir / stale).unlink(missing_ok=True)
    _write_config(run_dir, cfg)
    return None


def _write_config(run_dir: Path, cfg: Config) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


# What a checkpoint's numbers depend on, by the canonical field (alias spellings are folded into these): the model,
# its template and lengths, the objective, the optimizer, the data and its batch, precision and seed. Not the
# schedule's length, logging, saving, evaluation or the number of processes (a resume equals an uninterrupted run
# across those).
_SETTINGS = ("model.model_path", "model.custom_chat_template", "model.enable_thinking", "model.max_model_len",
             "model.max_prompt_tokens", "model.max_response_tokens", "model.lora.", "algorithm.",
             "buffer.train_batch_size", "buffer.trainer_input.experience_buffer.", "buffer.trainer_input.eval_fraction",
             "trainer.grad_clip",
             "trainer.precision", "trainer.seed")
_NOT_SETTINGS = ("model.lora.save_merged", "buffer.trainer_input.experience_buffer.name",
                 "algorithm.optimizer.total_training_steps", "buffer.trainer_input.experience_buffer.on_bad_row",
                 "algorithm.use_token_level_loss", "algorithm.optimizer.beta1", "algorithm.optimizer.beta2")


def settings_of(cfg: Config) -> dict:
    """The settings a checkpoint records (`_SETTINGS`), dotted key -> value, for a resume to compare."""
    spellings = {k for canonical, tiers in ALIASES for tier in tiers for k in tier if k != canonical}
    return {k: v for k, v in _flat(dataclasses.asdict(cfg)).items()
            if k.startswith(_SETTINGS) and not k.startswith(_NOT_SETTINGS) and k not in spellings}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _changed_settings(cfg: Config, path: Path) -> str:
    """The settings that differ between checkpoint `path`'s run and `cfg` ("" where none, or where the
    checkpoint predates recording them), the first three named."""
    saved = checkpoint.saved_state(path).get("settings")
    if not isinstance(saved, dict):
        return ""
    now = settings_of(cfg)
    keys = [k for k in sorted(now.keys() | saved.keys()) if json.dumps(now.get(k)) != json.dumps(saved.get(k))]
    named = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys[:3])
    return named + (f"; and {len(keys) - 3} more" if len(keys) > 3 else "")


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
        # A new file renamed over the old: a full disk or a kill midway leaves the whole history, never a cut one.
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in keep))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise RunFolderError(f"{path}: cannot rewrite it to step {step} ({e.strerror or e}); it is unchanged: "
                                 "free space and run the same command again") from None


def write_json(path: Path, obj) -> None:
    """Written beside and renamed into place: a crash or a full disk leaves the old file or the new, never a cut
    one that the report would fail to read."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    os.replace(tmp, path)
