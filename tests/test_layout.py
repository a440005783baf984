"""The package's layout is its data flow: config -> data -> engine -> objective -> run, with sources and errors at
the bottom. A module imports only from its own wing or the wings below it, so a reader can follow a value upward
through the folders; these tests read every module's imports (no module is run) and name any that point the other
way."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "trinity_dpo"
# Lower number: lower in the house. `cli` is the command at the top; `errors` is the floor.
ORDER = {"errors": 0, "config": 1, "sources": 2, "data": 3, "engine": 4, "objective": 5, "run": 6, "cli": 7}


def wing_of(module: str) -> str:
    """`trinity_dpo.engine.modeling` -> `engine`; `trinity_dpo.cli` -> `cli`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path, root: Path = PACKAGE.parent) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path = PACKAGE.parent) -> list[tuple[int, str]]:
    """(line, absolute name) of every import from the package in `path`, lazy ones inside functions included."""
    here = module_name(path, root)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names if target.startswith("trinity_dpo")]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("trinity_dpo")]
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_module_lives_in_a_wing():
    assert {wing_of(module_name(p)) for p in MODULES} <= {*ORDER, "__init__"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_house(path):
    wing = wing_of(module_name(path))
    if wing == "__init__":
        return
    upward = [f"line {line}: {target}" for line, target in imports_of(path)
              if ORDER.get(wing_of(target), 0) > ORDER[wing]]
    assert not upward, f"{path.relative_to(PACKAGE)} ({wing}) imports from above it: {upward}"


def test_the_check_sees_an_upward_import(tmp_path):
    """The reader of imports itself: a config module importing the training loop is found, relative or not."""
    fake = tmp_path / "trinity_dpo" / "config" / "probe.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from ..run import train\ndef f():\n    import trinity_dpo.engine.modeling\n")
    targets = [target for _, target in imports_of(fake, tmp_path)]
    assert targets == ["trinity_dpo.run.train", "trinity_dpo.engine.modeling"]
    assert [wing_of(target) for target in targets] == ["run", "engine"]


def test_data_never_touches_torch_distributed():
    """Data work is shared through files, one process per node, never through a collective with a timeout."""
    for path in (PACKAGE / "data").rglob("*.py"):
        text = path.read_text()
        assert "torch.distributed" not in text and "from ..engine import distributed" not in text, path
