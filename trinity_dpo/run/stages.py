"""Running a config's stages one after the other (`config.stages` builds and checks them all first).

Each stage is an ordinary run (`train.run`) in its own folder `<checkpoint_root_dir>/<project>/<name>/<stage_name>`,
starting from the previous stage's last checkpoint (its Hugging Face folder becomes `model.model_path`, so for DPO
it is the reference too). A stage counts as finished once its run has written the checkpoint of its last step; the
folder above the stages keeps `stages.json`, the finished stages in order with that checkpoint, written atomically
by rank 0 after each one. Trinity records only the stage it last started and re-enters it; here a restart skips
every finished stage and resumes the first unfinished one from its own newest checkpoint (the normal resume).

Under torchrun every worker runs this same sequence; the process group of the first stage serves them all.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import os
from pathlib import Path

from ..config.stages import Stage, experiment_dir
from ..engine import distributed, lora
from ..errors import RunFolderError
from . import checkpoint, train

log = logging.getLogger(__name__)

LEDGER = "stages.json"


def run_stages(stages: list[Stage]) -> Path:
    """Run the stages not finished yet, in order; the run folder of the last one run (or of the one a signal
    stopped: the same command resumes it)."""
    if len(stages) == 1 and stages[0].name is None:
        return train.run(stages[0].cfg)
    root = experiment_dir(stages)
    finished = _finished(root, stages)  # read once, before any stage runs, by every worker alike
    start, run_dir = None, root
    stop = train.Stop()  # one handler over all stages: a signal between two of them is not lost
    with distributed.kept_group(), _restoring(stop):
        for i, stage in enumerate(stages):
            where = f"stage {i + 1}/{len(stages)} ({stage.name})"
            if i < len(finished):
                start = _hand_off(Path(finished[i]["checkpoint"]), stage.name)
                log.info("%s: finished before, at %s; skipped", where, finished[i]["checkpoint"])
                continue
            cfg = copy.deepcopy(stage.cfg)
            if start is not None:
                cfg.model.model_path = str(start)
            log.info("%s: starting from %s", where, cfg.model.model_path)
            run_dir = train.run(cfg, stop)
            final = checkpoint.final_of(run_dir)
            if final is None:  # stopped by a signal after saving
                log.warning("%s stopped before its last step; run the same command again to resume it", where)
                return run_dir
            finished = [*finished, {"stage_name": stage.name, "checkpoint": str(final.resolve())}]
            if distributed.is_main_process():
                _record(root, finished)
            start = _hand_off(final.resolve(), stage.name)
            gc.collect()  # the stage's model, before the next one loads
    return run_dir


@contextlib.contextmanager
def _restoring(stop: "train.Stop"):
    try:
        yield
    finally:
        stop.restore()


def _finished(root: Path, stages: list[Stage]) -> list[dict]:
    """The leading stages `stages.json` records as finished, as long as they are the config's first stages in
    order (a stage renamed or inserted runs again from there)."""
    path = root / LEDGER
    if not path.is_file():
        return []
    try:
        records = json.loads(path.read_text())["finished"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunFolderError(f"{path}: cannot read the finished stages ({e}); correct it, or delete it to run "
                             "every stage again (each resumes from its own checkpoints)") from None
    done = []
    for stage, record in zip(stages, records):
        if record.get("stage_name") != stage.name:
            break
        done.append(record)
    return done


def _record(root: Path, finished: list[dict]) -> None:
    """Write `stages.json` whole, so a crash leaves the old file or the new one."""
    tmp = root / f".{LEDGER}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps({"finished": finished}, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LEDGER)


def _hand_off(final: Path, name: str) -> Path:
    """The model folder the next stage starts from: the checkpoint itself, or with LoRA its merged model."""
    folder = final / lora.MERGED if lora.is_adapter(final) else final
    if not (folder / "config.json").is_file():
        raise RunFolderError(f"stage {name} finished at {final}, but {folder} holds no model now; restore it, or "
                             f"remove the stage from {LEDGER} to train it again")
    return folder


def eval_reference(stages: list[Stage]) -> str | None:
    """The model the last of `stages` started from, which its DPO objective took as the reference: the previous
    stage's final checkpoint (`stages.json`); None for a config of one run, whose reference is its own
    `model.model_path`. `trinity eval --config` compares against it unless `--ref` names another."""
    if len(stages) < 2:
        return None
    root, previous = experiment_dir(stages), len(stages) - 2
    finished = _finished(root, stages)
    if len(finished) <= previous:
        raise RunFolderError(f"{root}: stage {stages[previous].name} has not finished, so the last stage's reference "
                             "(its final checkpoint) is not there yet; finish it, or give --ref")
    return str(_hand_off(Path(finished[previous]["checkpoint"]), stages[previous].name))
