"""The simulated demo cohort: FCS files of five patients through CD19 CAR-T, with truth.

``bcellmap simulate`` (and :func:`simulate_cohort`) writes, into one folder:

- ``{sample_id}.fcs``: one FCS 3.1 file per visit (float32 list mode, ``$PnR`` 262144,
  ``$SPILLOVER``, ``$CYT``, ``$DATE``, ``$TIMESTEP``), uncompensated linear values;
- ``samples.tsv``: the sample sheet (DESIGN.md contract; ``path`` relative to the folder);
- ``truth_samples.tsv``: per visit, the events planted in the file, counted by category
  (also ``monocytes``, ``granulocytes``, ``lymphopenic`` and ``near_threshold``, the
  threshold a near-threshold visit was planted next to: ``1/uL`` or ``10/uL``);
- ``truth_patients.tsv``: per patient, the depletion and reconstitution days that follow
  from the true B cells/µL (also for CD19+ and CD20+ B cells);
- ``truth_drift.tsv``: per visit and marker, the staining factor and the gain of the
  marker's detector (sample_id, marker, detector, staining_factor, detector_gain);
- ``truth_events/{sample_id}.npy``: one int8 code per event (file order) and
  ``truth_codes.tsv`` naming the codes, for per-event accuracy of QC and annotation.

Cohort
------
Five patients (three SLE, one systemic sclerosis, one myositis), a baseline visit a few
days before infusion and ten visits up to about day 365. All are depleted (below 1 B
cell/µL) within a week: P04 on day 2 with 0.5-0.7 residual B cells/µL, P03 still carries
1.4-2.0/µL on day 3 and is depleted on day 7, the others are aplastic from day 3. B cells
return on day 84 (P02), 112 (P01), 56 (P03) and 150 (P04, its first return at only
13.8-16/µL); P05 is not reconstituted by its last visit (censored). Early returns below
the reconstitution threshold precede it: P02 day 56 at 1.4-2.0/µL, P01 day 84 at
6.0-7.2/µL, and P05's last visit (day 365) at 6.0-7.2/µL. These six near-threshold visits
draw their B cells/µL and their lymphocyte count together so that the % of lymphocytes is
safe as well; their B events are planted to match (at any file size the count is moved to
the nearest safe count of the same kinetics class, or, when the file is too small to
resolve it, to the nearest safe count).
P02 shows CD19 masking: on its first three visits of the ``return`` phase, 60%, 50% and
45% of its CD20+ B cells are CD19-negative; no other B cell in the cohort is.
Returning B cells are transitional/naive (first return visit and early returns: ~26%
transitional, ~67% naive, ~4% memory), baselines and residual visits are those of
autoimmune patients (naive ~55-70%, memory ~25-35%, transitional 2-5%, plasmablasts 1-3%,
double negative 3-8%). During aplasia the only B-lineage events are plasmablasts
(CD19-CAR-T-resistant), planted at ``floor(1e-4 * lymphocytes)`` events per file: none at
1,000-9,999 lymphocytes, one at the fixture size. No visit's true B cells/µL (nor CD19+,
CD20+ B cells/µL) may fall in ``FORBIDDEN_PER_UL`` ([0.75, 1.33] and [7.5, 13.3]), nor its
% of lymphocytes in ``FORBIDDEN_PCT_LYMPHOCYTES`` ([0.075, 0.133] and [0.75, 1.33]):
within about 25% of the kinetics thresholds (1 and 10 per µL; 0.1% and 1%) the truth
itself would be in doubt. The simulator checks this after planting and fails loudly.

Specimens: post-infusion visits on days ``LYMPHOPENIC_DAYS`` (7 to 28, inclusive) are
lysed whole blood after lymphodepletion (switch ``lymphopenic``): lymphocytes 9-14% of all
events, granulocytes 56-64%, monocytes 8-11%, debris, doublets, dead and margin events
sharing the rest in their usual proportions; their clinical count is 200-500
lymphocytes/µL. All other visits are PBMC-like (below). Without the switch the
lymphopenic visits have the PBMC-like composition and the clinical counts of before
(300-750/µL on days 7-28).

Drift (switch ``drift``): visits are acquired months apart. Per visit, every marker's true
signal is multiplied by a staining factor drawn log-uniformly in ``STAINING_DRIFT``
[0.7, 1.4] and every detector's value by a gain g drawn log-uniformly in
``DETECTOR_GAIN_DRIFT`` [0.85, 1.18]. The file's ``$SPILLOVER`` is
``diag(1/g) @ SPILLOVER @ diag(g)`` (row = fluorochrome, column = detector), so that
compensating with it recovers ``signal * staining * g``. The first baseline drifts too.
Drift draws from its own random stream: switching it off changes no planted event.

Events
------
Every file has exactly ``events_per_file`` events in random order with increasing Time
(``$TIMESTEP`` 0.01 s, about 1,500 events/s). Categories and their share of events in a
PBMC-like file: debris 6-12% (low FSC/SSC), doublets 3-5%, dead cells 3-7%, margin events
0.2-0.4% (each share drawn per file), myeloid 15-22% (monocytes 75%, granulocytes 25%),
lymphocytes the rest (T cells ~78% of non-B lymphocytes, 3-5% of them CD20dim; NK cells
the rest). A quarter of the files (drawn per file) carry an acquisition anomaly: 3% of the
events, contiguous in time, arrive five times faster with fluorescence at half and
scatter at 90% of its level.

How the truth counts events (each event once, precedence top to bottom):

1. ``margin``: any scatter value at ``$PnR - 1`` (262143). Planted margin events are cells
   with FSC-A, SSC-A or one fluorescence detector saturated; a fluorescence detector
   saturates on the cell's brightest marker, and such a cell keeps its own category (QC
   counts fluorescence saturation without removing the event); an event of another
   category whose scatter saturates by chance is counted here too. ``truth_samples.tsv``
   counts events with a saturated fluorescence detector in ``fluorescence_saturated``.
2. ``doublets``: two live cells (lymphocytes or myeloid, drawn from the file's own
   composition) in one event: FSC-A, SSC-A and fluorescence are the sums of the two cells,
   FSC-H is 1.0-1.25 times the larger cell's.
3. ``dead``: cells of any live type with bright viability dye, 70% of their marker signal
   and lower FSC / higher SSC.
4. ``debris``.
5. the live singlet cell types: ``myeloid`` (``monocyte`` and ``granulocyte`` codes),
   ``t_cells``, ``nk_cells``, ``b_cells`` (by subset). ``lymphocytes`` = t_cells +
   nk_cells + b_cells; events in an anomaly window keep their category.

Signals
-------
True fluorochrome signals (linear units) per cell are log-normal around a level's median
(sigma 0.35 in ln units) or around a population's own median and sigma (the B-cell
continua below), or exactly 0 for ``neg``. The detector values are
``((true * staining) @ SPILLOVER + autofluorescence) * gain + noise`` (noise sd
``sqrt(50^2 + 2 * detected)``), so negative populations sit around 0 with a realistic
spread and go negative after compensation. Levels (median linear signal, then
arcsinh(x/150) of it):

====== ======= ===========
level  linear  arcsinh/150
====== ======= ===========
neg    0       ~0.4 with autofluorescence
dim    700     2.2
lo     1,500   3.0
int    3,000   3.7
pos    7,000   4.5
hi     22,000  5.7
vhi    45,000  6.4
====== ======= ===========

Phenotypes (Live/Dead, CD3, CD19, CD20, IgD, CD27, CD38, CD24), identical in every file
before drift; ``m/s`` is a log-normal with median m and ln sigma s:

- T cells: neg, pos, neg, neg (dim on the CD20dim T cells), neg, pos (70%) / neg, dim, neg
- NK cells: neg, neg, neg, neg, neg, dim (30%) / neg, pos, neg
- transitional B: neg, neg, pos, pos, 7000/0.45, neg, **12000/0.35**, **14000/0.35**
- naive B: neg, neg, pos, pos, 7000/0.45, neg, 3000/0.40, 3300/0.40
- unswitched memory B: neg, neg, pos, pos, 3500/0.55, 4000/0.95, 900/0.5, 16000/0.45
- switched memory B: neg, neg, pos, pos, neg (80%) / 250/0.8 (20%), 4000/0.95, 900/0.5,
  16000/0.45
- double negative B: neg, neg, pos, pos, neg (80%) / 250/0.8 (20%), neg, 900/0.5,
  5000/0.5
- plasmablasts: neg, neg, lo, neg, neg, **vhi**, **vhi**, neg
- CD19-masked B cells: their subset's phenotype with CD19 neg
- monocytes: neg, neg, neg, neg, neg, neg, int, neg; granulocytes: ... CD38 neg, CD24 hi
- dead cells: viability hi; debris: viability anywhere from neg to hi, markers neg

The B-cell subsets overlap as in real blood: CD24 and CD38 of a B cell share one ln
deviate (correlation 0.6), so transitional cells (CD24hi CD38hi) are the upper tail of the
naive CD24int CD38int continuum rather than an island; memory CD38 is dim/low; memory CD27
runs from dim (its lowest percent only about 4 times the 99th percentile of the
CD27-negative naive cells) to bright; IgD on IgD- B cells is negative with a dim tail. The
overlap is sized so that the best axis-aligned gates (the rules of the built-in subset
table, ``bcellmap/subsets.yaml``, thresholds tuned per visit with the per-event truth on
compensated arcsinh(x/150) values) get each subset within about 1 percentage point of truth
for a visit of about 1,000 B cells, while still misclassifying 0.5-2.5% of them.

Scatter medians (FSC-A, SSC-A): lymphocytes 60,000 / 14,000 (NK SSC 18,000, B FSC
62,000, plasmablasts 72,000 / 17,000), monocytes 95,000 / 42,000, granulocytes 105,000 /
95,000 with 6% low-SSC (hypogranular) granulocytes at 80,000 / 32,000 (wide, reaching into
the lymphocyte gate's edge), dead cells 38,000 / 20,000, debris 12,000 / 5,000 (wide).
Singlet FSC-H is 0.85 times FSC-A (sigma 2.5%).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import tempfile
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError

log = logging.getLogger(__name__)

#: Events per FCS file of each preset.
PRESET_EVENTS: dict[str, int] = {"fixture": 20_000, "full": 200_000}
#: Default seed of ``bcellmap simulate`` (and of ``demo.seed`` in the defaults).
DEFAULT_SEED = 20241121
#: Fewer events than this cannot keep the truth away from the kinetics thresholds.
MIN_EVENTS_PER_FILE = 1_000
#: $PnR of every channel; margin events sit at PnR - 1.
CHANNEL_RANGE = 262_144
MARGIN_VALUE = CHANNEL_RANGE - 1
B_SUBSETS = ("transitional", "naive", "unswitched_memory", "switched_memory",
             "double_negative", "plasmablast")

# Fluorescence detectors ($PnN) and what they carry ($PnS), in file order.
_DETECTORS = ("FITC-A", "PE-A", "PerCP-Cy5-5-A", "PE-Cy7-A", "BV421-A", "BV510-A",
              "APC-A", "APC-H7-A")
_DETECTOR_MARKERS = ("IgD", "CD24", "CD20", "CD19", "CD38", "Live/Dead", "CD27", "CD3")
_MARKER_INDEX = {m: i for i, m in enumerate(_DETECTOR_MARKERS)}
CHANNELS = ("FSC-A", "FSC-H", "SSC-A", *_DETECTORS, "Time")
CHANNEL_MARKERS = ("", "", "", *_DETECTOR_MARKERS, "")
_N_SCATTER = 3

# Spillover: row = fluorochrome, column = detector (FCS $SPILLOVER orientation).
SPILLOVER = np.array([
    # FITC   PE     PerCP  PE-Cy7 BV421  BV510  APC    APC-H7
    [1.000, 0.220, 0.040, 0.005, 0.000, 0.020, 0.000, 0.000],  # FITC (IgD)
    [0.015, 1.000, 0.080, 0.030, 0.000, 0.005, 0.002, 0.000],  # PE (CD24)
    [0.000, 0.010, 1.000, 0.140, 0.000, 0.000, 0.030, 0.010],  # PerCP-Cy5.5 (CD20)
    [0.000, 0.020, 0.040, 1.000, 0.000, 0.000, 0.001, 0.060],  # PE-Cy7 (CD19)
    [0.010, 0.000, 0.000, 0.000, 1.000, 0.150, 0.000, 0.000],  # BV421 (CD38)
    [0.080, 0.010, 0.005, 0.000, 0.030, 1.000, 0.000, 0.000],  # BV510 (Live/Dead)
    [0.000, 0.000, 0.020, 0.005, 0.000, 0.000, 1.000, 0.090],  # APC (CD27)
    [0.000, 0.000, 0.005, 0.080, 0.000, 0.000, 0.040, 1.000],  # APC-H7 (CD3)
])
# Autofluorescence seen by each detector, relative (violet and blue detectors see most).
_AUTOFLUORESCENCE_WEIGHTS = np.array([1.0, 0.6, 0.4, 0.2, 1.2, 1.1, 0.15, 0.1])
_NOISE_BASE_SD = 50.0
_NOISE_PER_SIGNAL = 2.0
_POSITIVE_SIGMA = 0.35

#: Median linear signal of each expression level (see the module docstring).
LEVELS: dict[str, float] = {"neg": 0.0, "dim": 700.0, "lo": 1_500.0, "int": 3_000.0,
                            "pos": 7_000.0, "hi": 22_000.0, "vhi": 45_000.0}



@dataclass(frozen=True)
class _Expr:
    """A log-normal expression with its own median (linear) and ln sigma."""
    median: float
    sigma: float


# Phenotype: marker -> level, _Expr, or ((level or _Expr, probability), ...) for a mixed
# population; markers not named are neg.
_Phenotype = Mapping[str, "str | _Expr | tuple[tuple[str | _Expr, float], ...]"]
_B = {"Live/Dead": "neg", "CD3": "neg", "CD19": "pos", "CD20": "pos"}
# B cells: CD24 and CD38 are continua (one shared ln deviate, correlation _B_CD24_CD38_RHO)
# on which transitional cells are the upper tail of naive; memory CD27 runs from dim to
# bright; IgD on IgD- B cells is mostly neg with a dim tail.
_IGD_NEG_TAIL = (("neg", 0.8), (_Expr(250.0, 0.8), 0.2))
_MEMORY_CD27 = _Expr(4_000.0, 0.95)
_MEMORY_CD38 = _Expr(900.0, 0.5)
_B_CD24_CD38_RHO = 0.6
_PHENOTYPES: dict[str, _Phenotype] = {
    "monocyte": {"CD38": "int"},
    "granulocyte": {"CD24": "hi"},
    "t_cell": {"CD3": "pos", "CD27": (("pos", 0.7), ("neg", 0.3)), "CD38": "dim"},
    "t_cell_cd20dim": {"CD3": "pos", "CD20": "dim", "CD27": (("pos", 0.7), ("neg", 0.3)),
                       "CD38": "dim"},
    "nk_cell": {"CD27": (("dim", 0.3), ("neg", 0.7)), "CD38": "pos"},
    "b_transitional": {**_B, "IgD": _Expr(7_000.0, 0.45), "CD38": _Expr(12_000.0, 0.35),
                       "CD24": _Expr(14_000.0, 0.35)},
    "b_naive": {**_B, "IgD": _Expr(7_000.0, 0.45), "CD38": _Expr(3_000.0, 0.40),
                "CD24": _Expr(3_300.0, 0.40)},
    "b_unswitched_memory": {**_B, "IgD": _Expr(3_500.0, 0.55), "CD27": _MEMORY_CD27,
                            "CD38": _MEMORY_CD38, "CD24": _Expr(16_000.0, 0.45)},
    "b_switched_memory": {**_B, "IgD": _IGD_NEG_TAIL, "CD27": _MEMORY_CD27,
                          "CD38": _MEMORY_CD38, "CD24": _Expr(16_000.0, 0.45)},
    "b_double_negative": {**_B, "IgD": _IGD_NEG_TAIL, "CD38": _MEMORY_CD38,
                          "CD24": _Expr(5_000.0, 0.5)},
    "b_plasmablast": {"CD19": "lo", "CD27": "vhi", "CD38": "vhi"},
}
for _subset in B_SUBSETS[:-1]:
    _PHENOTYPES[f"b_{_subset}_cd19neg"] = {**_PHENOTYPES[f"b_{_subset}"], "CD19": "neg"}
_CORRELATED = {label: ("CD24", "CD38") for label in _PHENOTYPES
               if label.startswith("b_") and "plasmablast" not in label}

# Scatter per cell type: FSC-A median, its ln sigma, SSC-A median, its ln sigma;
# autofluorescence median (linear units at weight 1).
_LYMPH = (60_000.0, 0.08, 14_000.0, 0.18, 60.0)
_SCATTER: dict[str, tuple[float, float, float, float, float]] = {
    "monocyte": (95_000.0, 0.10, 42_000.0, 0.20, 350.0),
    "granulocyte": (105_000.0, 0.08, 95_000.0, 0.15, 500.0),
    "t_cell": _LYMPH,
    "t_cell_cd20dim": _LYMPH,
    "nk_cell": (62_000.0, 0.08, 18_000.0, 0.18, 70.0),
    "b_plasmablast": (72_000.0, 0.08, 17_000.0, 0.18, 80.0),
}
_B_SCATTER = (62_000.0, 0.08, 14_000.0, 0.18, 60.0)
_DEBRIS_SCATTER = (12_000.0, 0.5, 5_000.0, 0.6, 40.0)
_DEAD_SCATTER = (38_000.0, 0.15, 20_000.0, 0.30, 150.0)
_FSC_H_RATIO = 0.85

# Per-event truth codes: label, category, B subset, CD19-negative (masked) B cell.
_CODE_ROWS: list[tuple[str, str, str, bool]] = [
    ("debris", "debris", "", False),
    ("doublet", "doublets", "", False),
    ("dead", "dead", "", False),
    ("margin", "margin", "", False),
    ("monocyte", "myeloid", "", False),
    ("granulocyte", "myeloid", "", False),
    ("t_cell", "t_cells", "", False),
    ("t_cell_cd20dim", "t_cells", "", False),
    ("nk_cell", "nk_cells", "", False),
    *[(f"b_{s}", "b_cells", s, False) for s in B_SUBSETS],
    *[(f"b_{s}_cd19neg", "b_cells", s, True) for s in B_SUBSETS[:-1]],
]
CODES: dict[str, int] = {row[0]: code for code, row in enumerate(_CODE_ROWS)}
_LIVE_CELL_LABELS = tuple(label for label, category, _, _ in _CODE_ROWS
                          if category in ("myeloid", "t_cells", "nk_cells", "b_cells"))

#: Forbidden bands of the truth: no visit's true B (CD19+, CD20+) cells/µL, nor its % of
#: lymphocytes, may fall inside any [low, high] (within about 25% of a kinetics threshold).
FORBIDDEN_PER_UL: tuple[tuple[float, float], ...] = ((0.75, 1.33), (7.5, 13.3))
FORBIDDEN_PCT_LYMPHOCYTES: tuple[tuple[float, float], ...] = ((0.075, 0.133), (0.75, 1.33))
#: Drift per visit: staining (per marker, log-uniform) and detector gain (per detector).
STAINING_DRIFT = (0.7, 1.4)
DETECTOR_GAIN_DRIFT = (0.85, 1.18)
_APLASIA_PLASMABLAST_RATE = 1e-4
_EVENTS_PER_SECOND = 1_500.0
_TIMESTEP = 0.01
_FIRST_BASELINE_DATE = _dt.date(2023, 3, 6)


def codes_table() -> pd.DataFrame:
    """Return the per-event truth codes: code, label, category, b_subset, cd19_negative."""
    return pd.DataFrame(
        [(code, *row) for code, row in enumerate(_CODE_ROWS)],
        columns=["code", "label", "category", "b_subset", "cd19_negative"],
    )


# --------------------------------------------------------------------------- design


@dataclass(frozen=True)
class _Near:
    """A visit planted close to (never within 25% of) a kinetics threshold."""
    day: int
    phase: str                            # residual | early_return | return
    per_ul: tuple[float, float]           # range of the true B cells/µL
    lymphocytes_per_ul: tuple[float, float]   # range of its clinical lymphocyte count


@dataclass(frozen=True)
class _Patient:
    patient_id: str
    disease: str
    baseline_day: int
    days: tuple[int, ...]                 # post-infusion visits
    return_day: int | None                # first visit with returning B cells; None: censored
    residual_until: int | None = None     # post-infusion visits up to this day still carry B
    masking: tuple[float, ...] = ()       # CD19-negative share of CD20+ B, first return visits
    return_b_fraction: tuple[float, ...] = (0.06, 0.09, 0.12, 0.14, 0.15)
    near: tuple[_Near, ...] = ()          # visits near a threshold (override the above)


_STANDARD_DAYS = (3, 7, 14, 28, 56, 84, 112, 150, 240, 365)
# Near-threshold visits: the per-µL range and the lymphocyte count are chosen together so
# that the % of lymphocytes stays outside its forbidden bands as well.
_PATIENTS = (
    _Patient("P01", "SLE", -5, _STANDARD_DAYS, return_day=112,
             near=(_Near(84, "early_return", (6.0, 7.2), (1000, 1150)),)),
    _Patient("P02", "SLE", -6, (3, 7, 14, 28, 56, 84, 112, 150, 240, 360), return_day=84,
             masking=(0.60, 0.50, 0.45), return_b_fraction=(0.11, 0.13, 0.15, 0.16, 0.16),
             near=(_Near(56, "early_return", (1.4, 2.0), (750, 900)),)),
    _Patient("P03", "systemic sclerosis", -4, _STANDARD_DAYS, return_day=56, residual_until=3,
             near=(_Near(3, "residual", (1.4, 2.0), (450, 550)),)),
    _Patient("P04", "myositis", -5, (2, 7, 14, 28, 56, 90, 120, 150, 240, 365),
             return_day=150, residual_until=2,
             near=(_Near(2, "residual", (0.5, 0.7), (260, 330)),
                   _Near(150, "return", (13.8, 16.0), (800, 950)))),
    _Patient("P05", "SLE", -7, _STANDARD_DAYS, return_day=None,
             near=(_Near(365, "early_return", (6.0, 7.2), (1000, 1150)),)),
)
#: Post-infusion days (inclusive) whose visits are lysed whole blood after lymphodepletion.
LYMPHOPENIC_DAYS = (7, 28)
#: Clinical lymphocyte count (/µL) of a lymphopenic visit.
LYMPHOPENIC_LYMPHOCYTES_PER_UL = (200.0, 500.0)

# B-cell subset composition (fractions of B cells, order of B_SUBSETS).
_BASELINE_SUBSETS = {
    "SLE": (0.04, 0.58, 0.09, 0.18, 0.08, 0.03),
    "other": (0.03, 0.64, 0.10, 0.17, 0.04, 0.02),
}
# First, second, ... visit with returning B cells: transitional share falls, memory grows.
_RETURN_TRANSITIONAL = (0.26, 0.20, 0.14, 0.09, 0.06)
_RETURN_UNSWITCHED = (0.02, 0.03, 0.05, 0.07, 0.09)
_RETURN_SWITCHED = (0.02, 0.03, 0.05, 0.08, 0.10)
_RETURN_DOUBLE_NEGATIVE = (0.02, 0.02, 0.03, 0.03, 0.04)
_RETURN_PLASMABLAST = (0.01, 0.01, 0.01, 0.015, 0.015)


@dataclass(frozen=True)
class _Visit:
    sample_id: str
    patient: _Patient
    visit: int
    day: int
    phase: str                     # baseline | residual | aplasia | early_return | return
    return_index: int              # 0 for the first visit with returning B cells
    lymphocytes_per_ul: float
    b_fraction: float              # of lymphocytes (aplasia: plasmablasts only, see below)
    subset_fractions: tuple[float, ...]
    masking: float                 # CD19-negative share of CD20+ B cells
    lymphopenic: bool = False      # lysed whole blood after lymphodepletion
    near_threshold: str = ""       # "1/uL" or "10/uL": planted close to that threshold


def _sample_id(patient_id: str, visit: int, day: int) -> str:
    day_text = f"m{-day}" if day < 0 else str(day)
    return f"{patient_id}_v{visit:02d}_d{day_text}"


def _lymphocytes_per_ul(day: int, baseline: float, rng: np.random.Generator,
                        lymphopenic: bool = False) -> float:
    """Clinical lymphocyte count: lymphopenia after lymphodepletion, then recovery.

    A lymphopenic visit maps the same uniform draw onto ``LYMPHOPENIC_LYMPHOCYTES_PER_UL``,
    so the switch changes no other draw of the design.
    """
    if day < 0:
        return baseline
    ranges = ((3, (250, 450)), (7, (300, 500)), (14, (400, 600)), (28, (550, 750)),
              (56, (750, 900)))
    low, high = next((r for last_day, r in ranges if day <= last_day), (850, 1150))
    value = float(rng.uniform(low, high))
    if lymphopenic:
        floor, ceiling = LYMPHOPENIC_LYMPHOCYTES_PER_UL
        value = floor + (value - low) / (high - low) * (ceiling - floor)
    return float(round(value))


def _jittered(fractions: Sequence[float], rng: np.random.Generator,
              spread: float = 0.1) -> tuple[float, ...]:
    values = np.asarray(fractions) * rng.uniform(1 - spread, 1 + spread, len(fractions))
    return tuple(float(v) for v in values / values.sum())


def _return_subsets(k: int, rng: np.random.Generator) -> tuple[float, ...]:
    k = min(k, len(_RETURN_TRANSITIONAL) - 1)
    others = (_RETURN_TRANSITIONAL[k], _RETURN_UNSWITCHED[k], _RETURN_SWITCHED[k],
              _RETURN_DOUBLE_NEGATIVE[k], _RETURN_PLASMABLAST[k])
    naive = 1.0 - sum(others)
    return _jittered((others[0], naive, *others[1:]), rng, spread=0.05)


def _is_lymphopenic_day(day: int) -> bool:
    return LYMPHOPENIC_DAYS[0] <= day <= LYMPHOPENIC_DAYS[1]


def _design(seed: int, lymphopenic: bool = True) -> list[_Visit]:
    """Plan every visit of the cohort (deterministic for ``seed``)."""
    visits = []
    for number, patient in enumerate(_PATIENTS):
        rng = np.random.default_rng([seed, number, 0])
        baseline_lymph = float(round(rng.uniform(1000, 1500)))
        baseline_b = float(rng.uniform(0.07, 0.12))
        kind = "SLE" if patient.disease == "SLE" else "other"
        baseline_subsets = _jittered(_BASELINE_SUBSETS[kind], rng, spread=0.05)
        near_by_day = {near.day: near for near in patient.near}
        return_index = -1
        for visit, day in enumerate((patient.baseline_day, *patient.days)):
            lysed = lymphopenic and day > 0 and _is_lymphopenic_day(day)
            lymph = _lymphocytes_per_ul(day, baseline_lymph, rng, lymphopenic=lysed)
            masking = 0.0
            near = near_by_day.get(day)
            if near is not None:
                # Planted near a threshold: the B cells/µL and the lymphocyte count together.
                lymph = float(round(rng.uniform(*near.lymphocytes_per_ul)))
                per_ul = float(rng.uniform(*near.per_ul))
                phase, b_fraction = near.phase, per_ul / lymph
                if phase == "residual":
                    subsets = baseline_subsets
                elif phase == "early_return":
                    subsets = _return_subsets(0, rng)
                else:
                    return_index += 1
                    subsets = _return_subsets(return_index, rng)
                    if return_index < len(patient.masking):
                        masking = patient.masking[return_index]
            elif day < 0:
                phase, b_fraction, subsets = "baseline", baseline_b, baseline_subsets
            elif patient.residual_until is not None and day <= patient.residual_until:
                # Not yet depleted: lymphodepletion took lymphocytes of every kind alike.
                phase, b_fraction, subsets = "residual", baseline_b, baseline_subsets
                lymph = float(round(rng.uniform(450, 550)))
            elif patient.return_day is None or day < patient.return_day:
                phase, b_fraction, subsets = "aplasia", 0.0, (0, 0, 0, 0, 0, 1.0)
            else:
                phase = "return"
                return_index += 1
                b_fraction = patient.return_b_fraction[
                    min(return_index, len(patient.return_b_fraction) - 1)]
                b_fraction *= float(rng.uniform(0.95, 1.05))
                subsets = _return_subsets(return_index, rng)
                if return_index < len(patient.masking):
                    masking = patient.masking[return_index]
            visits.append(_Visit(
                sample_id=_sample_id(patient.patient_id, visit, day), patient=patient,
                visit=visit, day=day, phase=phase,
                return_index=return_index if phase == "return" else -1,
                lymphocytes_per_ul=lymph, b_fraction=b_fraction,
                subset_fractions=tuple(subsets), masking=masking,
                lymphopenic=lysed,
                near_threshold=("" if near is None else
                                "1/uL" if b_fraction * lymph < np.sqrt(10.0) else "10/uL"),
            ))
    return visits


# --------------------------------------------------------------------------- events


def _allocate(total: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Round ``fractions`` of ``total`` to counts; the last key takes the remainder."""
    counts = {}
    keys = list(fractions)
    for key in keys[:-1]:
        counts[key] = int(round(fractions[key] * total))
    counts[keys[-1]] = total - sum(counts.values())
    return counts


