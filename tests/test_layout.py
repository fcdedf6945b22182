"""The folder tree is the architecture: p5rec's subpackages follow the data flow and import one way only.

    data -> prompts -> train / eval -> serve, with cli.py (the command line) on top of all of them.

Every ``import`` in every module is read with ``ast`` (function-local ones included: a lazy import is still a
dependency), so a module that reaches back up the flow fails here with its file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "p5rec"

# the subpackages, and the ones each must never import
FORBIDDEN = {
    "data": {"prompts", "train", "eval", "serve", "run", "cli"},
    "prompts": {"train", "eval", "serve", "run", "cli"},
    "train": {"serve", "cli"},
    "eval": {"serve", "cli"},
    "serve": {"cli"},
}
# the top-level modules: the dispatcher, the run loader (used by train, eval and serve) and leaf utilities
TOP_LEVEL = {"__init__", "cli", "run", "registry", "atomic", "argtypes"}
UTILITIES = {"registry", "atomic", "argtypes"}  # import nothing of p5rec, so any layer may use them


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of each p5rec module or package ``path`` imports, wherever the import stands."""
    rel = path.relative_to(ROOT).with_suffix("")
    here = list(rel.parts[:-1])  # the package the module is in (an __init__'s own package)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = here[: len(here) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from p5rec import atomic` / `from p5rec.eval import metrics` import the named modules
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
            found.append((node.lineno, module))
    return [(line, name) for line, name in found if name == "p5rec" or name.startswith("p5rec.")]


def _unit(dotted: str) -> str | None:
    """The layer (subpackage) or top-level module a dotted p5rec name belongs to."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else None


def _unit_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_imports_run_one_way_along_the_flow():
    violations = []
    for path in _modules():
        me = _unit_of(path)
        forbidden = FORBIDDEN.get(me, set())
        if me in UTILITIES:
            forbidden = set(FORBIDDEN) | (TOP_LEVEL - {"__init__"})
        for line, name in _imports(path):
            target = _unit(name)
            if target in forbidden and target != me:
                violations.append(f"{path.relative_to(ROOT)}:{line} ({me}) imports {name}")
    assert not violations, "imports against the flow:\n" + "\n".join(violations)


def test_nothing_imports_the_command_line():
    """cli.py names its stage modules by string and is imported by no module (only run as `python -m` or the
    `p5rec` script); train.py goes straight to the training module."""
    users = [f"{path.relative_to(ROOT)}:{line}" for path in [*_modules(), ROOT / "train.py"]
             for line, name in _imports(path) if name == "p5rec.cli" and path.name != "cli.py"]
    assert not users, users


def test_the_folder_tree_is_the_layout():
    """Every module sits in its layer: the top level holds only the dispatcher, the run loader and the
    utilities, and each subpackage is one of the layers (a new layer is a decision for docs/design.md)."""
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == TOP_LEVEL, sorted(top ^ TOP_LEVEL)
    layers = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert layers == set(FORBIDDEN), sorted(layers ^ set(FORBIDDEN))
    assert any((PACKAGE / "serve" / "static").glob("*.html"))


def test_pyproject_ships_every_subpackage():
    """A non-editable install gets exactly the packages pyproject lists: a subpackage missing there would import
    from a checkout and fail once installed."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    packages = set(config["packages"])
    on_disk = {".".join(p.relative_to(ROOT).parts[:-1]) for p in PACKAGE.rglob("__init__.py")
               if "__pycache__" not in p.parts}
    assert on_disk <= packages, sorted(on_disk - packages)
    assert "p5rec.tasks" in packages and config["package-dir"]["p5rec.tasks"] == "tasks"
    assert config["package-data"]["p5rec.serve"] == ["static/*.html"]

