"""The package layers: every import of the project's own code points down, never up.

Layers, lowest first: ``utils.base``; ``data`` and ``model`` (independent of each other);
``utils.evaluation``; ``utils.engine``; the command-line tools directly in ``utils``; the
top-level scripts. Library code never imports a script.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"train", "test", "search"}
PACKAGES = ("data", "model", "utils")


def layer(module: str) -> tuple[int, str]:
    """(rank, name) of a project module; a module may import only lower ranks or its own name."""
    parts = module.split(".")
    if parts[0] in SCRIPTS:
        return 6, "scripts"
    if parts[0] in ("data", "model"):
        return 1, parts[0]
    if parts[0] == "utils":
        if len(parts) == 1:
            return 0, "utils.base"  # the package docstring only
        sub = parts[1]
        if sub == "base":
            return 0, "utils.base"
        if sub == "evaluation":
            return 2, "utils.evaluation"
        if sub == "engine":
            return 3, "utils.engine"
        return 4, "utils tools"
    raise ValueError(module)


def module_name(path: Path) -> str:
    """The dotted module name of a project file."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files() -> list[Path]:
    """Every Python file of the project outside the tests."""
    files = [ROOT / f"{name}.py" for name in sorted(SCRIPTS)]
    for package in PACKAGES:
        files += sorted((ROOT / package).rglob("*.py"))
    return [f for f in files if ".venv" not in f.parts]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of the project's own code in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).rsplit(".", 1)[0] if "." in module_name(path) else ""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            # ``from utils import x`` imports the module utils.x when x is one.
            names = [base]
            if base in PACKAGES or base.startswith(PACKAGES):
                for alias in node.names:
                    candidate = ROOT.joinpath(*base.split("."), alias.name)
                    if candidate.with_suffix(".py").is_file() or candidate.is_dir():
                        names.append(f"{base}.{alias.name}")
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES or name.split(".")[0] in SCRIPTS:
                found.append((node.lineno, name))
    return found


def upward_imports() -> list[str]:
    """Every import of a script, of a higher layer, or of a sibling layer (data <-> model)."""
    bad = []
    for path in project_files():
        me = module_name(path)
        rank, name = layer(me)
        for line, target in imported_modules(path):
            their_rank, their_name = layer(target)
            script = their_name == "scripts"
            if script or their_rank > rank or (their_rank == rank and their_name != name):
                where = f"{path.relative_to(ROOT)}:{line} ({name})"
                bad.append(f"{where} imports {target} ({their_name})")
    return bad


def test_no_import_points_up() -> None:
    assert upward_imports() == []


def import_circles() -> list[list[str]]:
    """Every loop of imports between project modules, as the modules around it (a package is its
    ``__init__``; importing ``a.b`` is not counted as importing ``a``)."""
    paths = {module_name(path): path for path in project_files()}
    graph = {
        name: sorted({target for _, target in imported_modules(path) if target in paths} - {name})
        for name, path in paths.items()
    }
    circles, done = [], set()

    def visit(module: str, trail: list[str]) -> None:
        if module in trail:
            circles.append(trail[trail.index(module) :])
            return
        if module in done:
            return
        for target in graph[module]:
            visit(target, [*trail, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    return circles


def test_no_import_circle() -> None:
    assert import_circles() == []


def test_the_circle_finder_sees_a_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check itself: an import of data.dataset planted in data/images.py closes a loop."""
    planted = ROOT / "data" / "images.py"
    text = planted.read_text()
    monkeypatch.setattr(
        Path,
        "read_text",
        lambda self, *a, **k: (
            text + "\nfrom data.dataset import DataSet\n"
            if self == planted
            else Path.read_bytes(self).decode()
        ),
    )
    assert ["data.dataset", "data.images"] in import_circles()


def test_the_walker_sees_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check itself: an upward import planted in a copy of a base module is reported."""
    planted = ROOT / "utils" / "base" / "errors.py"
    text = planted.read_text()
    monkeypatch.setattr(
        Path,
        "read_text",
        lambda self, *a, **k: (
            text + "\nfrom utils.engine import trainer\nimport train\n"
            if self == planted
            else Path.read_bytes(self).decode()
        ),
    )
    bad = upward_imports()
    assert any("utils/base/errors.py" in b and "utils.engine" in b for b in bad)
    assert any("utils/base/errors.py" in b and "imports train (scripts)" in b for b in bad)


def test_layers_of_known_modules() -> None:
    assert layer("utils.base.io")[1] == "utils.base"
    assert layer("utils.metrics")[1] == "utils tools"
    assert layer("utils.evaluation.metrics")[0] < layer("utils.engine.trainer")[0]
    assert layer("data.sysu")[0] < layer("utils.evaluation.evaluate")[0]
    assert layer("search")[1] == "scripts"
