"""Checkpoints: `global_step_<N>/` Hugging Face model folders in the run folder, written atomically.

A checkpoint is written into a hidden temporary folder and renamed into place, so a folder named
`global_step_<N>` is always complete; `latest_checkpointed_iteration.txt` (verl's marker) is updated last.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

MARKER = "latest_checkpointed_iteration.txt"


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"global_step_{step}"


def save_hf(run_dir: Path, step: int, model, tokenizer, save_dtype: torch.dtype) -> Path:
    """Write the model (in `save_dtype`), its generation config and the tokenizer as `global_step_<step>/`."""
    final = step_dir(run_dir, step)
    tmp = run_dir / f".tmp_global_step_{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().to("cpu", save_dtype) for k, v in model.state_dict().items()}
    original_dtype = model.config.dtype
    model.config.dtype = save_dtype
    try:
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    finally:
        model.config.dtype = original_dtype
    tokenizer.save_pretrained(tmp)
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    marker_tmp = run_dir / f".{MARKER}"
    marker_tmp.write_text(str(step))
    os.replace(marker_tmp, run_dir / MARKER)
    return final


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
