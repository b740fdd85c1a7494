"""Which of a sample's values rest on a gate that cannot be stood behind.

A gate judged ``unreliable`` or ``nonspecific`` (:mod:`bcellmap.flow.references`) makes
every value that rests on it *not evaluable*: the counts table holds NA for it, never a
count and never 0, and says why (``not_evaluable``, ``unreliable_gates``). What rests on
what:

================================  ============================================================
value                             gates it rests on (where the panel has the marker)
================================  ============================================================
``t_cells``                       CD3
``b_cells``                       CD3, CD19, CD20 (B cells are CD3- and CD19+ or CD20+)
``cd19_pos``                      CD3, CD19
``cd20_pos``                      CD3, CD20
``cd19neg_cd20pos``               CD3, CD19, CD20
``nk_cells``, ``lymphocytes``     CD3, the NK markers (CD56, CD16, CD45, CD14), and at least
                                  one reliable B-lineage marker: with CD19 unreliable and CD20
                                  sound, lymphocytes are T + CD20+ B + NK cells (the CD19+
                                  CD20- plasmablasts, about 1% of B cells, are then left out)
``{subset}_count``                ``b_cells``' gates and the gates of the subset's rule (``pos``
                                  or ``hi`` level); and any earlier rule of the table, not
                                  evaluable, whose events could fall to this one (rules are
                                  applied first match first)
================================  ============================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import pandas as pd

from ..contracts import NOT_RELIABLE, SUBSETS
from ..io.readers import cell_text
from .subsets import SubsetRule

__all__ = ["not_evaluable", "reliable_thresholds", "unreliable_gates"]

_LINEAGE = ("CD19", "CD20")
_NK_MARKERS = ("CD56", "CD16", "CD45", "CD14")
#: Levels that exclude each other on one marker (``hi`` gates sit at or above ``pos``).
_EXCLUSIVE = {("neg", "pos"), ("neg", "hi"), ("lo", "hi")}


def unreliable_gates(gates: pd.DataFrame | None) -> dict[tuple[str, str], str]:
    """``{(marker, level): "reliability: detail"}`` of a sample's gates nothing may rest on."""
    if gates is None or gates.empty or "reliability" not in gates.columns:
        return {}
    out = {}
    for row in gates.itertuples(index=False):
        reliability = cell_text(getattr(row, "reliability", ""))
        if reliability in NOT_RELIABLE:
            detail = cell_text(getattr(row, "reliability_detail", ""))
            out[(str(row.marker), str(row.level))] = f"{reliability}: {detail}".rstrip(": ")
    return out


def reliable_thresholds(thresholds: Mapping[str, Mapping[str, float]],
                        unreliable: Iterable[tuple[str, str]]) -> dict[str, dict[str, float]]:
    """The sample's gates without the unreliable ones (their markers count as not gated)."""
    dropped = {marker for marker, level in unreliable if level == "pos"}
    return {m: dict(levels) for m, levels in thresholds.items() if m not in dropped}


def _compatible(first: SubsetRule, later: SubsetRule) -> bool:
    """Whether an event could match both rules (no shared marker at exclusive levels)."""
    for marker, level in first.levels.items():
        other = later.levels.get(marker)
        if other is not None and ((level, other) in _EXCLUSIVE or (other, level) in _EXCLUSIVE):
            return False
    return True


def not_evaluable(present: Iterable[str], unreliable: Mapping[tuple[str, str], str],
                  rules: Sequence[SubsetRule], not_called: Iterable[str]) -> dict[str, str]:
    """``{counts column: reason}`` of the values that rest on an unreliable gate.

    Parameters
    ----------
    present
        The markers of the panel (canonical names).
    unreliable
        :func:`unreliable_gates` of the sample.
    rules
        The subset rule table, in precedence order.
    not_called
        Rules the panel cannot evaluate (missing marker or gate): not called, not "not
        evaluable".
    """
    present = set(present)
    bad = {marker for marker, level in unreliable if level == "pos"}

    def reason(markers: Iterable[str], level: str = "pos") -> str:
        return "; ".join(f"{m} gate {unreliable[(m, level)]}" for m in sorted(set(markers))
                         if (m, level) in unreliable)

    out: dict[str, str] = {}
    resting = {
        "t_cells": {"CD3"},
        "b_cells": {"CD3", *_LINEAGE},
        "cd19_pos": {"CD3", "CD19"},
        "cd20_pos": {"CD3", "CD20"},
        "cd19neg_cd20pos": {"CD3", *_LINEAGE},
    }
    for column, markers in resting.items():
        hit = markers & present & bad
        if hit:
            out[column] = reason(hit)
    lineage = [m for m in _LINEAGE if m in present]
    hit = ({"CD3", *_NK_MARKERS} & present & bad)
    if lineage and all(m in bad for m in lineage):
        hit |= set(lineage)
    if hit:
        for column in ("lymphocytes", "nk_cells"):
            out[column] = reason(hit)
    skipped = set(not_called)
    failed: list[SubsetRule] = []
    for rule in rules:
        if rule.name in skipped or rule.name not in SUBSETS:
            continue
        column = f"{rule.name}_count"
        causes = [reason([m], "pos" if level in ("pos", "neg") else "hi")
                  for m, level in rule.levels.items()
                  if (m, "pos" if level in ("pos", "neg") else "hi") in unreliable]
        if "b_cells" in out:
            causes.insert(0, out["b_cells"])
        earlier = [r.name for r in failed if _compatible(r, rule)]
        if earlier:
            causes.append(f"its events may be {' or '.join(earlier)} cells, not evaluable")
        if causes:
            out[column] = "; ".join(dict.fromkeys(causes))
            failed.append(rule)
    return out

