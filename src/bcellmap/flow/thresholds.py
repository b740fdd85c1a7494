"""The thresholds step: learn the cohort's gates (:func:`learn_cohort_gates`); its tables.

A threshold placed per sample would invent positives: in B-cell aplasia a sample has no
CD19+ population, and a two-population model fitted to that sample alone splits its
negative peak in two. Thresholds are therefore learned on a pool (the whole cohort, the
baseline samples, or each batch; ``annotate.thresholds.method``) made of an equal-sized,
seeded subsample of every sample, and mapped onto every sample through its registration.

Each threshold is placed by the package's one 1-D learner,
:func:`bcellmap.kernels.density.learn_marker_threshold` (density valley, else upper tail).

Where each threshold is learned (the parent population of every gate), how visits are
registered onto each other before pooling, and the "hi" levels: ``bcellmap.flow.gating``.
:func:`learn_cohort_gates` (called by ``bcellmap thresholds`` and :func:`bcellmap.tl.gate`)
gives the cohort's reference gates (``thresholds.tsv``) and every sample's own gates
(``gates.tsv``). Fixed values from ``annotate.thresholds.fixed`` (positive
level) and ``annotate.thresholds.fixed_hi`` (hi level) override learning; a sample's
corrected gates (a GatingML file: the sheet's ``gatingml`` column, or ``annotate.user_gates``
by panel) override its own (:func:`user_gate_file`, :func:`read_user_gate_files`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..contracts import ALL_SAMPLES
from ..errors import ConfigError, InputError

log = logging.getLogger(__name__)

#: Markers of the cell-type rules; subset markers come from the subset rule table.
LINEAGE_MARKERS = ("CD3", "CD19", "CD20")
#: Markers the lymphocyte gate uses where the panel has them (see ``gating.lymphocyte_gate``).
_LYMPHOCYTE_GATE_MARKERS = ("CD45", "CD14", "CD56", "CD16")


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


def read_gates(path: str | os.PathLike) -> pd.DataFrame:
    """Read ``gates.tsv`` (every sample's own gates), checking its key columns."""
    return read_thresholds(path, required=("sample_id", "marker", "level", "threshold"))


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


def instrument_kind(path: str | os.PathLike) -> str:
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


def gate_markers(rules: Sequence[Any]) -> tuple[list[str], list[str]]:
    """The markers that get a positive gate and those that also get a hi gate.

    Positive: the lineage markers, every marker a subset rule uses at ``neg``/``pos`` and the
    lymphocyte gate's markers; hi: every marker a rule uses at ``hi``/``lo``.
    """
    pos_markers = list(dict.fromkeys(
        [*LINEAGE_MARKERS, *(m for rule in rules for m, lv in rule.levels.items()
                             if lv in ("neg", "pos"))]))
    hi_markers = list(dict.fromkeys(m for rule in rules for m, lv in rule.levels.items()
                                    if lv in ("hi", "lo")))
    pos_markers += [m for m in _LYMPHOCYTE_GATE_MARKERS if m not in pos_markers]
    if "CD3" not in pos_markers:
        pos_markers.insert(0, "CD3")
    return pos_markers, hi_markers


def _day(row: Mapping[str, Any]) -> int | None:
    day = row.get("day")
    return None if day is None or pd.isna(day) or day == "" else int(day)


def learn_cohort_gates(
    samples: Mapping[str, Callable[[], Any]],
    *,
    rows: Mapping[str, Mapping[str, Any]],
    kinds: Mapping[str, str],
    config: Mapping[str, Any],
    sheet_path: str | os.PathLike | None = None,
    user_gates: Mapping[str, Mapping[tuple[str, str], tuple[float, str]]] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
    """Learn the cohort's hierarchical gates: the ``thresholds`` step.

    The one home of gate learning: ``bcellmap thresholds`` (on files) and
    :func:`bcellmap.tl.gate` (on AnnData objects) both call it. Samples are grouped by panel
    (and batch under ``annotate.thresholds.method: batch``; mass and fluorescence cytometry
    apart), the markers come from the lineage rules and the subset rule table, and
    :func:`bcellmap.flow.gating.learn_gates` learns every gate in its parent population.

    Parameters
    ----------
    samples
        ``{sample_id: reader}``: each reader returns the sample's QC-passed events (``X`` and
        ``var["canonical"]``, e.g. :func:`read_qc_passed`); called once per stage, so the
        cohort need not fit in memory.
    rows
        Per sample: ``panel``, ``batch`` and ``day`` (its sample-sheet row).
    kinds
        Per sample: ``mass_cytometry`` or ``fluorescence`` (:func:`instrument_kind`).
    config
        The merged config (``annotate``, ``seed``).
    sheet_path
        The sample sheet, for messages.
    user_gates
        Per sample, the gates a user set (:func:`read_user_gate_files`): they replace the learned
        ones (``learn_gates``).

    Returns
    -------
    cohort
        The reference gates of every group (``THRESHOLD_COLUMNS``; ``thresholds.tsv``).
    gates
        Every sample's own gates (``GATE_COLUMNS``; ``gates.tsv``).
    groups
        ``{sample_id: gating group}``.

    Raises
    ------
    InputError
        No sample to learn on (``baseline`` without day <= 0 samples), missing markers.
    """
    from .gating import GatingSettings, learn_gates
    from .subsets import load_subset_rules

    settings = _settings(config)
    pos_markers, hi_markers = gate_markers(load_subset_rules(config))
    groups = split_instrument_mix(
        {s: threshold_group(rows[s], settings["method"]) for s in samples},
        {s: kinds[s] for s in samples})
    learners = set(samples)
    if settings["method"] == "baseline":
        learners = {s for s in samples if (day := _day(rows[s])) is not None and day <= 0}
    if not learners:
        raise InputError("no sample to learn thresholds on (method "
                         f"{settings['method']!r}: baseline needs samples with day <= 0)",
                         path=sheet_path)
    cohort, gates = learn_gates(dict(samples), pos_markers=pos_markers, hi_markers=hi_markers,
                                settings=GatingSettings.from_config(config),
                                seed=int(config.get("seed", 0)), groups=groups,
                                learners=learners, user_gates=user_gates)
    for row in gates[gates["flag"].astype(str) != ""].itertuples(index=False):
        log.warning("%s: gate %s %s (%s) flagged %s: %s on %d parent events", row.sample_id,
                    row.marker, row.level, row.parent, row.flag, row.method, row.n_events)
    return cohort, gates, groups


def user_gate_file(row: Mapping[str, Any], config: Mapping[str, Any]) -> Path | None:
    """The GatingML file of a sample's corrected gates, or None.

    The sheet's ``gatingml`` column wins; otherwise ``annotate.user_gates`` by the sample's
    panel (``default`` when empty), a relative path taken from the working directory.
    """
    own = str(row.get("gatingml") or "")
    if own:
        return Path(own)
    by_panel = (config.get("annotate") or {}).get("user_gates") or {}
    value = by_panel.get(str(row.get("panel") or "") or "default")
    if not value:
        return None
    given = Path(str(value)).expanduser()
    return given if given.is_absolute() else Path.cwd() / given


def read_user_gate_files(files: Mapping[str, Path], header: Callable[[str], Any]
                         ) -> dict[str, dict[tuple[str, str], tuple[float, str]]]:
    """Every sample's corrected gates on its own scale, for :func:`learn_cohort_gates`.

    Parameters
    ----------
    files
        ``sample_id -> GatingML file`` (:func:`user_gate_file`).
    header
        ``sample_id -> AnnData-like`` with the sample's ``var`` and ``uns`` (its transforms
        and compensation).

    Raises
    ------
    InputError
        A file is missing or unreadable, or a gate does not fit the sample
        (:func:`bcellmap.flow.gatingml.read_user_gates`).
    """
    from .gatingml import read_user_gates

    found: dict[str, dict[tuple[str, str], tuple[float, str]]] = {}
    for sample_id, path in files.items():
        if not Path(path).is_file():
            raise InputError("user gates: the GatingML file does not exist", path=path,
                             sample_id=sample_id)
        gates = read_user_gates(path, header(sample_id), sample_id=sample_id)
        found[sample_id] = {key: (value, Path(path).name) for key, value in gates.items()}
        log.info("%s: %d gate(s) set by the user in %s", sample_id, len(gates), path)
    return found


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
