"""rclib's architecture as a test: subpackages in layers, imports pointing one way, no cycles.

Read statically with ``ast`` over every ``.py`` file of the package, counting imports placed
inside functions too, so a cycle cannot hide behind a late import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rclib"

# What each subpackage may import from (besides itself). Layers rise from core to report;
# compress and robust are siblings that never import each other.
ALLOWED = {
    "core": set(),
    "data": {"core"},
    "nn": {"core", "data"},
    "compress": {"core", "data", "nn"},
    "robust": {"core", "data", "nn"},
    "experiments": {"core", "data", "nn", "compress", "robust"},
    "report": {"core", "data", "nn", "compress", "robust", "experiments"},
    "__main__": {"core", "data", "nn", "compress", "robust", "experiments", "report"},
}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, package: Path = PACKAGE) -> set[str]:
    """The rclib modules ``path`` imports anywhere in its body (absolute names)."""
    here = module_name(path, package).split(".")
    if path.name != "__init__.py":
        here = here[:-1]  # the package a relative import starts from
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == package.name}
        elif isinstance(node, ast.ImportFrom):
            base = node.module.split(".") if node.module else []
            if node.level:
                base = here[: len(here) - node.level + 1] + base
            if not base or base[0] != package.name:
                continue
            prefix = ".".join(base)
            for a in node.names:  # `from rclib.nn import models` imports the module rclib.nn.models
                candidate = package.parent.joinpath(*base, a.name)
                found.add(f"{prefix}.{a.name}" if candidate.with_suffix(".py").exists() or candidate.is_dir()
                          else prefix)
    return found - {module_name(path, package)}


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = {module_name(p, package): p for p in package.rglob("*.py")}
    return {name: {m for m in imports_of(p, package) if m in modules} for name, p in modules.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def upward(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in g.items():
        if layer(src) == "__init__":
            continue
        for dst in targets:
            if layer(dst) != layer(src) and layer(dst) not in ALLOWED[layer(src)]:
                bad.append(f"{src} -> {dst}")
    return sorted(bad)


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_imports_point_down_the_layers():
    assert upward(graph()) == []


def test_every_module_sits_in_a_layer():
    g = graph()
    assert {layer(m) for m in g} <= set(ALLOWED) | {"__init__"}
    assert g["rclib"] == set(), "the package's __init__ imports nothing (no re-exports)"


def test_modules_stay_small():
    sizes = {module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {m: n for m, n in sizes.items() if n > 420} == {}


def _toy_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "rclib"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checks_see_a_cycle_hidden_inside_a_function(tmp_path):
    root = _toy_package(tmp_path, {
        "__init__.py": "", "core/__init__.py": "", "nn/__init__.py": "",
        "core/a.py": "def f():\n    from rclib.nn import b\n",
        "nn/b.py": "from rclib.core import a\n",
    })
    g = graph(root)
    assert cycles(g) == [["rclib.core.a", "rclib.nn.b"]]
    assert upward(g) == ["rclib.core.a -> rclib.nn.b"]


@pytest.mark.parametrize("line", ["from . import b", "from .b import x", "from rclib.core.b import x",
                                  "import rclib.core.b"])
def test_every_import_form_is_seen(tmp_path, line):
    root = _toy_package(tmp_path, {"__init__.py": "", "core/__init__.py": "", "core/a.py": line + "\n",
                                   "core/b.py": "x = 1\n"})
    assert graph(root)["rclib.core.a"] == {"rclib.core.b"}


def test_the_source_fingerprint_sees_a_change_in_any_subpackage(tmp_path):
    import shutil

    from rclib.core import paths

    copy = tmp_path / "rclib"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = paths.fingerprint_of(copy)
    assert before == paths.fingerprint_of(PACKAGE) == paths.source_fingerprint()
    for module in ("experiments/steps.py", "core/keys.py", "report/plots.py"):
        (copy / module).write_text((copy / module).read_text() + "\n# an edit\n")
        after = paths.fingerprint_of(copy)
        assert after != before, module
        before = after


def test_packaging_ships_every_subpackage():
    import tomllib

    from setuptools import find_packages

    setup = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    shipped = set(find_packages(str(PACKAGE.parent), include=setup["include"]))
    folders = {".".join(p.relative_to(PACKAGE.parent).parts) for p in PACKAGE.rglob("__init__.py")
               for p in [p.parent]}
    assert folders == shipped and {"rclib.core", "rclib.report"} <= shipped
