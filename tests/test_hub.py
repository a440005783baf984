"""Hugging Face Hub ids for the model and the data, resolved offline from a cache built by hand in the hub's layout
(models--ORG--NAME/refs/main naming a snapshot folder), as transformers and datasets resolve them."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from trinity_dpo.errors import ConfigError
from trinity_dpo.config.loader import load_config
from trinity_dpo.sources.local import localize

from conftest import REPO

SHA = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache, kind: str, repo_id: str, files_from) -> None:
    """Put a snapshot of `files_from` into the hub cache at `cache` as repo `repo_id` ('models' or 'datasets')."""
    root = cache / f"{kind}--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(SHA)
    shutil.copytree(files_from, root / "snapshots" / SHA)


@pytest.fixture()
def hub_cache(tmp_path, qwen_dir, pairs_file, monkeypatch):
    cache = tmp_path / "hub"
    cache_repo(cache, "models", "TinyOrg/tiny-chat", qwen_dir)
    data = tmp_path / "dataset_download"
    data.mkdir()
    shutil.copy(pairs_file, data / "data.json")
    (data / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                    "    path: data.json\n---\n")
    cache_repo(cache, "datasets", "TinyOrg/prefs", data)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_model_and_dataset_ids_resolve_to_cached_snapshots(make_config, hub_cache):
    loaded = load_config(make_config(model="TinyOrg/tiny-chat", data="TinyOrg/prefs"))
    assert loaded.model.model_path == "TinyOrg/tiny-chat"  # loading is pure: names stay names
    cfg = localize(loaded)
    assert cfg.model.model_path == str(hub_cache / "models--TinyOrg--tiny-chat" / "snapshots" / SHA)
    assert cfg.buffer.trainer_input.experience_buffer.path == str(
        hub_cache / "datasets--TinyOrg--prefs" / "snapshots" / SHA)


def test_ids_not_cached_offline_are_one_line(make_config, hub_cache):
    with pytest.raises(ConfigError) as err:
        localize(load_config(make_config(model="Qwen/Qwen2.5-1.5B-Instruct")))
    assert str(err.value) == (
        f"model.model_path: Qwen/Qwen2.5-1.5B-Instruct is not a local path, and the Hugging Face model "
        f"Qwen/Qwen2.5-1.5B-Instruct is not in the cache {hub_cache} (HF_HUB_OFFLINE is set); download it with "
        "`hf download Qwen/Qwen2.5-1.5B-Instruct` (or huggingface-cli download), or give a local path")
    with pytest.raises(ConfigError, match="buffer.trainer_input.experience_buffer.path: HumanLLMs/Human-Like-DPO-"
                                          "Dataset is not a local path.*`hf download HumanLLMs/Human-Like-DPO-Dataset "
                                          "--repo-type dataset`"):
        localize(load_config(make_config(data="HumanLLMs/Human-Like-DPO-Dataset")))


@pytest.mark.slow
def test_a_run_from_hub_ids(make_config, hub_cache, tmp_path):
    path = make_config(model="TinyOrg/tiny-chat", data="TinyOrg/prefs", main={"trainer": {"total_steps": 1}})
    proc = subprocess.run([sys.executable, "-m", "trinity_dpo.cli", "run", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = [json.loads(line) for line in (tmp_path / "ckpt" / "proj" / "run" / "metrics.jsonl").read_text()
               .splitlines() if "loss" in line]
    assert len(metrics) == 1 and abs(metrics[0]["loss"] - 0.6931471805599453) < 1e-6


def test_loading_a_model_leaves_the_hub_setting_alone(make_config, qwen_dir, monkeypatch):
    """Loading once set HF_HUB_OFFLINE for the rest of the process, so a later hub lookup in the same process (the
    next stage's model, `trinity eval --ref` of a hub id) was refused; local folders are read with
    `local_files_only` instead."""
    from trinity_dpo.engine.modeling import load_model, load_tokenizer

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cfg = localize(load_config(make_config()))
    load_tokenizer(cfg)
    load_model(cfg, torch.device("cpu"))
    assert "HF_HUB_OFFLINE" not in os.environ


def test_a_builtin_set_is_written_by_one_process_while_others_wait(tmp_path, monkeypatch):
    """Every worker of a run makes its names local at once: the first writes the demo set, the others wait on the
    lock file and find it written (without the lock each would write it: two writes here)."""
    from trinity_dpo.sources import builtin, demo_data

    monkeypatch.setenv("TRINITY_DPO_CACHE", str(tmp_path))
    writes, real = [], demo_data.write

    def slow_write(folder, name):
        writes.append(name)
        time.sleep(0.5)  # long enough for the other caller to arrive while the set is missing
        return real(folder, name)

    monkeypatch.setattr(demo_data, "write", slow_write)
    with ThreadPoolExecutor(2) as pool:
        folders = list(pool.map(lambda _: builtin.data_path("builtin:human-like-demo"), range(2)))
    assert len(writes) == 1 and folders[0] == folders[1]
    assert (Path(folders[0]) / "train.jsonl").is_file()


def test_the_cache_is_found_as_huggingface_hub_finds_it_and_data_files_are_never_repo_ids(monkeypatch, tmp_path):
    """HF_HUB_CACHE, then its older name HUGGINGFACE_HUB_CACHE, then HF_HOME/hub, with ~ and $VARS expanded. A name
    like `data/prefs.jsonl` that is not on disk is a mistyped path, not a repository to download."""
    from trinity_dpo.sources import hub

    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("REVIEW", str(tmp_path))
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", "$REVIEW/old")
    assert hub.cache_dir() == str(tmp_path / "old")
    monkeypatch.setenv("HF_HUB_CACHE", "~/hub")
    assert hub.cache_dir() == os.path.expanduser("~/hub")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", "$REVIEW/home")
    assert hub.cache_dir() == str(tmp_path / "home" / "hub")
    assert hub.is_repo_id("Qwen/Qwen2.5-1.5B-Instruct") and not hub.is_repo_id("data/prefs.jsonl")
    with pytest.raises(ConfigError, match="not found: data/prefs.jsonl"):
        from trinity_dpo.sources.local import data_path
        data_path("data/prefs.jsonl", "buffer.trainer_input.experience_buffer.path")
