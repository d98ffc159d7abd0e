"""The package's layering, read from the source with ``ast`` (nothing is imported, no torch).

* the network, the weights, the kernels' dispatch and the core modules never import the application layer
  (the commands, the Ray executor, training);
* no module imports a private name (``_x``) from a module of another part of the application layer;
* no import cycle between the modules of ``romav2_plugin`` (``kernels/`` and ``adapters/`` included, mapped
  into the namespace as pyproject's package-dir does), counting every import: module level and inside
  functions, except under ``if TYPE_CHECKING:``.

:func:`import_graph` and :func:`find_cycle` take a repository root so that the checks can be pointed at
another tree (e.g. an older checkout, where they fail).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "romav2_plugin"
# pyproject's [tool.setuptools.package-dir]: these subpackages live at the top of the repository
PACKAGE_DIRS = {f"{PACKAGE}.kernels": "kernels", f"{PACKAGE}.adapters": "adapters"}

# the lower layers: what they must not import
CORE = ("nn", "weights", "ops", "model", "config", "geometry", "sampling", "postprocess")
APP = ("app", "distributed", "train", "cli")
# the parts of the application layer, for the private-name rule (cli, commands, results, summary: the
# modules of the earlier flat layout, so that the check means the same on an older tree)
APP_PARTS = ("app", "distributed", "train", "hloc", "export", "cli", "commands", "results", "summary", "visualize")


def module_files(root: Path = REPO) -> dict[str, Path]:
    """Dotted module name -> file, for the package and its package-dir subpackages."""
    mods: dict[str, Path] = {}
    sources = [(PACKAGE, root / PACKAGE)] + [(name, root / d) for name, d in PACKAGE_DIRS.items()]
    for prefix, base in sources:
        for f in sorted(base.rglob("*.py")):
            rel = f.relative_to(base).with_suffix("")
            if prefix == PACKAGE and rel.parts[0] in {n.split(".")[1] for n in PACKAGE_DIRS}:
                continue  # a symlink into kernels/ or adapters/: counted from there
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([prefix, *parts])] = f
    return mods


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            t = node.test
            name = t.id if isinstance(t, ast.Name) else t.attr if isinstance(t, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                for child in node.body:
                    skip |= {id(n) for n in ast.walk(child)}
    return skip


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, list[str]]]:
    """``(imported module, names)`` for every import in the file (functions included, TYPE_CHECKING not);
    ``from pkg import sub`` counts as importing ``pkg.sub`` when that is a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    skip = _type_checking_nodes(tree)
    is_pkg = path.name == "__init__.py"
    out: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            subs = [n for n in names if f"{target}.{n}" in known]
            out += [(f"{target}.{n}", []) for n in subs]
            out.append((target, [n for n in names if n not in subs]))
    return out


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """Module -> the package's modules it imports. Importing ``a.b.c`` also runs the ``__init__`` of
    ``a`` and ``a.b``: those count too, except the importer's own parents (they are running already)."""
    files = module_files(root)
    known = set(files)
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        own_parents = {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 1)}
        for target, _ in imports_of(mod, path, known):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                t = ".".join(parts[:i])
                if t in known and t != mod and t not in own_parents:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``), or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def _part(module: str) -> str:
    """``nn``, ``app``, ``model``, ...: the first component below the package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_violations(root: Path = REPO) -> list[str]:
    graph = import_graph(root)
    bad = []
    for mod, targets in graph.items():
        if _part(mod) in CORE:
            bad += [f"{mod} imports {t}" for t in sorted(targets) if _part(t) in APP]
    return bad


def _private_uses(module: str, path: Path, known: set[str]) -> list[tuple[str, str]]:
    """``(module, private name)`` taken from the package's modules: ``from m import _x``, and ``m._x`` where
    ``m`` is bound to a module by an import (TYPE_CHECKING imports excepted)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    skip = _type_checking_nodes(tree)
    bound: dict[str, str] = {}
    uses: list[tuple[str, str]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname and a.name in known:
                    bound[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            for a in node.names:
                if f"{node.module}.{a.name}" in known:
                    bound[a.asname or a.name] = f"{node.module}.{a.name}"
                elif a.name.startswith("_") and not a.name.startswith("__"):
                    uses.append((node.module, a.name))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            uses.append((bound[node.value.id], node.attr))
    return uses


def private_imports(root: Path = REPO) -> list[str]:
    """Private names one part of the application layer takes from another."""
    files = module_files(root)
    known = set(files)
    bad = []
    for mod, path in files.items():
        if _part(mod) not in APP_PARTS:
            continue
        for target, name in _private_uses(mod, path, known):
            if target.startswith(PACKAGE + ".") and _part(target) in APP_PARTS and _part(target) != _part(mod):
                bad.append(f"{mod} imports {target}:{name}")
    return sorted(set(bad))


# ------------------------------------------------------------------------------------------------ tests
def test_the_graph_sees_the_package():
    graph = import_graph()
    assert f"{PACKAGE}.model" in graph and f"{PACKAGE}.kernels" in graph and f"{PACKAGE}.adapters.hloc" in graph
    # a function-level import counts: the model loads weights lazily
    assert f"{PACKAGE}.weights.named" in graph[f"{PACKAGE}.model"]
    # so do package-dir modules: adapters/kornia.py imports the model
    assert f"{PACKAGE}.model" in graph[f"{PACKAGE}.adapters.kornia"]


def test_core_never_imports_the_application_layer():
    assert layer_violations() == []


def test_no_private_names_across_the_application_layer():
    assert private_imports() == []


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_no_module_over_600_lines():
    long = {m: n for m, p in module_files().items() if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}, long


@pytest.mark.parametrize(
    "source, expect",
    [
        ("a -> b, b -> a", ["a", "b", "a"]),
        ("a -> b, b -> c", None),
    ],
)
def test_find_cycle_finds_one(source, expect):
    graph: dict[str, set[str]] = {}
    for edge in source.split(", "):
        x, y = edge.split(" -> ")
        graph.setdefault(x, set()).add(y)
    assert find_cycle(graph) == expect


def test_the_checks_catch_a_bad_tree(tmp_path):
    """A small tree with each defect: a lazy import circle, a network module importing a command, a private
    name taken across the application layer (a TYPE_CHECKING import does not count)."""
    pkg = tmp_path / PACKAGE
    for d in ("nn", "app", "distributed", "kernels", "adapters"):
        (pkg / d).mkdir(parents=True, exist_ok=True)
        (pkg / d / "__init__.py").write_text("")
    for d in ("kernels", "adapters"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "nn" / "net.py").write_text("def f():\n    from romav2_plugin.app import cli\n")
    (pkg / "app" / "cli.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from romav2_plugin.nn import net\n"
        "def g():\n    from romav2_plugin.distributed.ray import run\n"
    )
    (pkg / "distributed" / "ray.py").write_text("def run():\n    from romav2_plugin.app.cli import _private\n")
    assert layer_violations(tmp_path) == [
        f"{PACKAGE}.nn.net imports {PACKAGE}.app",  # the package's __init__ runs too
        f"{PACKAGE}.nn.net imports {PACKAGE}.app.cli",
    ]
    assert private_imports(tmp_path) == [f"{PACKAGE}.distributed.ray imports {PACKAGE}.app.cli:_private"]
    cycle = find_cycle(import_graph(tmp_path))
    assert cycle is not None and set(cycle) == {f"{PACKAGE}.app.cli", f"{PACKAGE}.distributed.ray"}
