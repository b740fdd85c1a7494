"""The package's shape: the public API (names, signatures, docstrings) and the layers.

Public API (``bcellmap.flow``, ``bcellmap.tl``, ``bcellmap.cohort``, ``bcellmap.pl``): every
name in ``__all__`` resolves and is no submodule's name (so ``import bcellmap.flow.gating``
and the function ``bcellmap.flow.x`` cannot shadow each other); every public function has a
numpy-style docstring with Parameters (naming every parameter) and Returns, type hints on
every parameter and on the return, its first parameter positional and every other
keyword-only. ``import bcellmap`` imports none of the namespaces (PEP 562).

Layers (by AST, every ``import`` in every module of ``src/bcellmap``, those inside functions
included): a module may import modules of a lower layer and of its own group, never of a
higher layer nor of a sibling group of the same layer; and no two modules may import each
other, directly or through others.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import pkgutil
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "bcellmap"
NAMESPACES = ("bcellmap.flow", "bcellmap.tl", "bcellmap.cohort", "bcellmap.pl")

#: Layer groups, bottom to top: ``(layer, top-level names)``. A group may import itself and
#: any group of a lower layer; groups sharing a layer are siblings and import none of each
#: other. ``""`` is the package root (``bcellmap/__init__.py``: ``__version__`` and the lazy
#: namespace hook, no static import), so every module may import ``__version__`` from it.
LAYERS: tuple[tuple[int, frozenset[str]], ...] = (
    (0, frozenset({"", "errors", "config", "contracts", "_contracts", "_apiutils"})),
    (1, frozenset({"io"})),
    (1, frozenset({"kernels"})),
    (2, frozenset({"flow"})),
    (2, frozenset({"scrna"})),
    (2, frozenset({"demo"})),
    (3, frozenset({"cohort"})),
    (4, frozenset({"report"})),
    (4, frozenset({"preflight"})),
    (5, frozenset({"tl"})),
    (5, frozenset({"pl"})),
    (6, frozenset({"cli", "__main__"})),
)

#: Violations that exist today; other work is removing them (xfail, not strict: an XPASS
#: means one was fixed and its entry can go).
KNOWN_LAYER_VIOLATIONS: dict[str, str] = {
}
KNOWN_NAME_CLASHES: dict[str, str] = {
}


# --------------------------------------------------------------------------- the import graph


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """``(imported bcellmap module, line)`` for every import statement of a module."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "bcellmap" or alias.name.startswith("bcellmap."):
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base != "bcellmap" and not base.startswith("bcellmap."):
                continue
            for alias in node.names:
                target = f"{base}.{alias.name}"
                yield (target if target in MODULES else base), node.lineno


def _group(module: str) -> tuple[int, frozenset[str]]:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    for layer, names in LAYERS:
        if top in names:
            return layer, names
    raise AssertionError(f"module {module} belongs to no layer: add {top!r} to LAYERS in "
                         f"{Path(__file__).name}")


GRAPH: dict[str, list[tuple[str, int]]] = {
    name: list(dict.fromkeys((t, line) for t, line in _imports(name, path)
                             if t != name and t in MODULES))
    for name, path in MODULES.items()}


def _layer_violations(module: str) -> list[str]:
    layer, group = _group(module)
    problems = []
    for target, line in GRAPH[module]:
        target_layer, target_group = _group(target)
        if target_group == group or target_layer < layer:
            continue
        kind = "a higher layer" if target_layer > layer else "a sibling of the same layer"
        problems.append(f"line {line}: imports {target} ({kind}: {layer} -> {target_layer})")
    return problems


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target, _ in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    return components


CYCLES = _cycles()


def _known(table: dict[str, str], key: str):
    return pytest.param(key, marks=pytest.mark.xfail(reason=table[key], strict=False)) \
        if key in table else key


@pytest.mark.parametrize("module", [_known(KNOWN_LAYER_VIOLATIONS, m) for m in MODULES])
def test_module_imports_only_lower_layers_and_its_own_group(module):
    problems = _layer_violations(module)
    assert not problems, f"{module}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("module", list(MODULES))
def test_module_is_in_no_import_cycle(module):
    cycle = next((c for c in CYCLES if module in c), None)
    assert cycle is None, f"{module} is in an import cycle: {' <-> '.join(cycle)}"


def test_there_is_no_import_cycle():
    assert CYCLES == []


def test_the_cycle_finder_sees_a_cycle(monkeypatch):
    monkeypatch.setitem(GRAPH, "bcellmap.flow.thresholds", [("bcellmap.flow.annotate", 1)])
    monkeypatch.setitem(GRAPH, "bcellmap.flow.annotate", [("bcellmap.flow.thresholds", 1)])
    assert ["bcellmap.flow.annotate", "bcellmap.flow.thresholds"] in _cycles()


