"""Hugging Face Hub ids (`Qwen/Qwen2.5-1.5B-Instruct`, `HumanLLMs/Human-Like-DPO-Dataset`) where a config expects a
local path: resolved to the local snapshot folder of the Hugging Face cache, as transformers and datasets resolve
them, and downloaded into that cache unless `HF_HUB_OFFLINE` is set. The rest of the tool only sees folders.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from ..errors import ConfigError, one_line

log = logging.getLogger(__name__)

# owner/name, as the hub spells repository ids; a relative path that exists on disk always wins.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


# A name ending like a data file is a local path the user mistyped, never a repository: "not found", not a download.
_FILE_SUFFIXES = (".json", ".jsonl", ".gz", ".parquet", ".csv", ".txt", ".yaml", ".safetensors", ".bin")


def is_repo_id(path: str) -> bool:
    return (bool(_REPO_ID.match(path)) and not Path(path).exists() and ".." not in path
            and not path.lower().endswith(_FILE_SUFFIXES))


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().upper() in ("1", "ON", "YES", "TRUE")


def cache_dir() -> str:
    """The hub cache as huggingface_hub finds it (HF_HUB_CACHE, its older name HUGGINGFACE_HUB_CACHE, else
    HF_HOME/hub, with ~ and $VARS expanded), read now (its own constant is fixed at import)."""
    given = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not given:
        home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                                          "huggingface")
        given = os.path.join(home, "hub")
    return os.path.expandvars(os.path.expanduser(given))


def resolve(path: str, kind: str, key: str) -> str:
    """The local folder for `path`: itself unless it is a hub id (`kind` 'model' or 'dataset') that is not a
    local path; then the cached snapshot, downloaded first when the hub may be reached."""
    if not path or not is_repo_id(path):
        return path
    from huggingface_hub import snapshot_download

    cache = cache_dir()
    try:
        folder = snapshot_download(path, repo_type=kind, cache_dir=cache, local_files_only=True)
    except Exception:  # not cached (huggingface_hub raises several types)
        folder = None
    if folder is None and not offline():
        log.info("downloading the %s %s from the Hugging Face Hub into %s", kind, path, cache)
        try:
            folder = snapshot_download(path, repo_type=kind, cache_dir=cache)
        except Exception as e:
            reason = one_line(e)
            raise ConfigError(f"{key}: {path} is not a local path, and downloading the Hugging Face {kind} {path} "
                              f"failed: {reason}") from None
    if folder is None:
        flag = " --repo-type dataset" if kind == "dataset" else ""
        raise ConfigError(f"{key}: {path} is not a local path, and the Hugging Face {kind} {path} is not in the "
                          f"cache {cache} (HF_HUB_OFFLINE is set); download it with `hf download {path}{flag}` "
                          "(or huggingface-cli download), or give a local path")
    log.info("%s: %s is the cached snapshot %s", key, path, folder)
    return folder
