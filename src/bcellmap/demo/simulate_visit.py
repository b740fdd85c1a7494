"""One simulated visit with the shapes of real blood: a test bed for gates that must not
assume bimodal markers.

The demo cohort (:mod:`bcellmap.demo.simulate`) plants cleanly separated populations: every
gate finds a valley there. Real blood does not (issue #23; flowDensity and openCyto were
written for it):

- **healthy adults** have 60-85% naive B cells, so within B cells IgD is one broad positive
  mode with a shoulder of IgD- memory and double-negative cells that sits at the T cells'
  IgD level, and CD27+ memory is a shoulder of 10-25% on the naive peak;
- **exports** are often compensated, transformed and compressed already (FlowJo's
  0-4,096 channel values of a biexponential display);
- a channel can **stain every cell** (a mislabelled or failed mass-cytometry metal: the
  CD19 of the CytoNorm control files is high on T cells and granulocytes);
- a **first-return visit** after CD19 CAR-T is all naive and transitional.

:func:`simulate_visit` writes one FCS file of such a visit with the demo's instrument, panel
and artefacts (debris, doublets, dead cells, margin events, time anomalies), its per-event
truth codes (:func:`bcellmap.demo.simulate.codes_table`) and a one-row truth table, so that
gates can be scored per event as an expert-gated file would score them.

Real-blood phenotypes (linear median signal and ln sigma; demo levels otherwise):

============== ===================== =====================
B subset       IgD                   CD27
============== ===================== =====================
naive          2,000 / 0.95 (broad)  neg
transitional   3,000 / 0.8           neg
unswitched     1,200 / 0.8           900 / 0.6 (dim)
switched, DN   neg (70%) / 120 / 0.8 900 / 0.6; DN neg
============== ===================== =====================
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from .simulate import (
    _DETECTORS,
    _PHENOTYPES,
    B_SUBSETS,
    CHANNEL_MARKERS,
    CHANNELS,
    MIN_EVENTS_PER_FILE,
    _Expr,
    _Patient,
    _simulate_events,
    _truth_row,
    _Visit,
    _write_fcs,
)

__all__ = ["VISIT_PROFILES", "simulate_visit"]

#: Visit profiles: B cells as a share of lymphocytes, and the B-subset composition (order of
#: ``B_SUBSETS``: transitional, naive, unswitched, switched, double negative, plasmablast).
VISIT_PROFILES: dict[str, tuple[float, tuple[float, ...]]] = {
    # Healthy adult: naive 60-85% of B cells (Morbach 2010: median 73% in adults).
    "healthy_adult": (0.10, (0.03, 0.74, 0.07, 0.11, 0.04, 0.01)),
    # First return after CD19 CAR-T: naive and transitional (Mackensen 2022, Müller 2024).
    "naive_return": (0.05, (0.24, 0.70, 0.02, 0.02, 0.01, 0.01)),
}
#: Export forms of the file.
EXPORTS = ("raw", "compressed")
#: The top of a compressed export's scale (FlowJo's channel values).
COMPRESSED_RANGE = 4096

_IGD_NEG_AT_T_LEVEL = (("neg", 0.7), (_Expr(120.0, 0.8), 0.3))
_MEMORY_CD27_DIM = _Expr(900.0, 0.6)
#: The shapes of real blood (module docstring); the demo's table otherwise.
REAL_PHENOTYPES: dict[str, Mapping] = {
    **_PHENOTYPES,
    "b_naive": {**_PHENOTYPES["b_naive"], "IgD": _Expr(2_000.0, 0.95)},
    "b_transitional": {**_PHENOTYPES["b_transitional"], "IgD": _Expr(3_000.0, 0.8)},
    "b_unswitched_memory": {**_PHENOTYPES["b_unswitched_memory"], "IgD": _Expr(1_200.0, 0.8),
                            "CD27": _MEMORY_CD27_DIM},
    "b_switched_memory": {**_PHENOTYPES["b_switched_memory"], "IgD": _IGD_NEG_AT_T_LEVEL,
                          "CD27": _MEMORY_CD27_DIM},
    "b_double_negative": {**_PHENOTYPES["b_double_negative"], "IgD": _IGD_NEG_AT_T_LEVEL},
}


def _nonspecific(phenotypes: Mapping[str, Mapping], marker: str) -> dict[str, Mapping]:
    """Every cell that does not carry ``marker`` gets it at the ``int`` level (3,000)."""
    out = {}
    for label, phenotype in phenotypes.items():
        out[label] = dict(phenotype)
        if phenotype.get(marker, "neg") == "neg":
            out[label][marker] = "int"
    return out


def simulate_visit(
    path: str | os.PathLike,
    *,
    profile: str = "healthy_adult",
    n_events: int = 20_000,
    seed: int = 0,
    shapes: str = "real",
    export: str = "raw",
    nonspecific: str | None = None,
    sample_id: str | None = None,
) -> dict[str, object]:
    """Write one simulated visit as an FCS file, with its per-event truth.

    Parameters
    ----------
    path
        The FCS file to write; ``{stem}.truth.npy`` (one truth code per event, file order)
        and ``{stem}.truth.tsv`` (the one-row truth table) are written beside it.
    profile
        A key of :data:`VISIT_PROFILES`.
    n_events
        Events in the file (at least 1,000).
    seed
        Seed of every draw.
    shapes
        ``real`` (:data:`REAL_PHENOTYPES`) or ``demo`` (the demo cohort's bimodal shapes).
    export
        ``raw``: uncompensated linear values with ``$SPILLOVER``, as the demo writes them;
        ``compressed``: compensated, logicle-transformed (T 262,144, W 0.5, M 4.5) and scaled
        to 0-4,096 (FlowJo's channel values), ``$PnR`` 4,096 and no spillover keyword: read
        it with ``compensation: {source: none}`` and ``transform: {method: none}``.
    nonspecific
        A marker (e.g. ``CD19``) that stains every cell not carrying it at the ``int`` level.
    sample_id
        ``$SRC`` and the truth table's ``sample_id`` (default: the file's stem).

    Returns
    -------
    dict
        The truth row (event counts per category, B cells, subsets and their % of B cells).

    Raises
    ------
    InputError
        An unknown profile, shape set, export or marker, or too few events.
    """
    path = Path(path)
    if profile not in VISIT_PROFILES:
        raise InputError(f"unknown visit profile {profile!r} (expected one of "
                         f"{', '.join(VISIT_PROFILES)})", path=path)
    if shapes not in ("real", "demo") or export not in EXPORTS:
        raise InputError(f"shapes must be real or demo and export one of {', '.join(EXPORTS)}",
                         path=path)
    if n_events < MIN_EVENTS_PER_FILE:
        raise InputError(f"events per file must be at least {MIN_EVENTS_PER_FILE}", path=path)
    phenotypes: Mapping[str, Mapping] = REAL_PHENOTYPES if shapes == "real" else _PHENOTYPES
    if nonspecific is not None:
        if nonspecific not in CHANNEL_MARKERS:
            raise InputError(f"{nonspecific!r} is not a marker of the simulated panel",
                             path=path)
        phenotypes = _nonspecific(phenotypes, nonspecific)
    b_fraction, subsets = VISIT_PROFILES[profile]
    sample_id = sample_id or path.stem
    visit = _Visit(sample_id=sample_id, patient=_Patient("P90", "healthy", -1, (), None),
                   visit=0, day=-1, phase="baseline", return_index=0,
                   lymphocytes_per_ul=1_800.0, b_fraction=b_fraction,
                   subset_fractions=subsets, masking=0.0)
    rng = np.random.default_rng([seed, 9_001])
    simulated = _simulate_events(visit, n_events, rng, phenotypes=phenotypes)
    truth = _truth_row(visit, simulated)
    path.parent.mkdir(parents=True, exist_ok=True)
    if export == "raw":
        _write_fcs(path, visit, simulated)
    else:
        _write_compressed(path, simulated, sample_id=sample_id)
    np.save(path.with_suffix(".truth.npy"), simulated.codes)
    pd.DataFrame([truth]).to_csv(path.with_suffix(".truth.tsv"), sep="\t", index=False)
    return truth


def _write_compressed(path: Path, simulated, *, sample_id: str) -> None:
    """A FlowJo-style export: compensated, logicle, scaled to 0-4,096, no spillover."""
    import flowio
    from flowutils import transforms

    data = np.array(simulated.data, dtype=np.float64)
    fluorescence = slice(3, 3 + len(_DETECTORS))
    data[:, fluorescence] = data[:, fluorescence] @ np.linalg.inv(simulated.spillover)
    scaled = transforms.logicle(data[:, fluorescence], list(range(len(_DETECTORS))),
                                t=262_144, m=4.5, w=0.5, a=0.0)
    data[:, fluorescence] = np.clip(scaled, 0.0, 1.0) * (COMPRESSED_RANGE - 1)
    data[:, :3] = data[:, :3] / 262_144 * COMPRESSED_RANGE  # scatter: channel units too
    names = [("Comp-" + c if c in _DETECTORS else c) for c in CHANNELS]
    metadata = {"$CYT": "LSRFortessa (bcellmap simulator, FlowJo-style export)",
                "$SRC": sample_id, "$FIL": path.name, "$TIMESTEP": "0.01",
                **{f"$P{i + 1}R": str(COMPRESSED_RANGE) for i in range(len(CHANNELS) - 1)},
                f"$P{len(CHANNELS)}R": str(int(np.ceil(data[:, -1].max())) + 1)}
    events = array("f")
    events.frombytes(np.ascontiguousarray(data, dtype="<f4").tobytes())
    with open(path, "wb") as handle:
        flowio.create_fcs(handle, events, names, opt_channel_names=list(CHANNEL_MARKERS),
                          metadata_dict=metadata)


def truth_subset_pct(truth: Mapping[str, object]) -> dict[str, float]:
    """Each subset's % of B cells in a truth row."""
    return {s: float(truth[f"{s}_pct_b"]) for s in B_SUBSETS}

