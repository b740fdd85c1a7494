"""The workflow passes `snakemake --lint` (style rules of the snakemake-workflows standard)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_snakemake_lint_reports_nothing(tmp_path):
    sheet = tmp_path / "samples.tsv"
    (tmp_path / "a.fcs").write_bytes(b"FCS3.1")
    sheet.write_text("sample_id\tpatient_id\tday\tmodality\tpath\nA\tP1\t0\tflow\ta.fcs\n")
    (tmp_path / "my.yaml").write_text(f"samples: {sheet}\n")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(
        [str(Path(sys.executable).with_name("snakemake")), "-s", str(ROOT / "Snakefile"),
         "--configfile", "my.yaml", "--lint"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Lints for" not in output, output