def _largest_remainder(total: int, fractions: Sequence[float]) -> np.ndarray:
    """Split ``total`` in proportion to ``fractions`` (summing to 1) into integer counts."""
    exact = total * np.asarray(fractions, dtype=float)
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


def _in_band(value: float, bands: Sequence[tuple[float, float]]) -> bool:
    return any(low <= value <= high for low, high in bands)


def _kinetics_class(per_ul: float) -> int:
    return 0 if per_ul < 1.0 else (1 if per_ul < 10.0 else 2)


def _b_split(visit: _Visit, n_b: int) -> tuple[np.ndarray, int]:
    """B events per subset (rounded, not sampled) and how many CD20+ B cells lose CD19."""
    subsets = _largest_remainder(n_b, visit.subset_fractions)
    return subsets, int(round(visit.masking * (n_b - int(subsets[-1]))))


def _safe_b_count(visit: _Visit, target: float, n_lymph: int) -> int:
    """The B event count nearest ``target`` whose truth avoids every forbidden band.

    Counts of the target's kinetics class (below 1, 1-10, at least 10 /µL) come first; a
    file too small to resolve that class falls back to the nearest safe count (0 is).
    """
    def safe(n_b: int) -> bool:
        subsets, masked = _b_split(visit, n_b)
        for n in (n_b, n_b - masked, n_b - int(subsets[-1])):
            pct = 100.0 * n / n_lymph
            if (_in_band(pct, FORBIDDEN_PCT_LYMPHOCYTES)
                    or _in_band(pct / 100.0 * visit.lymphocytes_per_ul, FORBIDDEN_PER_UL)):
                return False
        return True

    if n_lymph == 0:
        return 0
    start = min(int(round(target)), n_lymph)
    wanted = _kinetics_class(target / n_lymph * visit.lymphocytes_per_ul) if n_lymph else 0
    candidates = sorted(range(n_lymph + 1), key=lambda n: (abs(n - start), n))
    fallback = None
    for n_b in candidates:
        if not safe(n_b):
            continue
        if _kinetics_class(n_b / n_lymph * visit.lymphocytes_per_ul) == wanted:
            return n_b
        if fallback is None:
            fallback = n_b
        if abs(n_b - start) > max(10, start):
            break
    return fallback if fallback is not None else 0


