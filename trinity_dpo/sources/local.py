"""The one step that turns the names a config gives into local folders: hub ids into snapshots of the Hugging Face
cache (downloaded there unless offline), `builtin:` names into the converted model and the generated data, and a
continued LoRA adapter's folder into its shape. Loading a config only parses and checks it; `localize` is called
once by the command before a run or an evaluation, and the rest of the tool only ever sees local folders.

It is idempotent (a local folder stays as it is), so every worker process may call it: the conversions it may do
are guarded by a file lock, so one process per host does them and the others find them done.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from ..config.schema import Config
from ..errors import ConfigError
from . import builtin, hub

ADAPTER_CONFIG = "adapter_config.json"  # PEFT's name for an adapter folder's settings


def is_adapter(path: str | Path) -> bool:
    """A PEFT adapter folder (its settings and no model config of its own)."""
    return (Path(path) / ADAPTER_CONFIG).is_file() and not (Path(path) / "config.json").is_file()


def localize(cfg: Config) -> Config:
    """A copy of `cfg` whose model, data and adapter paths are local and checked; one line for whatever is missing."""
    cfg = copy.deepcopy(cfg)
    cfg.model.model_path = model_folder(cfg.model.model_path, "model.model_path")
    inputs = cfg.buffer.trainer_input
    for name, storage in (("experience_buffer", inputs.experience_buffer), ("eval_buffer", inputs.eval_buffer)):
        if storage.path:
            storage.path = data_path(storage.path, f"buffer.trainer_input.{name}.path")
    _adapter_shape(cfg)
    return cfg


def model_folder(path: str, key: str, adapter_ok: bool = False) -> str:
    """The local model folder for `path` (a folder, a hub id or a built-in name); `adapter_ok`: a LoRA adapter
    folder may stand for its base with the adapter merged (`trinity eval` of a LoRA checkpoint)."""
    if not path:
        raise ConfigError(f"{key} is required: a local Hugging Face model folder or a hub id")
    if builtin.is_builtin(path):
        return builtin.materialize(path)
    folder = hub.resolve(path, "model", key)
    if not Path(folder).is_dir():
        raise ConfigError(f"{key}: folder not found: {folder}")
    if is_adapter(folder):
        if adapter_ok:
            return folder
        raise ConfigError(f"{key}: {folder} is a LoRA adapter, not a model: give its merged/ folder, or the base model "
                          "here and the adapter as model.lora.path")
    if not (Path(folder) / "config.json").is_file():
        if (Path(folder) / "trainer_state").is_dir():
            raise ConfigError(f"{key}: {folder} is a checkpoint saved without its Hugging Face weights "
                              "(trainer.save_hf_checkpoint); give one that holds them, such as the run's last")
        raise ConfigError(f"{key}: {folder} has no config.json (not a model folder)")
    return folder


def data_path(path: str, key: str) -> str:
    """The local file or folder for a data `path` (a path, a hub dataset id or a built-in demo set)."""
    if builtin.is_builtin(path):
        return builtin.data_path(path)
    local = hub.resolve(path, "dataset", key)
    if not Path(local).exists():
        raise ConfigError(f"{key}: not found: {local}")
    return local


def _adapter_shape(cfg: Config) -> None:
    """A continued adapter keeps its own rank, alpha and targets: they are read from its folder."""
    lora = cfg.model.lora
    if not lora.path:
        return
    settings = Path(lora.path) / ADAPTER_CONFIG
    if not settings.is_file():
        raise ConfigError(f"model.lora.path: {lora.path} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    saved = json.loads(settings.read_text())
    lora.rank, lora.alpha = int(saved.get("r") or 0), saved.get("lora_alpha")
    lora.target_modules = saved.get("target_modules") or lora.target_modules
    if not lora.rank or lora.alpha is None or lora.alpha <= 0:
        raise ConfigError(f"model.lora.path: {settings} names no rank (r) and lora_alpha above 0")
