"""What the Snakemake workflow needs while it parses, computed without writing anything.

Building the DAG must have no side effects (no simulated cohort, no config file written):

- :func:`demo_sample_sheet` gives the demo cohort's sample sheet as the simulator will write
  it, from ``demo.preset`` and ``demo.seed`` alone, so that rule ``simulate_demo`` can make the
  files as an ordinary job;
- :func:`settings_text` gives the config values a rule reads, as one canonical text: the rule's
  ``params``, so that editing a config section reruns exactly the rules that read it.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any


def settings_text(config: Mapping[str, Any], keys: Iterable[str]) -> str:
    """The values at the dotted ``keys`` of ``config``, as canonical JSON.

    Parameters
    ----------
    config
        The merged config.
    keys
        Dotted key paths, e.g. ``"annotate.gating"``, ``"seed"``.

    Returns
    -------
    str
        ``{"key": value, ...}`` with sorted keys, so that reordering keys in a user's file
        is not a change.
    """
    values = {}
    for key in keys:
        value: Any = config
        for part in key.split("."):
            value = value[part]
        values[key] = value
    return json.dumps(values, sort_keys=True, default=str)


def demo_sample_sheet(outdir: str | os.PathLike, *, preset: str, seed: int):
    """The sample sheet that ``bcellmap simulate --out OUTDIR`` writes, without simulating.

    The visits are the simulator's deterministic design for ``seed``; which visits also have
    scRNA follows from the planned B cells/µL, whose kinetics class the simulator keeps at
    every file size of the presets (the files only change with ``preset``). Rule
    ``simulate_demo`` declares these files as its outputs, so a mismatch with what the
    simulator writes fails that job instead of passing unnoticed.

    Parameters
    ----------
    outdir
        The demo folder (``demo.outdir``) as configured; ``path`` is ``{outdir}/{file}``.
    preset
        ``demo.preset`` (checked; it does not change the design).
    seed
        ``demo.seed``.

    Returns
    -------
    pandas.DataFrame
        One row per sample, indexed by ``sample_id``, typed as
        :func:`bcellmap.io.samplesheet.read_sample_sheet` returns a sheet.
    """
    import pandas as pd

    from ..demo import simulate
    from ..errors import InputError

    if preset not in simulate.PRESET_EVENTS:
        raise InputError(f"unknown demo preset {preset!r} (expected one of "
                         f"{', '.join(simulate.PRESET_EVENTS)})", path=outdir)
    folder = str(outdir).rstrip("/") or "."
    visits = simulate._design(int(seed))
    rows = [{"sample_id": v.sample_id, "patient_id": v.patient.patient_id, "day": int(v.day),
             "modality": "flow", "path": f"{folder}/{v.sample_id}.fcs",
             "lymphocytes_per_ul": float(int(v.lymphocytes_per_ul)),
             "disease": v.patient.disease, "batch": simulate._batch(v.day), "panel": ""}
            for v in visits]
    for number, patient in enumerate(simulate.SCRNA_PATIENTS):
        own = sorted((v for v in visits if v.patient.patient_id == patient),
                     key=lambda v: v.day)
        per_ul = [v.b_fraction * v.lymphocytes_per_ul for v in own]
        _, returned = simulate.kinetics_days([v.day for v in own], per_ul)
        if returned is None:
            raise InputError(f"demo design: patient {patient} does not reconstitute, but the "
                             "simulator takes its scRNA visits from its return", path=outdir)
        after = [v.day for v in own if v.day >= returned][:2]
        by_day = {v.day: v for v in own}
        for index, day in enumerate([own[0].day, 28, *after]):
            sample_id = f"{patient}_d{int(day)}_scrna"
            # The simulator writes the first visit of the first patient as a 10x .h5.
            suffix = ".h5" if number == 0 and index == 0 else ".h5ad"
            rows.append({"sample_id": sample_id, "patient_id": patient, "day": int(day),
                         "modality": "scrna",
                         "path": f"{folder}/scrna/{patient}/{sample_id}{suffix}",
                         "lymphocytes_per_ul": float(by_day[day].lymphocytes_per_ul),
                         "disease": by_day[day].patient.disease, "batch": "", "panel": ""})
    sheet = pd.DataFrame(rows)
    sheet["reference"] = False
    sheet["lymphodepletion_day"] = pd.array([pd.NA] * len(sheet), dtype="Int64")
    sheet["gatingml"] = ""
    return sheet.set_index("sample_id", drop=False)


def cli_write_config(args: argparse.Namespace) -> None:
    """``bcellmap write-config``: write the workflow's merged config as YAML.

    The workflow merges the package defaults, its config files and ``--config`` while it
    parses and hands this command (rule ``write_config``) the differences from the package
    defaults, so that parsing writes nothing and the command line stays short. They are
    merged over the defaults, checked for unknown keys and validated as by every command.
    """
    import yaml

    from ..config import load_config
    from ..errors import ConfigError
    from ..io._atomic import atomic_path

    try:
        overrides = json.loads(args.json)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"write-config: --json is not valid JSON ({exc})") from None
    if not isinstance(overrides, dict):
        raise ConfigError("write-config: --json must be a mapping of keys")
    merged = load_config(None, overrides=overrides)
    with atomic_path(args.out) as tmp:
        tmp.write_text(yaml.safe_dump(merged, sort_keys=True))