def _plant_labels(visit: _Visit, n_events: int, rng: np.random.Generator) -> dict[str, int]:
    """Number of events of every label for one file."""
    artefacts = {
        "debris": rng.uniform(0.06, 0.12),
        "doublet": rng.uniform(0.03, 0.05),
        "dead": rng.uniform(0.03, 0.07),
        "margin": rng.uniform(0.002, 0.004),
    }
    if visit.lymphopenic:
        # Lysed whole blood after lymphodepletion: granulocytes dominate, few lymphocytes;
        # the artefacts share what is left in their usual proportions.
        granulocytes = rng.uniform(0.56, 0.64)
        monocytes = rng.uniform(0.08, 0.11)
        lymphocytes = rng.uniform(0.09, 0.14)
        rest = 1.0 - granulocytes - monocytes - lymphocytes
        total = sum(artefacts.values())
        shares = {key: rest * value / total for key, value in artefacts.items()}
        counts = _allocate(n_events, {**shares, "granulocyte": granulocytes,
                                      "monocyte": monocytes, "lymphocytes": lymphocytes})
    else:
        counts = _allocate(n_events, {**artefacts, "myeloid": rng.uniform(0.15, 0.22),
                                      "lymphocytes": 0.0})
        myeloid = counts.pop("myeloid")
        counts["monocyte"] = int(round(0.75 * myeloid))
        counts["granulocyte"] = myeloid - counts["monocyte"]
    n_lymph = counts.pop("lymphocytes")

    if visit.phase == "aplasia":
        # Long-lived plasma cells/plasmablasts escape CD19 CAR-T; keep them a handful.
        n_b = int(np.floor(_APLASIA_PLASMABLAST_RATE * n_lymph))
    else:
        n_b = _safe_b_count(visit, visit.b_fraction * n_lymph, n_lymph)
    n_t = int(round(rng.uniform(0.76, 0.80) * (n_lymph - n_b)))
    counts["nk_cell"] = n_lymph - n_b - n_t
    counts["t_cell_cd20dim"] = int(round(rng.uniform(0.03, 0.05) * n_t))
    counts["t_cell"] = n_t - counts["t_cell_cd20dim"]

    # Rounded, not sampled: the planted composition is the design's even for small files.
    subsets, n_masked = _b_split(visit, n_b)
    for subset, n in zip(B_SUBSETS, subsets, strict=True):
        counts[f"b_{subset}"] = int(n)
    # CD19 masking: a share of the CD20+ B cells (not plasmablasts) lose CD19.
    masked = np.bincount(rng.choice(np.repeat(np.arange(5), subsets[:-1]), n_masked,
                                    replace=False), minlength=5) if n_masked else np.zeros(5)
    for subset, n in zip(B_SUBSETS[:-1], masked, strict=True):
        counts[f"b_{subset}"] -= int(n)
        counts[f"b_{subset}_cd19neg"] = int(n)
    return counts


