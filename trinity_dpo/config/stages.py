"""Trinity's `stages:`: one config that is several runs, one after the other (say SFT, then DPO on its result).

Each stage's config is built as Trinity's `Config.__iter__` builds it: the global config with every section the
stage gives (`mode`, `algorithm`, `buffer`, `data_processor`, `explorer`, `trainer`: Trinity's `StageConfig`)
put in place of the global one whole, so a field the stage's section leaves out takes its default, not the global
value; the experiment name becomes `{name}/{stage_name}`. Every stage's config is built and checked here, before
any stage runs. Running them is `run.stages`.
"""
from __future__ import annotations

import copy
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .loader import build_config, omega, parse_override, read_raw
from .schema import Config

log = logging.getLogger(__name__)

STAGE_SECTIONS = ("mode", "algorithm", "buffer", "data_processor", "explorer", "trainer")  # Trinity's StageConfig
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Stage:
    """One run of a config: `name` is its `stage_name` (None for a config without stages)."""

    name: str | None
    cfg: Config


def load_stages(path: str | os.PathLike, overrides: list[str] = ()) -> list[Stage]:
    """The runs of the config at `path`: one for a config without `stages`, else one per stage, each built and
    checked. An override `stages.N.key=value` changes stage N's own section; any other override applies to every
    stage's config after its sections replaced the global ones (so it is never lost to a replaced section)."""
    path, raw = read_raw(path)
    pairs = [parse_override(o) for o in overrides]
    staged = [(k, v) for k, v in pairs if k == "stages" or k.startswith("stages.")]
    pairs = [p for p in pairs if p not in staged]
    if staged:
        raw = _with_overrides(raw, staged, path)
    stages = raw.pop("stages", None)
    if not stages:  # Trinity runs the config itself when `stages` is absent or empty
        return [Stage(None, build_config(raw, path, pairs))]
    names = _stage_names(stages)
    built = []
    for i, (stage, name) in enumerate(zip(stages, names)):
        given = {k: v for k, v in stage.items() if k in STAGE_SECTIONS and v is not None}
        stage_raw = copy.deepcopy({**raw, **given})
        try:
            cfg = build_config(stage_raw, path, [*pairs, ("name", f"{_name_of(stage_raw, pairs)}/{name}")])
        except ConfigError as e:
            raise ConfigError(_in_stage(str(e), i, name, given)) from None
        built.append(Stage(name, cfg))
    _hand_offs(built)
    return built


def _with_overrides(raw: dict, pairs: list, path: Path) -> dict:
    from omegaconf import OmegaConf

    merged = omega(lambda: OmegaConf.create(raw), path)
    for key, value in pairs:
        omega(lambda: OmegaConf.update(merged, key, value, merge=True, force_add=True), f"override {key}")
    return omega(lambda: OmegaConf.to_container(merged, resolve=False), path)


def _stage_names(stages) -> list[str]:
    """Each stage's `stage_name`, checked: a list of mappings of Trinity's stage keys, unique folder names."""
    if not isinstance(stages, list):
        raise ConfigError(f"stages: expected a list of stages (each a stage_name and the sections it replaces), got "
                          f"{type(stages).__name__}")
    names: list[str] = []
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict):
            raise ConfigError(f"stages[{i}]: expected a mapping (stage_name and the sections it replaces), got "
                              f"{type(stage).__name__}")
        unknown = [k for k in stage if k != "stage_name" and k not in STAGE_SECTIONS]
        if unknown:
            raise ConfigError(f"unknown key 'stages[{i}].{unknown[0]}'; a stage sets stage_name and whole sections: "
                              f"{', '.join(STAGE_SECTIONS)} (Trinity's StageConfig; model, cluster and monitor are "
                              "the global config's)")
        name = stage.get("stage_name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"stages[{i}].stage_name is required: a name for the stage's run folder "
                              "(<checkpoint_root_dir>/<project>/<name>/<stage_name>)")
        if not _NAME.fullmatch(name):
            raise ConfigError(f"stages[{i}].stage_name: {name!r} must be a folder name (letters, digits, '.', '_', "
                              "'-'; starting with a letter or digit)")
        if name in names:
            raise ConfigError(f"stages[{i}].stage_name: {name!r} is also stages[{names.index(name)}]'s; each stage "
                              "needs its own name (its run folder)")
        names.append(name)
    return names


def _name_of(raw: dict, pairs: list) -> str:
    """The experiment name before the stage's suffix (an override of `name` included)."""
    named = [v for k, v in pairs if k == "name"]
    return str(named[-1] if named else raw.get("name") or Config.name)


_SECTION_KEY = r"(?<![\w.\[\]])({})(?=[.:])"


def _in_stage(message: str, i: int, name: str, given: set[str]) -> str:
    """An error of stage i's config: keys of the sections the stage gave are named `stages[i].<key>`; an error in
    what the stage took from the global config says which stage's config it stopped."""
    if given:
        renamed = re.sub(_SECTION_KEY.format("|".join(sorted(given))), f"stages[{i}].\\1", message)
        if renamed != message:
            return renamed
    return f"stages[{i}] ({name}), from the global config: {message}"


def _hand_offs(built: list[Stage]) -> None:
    """What each stage hands the next: its last checkpoint's Hugging Face folder becomes the next `model_path`
    (`run.stages`), so that folder must exist and hold full-precision weights."""
    for stage in built:
        trainer = stage.cfg.trainer
        if trainer.save_hf_checkpoint == "never":  # Trinity forces 'last' in every stage for the same reason
            log.info("stages: %s: trainer.save_hf_checkpoint 'never' -> 'last': a stage's last checkpoint is what "
                     "the next one starts from", stage.name)
            trainer.save_hf_checkpoint = "last"
        if trainer.resume_from_path:
            raise ConfigError(f"trainer.resume_from_path: with stages each stage resumes from its own run folder "
                              f"(stage {stage.name}); remove it")
    for stage, after in zip(built, built[1:]):
        lora = stage.cfg.model.lora
        if stage.cfg.trainer.save_dtype == "auto":
            # Under bf16 compute `auto` stores the model folder's dtype: the next stage would start from rounded
            # weights instead of this stage's fp32 masters.
            stage.cfg.trainer.save_dtype = "float32"
        if lora.rank > 0 and lora.save_merged == "never":
            raise ConfigError(f"model.lora.save_merged: never leaves stage {stage.name} without a whole model for "
                              f"stage {after.name} to start from (its merged/ folder); set it to final")
        kinds = [s.cfg.algorithm.algorithm_type == "reward_model" for s in (stage, after)]
        if kinds[0] and not kinds[1]:  # a sequence classifier has no LM head for a policy to start from
            raise ConfigError(f"stage {stage.name} trains a reward model (a sequence classifier), which stage "
                              f"{after.name} cannot start from; make the reward model the last stage or a run of its own")
        if lora.path:
            raise ConfigError("model.lora.path continues one adapter, but with stages each stage trains a fresh "
                              "adapter on the previous stage's merged model; remove model.lora.path (or give its "
                              "merged model as model.model_path)")


def experiment_dir(stages: list[Stage]) -> Path:
    """The folder above the stages' run folders: `<checkpoint_root_dir>/<project>/<name>`."""
    cfg = stages[0].cfg
    return Path(cfg.checkpoint_root_dir) / cfg.project / cfg.name.rsplit("/", 1)[0]
