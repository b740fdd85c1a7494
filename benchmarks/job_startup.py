"""Start-up cost of the workflow's per-sample commands: interpreter plus imports.

Every job of the workflow is a fresh ``bcellmap`` process, so what a command imports before
it reads its first byte is paid once per sample. For each per-sample subcommand this starts
a fresh interpreter that imports what the command imports (its module and the modules its
function imports), best of ``--repeats``, and prints the wall and CPU seconds (CPU time is
the robust number on a busy machine). ``bcellmap --version`` is the floor: the interpreter
and the command line alone.

Usage: ``python benchmarks/job_startup.py [--repeats 5]``
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

#: subcommand -> what its function imports before it reads its input (see the functions).
COMMANDS: dict[str, list[str]] = {
    "ingest-flow": ["bcellmap.cli.flow", "bcellmap.flow._ingest", "bcellmap.kernels.gmm",
                    "bcellmap.config", "bcellmap.io._atomic",
                    "bcellmap.io.samplesheet", "anndata", "bcellmap.io.fcs",
                    "bcellmap.io.panel", "bcellmap.flow.compensation", "bcellmap.flow._qc",
                    "bcellmap.flow._transform"],
    "map-annotate-flow": ["bcellmap.cli.sample", "bcellmap.config", "bcellmap.flow.annotate",
                          "bcellmap.flow.cluster", "bcellmap.io._atomic",
                          "bcellmap.kernels.backend", "bcellmap.io.readers",
                          "bcellmap.io.samplesheet", "anndata", "bcellmap.flow.gating",
                          "bcellmap.flow.thresholds", "bcellmap.flow.subsets"],
    "ingest-scrna": ["bcellmap.cli.scrna", "bcellmap.scrna.ingest", "bcellmap.config",
                     "bcellmap.io._atomic",
                     "bcellmap.io.samplesheet", "anndata", "scanpy"],
    "map-annotate-scrna": ["bcellmap.cli.sample", "bcellmap.config", "bcellmap.contracts",
                           "bcellmap.io._atomic", "bcellmap.kernels.backend",
                           "bcellmap.scrna.annotate", "bcellmap.scrna.cluster",
                           "scipy.optimize", "scipy.special", "bcellmap.io.readers",
                           "bcellmap.io.samplesheet", "anndata"],
}


def _measure(code: str, repeats: int) -> tuple[float, float]:
    """Best wall and CPU seconds of ``python -c code`` over ``repeats`` runs."""
    walls, cpus = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return min(walls), min(cpus)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rows = [("bcellmap --version (floor)",
             *_measure("from bcellmap.cli import build_parser; build_parser()", args.repeats))]
    for command, modules in COMMANDS.items():
        code = f"import importlib\nfor m in {modules!r}: importlib.import_module(m)"
        rows.append((command, *_measure(code, args.repeats)))
    print(f"{'command':<28} {'wall s':>7} {'cpu s':>7}")
    for name, wall, cpu in rows:
        print(f"{name:<28} {wall:>7.2f} {cpu:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