def _draw_level(level: str | _Expr, n: int, rng: np.random.Generator,
                deviate: np.ndarray | None = None) -> np.ndarray:
    """Linear signals of ``n`` cells at ``level``; ``deviate``: their standard normals."""
    if isinstance(level, str) and level == "neg":
        return np.zeros(n)
    median, sigma = ((level.median, level.sigma) if isinstance(level, _Expr)
                     else (LEVELS[level], _POSITIVE_SIGMA))
    if deviate is None:
        return median * rng.lognormal(0.0, sigma, n)
    return median * np.exp(sigma * deviate)


# Low-SSC granulocytes (hypogranular, left-shifted after lymphodepletion and G-CSF): a small
# share whose scatter reaches into the lymphocyte gate's edge.
_LOW_SSC_GRANULOCYTE_SHARE = 0.06
_LOW_SSC_GRANULOCYTE_SCATTER = (80_000.0, 0.12, 32_000.0, 0.35, 300.0)


def _cells(labels: np.ndarray, rng: np.random.Generator,
           phenotypes: Mapping[str, _Phenotype] | None = None) -> tuple[np.ndarray, ...]:
    """True fluorochrome signals, FSC-A, SSC-A and autofluorescence of live cells.

    ``phenotypes`` replaces the demo's phenotype table (``demo.simulate_visit``'s real-blood
    shapes); None: the demo's.
    """
    phenotypes = _PHENOTYPES if phenotypes is None else phenotypes
    n = len(labels)
    signal = np.zeros((n, len(_DETECTORS)))
    fsc = np.empty(n)
    ssc = np.empty(n)
    autofluorescence = np.empty(n)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        correlated = _CORRELATED.get(str(label), ())
        shared = rng.standard_normal(len(rows)) if correlated else None
        for marker, level in phenotypes[label].items():
            column = _MARKER_INDEX[marker]
            if not isinstance(level, tuple):
                deviate = None
                if marker in correlated:
                    deviate = (np.sqrt(_B_CD24_CD38_RHO) * shared
                               + np.sqrt(1 - _B_CD24_CD38_RHO)
                               * rng.standard_normal(len(rows)))
                signal[rows, column] = _draw_level(level, len(rows), rng, deviate)
                continue
            choice = rng.choice(len(level), len(rows), p=[p for _, p in level])
            for i, (name, _) in enumerate(level):
                signal[rows[choice == i], column] = _draw_level(name, int((choice == i).sum()),
                                                                rng)
        params = _SCATTER.get(label, _B_SCATTER)
        fsc[rows], ssc[rows], autofluorescence[rows] = _scatter(params, len(rows), rng)
        if label == "granulocyte":
            low = rows[rng.random(len(rows)) < _LOW_SSC_GRANULOCYTE_SHARE]
            fsc[low], ssc[low], autofluorescence[low] = _scatter(
                _LOW_SSC_GRANULOCYTE_SCATTER, len(low), rng)
    return signal, fsc, ssc, autofluorescence


