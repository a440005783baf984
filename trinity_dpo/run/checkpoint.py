"""Checkpoints: `global_step_<N>/` in the run folder, each a Hugging Face model folder plus the state to resume.

A checkpoint is written into a hidden temporary folder, flushed to disk and renamed into place, so a folder named
`global_step_<N>` is always complete; `latest_checkpointed_iteration.txt` (verl's marker) is updated last.
`global_step_<N>/trainer_state/` holds what exact resumption needs beyond the HF weights: `dcp/`, the fp32 master
weights and the optimizer state in torch.distributed.checkpoint's format (each process writes its shards; any number
of processes can load them), plus RNG states and the loop position. With several processes, rank 0 gathers and
writes the one HF copy and does the renaming; all of them agree on success before anyone goes on. State files are
read back only with `torch.load(weights_only=True)` and DCP, weights only through safetensors.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine import distributed, lora
from . import direct_io, manifest
from ..errors import CheckpointError, UserError, one_line
from ..engine.distributed import Dist

log = logging.getLogger(__name__)

MARKER = "latest_checkpointed_iteration.txt"
STATE = "trainer_state"


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"global_step_{step}"


def save(run_dir: Path, step: int, model, tokenizer, save_dtype: torch.dtype, optimizer, state: dict,
         d: Dist, merge: bool = False, hf: bool = True) -> Path:
    """Write `global_step_<step>/` atomically: HF folder (weights in `save_dtype`; with LoRA, the adapter in PEFT's
    layout, and with `merge` the merged model in `merged/`) plus `trainer_state/`; without `hf`, only
    `trainer_state/` (`trainer.save_hf_checkpoint`: resuming needs nothing else). Every process must call it; a
    failure anywhere raises CheckpointError everywhere."""
    final = step_dir(run_dir, step)
    tmp = run_dir / f".tmp_global_step_{step}"
    state = {**state, "hf_weights": hf}
    # Collectives, before anything can fail.
    weights = distributed.full_state_dict(model, d.main, trainable_only=lora.enabled(model)) if hf else {}
    full = distributed.full_state_dict(model, d.main) if merge and hf else {}  # {} on every rank but 0
    merged = lora.merged_weights(model, full) if full else None
    error = _attempt(lambda: _write(tmp, model, weights, merged, tokenizer, save_dtype, state) if d.main else None)
    error = d.first_error(error)  # the folder exists everywhere before the shards go in
    written: direct_io.Written = {}  # this process's state files and their checksums, as written
    if error is None:
        dcp_dir = tmp / STATE / "dcp"
        error = _attempt(lambda: distributed.save_state(dcp_dir, model, optimizer,
                                                        direct_io.storage_writer(dcp_dir, written)))
        # Each process's checksums travel with its outcome (one small object each), so rank 0's manifest does not
        # read every other shard back: at 12 bytes a parameter, the whole resumable state.
        outcomes = d.everyone((error, written))
        error = next((e for e, _ in outcomes if e), None)
        written = {path: entry for _, theirs in outcomes for path, entry in theirs.items()}
    if error is None and d.main:
        error = _attempt(lambda: _publish(tmp, final, run_dir, step, direct_io.known_checksums(written)))
    error = d.first_error(error)
    if error is not None:
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest(run_dir)
        kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"saving checkpoint {step} into {run_dir} failed ({error}); {kept}; free "
                              "space and run the same command again to resume")
    return final


def wants_hf(setting: str, last: bool) -> bool:
    """`trainer.save_hf_checkpoint`: whether this checkpoint holds the Hugging Face weights; `last`: the run's last
    save (its final step, or where a signal stopped it), as Trinity's save at the end of its loop."""
    return setting == "always" or (setting == "last" and last)


def _attempt(write) -> str | None:
    """Run `write`; the reason it failed, or None."""
    from safetensors import SafetensorError
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        write()
    except OSError as e:
        return e.strerror or str(e)
    except (RuntimeError, SafetensorError) as e:  # torch.save and safetensors report a full disk this way
        return one_line(e)
    except CheckpointException as e:  # DCP wraps each process's OSError
        cause = _cause(e)
        return (cause.strerror or str(cause)) if isinstance(cause, OSError) else _one_line(cause)
    return None


