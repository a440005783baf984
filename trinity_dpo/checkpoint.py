"""Checkpoints: `global_step_<N>/` in the run folder, each a Hugging Face model folder plus the state to resume.

A checkpoint is written into a hidden temporary folder, flushed to disk and renamed into place, so a folder named
`global_step_<N>` is always complete; `latest_checkpointed_iteration.txt` (verl's marker) is updated last.
`global_step_<N>/trainer_state/` holds what exact resumption needs beyond the HF weights: the fp32 master weights
(when the HF copy is stored in a narrower dtype), the optimizer state, RNG states and the loop position. State files
are read back only with `torch.load(weights_only=True)` and weights only through safetensors.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from .config import ConfigError

log = logging.getLogger(__name__)

MARKER = "latest_checkpointed_iteration.txt"
STATE = "trainer_state"


class CheckpointError(RuntimeError):
    """Saving failed (a full disk, say); the previous checkpoint is intact. One line for the user, exit code 1."""


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"global_step_{step}"


def save(run_dir: Path, step: int, model, tokenizer, save_dtype: torch.dtype, optimizer, state: dict) -> Path:
    """Write `global_step_<step>/` atomically: HF folder (weights in `save_dtype`) plus `trainer_state/`."""
    final = step_dir(run_dir, step)
    tmp = run_dir / f".tmp_global_step_{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(tmp, model, tokenizer, save_dtype, optimizer, state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        marker_tmp = run_dir / f".{MARKER}"
        marker_tmp.write_text(str(step))
        os.replace(marker_tmp, run_dir / MARKER)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest(run_dir)
        kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"saving checkpoint {step} into {run_dir} failed ({e.strerror or e}); {kept}; free "
                              "space and run the same command again to resume") from None
    return final


def _write(tmp: Path, model, tokenizer, save_dtype: torch.dtype, optimizer, state: dict) -> None:
    (tmp / STATE).mkdir(parents=True)
    weights = {k: v.detach().to("cpu", save_dtype) for k, v in model.state_dict().items()}
    original_dtype = model.config.dtype
    model.config.dtype = save_dtype
    try:
        model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
    finally:
        model.config.dtype = original_dtype
    tokenizer.save_pretrained(tmp)
    if save_dtype != torch.float32:  # exact resumption needs the fp32 master weights
        save_model(model, str(tmp / STATE / "model_fp32.safetensors"))
    torch.save(optimizer.state_dict(), tmp / STATE / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}, tmp / STATE / "rng.pt")
    (tmp / STATE / "state.json").write_text(json.dumps(state, indent=1))
    for f in [*tmp.iterdir(), *(tmp / STATE).iterdir()]:
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def is_complete(path: Path) -> bool:
    return (path / STATE / "state.json").is_file() and (path / "config.json").is_file()


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of `run_dir` (the marker's, else the highest step found), or None."""
    marker = run_dir / MARKER
    if marker.is_file() and marker.read_text().strip().isdigit():
        path = step_dir(run_dir, int(marker.read_text()))
        if is_complete(path):
            return path
    found = _complete(run_dir)
    return found[-1] if found else None


def _complete(run_dir: Path) -> list[Path]:
    """The complete `global_step_<N>` folders of `run_dir`, oldest step first."""
    found = [p for p in run_dir.glob("global_step_*") if p.name[12:].isdigit() and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[12:]))


def clean_incomplete(run_dir: Path) -> None:
    """Remove what an interrupted save left behind: temporary folders and step folders without their state."""
    for path in run_dir.glob(".tmp_global_step_*"):
        log.info("removing the incomplete checkpoint %s", path.name)
        shutil.rmtree(path, ignore_errors=True)


def prune(run_dir: Path, keep: int | None, protect: Path | None) -> None:
    """Keep the newest `keep` complete checkpoints (never `protect`, the one this run resumed from)."""
    if not keep:
        return
    for path in _complete(run_dir)[:-keep]:
        if protect is None or path.resolve() != protect.resolve():
            shutil.rmtree(path, ignore_errors=True)


def restore(path: Path, model, optimizer) -> dict:
    """Load weights, optimizer state and RNG states from checkpoint `path`; return its loop state."""
    if not is_complete(path):
        raise ConfigError(f"{path} is not a complete checkpoint of this tool (no {STATE}/state.json)")
    fp32 = path / STATE / "model_fp32.safetensors"
    if fp32.is_file():
        load_model(model, str(fp32), device=str(next(model.parameters()).device))
    else:
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
        model.load_state_dict(saved.state_dict())
    optimizer.load_state_dict(torch.load(path / STATE / "optimizer.pt", map_location="cpu", weights_only=True))
    rng = torch.load(path / STATE / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate((3, tuple(rng["python"]), None))
    return json.loads((path / STATE / "state.json").read_text())