def _scatter(params: tuple[float, ...], n: int,
             rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    fsc_median, fsc_sigma, ssc_median, ssc_sigma, af = params
    return (fsc_median * rng.lognormal(0.0, fsc_sigma, n),
            ssc_median * rng.lognormal(0.0, ssc_sigma, n),
            af * rng.lognormal(0.0, 0.3, n))


@dataclass
class _SimulatedFile:
    data: np.ndarray               # float32, events x CHANNELS
    codes: np.ndarray              # int8 per event
    anomaly_events: int
    anomaly_time: tuple[float, float] | None
    staining: np.ndarray           # per marker (detector order): factor on the true signal
    gain: np.ndarray               # per detector: factor on the detected value
    spillover: np.ndarray          # the file's $SPILLOVER: diag(1/gain) @ SPILLOVER @ diag(gain)


def _drift(seed: int, number: int, enabled: bool) -> tuple[np.ndarray, np.ndarray]:
    """Staining factors (per marker) and detector gains of one visit, log-uniform."""
    n = len(_DETECTORS)
    if not enabled:
        return np.ones(n), np.ones(n)
    rng = np.random.default_rng([seed, 3000 + number])
    staining = np.exp(rng.uniform(*np.log(STAINING_DRIFT), n))
    gain = np.exp(rng.uniform(*np.log(DETECTOR_GAIN_DRIFT), n))
    return staining, gain


def _simulate_events(visit: _Visit, n_events: int, rng: np.random.Generator,
                     staining: np.ndarray | None = None,
                     gain: np.ndarray | None = None,
                     phenotypes: Mapping[str, _Phenotype] | None = None) -> _SimulatedFile:
    """All events of one file, in acquisition order, with their truth codes.

    ``staining`` multiplies every event's true fluorochrome signal (per marker) and ``gain``
    every detected value (per detector); both default to no drift. ``phenotypes`` replaces
    the demo's phenotype table.
    """
    staining = np.ones(len(_DETECTORS)) if staining is None else np.asarray(staining, float)
    gain = np.ones(len(_DETECTORS)) if gain is None else np.asarray(gain, float)
    counts = _plant_labels(visit, n_events, rng)
    live_labels = np.repeat(np.array(_LIVE_CELL_LABELS),
                            [counts.get(label, 0) for label in _LIVE_CELL_LABELS])
    n_doublets, n_dead = counts["doublet"], counts["dead"]
    n_debris, n_margin = counts["debris"], counts["margin"]

    signal, fsc, ssc, autofl = _cells(live_labels, rng, phenotypes)
    fsc_h = fsc * _FSC_H_RATIO * rng.lognormal(0.0, 0.025, len(fsc))
    codes = np.array([CODES[label] for label in live_labels], dtype=np.int8)
    parts = [(signal, fsc, fsc_h, ssc, autofl, codes)]

    # Doublets: two cells of this file's live composition in one event.
    pool = live_labels if len(live_labels) else np.array(["t_cell"])
    first = _cells(rng.choice(pool, n_doublets), rng, phenotypes)
    second = _cells(rng.choice(pool, n_doublets), rng, phenotypes)
    larger_h = np.maximum(first[1], second[1]) * _FSC_H_RATIO
    parts.append((first[0] + second[0], first[1] + second[1],
                  larger_h * rng.uniform(1.0, 1.25, n_doublets), first[2] + second[2],
                  first[3] + second[3], np.full(n_doublets, CODES["doublet"], np.int8)))

    # Dead cells: any live type, dimmer markers, bright viability dye, smaller and grainier.
    dead_signal = 0.7 * _cells(rng.choice(pool, n_dead), rng, phenotypes)[0]
    dead_signal[:, _MARKER_INDEX["Live/Dead"]] = _draw_level("hi", n_dead, rng)
    dead_fsc, dead_ssc, dead_af = _scatter(_DEAD_SCATTER, n_dead, rng)
    parts.append((dead_signal, dead_fsc,
                  dead_fsc * _FSC_H_RATIO * rng.lognormal(0.0, 0.025, n_dead), dead_ssc,
                  dead_af, np.full(n_dead, CODES["dead"], np.int8)))

    # Debris: small, no specific staining, viability dye anywhere from dull to bright.
    debris_signal = np.zeros((n_debris, len(_DETECTORS)))
    debris_signal[:, _MARKER_INDEX["Live/Dead"]] = 2_000.0 * rng.lognormal(0.0, 1.2, n_debris)
    debris_fsc, debris_ssc, debris_af = _scatter(_DEBRIS_SCATTER, n_debris, rng)
    parts.append((debris_signal, debris_fsc,
                  debris_fsc * _FSC_H_RATIO * rng.lognormal(0.0, 0.025, n_debris),
                  debris_ssc, debris_af, np.full(n_debris, CODES["debris"], np.int8)))

    # Margin events: cells with a saturated detector (set after the detector model below).
    margin_labels = rng.choice(pool, n_margin)
    margin = _cells(margin_labels, rng, phenotypes)
    parts.append((margin[0], margin[1], margin[1] * _FSC_H_RATIO, margin[2], margin[3],
                  np.full(n_margin, CODES["margin"], np.int8)))
    # What each event is as a cell (a margin event's own cell type), for saturation below.
    own_codes = np.concatenate([*(p[-1] for p in parts[:-1]),
                                np.array([CODES[label] for label in margin_labels], np.int8)])

    signal, fsc, fsc_h, ssc, autofl, codes = (np.concatenate(p) for p in zip(*parts,
                                                                            strict=True))
    order = rng.permutation(len(codes))
    signal, fsc, fsc_h, ssc, autofl, codes, own_codes = (
        a[order] for a in (signal, fsc, fsc_h, ssc, autofl, codes, own_codes))
    n = len(codes)

    # Detector model: staining drift, spillover, autofluorescence, the detectors' gain, then
    # photon and electronic noise. With gain g the detected value is (signal @ S) * g =
    # signal @ S @ diag(g), so the file's matrix diag(1/g) @ S @ diag(g) compensates it to
    # signal * g.
    detected = ((signal * staining) @ SPILLOVER
                + autofl[:, None] * _AUTOFLUORESCENCE_WEIGHTS) * gain
    noise_sd = np.sqrt(_NOISE_BASE_SD ** 2 + _NOISE_PER_SIGNAL * np.maximum(detected, 0.0))
    detected = detected + rng.normal(0.0, 1.0, detected.shape) * noise_sd

    # Acquisition: Poisson arrivals; an anomaly is a fast burst with shifted signals.
    gaps = rng.exponential(1.0 / (_EVENTS_PER_SECOND * _TIMESTEP), n)
    scatter = np.column_stack([fsc, fsc_h, ssc])
    anomaly_events, anomaly_window = 0, None
    if rng.random() < 0.25:
        anomaly_events = max(1, int(round(0.03 * n)))
        start = int(rng.integers(int(0.2 * n), int(0.75 * n)))
        window = slice(start, start + anomaly_events)
        gaps[window] /= 5.0
        detected[window] *= 0.5
        scatter[window] *= 0.9
        anomaly_window = window
    time = np.cumsum(gaps)

    data = np.column_stack([scatter, detected, time])
    margin_rows = np.flatnonzero(codes == CODES["margin"])
    # Saturate FSC-A (with FSC-H), SSC-A, or one fluorescence detector.
    which = rng.integers(0, 2 + len(_DETECTORS), len(margin_rows))
    data[margin_rows[which == 0], 0] = MARGIN_VALUE
    data[margin_rows[which == 0], 1] = np.minimum(
        data[margin_rows[which == 0], 1] * 2.0, MARGIN_VALUE)
    data[margin_rows[which == 1], 2] = MARGIN_VALUE
    # A fluorescence detector saturates on a cell that is bright in it: the cell's brightest
    # detector. Such a cell stays what it is (QC counts fluorescence saturation but keeps
    # the event, as bright B cells and plasmablasts saturate on older instruments).
    fluorescent = margin_rows[which >= 2]
    detectors = slice(_N_SCATTER, _N_SCATTER + len(_DETECTORS))
    brightest = np.argmax(data[fluorescent, detectors], axis=1)
    data[fluorescent, _N_SCATTER + brightest] = MARGIN_VALUE
    codes[fluorescent] = own_codes[fluorescent]
    data[:, :-1] = np.minimum(data[:, :-1], MARGIN_VALUE)
    # Saturated scatter, planted or by chance, makes a margin event (truth follows the file).
    codes[(data[:, :_N_SCATTER] >= MARGIN_VALUE).any(axis=1)] = CODES["margin"]

    data = data.astype(np.float32)
    anomaly_time = None
    if anomaly_window is not None:
        anomaly_time = (float(data[anomaly_window.start, -1]),
                        float(data[anomaly_window.stop - 1, -1]))
    return _SimulatedFile(data=data, codes=codes, anomaly_events=anomaly_events,
                          anomaly_time=anomaly_time, staining=staining, gain=gain,
                          spillover=np.diag(1.0 / gain) @ SPILLOVER @ np.diag(gain))


# --------------------------------------------------------------------------- truth


def _truth_row(visit: _Visit, simulated: _SimulatedFile) -> dict[str, object]:
    table = codes_table()
    counts = np.bincount(simulated.codes.astype(np.int64), minlength=len(table))
    by_category = {c: int(counts[table["category"] == c].sum())
                   for c in ("debris", "doublets", "dead", "margin", "myeloid", "t_cells",
                             "nk_cells", "b_cells")}
    b_cells = by_category["b_cells"]
    is_b = table["category"] == "b_cells"
    cd19neg = int(counts[is_b & table["cd19_negative"]].sum())
    plasmablasts = int(counts[table["b_subset"] == "plasmablast"].sum())
    lymphocytes = by_category["t_cells"] + by_category["nk_cells"] + b_cells
    row: dict[str, object] = {
        "sample_id": visit.sample_id, "patient_id": visit.patient.patient_id,
        "day": visit.day, "phase": visit.phase, "events_total": int(len(simulated.codes)),
        **by_category,
        "t_cells_cd20dim": int(counts[CODES["t_cell_cd20dim"]]),
        "lymphocytes": lymphocytes,
        "cd19_pos": b_cells - cd19neg,
        "cd20_pos": b_cells - plasmablasts,
        "cd19neg_cd20pos": cd19neg,
    }
    for subset in B_SUBSETS:
        row[f"{subset}_count"] = int(counts[table["b_subset"] == subset].sum())
    per_lymph = 100.0 / lymphocytes if lymphocytes else float("nan")
    row["b_pct_lymphocytes"] = b_cells * per_lymph
    row["cd19_pct_lymphocytes"] = row["cd19_pos"] * per_lymph
    row["cd20_pct_lymphocytes"] = row["cd20_pos"] * per_lymph
    for subset in B_SUBSETS:
        row[f"{subset}_pct_b"] = (100.0 * row[f"{subset}_count"] / b_cells if b_cells
                                  else float("nan"))
    row["lymphocytes_per_ul"] = visit.lymphocytes_per_ul
    for measure in ("b", "cd19", "cd20"):
        row[f"{measure}_per_ul"] = (row[f"{measure}_pct_lymphocytes"] / 100.0
                                    * visit.lymphocytes_per_ul)
    row["anomaly_events"] = simulated.anomaly_events
    row["anomaly_time_start"] = simulated.anomaly_time[0] if simulated.anomaly_time else None
    row["anomaly_time_end"] = simulated.anomaly_time[1] if simulated.anomaly_time else None
    row["monocytes"] = int(counts[CODES["monocyte"]])
    row["granulocytes"] = int(counts[CODES["granulocyte"]])
    row["lymphopenic"] = visit.lymphopenic
    row["near_threshold"] = visit.near_threshold
    fluorescence = simulated.data[:, _N_SCATTER:_N_SCATTER + len(_DETECTORS)]
    row["fluorescence_saturated"] = int((fluorescence >= MARGIN_VALUE).any(axis=1).sum())
    return row


def _check_robust(row: Mapping[str, object]) -> None:
    """Fail when a visit's truth lands near a kinetics threshold (a design error)."""
    for measure in ("b", "cd19", "cd20"):
        for value, bands, unit in (
            (row[f"{measure}_per_ul"], FORBIDDEN_PER_UL, "/uL"),
            (row[f"{measure}_pct_lymphocytes"], FORBIDDEN_PCT_LYMPHOCYTES, "% of lymphocytes"),
        ):
            for low, high in bands:
                if low <= float(value) <= high:
                    raise RuntimeError(
                        f"simulator design error: {row['sample_id']} has {measure} = "
                        f"{value:.3g}{unit}, inside the forbidden band [{low}, {high}]")


def kinetics_days(days: Sequence[int], per_ul: Sequence[float], *, depleted_below: float = 1.0,
                  reconstituted_at: float = 10.0) -> tuple[int | None, int | None]:
    """Depletion and reconstitution days of one patient's post-infusion visits.

    Parameters
    ----------
    days, per_ul
        Visit days (sorted, baseline included or not) and cells/µL at each.
    depleted_below
        Depleted: the first post-infusion visit (day > 0) below this value.
    reconstituted_at
        Reconstituted: the first of two consecutive visits after depletion at or above it.

    Returns
    -------
    (depletion_day, reconstitution_day); None where the event did not happen (a last
    visit at or above the threshold alone is not a confirmed reconstitution).
    """
    post = [(d, v) for d, v in zip(days, per_ul, strict=True) if d > 0]
    depleted_at = next((i for i, (_, v) in enumerate(post) if v < depleted_below), None)
    if depleted_at is None:
        return None, None
    after = post[depleted_at + 1:]
    for (day, value), (_, following) in zip(after, after[1:], strict=False):
        if value >= reconstituted_at and following >= reconstituted_at:
            return post[depleted_at][0], day
    return post[depleted_at][0], None


def _truth_patients(truth: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for patient in _PATIENTS:
        visits = truth[truth["patient_id"] == patient.patient_id].sort_values("day")
        row: dict[str, object] = {"patient_id": patient.patient_id,
                                  "disease": patient.disease}
        for measure in ("b", "cd19", "cd20"):
            depletion, reconstitution = kinetics_days(
                visits["day"].tolist(), visits[f"{measure}_per_ul"].tolist())
            prefix = "" if measure == "b" else f"{measure}_"
            row[f"{prefix}depletion_day"] = depletion
            row[f"{prefix}reconstitution_day"] = reconstitution
            row[f"{prefix}censored"] = depletion is not None and reconstitution is None
        row["last_day"] = int(visits["day"].max())
        row["masking"] = bool(patient.masking)
        rows.append(row)
    frame = pd.DataFrame(rows)
    day_columns = [c for c in frame.columns if c.endswith("_day") and c != "last_day"]
    frame[day_columns] = frame[day_columns].astype("Int64")
    first = ["patient_id", "disease", "depletion_day", "reconstitution_day", "censored",
             "last_day", "masking"]
    return frame[first + [c for c in frame.columns if c not in first]]


# --------------------------------------------------------------------------- output


def _batch(day: int) -> str:
    return "batch1" if day <= 28 else ("batch2" if day <= 150 else "batch3")


def _write_fcs(path: Path, visit: _Visit, simulated: _SimulatedFile) -> None:
    import flowio

    patient_number = int(visit.patient.patient_id[1:])
    infusion = _FIRST_BASELINE_DATE + _dt.timedelta(days=7 * patient_number)
    date = infusion + _dt.timedelta(days=visit.day)
    seconds = float(simulated.data[-1, -1]) * _TIMESTEP
    begin = _dt.datetime.combine(date, _dt.time(10, 0, 0))
    end = begin + _dt.timedelta(seconds=round(seconds))
    spill_values = ",".join(f"{v:.6g}" for v in simulated.spillover.ravel())
    metadata = {
        "$CYT": "LSRFortessa (bcellmap simulator)",
        "$DATE": date.strftime("%d-%b-%Y").upper(),
        "$BTIM": begin.strftime("%H:%M:%S"),
        "$ETIM": end.strftime("%H:%M:%S"),
        "$TIMESTEP": f"{_TIMESTEP:g}",
        "$SPILLOVER": f"{len(_DETECTORS)},{','.join(_DETECTORS)},{spill_values}",
        "$SRC": visit.sample_id,
        "$FIL": path.name,
        "$SYS": "bcellmap simulate",
        **{f"$P{i + 1}R": str(CHANNEL_RANGE) for i in range(len(CHANNELS))},
    }
    events = array("f")
    events.frombytes(np.ascontiguousarray(simulated.data, dtype="<f4").tobytes())
    with open(path, "wb") as handle:
        flowio.create_fcs(handle, events, list(CHANNELS),
                          opt_channel_names=list(CHANNEL_MARKERS), metadata_dict=metadata)


# scRNA visits of two patients: baseline, aplasia (day 28), and the first two visits after
# B cells returned in flow, so that the scRNA kinetics can confirm reconstitution too. Cells
# per visit: enough lymphocytes (about 2,900 of 4,000 cells) that three events, the limit of
# quantification, resolve the 1 cell/µL depletion threshold at the demo's lymphopenia.
SCRNA_PATIENTS = ("P01", "P03")
PRESET_SCRNA_CELLS: dict[str, int] = {"fixture": 4_000, "full": 10_000}


def _write_scrna_patient(folder: Path, visits: pd.DataFrame, *, patient: str, number: int,
                         seed: int, cells: int, returned: int, disease: str
                         ) -> tuple[list[dict[str, object]], pd.DataFrame]:
    """One patient's scRNA count files (its own seed); its sheet rows and truth summary."""
    from .simulate_scrna import simulate_scrna_visits

    after = visits.loc[visits["day"] >= returned, "day"].tolist()[:2]
    days = [int(visits["day"].iloc[0]), 28, *after]
    subfolder = folder / "scrna" / patient
    rows: list[dict[str, object]] = []
    for row in simulate_scrna_visits(
        subfolder, patients=(patient,), seed=seed + 7919 * (number + 1),
        cells_per_sample=cells, days=days, reconstitution_days={patient: returned},
        write_10x_h5=number == 0,
        # Real CITE-seq panels carry more antibodies than the B-cell ones ingest keeps;
        # they matter for the per-cell CLR that the cohort protein gates work on.
        extended_adt_panel=True,
        b_share_of_lymphocytes={
            (patient, int(day)): share / 100 for day, share
            in zip(visits["day"], visits["b_pct_lymphocytes"], strict=True)},
    ):
        flow_visit = visits[visits["day"] == row["day"]].iloc[0]
        row["path"] = f"scrna/{patient}/{row['path']}"
        # The clinical count is one per visit, shared by both modalities.
        row["lymphocytes_per_ul"] = flow_visit["lymphocytes_per_ul"]
        row.update(disease=disease, batch="", panel="")
        rows.append(row)
    return rows, pd.read_csv(subfolder / "truth_scrna_samples.tsv", sep="\t")


def _write_scrna_visits(folder: Path, truth: pd.DataFrame, *, seed: int, cells: int,
                        workers: int = 1) -> list[dict[str, object]]:
    """Simulate scRNA count files for some flow visits; return their sample-sheet rows.

    Each patient has a seed of its own, so with ``workers > 1`` the patients are simulated
    in parallel processes and the files are the same.
    """
    patients = _truth_patients(truth).set_index("patient_id")
    tasks = [dict(visits=truth[truth["patient_id"] == patient].sort_values("day"),
                  patient=patient, number=number, seed=seed, cells=cells,
                  returned=int(patients.loc[patient, "reconstitution_day"]),
                  disease=str(patients.loc[patient, "disease"]))
             for number, patient in enumerate(SCRNA_PATIENTS)]
    if workers > 1:
        import multiprocessing
        import sys
        from concurrent.futures import ProcessPoolExecutor

        # fork on Linux: the workers start with the simulator already imported (spawn, the
        # default elsewhere, imports it again).
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks)),
                                 mp_context=context) as pool:
            results = list(pool.map(_scrna_task, [(folder, task) for task in tasks]))
    else:
        results = [_write_scrna_patient(folder, **task) for task in tasks]
    rows = [row for patient_rows, _ in results for row in patient_rows]
    pd.concat([summary for _, summary in results]).to_csv(
        folder / "truth_scrna_samples.tsv", sep="\t", index=False)
    return rows


