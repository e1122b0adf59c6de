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


def _module_name(path: Path) -> str:
    """The dotted name of a module of the package (a package's __init__.py: the package's)."""
    return ".".join(["autosquash", *path.relative_to(ROOT).with_suffix("").parts]).removesuffix(".__init__")


def _imports(path: Path, module: str | None = None) -> list[tuple[int, str]]:
    """(line, autosquash module) of every import in the file, wherever it stands: absolute, relative (`from . import
    x`, `from ..models import y`, resolved from `module`, the file's dotted name) and `from autosquash import x`
    (each name a module of its own)."""
    module = module or _module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("autosquash.")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: the file's package, one package up per further dot
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            if base == "autosquash":
                out += [(node.lineno, f"autosquash.{a.name}") for a in node.names]
            elif base.startswith("autosquash."):
                out.append((node.lineno, base))
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
    assert _imports(f, "autosquash.models.m") == [(2, "autosquash.search.study")]


def test_the_checker_sees_relative_and_package_imports(tmp_path):
    """`from . import x`, `from ..search import study` and `from autosquash import search` are imports too."""
    f = tmp_path / "x.py"
    f.write_text("from . import arch\nfrom ..search import study\nfrom autosquash import search\n")
    assert _imports(f, "autosquash.models.x") == [
        (1, "autosquash.models"),
        (2, "autosquash.search"),  # as `from autosquash.search import study` is recorded: the package
        (3, "autosquash.search"),
    ]


def test_no_two_modules_import_each_other():
    """Within a package too: two modules that import each other (even lazily) are one module in two files."""
    graph = {_module_name(p): {m for _, m in _imports(p)} for p in _modules()}
    pairs = sorted({tuple(sorted((a, b))) for a, targets in graph.items() for b in targets if a in graph.get(b, ())})
    assert not pairs, f"modules that import each other: {pairs}"