@pytest.mark.parametrize("module", [m for m in MODULES if _group(m)[0] < 6])
def test_library_modules_hold_no_command_line_code(module):
    # The CLI only reads, calls the library and writes: argparse and every ``cli_*``
    # function live in ``bcellmap.cli``.
    tree = ast.parse(MODULES[module].read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert "argparse" not in imported, f"{module} imports argparse"
    commands = [node.name for node in ast.walk(tree)
                if isinstance(node, ast.FunctionDef) and node.name.startswith("cli_")]
    assert not commands, f"{module} defines {commands}: move them to bcellmap.cli"


def test_the_layer_table_covers_every_module():
    for module in MODULES:
        _group(module)


def test_the_rule_flags_higher_layers_and_siblings(monkeypatch):
    monkeypatch.setitem(GRAPH, "bcellmap.flow.gating", [
        ("bcellmap.io.panel", 1), ("bcellmap.flow.thresholds", 2),  # lower; own group
        ("bcellmap.scrna.annotate", 3), ("bcellmap.cohort._api", 4)])  # sibling; higher
    problems = _layer_violations("bcellmap.flow.gating")
    assert [p.split(":")[0] for p in problems] == ["line 3", "line 4"]
    assert "sibling" in problems[0] and "higher" in problems[1]


def test_the_root_imports_nothing_statically():
    # It is layer 0 only because its namespaces are imported lazily, by name.
    assert GRAPH["bcellmap"] == []


def test_the_scanner_sees_relative_and_lazy_imports():
    # flow/_api.py imports flow._ingest inside a function, relatively.
    assert "bcellmap.flow._ingest" in {t for t, _ in GRAPH["bcellmap.flow._api"]}
    assert "bcellmap.flow._api" in {t for t, _ in GRAPH["bcellmap.flow"]}


# --------------------------------------------------------------------------- the public API


def _public() -> list[str]:
    names = []
    for namespace in NAMESPACES:
        module = importlib.import_module(namespace)
        names += [f"{namespace}.{name}" for name in module.__all__]
    return names


PUBLIC = _public()


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_every_name_in_all_resolves_to_a_function(namespace):
    module = importlib.import_module(namespace)
    assert module.__all__, namespace
    assert len(set(module.__all__)) == len(module.__all__)
    for name in module.__all__:
        assert inspect.isfunction(getattr(module, name)), f"{namespace}.{name}"


@pytest.mark.parametrize("qualname", [_known(KNOWN_NAME_CLASHES, q) for q in PUBLIC])
def test_no_public_name_is_a_submodule(qualname):
    namespace, _, name = qualname.rpartition(".")
    module = importlib.import_module(namespace)
    submodules = {info.name for info in pkgutil.iter_modules(module.__path__)}
    assert name not in submodules, (f"{qualname} is also the submodule {namespace}.{name}: "
                                    "make the submodule private (_{name}.py)")


def _documented(doc: str, section: str) -> str | None:
    """The body of a numpy-style section, or None when the section is absent."""
    match = re.search(rf"^{section}\n-{{{len(section)}}}\n(.*?)(?=^\S[^\n]*\n-{{3,}}\n|\Z)",
                      doc, flags=re.M | re.S)
    return None if match is None else match.group(1)


@pytest.mark.parametrize("qualname", PUBLIC)
def test_public_function_signature_and_docstring(qualname):
    namespace, _, name = qualname.rpartition(".")
    function = getattr(importlib.import_module(namespace), name)
    signature = inspect.signature(function)
    parameters = list(signature.parameters.values())
    assert parameters, f"{qualname} takes no arguments"
    first, rest = parameters[0], parameters[1:]
    assert first.kind in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD), qualname
    assert first.default is first.empty, f"{qualname}: the first argument has a default"
    not_keyword_only = [p.name for p in rest if p.kind is not p.KEYWORD_ONLY]
    assert not not_keyword_only, f"{qualname}: not keyword-only: {not_keyword_only}"
    unannotated = [p.name for p in parameters if p.annotation is p.empty]
    assert not unannotated, f"{qualname}: no type hint on {unannotated}"
    assert signature.return_annotation is not signature.empty, f"{qualname}: no return hint"

    doc = inspect.getdoc(function) or ""
    assert doc.strip(), f"{qualname} has no docstring"
    documented = _documented(doc, "Parameters")
    assert documented is not None, f"{qualname}: no Parameters section"
    assert _documented(doc, "Returns") is not None, f"{qualname}: no Returns section"
    names = {n.strip() for line in documented.splitlines()
             if line and not line[0].isspace() for n in line.split(":")[0].split(",")}
    undocumented = [p.name for p in parameters if p.name not in names]
    assert not undocumented, f"{qualname}: parameters not in the docstring: {undocumented}"


def test_import_bcellmap_is_lazy():
    code = ("import json, sys, bcellmap; before = sorted(sys.modules); "
            "names = [bcellmap.flow.__name__, bcellmap.tl.__name__, bcellmap.cohort.__name__, "
            "bcellmap.pl.__name__]; "
            "print(json.dumps([before, names, sorted(bcellmap.__all__), dir(bcellmap)]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    before, names, exported, listed = json.loads(result.stdout)
    assert not {"bcellmap.flow", "bcellmap.tl", "bcellmap.cohort", "bcellmap.pl", "numpy",
                "pandas", "anndata"} & set(before)
    assert names == list(NAMESPACES)
    assert exported == sorted(n.rpartition(".")[2] for n in NAMESPACES)
    assert set(exported) <= set(listed)