def _scrna_task(args: tuple[Path, dict]) -> tuple[list[dict[str, object]], pd.DataFrame]:
    folder, task = args
    return _write_scrna_patient(folder, **task)


def _write_cohort(folder: Path, *, seed: int, events_per_file: int,
                  scrna_cells: int = 0, drift: bool = True, lymphopenic: bool = True,
                  workers: int = 1) -> None:
    visits = _design(seed, lymphopenic=lymphopenic)
    (folder / "truth_events").mkdir()
    sheet_rows, truth_rows, drift_rows = [], [], []
    for number, visit in enumerate(visits):
        rng = np.random.default_rng([seed, 1000 + number])
        staining, gain = _drift(seed, number, drift)
        simulated = _simulate_events(visit, events_per_file, rng, staining=staining, gain=gain)
        truth = _truth_row(visit, simulated)
        _check_robust(truth)
        _write_fcs(folder / f"{visit.sample_id}.fcs", visit, simulated)
        np.save(folder / "truth_events" / f"{visit.sample_id}.npy", simulated.codes)
        truth_rows.append(truth)
        drift_rows += [{"sample_id": visit.sample_id, "marker": marker, "detector": detector,
                        "staining_factor": float(f), "detector_gain": float(g)}
                       for marker, detector, f, g in zip(_DETECTOR_MARKERS, _DETECTORS,
                                                         staining, gain, strict=True)]
        sheet_rows.append({
            "sample_id": visit.sample_id, "patient_id": visit.patient.patient_id,
            "day": visit.day, "modality": "flow", "path": f"{visit.sample_id}.fcs",
            "lymphocytes_per_ul": int(visit.lymphocytes_per_ul),
            "disease": visit.patient.disease, "batch": _batch(visit.day), "panel": "",
        })
    truth = pd.DataFrame(truth_rows)
    if scrna_cells:
        sheet_rows += _write_scrna_visits(folder, truth, seed=seed, cells=scrna_cells,
                                          workers=workers)
    codes_table().to_csv(folder / "truth_codes.tsv", sep="\t", index=False)
    truth.to_csv(folder / "truth_samples.tsv", sep="\t", index=False)
    pd.DataFrame(drift_rows).to_csv(folder / "truth_drift.tsv", sep="\t", index=False)
    _truth_patients(truth).to_csv(folder / "truth_patients.tsv", sep="\t", index=False)
    # The sample sheet last: its presence marks a complete cohort.
    pd.DataFrame(sheet_rows).to_csv(folder / "samples.tsv", sep="\t", index=False)


