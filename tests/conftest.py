"""Shared fixtures: tiny models built once per session, and a writer of run configs."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import SPACE_TEMPLATE, make_model_dir, write_pairs  # noqa: E402
from trinity_dpo.engine import vector_math  # noqa: E402

# Before any test computes: a test comparing numbers (with TRL, across runs) must not meet MKL's first-call race
# in whichever test happens to make the first call (`trinity_dpo/engine/vector_math.py`).
vector_math.settle()

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "human_like_dpo_dataset"


def need_extra(name: str):
    """Import a package of the test extras. Missing, the test (or its whole module) fails in one line: a skip would
    silently drop the claim it makes, such as equality with TRL."""
    try:
        return importlib.import_module(name)
    except ImportError:
        pass
    pytest.fail(f"{name} is missing: install the test extras (pip install -e '.[test]')", pytrace=False)


@pytest.fixture(autouse=True)
def seeded_global_rng():
    """Each test starts from the same global random state, whatever ran before it: a test that draws from torch's
    global generator gives one result whether it runs alone, in its file or in the suite (a head test drawing an
    unseeded bias passed in the suite's order and failed half the time alone)."""
    import torch

    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def token_cache(tmp_path_factory, monkeypatch) -> Path:
    """Each test tokenizes into its own cache folder (a test's subprocesses too), so no test finds another's
    tables; runs within a test share it, as runs on the same data do."""
    folder = tmp_path_factory.mktemp("tokens")
    monkeypatch.setenv("TRINITY_DPO_TOKEN_CACHE", str(folder))
    return folder


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("qwen2"), "qwen2")


@pytest.fixture(scope="session")
def llama3_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("llama3"), "llama", style="llama3")


@pytest.fixture(scope="session")
def space_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("space"), "llama", template=SPACE_TEMPLATE)


@pytest.fixture()
def pairs_file(tmp_path) -> Path:
    return write_pairs(tmp_path / "pairs.json", n=24)


@pytest.fixture()
def make_config(tmp_path, qwen_dir, pairs_file):
    """Write a document-shaped dpo.yaml (and train_dpo.yaml) into tmp_path; keyword args patch sections."""

    def make(main: dict | None = None, verl: dict | None = None, model=None, data=None) -> Path:
        cfg = {
            "project": "proj", "name": "run", "mode": "train",
            "algorithm": {"algorithm_type": "dpo"},
            "checkpoint_root_dir": str(tmp_path / "ckpt"),
            "model": {"model_path": str(model or qwen_dir)},
            "cluster": {"node_num": 1, "gpu_per_node": 1},
            "buffer": {"total_epochs": 1, "batch_size": 8, "trainer_input": {"experience_buffer": {
                "name": "dpo_buffer", "storage_type": "file", "path": str(data or pairs_file),
                "format": {"prompt_type": "plaintext", "prompt_key": "prompt", "chosen_key": "chosen",
                           "rejected_key": "rejected"}}}},
            "trainer": {"trainer_config_path": "train_dpo.yaml", "save_interval": 0, "actor_use_kl_loss": True,
                        "precision": "fp32",
                        "actor_kl_loss_coef": 0.1},
        }
        trainer_file = {"data": {"max_prompt_length": 128, "max_response_length": 64},
                        "actor_rollout_ref": {"actor": {"ppo_micro_batch_size_per_gpu": 4, "optim": {"lr": 1e-3}}}}
        _deep_update(cfg, main or {})
        _deep_update(trainer_file, verl or {})
        (tmp_path / "train_dpo.yaml").write_text(yaml.safe_dump(trainer_file))
        path = tmp_path / "dpo.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return make


def _deep_update(base: dict, patch: dict) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