def _cuda_rng() -> dict:
    """This process's CUDA generator (rank 0's, which writes the state; every rank seeds alike), where there is one."""
    return {"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() and torch.cuda.is_initialized() else {}


def _write(tmp: Path, model, weights: dict, merged: dict | None, tokenizer, save_dtype: torch.dtype,
           state: dict) -> None:
    """Rank 0's part: the HF folder (or adapter) and the small state files, into the fresh temporary folder `tmp`."""
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / STATE).mkdir(parents=True)
    if state["hf_weights"]:
        if lora.enabled(model):
            lora.save_adapter(model, tmp, weights)  # fp32, as PEFT keeps adapters
        else:
            _save_hf(model, tmp, weights, save_dtype)
        tokenizer.save_pretrained(tmp)
    if merged is not None:
        _save_hf(model, tmp / lora.MERGED, merged, save_dtype)
        tokenizer.save_pretrained(tmp / lora.MERGED)
    torch.save({"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), **_cuda_rng()},
               tmp / STATE / "rng.pt")
    (tmp / STATE / "state.json").write_text(json.dumps(state, indent=1))


def _save_hf(model, folder: Path, weights: dict, save_dtype: torch.dtype) -> None:
    """A plain Hugging Face model folder with `weights` stored in `save_dtype`, which its config.json names (the
    next run reads it: `modeling.stored_dtype`). Tied weights (one memory under two names) stay one tensor through
    the cast, so `save_pretrained` stores them once."""
    model.save_pretrained(folder, state_dict=distributed.per_memory(weights, lambda v: v.to(save_dtype)),
                          safe_serialization=True)
    # save_pretrained writes the dtype of the model's own parameters (fp32 master weights), whatever it stored.
    config = json.loads((folder / "config.json").read_text())
    for key in {"dtype", *({"torch_dtype"} & config.keys())}:  # transformers 4.x wrote torch_dtype
        config[key] = str(save_dtype).replace("torch.", "")
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _publish(tmp: Path, final: Path, run_dir: Path, step: int, known: dict[Path, str] | None = None) -> None:
    """Record what `tmp` holds (`known`: checksums taken as files were written), flush every file, rename it to
    `final`, then move the marker: a crash leaves either checkpoint."""
    manifest.write(tmp, tmp / STATE / manifest.NAME, known)
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _mark(run_dir, step)


def _mark(run_dir: Path, step: int) -> None:
    marker_tmp = run_dir / f".{MARKER}"
    marker_tmp.write_text(str(step))
    os.replace(marker_tmp, run_dir / MARKER)


def is_complete(path: Path) -> bool:
    state = path / STATE
    if not (state / "state.json").is_file():
        return False
    if not ((state / "dcp" / ".metadata").is_file() or (state / "optimizer.pt").is_file()):
        return False
    return _has_weights(path) or not saved_state(path).get("hf_weights", True)


def _has_weights(path: Path) -> bool:
    """Whether checkpoint `path` holds Hugging Face weights (a model folder or a PEFT adapter folder)."""
    return (path / "config.json").is_file() or (path / lora.ADAPTER_CONFIG).is_file()


def saved_state(path: Path) -> dict:
    try:
        return json.loads((path / STATE / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def final_of(run_dir: Path) -> Path | None:
    """The run's checkpoint at its last step (its loop state's `total`), or None: the run has not finished."""
    path = latest(run_dir)
    state = saved_state(path) if path is not None else {}
    return path if state and state.get("step") == state.get("total") else None


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


@dataclass(frozen=True)
class Resume:
    """The checkpoint to resume from as the run folder chose it, and `fallback`: the older checkpoints to load,
    newest first, if loading it raises; None for an explicit `trainer.resume_from_path`: the user named that one."""

    path: Path
    fallback: tuple[Path, ...] | None = None


def resume_of(paths: list[str], explicit: bool) -> Resume:
    return Resume(Path(paths[0]), None if explicit else tuple(Path(p) for p in paths[1:]))


def verify(path: Path) -> str | None:
    """Why checkpoint `path` cannot be resumed from (incomplete, or not what its manifest records), or None."""
    if not is_complete(path):
        return (f"it is not a complete checkpoint of this tool ({STATE}/state.json, {STATE}/dcp or its Hugging Face "
                "weights missing)")
    return manifest.verify(path, path / STATE / manifest.NAME)


def choose(run_dir: Path) -> Resume | None:
    """The newest checkpoint of `run_dir` that verifies, the older ones its fallback; None when there is none to
    resume. Newer ones that fail verification are set aside, kept, with a warning; if none verifies, CheckpointError.
    Rank 0 alone chooses (`folder.prepare_run_dir`)."""
    found = _complete(run_dir)[::-1]
    failed = []
    for i, path in enumerate(found):
        reason = verify(path)
        if reason is None:
            _set_aside(failed, path, main=True)
            return resume_of([str(p) for p in found[i:]], explicit=False)
        failed.append((path, reason))
    if failed:
        raise cannot_resume(failed, explicit=False)
    return None


def cannot_resume(failed: list[tuple[Path, str]], explicit: bool) -> CheckpointError:
    why = "; ".join(f"{path}: {reason}" for path, reason in failed)
    if explicit:
        return CheckpointError(f"trainer.resume_from_path: cannot resume from {why}; point it at another checkpoint, or "
                           "set trainer.resume_mode: disable to start afresh")
    return CheckpointError(f"no checkpoint of {failed[0][0].parent} can be resumed from ({why}); set "
                       "trainer.resume_from_path to a checkpoint you trust, or trainer.resume_mode: disable (with a "
                       "new `name`) to start afresh")


def set_aside_newer(run_dir: Path, chosen: Path) -> None:
    """`trainer.resume_from_path` named an older checkpoint of this same run folder (a roll-back): its newer ones
    belong to the run given up. They are set aside, kept, and the marker points at `chosen`: left in place, pruning
    by step would delete the continued run's own new checkpoints first, and a later auto resume would take the
    given-up run's newest. Rank 0 alone calls it (`folder.prepare_run_dir`)."""
    if chosen.resolve().parent != run_dir.resolve() or not chosen.name[12:].isdigit():
        return
    step = int(chosen.name[12:])
    newer = sorted((p for p in run_dir.glob("global_step_*") if p.name[12:].isdigit() and int(p.name[12:]) > step),
                   key=lambda p: int(p.name[12:]))
    _set_aside([(p, f"newer than {chosen.name}, which trainer.resume_from_path continues from") for p in newer],
               chosen, main=True)


def _set_aside(failed: list[tuple[Path, str]], chosen: Path, main: bool) -> None:
    """Rename the checkpoints skipped in favour of `chosen` out of the way (the run would overwrite them when it
    reaches their step again), keeping them for the user to inspect; point the marker at `chosen`. Every process
    learns the new names; only the `main` one renames."""
    for path, reason in failed:
        kept = path.with_name(f"{path.name}.skipped")
        n = 1
        while kept.exists():
            n += 1
            kept = path.with_name(f"{path.name}.skipped{n}")
        if main:
            os.replace(path, kept)
        log.warning("checkpoint %s skipped: %s; kept as %s; resuming from %s", path, reason, kept.name, chosen.name)
    if failed and main:
        _mark(chosen.parent, int(chosen.name[12:]))


def restore(resume: Resume, model, optimizer, main: bool) -> tuple[dict, Path]:
    """Load fp32 weights, optimizer state (whatever number of processes wrote them) and RNG states from checkpoint
    `resume.path`; return its loop state and the checkpoint used. If loading it raises, the first of its `fallback`
    that verifies and loads is used instead, and those that failed are set aside (`_set_aside`; `main`: this
    process renames them)."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: DCP's wrapper of causes

    path, fallback = resume.path, resume.fallback
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint of this tool (no {STATE}/state.json)")
    failed = []
    for candidate in (path, *(fallback or ())):
        reason = verify(candidate) if failed else None  # `path` was verified when it was chosen
        if reason is None:
            try:
                state = _load(candidate, model, optimizer)
            except UserError:
                raise
            except (Exception, CheckpointException) as e:  # whatever a damaged file makes its reader raise
                reason = f"loading it raised {_one_line(e)}"
        if reason is None:
            _set_aside(failed, candidate, main)
            return state, candidate
        failed.append((candidate, reason))
    raise cannot_resume(failed, explicit=fallback is None)


def _load(path: Path, model, optimizer) -> dict:
    if (path / STATE / "dcp").is_dir():
        distributed.load_state(path / STATE / "dcp", model, optimizer)
    else:
        _restore_single_file(path, model, optimizer)
    rng = torch.load(path / STATE / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():  # LoRA dropout's masks on GPU draw from it
        torch.cuda.set_rng_state(rng["cuda"])
    random.setstate((3, tuple(rng["python"]), None))
    return json.loads((path / STATE / "state.json").read_text())


def _one_line(e: BaseException) -> str:
    """An exception as `Type: first line`, DCP's by its first process's cause."""
    e = _cause(e)
    return f"{type(e).__name__}: {one_line(e)}" if str(e).strip() else type(e).__name__


def _cause(e: BaseException) -> BaseException:
    """The first process's exception inside DCP's CheckpointException (its `failures` hold (exception, traceback)
    pairs by rank), else `e`."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        cause = next(iter(failures.values()))
        return cause[0] if isinstance(cause, tuple) else cause
    return e


def _restore_single_file(path: Path, model, optimizer) -> None:
    """The layout of checkpoints written before `dcp/`: fp32 weights in `model_fp32.safetensors` (else the HF copy)
    and the optimizer's own `optimizer.pt`, which only an unsharded model can take."""
    if any(hasattr(p, "full_tensor") for p in model.parameters()):
        raise CheckpointError(f"{path} was written by an earlier version in a single-process layout: resume it once with "
                          "cluster.gpu_per_node=1; its next checkpoint resumes with any number of processes")
    from safetensors.torch import load_model

    fp32 = path / STATE / "model_fp32.safetensors"
    if fp32.is_file():
        load_model(model, str(fp32), device=str(next(model.parameters()).device))
    else:
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True,
                                                     local_files_only=True)
        model.load_state_dict(saved.state_dict())
    optimizer.load_state_dict(torch.load(path / STATE / "optimizer.pt", map_location="cpu", weights_only=True))