def simulate_cohort(outdir: str | os.PathLike, *, preset: str = "fixture",
                    seed: int = DEFAULT_SEED, events_per_file: int | None = None,
                    scrna: bool = True, drift: bool = True,
                    lymphopenic: bool = True, workers: int = 1) -> Path:
    """Write the simulated demo cohort into ``outdir``.

    The cohort is written into a temporary folder beside ``outdir`` first. When ``outdir``
    does not exist or is empty, that folder is renamed onto it in one step; otherwise the
    existing ``samples.tsv`` is removed first and the new files are moved in one by one
    with the sample sheet last, so an interrupted run never leaves a sample sheet that
    points at a half-written cohort.

    Parameters
    ----------
    outdir
        Output folder (created when missing).
    preset
        ``fixture`` (20,000 events per file) or ``full`` (200,000).
    seed
        Seed of every random draw; the same seed writes byte-identical files.
    events_per_file
        Events per FCS file, overriding the preset (at least 1,000).
    scrna
        Also write scRNA count files (10x ``.h5`` with CITE-seq for the first, ``.h5ad`` for
        the rest) for four visits each of patients P01 and P03, with per-cell truth
        (``scrna/{patient}/*.truth.tsv``, ``truth_scrna_samples.tsv``).
    drift
        Per-visit staining and detector-gain drift (``truth_drift.tsv`` records the factors;
        without drift they are all 1).
    lymphopenic
        Post-infusion visits on days ``LYMPHOPENIC_DAYS`` are lysed whole blood after
        lymphodepletion (few lymphocytes, granulocytes dominating, 200-500 lymphocytes/µL);
        without it they have the composition of every other visit.
    workers
        Processes for the scRNA patients (each has its own seed: the files are the same for
        any number).

    Returns
    -------
    The path of the written ``samples.tsv``.

    Raises
    ------
    InputError
        For an unknown preset or too few events per file.
    """
    outdir = Path(outdir)
    if preset not in PRESET_EVENTS:
        raise InputError(f"unknown demo preset {preset!r} (expected one of "
                         f"{', '.join(PRESET_EVENTS)})", path=outdir)
    n_events = PRESET_EVENTS[preset] if events_per_file is None else int(events_per_file)
    if n_events < MIN_EVENTS_PER_FILE:
        raise InputError(f"events per file must be at least {MIN_EVENTS_PER_FILE}, "
                         f"got {n_events}", path=outdir)
    parent = outdir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", suffix=".tmp", dir=parent))
    try:
        _write_cohort(staging, seed=seed, events_per_file=n_events,
                      scrna_cells=PRESET_SCRNA_CELLS[preset] if scrna else 0,
                      drift=drift, lymphopenic=lymphopenic, workers=workers)
        if outdir.is_dir() and not any(outdir.iterdir()):
            outdir.rmdir()
        if not outdir.exists():
            os.replace(staging, outdir)
        else:
            (outdir / "samples.tsv").unlink(missing_ok=True)
            (outdir / "truth_events").mkdir(exist_ok=True)
            names = sorted(p.relative_to(staging) for p in staging.rglob("*") if p.is_file())
            names.sort(key=lambda name: name == Path("samples.tsv"))
            for name in names:
                os.replace(staging / name, outdir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("simulated %d flow samples of %d events into %s", len(_design(seed)), n_events,
             outdir)
    return outdir / "samples.tsv"
