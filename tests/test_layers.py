"""The package layering of STYLE.md: each package imports only those below it, at module level or inside a
function (a lazy import that reaches up is a circle all the same)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "autosquash"

# Lower rank = lower layer. A module may import its own package and any package of a lower rank; packages
# of the same rank stay apart. The top-level helpers (errors, then files, then yaml_io) sit at the bottom.
RANK = {
    "errors": 0,
    "files": 1,
    "yaml_io": 2,
    "formats": 2,
    "models": 3,
    "compress": 4,
    "cost": 5,
    "evaluate": 5,
    "export": 6,
    "track": 6,
    "search": 7,
    "cli": 8,
    "__main__": 9,
}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, autosquash module) of every import in the file, wherever it stands."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("autosquash.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("autosquash."):
            out.append((node.lineno, node.module))
    return out


def _modules() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def test_every_package_has_a_rank():
    packages = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in _modules()} - {"__init__"}
    assert packages <= set(RANK), packages - set(RANK)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path: Path):
    own = path.relative_to(ROOT).parts[0].removesuffix(".py")
    if own == "__init__":
        return
    upward = [
        f"line {line}: {module}"
        for line, module in _imports(path)
        if _package(module) != own and RANK[_package(module)] >= RANK[own]
    ]
    assert not upward, f"{path.relative_to(ROOT)} ({own}, rank {RANK[own]}) imports at or above its layer: {upward}"


def test_the_checker_sees_lazy_imports(tmp_path):
    """A function-level import counts: the check would fail on one that reaches up."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from autosquash.search.study import run_search\n")
    assert _imports(f) == [(2, "autosquash.search.study")]
