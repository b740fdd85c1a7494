"""The thresholds tables and ``bcellmap thresholds``.

A threshold placed per sample would invent positives: in B-cell aplasia a sample has no
CD19+ population, and a two-population model fitted to that sample alone splits its
negative peak in two. Thresholds are therefore learned on a pool (the whole cohort, the
baseline samples, or each batch; ``annotate.thresholds.method``) made of an equal-sized,
seeded subsample of every sample, and mapped onto every sample through its registration.

Each threshold is placed by the package's one 1-D learner,
:func:`bcellmap.kernels.density.learn_marker_threshold` (density valley, else upper tail).

Where each threshold is learned (the parent population of every gate), how visits are
registered onto each other before pooling, and the "hi" levels: ``bcellmap.flow.gating``.
``bcellmap thresholds`` writes the cohort's reference gates (``thresholds.tsv``) and every
sample's own gates (``gates.tsv``). Fixed values from ``annotate.thresholds.fixed`` (positive
level) and ``annotate.thresholds.fixed_hi`` (hi level) override learning.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import ConfigError, InputError

log = logging.getLogger(__name__)

#: Markers of the cell-type rules; subset markers come from the subset rule table.
LINEAGE_MARKERS = ("CD3", "CD19", "CD20")
#: Group name used when one set of thresholds serves every sample.
ALL_SAMPLES = "all"


def _settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``annotate.thresholds`` settings with defaults for keys absent in old configs."""
    settings = dict(config.get("annotate", {}).get("thresholds", {}))
    settings.setdefault("method", "pooled")
    settings.setdefault("fixed", {})
    settings.setdefault("fixed_hi", {})
    settings.setdefault("events_per_sample", 5000)
    settings.setdefault("fallback_sd", 4.0)
    settings.setdefault("min_peak_fraction", 0.002)
    if settings["method"] not in ("pooled", "baseline", "batch"):
        raise ConfigError(f"annotate.thresholds.method {settings['method']!r}: expected "
                          "pooled, baseline or batch")
    return settings


def thresholds_for(table: pd.DataFrame, group: str) -> dict[str, dict[str, float]]:
    """Return ``{marker: {"pos": t, "hi": t}}`` for one group of a thresholds table.

    Falls back to the ``all`` group when the table has no rows for ``group``.
    """
    rows = table[table["group"].astype(str) == str(group)]
    if rows.empty:
        rows = table[table["group"].astype(str) == ALL_SAMPLES]
    if rows.empty:
        raise InputError(f"thresholds table has no rows for group {group!r} nor {ALL_SAMPLES!r}")
    out: dict[str, dict[str, float]] = {}
    for row in rows.itertuples(index=False):
        out.setdefault(str(row.marker), {})[str(row.level)] = float(row.threshold)
    return out


def read_thresholds(path: str | os.PathLike, *,
                    required: tuple[str, ...] = ("group", "marker", "level", "threshold")
                    ) -> pd.DataFrame:
    """Read ``thresholds.tsv`` (or ``gates.tsv``), checking the ``required`` columns."""
    from ..io.readers import read_table

    return read_table(path, required=required, what="thresholds table")


def threshold_group(row: Mapping[str, Any], method: str) -> str:
    """The gating group of a sample: its panel (``all`` for the default one), and under
    ``method: batch`` its batch too (``batch`` alone for the default panel).

    Panels are never pooled: a CyTOF panel and a fluorescence panel, or two fluorescence
    panels with other fluorochromes, have other scales.
    """
    panel = str(row.get("panel", "") or "")
    panel = "" if panel in ("default", "nan") else panel
    batch = str(row.get("batch", "") or "") if method == "batch" else ""
    batch = "" if batch == "nan" else batch
    if panel and batch:
        return f"{panel}:{batch}"
    return panel or batch or ALL_SAMPLES


def _instrument_kind(path: Path) -> str:
    """``mass_cytometry`` or ``fluorescence``, as ingest recorded it in ``uns["source"]``."""
    import h5py

    # One scalar of uns, read directly: opening the AnnData would read the whole obs.
    try:
        with h5py.File(path, "r") as handle:
            node = handle.get("uns/source/mass_cytometry")
            mass = bool(node[()]) if isinstance(node, h5py.Dataset) else False
    except (OSError, KeyError, TypeError):
        return "fluorescence"
    return "mass_cytometry" if mass else "fluorescence"


def split_instrument_mix(groups: Mapping[str, str], kinds: Mapping[str, str]) -> dict[str, str]:
    """Split every group that holds both mass and fluorescence cytometry samples.

    Their scales differ, so one pooled gate would fit neither: each kind gets its own
    group, ``{group}:mass_cytometry`` / ``{group}:fluorescence`` (flagged downstream).
    """
    mixed = {g for g in set(groups.values())
             if len({kinds[s] for s, group in groups.items() if group == g}) > 1}
    for group in sorted(mixed):
        log.warning("gating group %r mixes mass and fluorescence cytometry samples; their gates "
                    "are learned apart (flagged instrument_mix)", group)
    return {s: f"{g}:{kinds[s]}" if g in mixed else g for s, g in groups.items()}


