"""The command line stays light: per-sample jobs import only what they use."""

from __future__ import annotations

import json
import subprocess
import sys

from bcellmap.cli import _COMMANDS, build_parser


def _modules_after(statement: str) -> set[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    return set(json.loads(result.stdout))


def test_help_imports_no_scientific_stack():
    loaded = _modules_after("import bcellmap.cli; bcellmap.cli.build_parser()")
    assert not {"numpy", "pandas", "anndata", "scanpy", "sklearn", "numba"} & loaded


def test_flow_ingest_does_not_import_scanpy_or_numba():
    loaded = _modules_after("import bcellmap.flow._ingest")
    assert not {"scanpy", "numba", "umap", "pynndescent", "cupy"} & loaded


def test_every_subcommand_has_a_parser_and_an_implementation():
    import importlib

    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices  # argparse keeps them here
    assert set(choices) == set(_COMMANDS)
    for module_name, function_name, _ in _COMMANDS.values():
        assert callable(getattr(importlib.import_module(module_name), function_name))