def cli_thresholds(args: argparse.Namespace) -> None:
    """``bcellmap thresholds``: learn the gates on the QC-passed events of every sample.

    ``--inputs`` are the ingested (or normalised) flow h5ad files; mapped files (QC-passed
    events only) give the same gates. Writes the cohort's reference gates (``--out``,
    ``THRESHOLD_COLUMNS``) and every sample's own gates (``--gates``,
    ``gating.GATE_COLUMNS``), which ``annotate`` applies.
    """
    from ..config import load_config
    from ..io._atomic import write_tsv
    from ..io.samplesheet import read_sample_sheet
    from .annotate import load_subset_rules
    from .gating import GatingSettings, learn_gates

    config = load_config(args.config)
    settings = _settings(config)
    sheet = read_sample_sheet(args.samples, check_files=False)
    rules = load_subset_rules(config)
    pos_markers = list(dict.fromkeys(
        [*LINEAGE_MARKERS, *(m for rule in rules for m, lv in rule.levels.items()
                             if lv in ("neg", "pos"))]))
    hi_markers = list(dict.fromkeys(m for rule in rules for m, lv in rule.levels.items()
                                    if lv in ("hi", "lo")))
    # The lymphocyte gate uses these where the panel has them (see annotate).
    pos_markers += [m for m in ("CD45", "CD14", "CD56", "CD16") if m not in pos_markers]
    if "CD3" not in pos_markers:
        pos_markers.insert(0, "CD3")

    paths: dict[str, Path] = {}
    for path in map(Path, args.inputs):
        sample_id = path.name.removesuffix(".h5ad")
        if sample_id not in sheet.index:
            raise InputError("input file is not named after a sample of the sheet",
                             path=path, sample_id=sample_id)
        paths[sample_id] = path

    def _reader(path: Path, sample_id: str) -> Any:
        return lambda: read_qc_passed(path, sample_id=sample_id)

    groups = split_instrument_mix(
        {s: threshold_group(sheet.loc[s], settings["method"]) for s in paths},
        {s: _instrument_kind(p) for s, p in paths.items()})
    learners = set(paths)
    if settings["method"] == "baseline":
        learners = {s for s in paths if int(sheet.loc[s, "day"]) <= 0}
    if not learners:
        raise InputError("no sample to learn thresholds on (method "
                         f"{settings['method']!r}: baseline needs samples with day <= 0)",
                         path=args.samples)
    cohort, gates = learn_gates({s: _reader(p, s) for s, p in paths.items()},
                                pos_markers=pos_markers, hi_markers=hi_markers,
                                settings=GatingSettings.from_config(config),
                                seed=int(config.get("seed", 0)), groups=groups,
                                learners=learners)
    for row in gates[gates["flag"].astype(str) != ""].itertuples(index=False):
        log.warning("%s: gate %s %s (%s) flagged %s: %s on %d parent events", row.sample_id,
                    row.marker, row.level, row.parent, row.flag, row.method, row.n_events)
    write_tsv(cohort, args.out)
    try:
        write_tsv(gates, args.gates)
    except BaseException:
        Path(args.out).unlink(missing_ok=True)  # the two outputs are all-or-nothing
        raise


def read_qc_passed(path: str | os.PathLike, *, sample_id: str | None = None) -> Any:
    """The QC-passed events of a flow h5ad: ``X`` rows and ``var``, nothing else.

    Gating reads every sample once per stage, so this reads only ``X``, ``var`` and
    ``obs["qc_pass"]`` (not the obs index, the other QC columns or layers). A file without
    ``qc_pass`` (a mapped file) is taken whole.

    Returns
    -------
    types.SimpleNamespace
        ``X`` (the QC-passed rows) and ``var``, as the gating functions read them.

    Raises
    ------
    InputError
        The file is missing or is not a flow h5ad.
    """
    from types import SimpleNamespace

    import h5py
    import numpy as np
    from anndata.io import read_elem

    from ..io.readers import read_h5ad

    try:
        with h5py.File(path, "r") as handle:
            if isinstance(handle.get("X"), h5py.Dataset):
                var = read_elem(handle["var"])
                obs = handle["obs"]
                passed = (np.asarray(read_elem(obs["qc_pass"]), dtype=bool)
                          if "qc_pass" in obs else None)
                x = handle["X"][...]
                return SimpleNamespace(X=x if passed is None else x[passed], var=var)
    except (OSError, KeyError):
        pass  # not a dense flow h5ad written by ingest: read_h5ad says what is wrong
    adata = read_h5ad(path, what="flow h5ad", sample_id=sample_id)
    if "qc_pass" in adata.obs.columns:
        adata = adata[adata.obs["qc_pass"].to_numpy().astype(bool)]
    return adata
