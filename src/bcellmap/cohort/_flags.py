"""What a run could not stand behind: every flag in one table, and the summary a run prints.

``results/tables/flags.tsv`` (:func:`flag_table`) holds one row per flag, from every table
the run wrote:

======== ====================================== ============================================
level    source                                 flags
======== ====================================== ============================================
sample   ``samples.tsv`` ``sample_flags``        implausible results and QC: a step that
                                                removed most events (``{step}_removed_most``),
                                                lymphocytes cut by QC, few B or T cells at
                                                baseline, values compressed twice ...
sample   ``samples.tsv`` ``not_evaluable``       ``not_evaluable``: the values that rest on an
                                                unreliable gate (listed in ``detail``)
gate     ``gates.tsv`` ``reliability``           ``{marker}:nonspecific``,
                                                ``{marker}:unreliable`` (what decides)
gate     ``samples.tsv`` ``gate_flags``          method flags (``upper_tail``, ``few_events``
                                                ...: informative)
patient  ``kinetics.tsv`` ``flags``              every kinetics flag of every measure
======== ====================================== ============================================

:func:`summary_text` is what the workflow prints when it ends (``onsuccess``/``onerror``),
locally and on a cluster: samples, gates and patients flagged, counted by reason; the
values not evaluable; where the flags page is. ``fail_on`` (config) turns chosen flags into
an error (:func:`failing_flags`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from ..io.readers import cell_text

__all__ = ["FLAG_TABLE_COLUMNS", "failing_flags", "flag_table", "read_results", "summary_text"]

FLAG_TABLE_COLUMNS = ("level", "id", "patient_id", "flag", "kind", "detail")
#: Kinetics flags that describe a timeline (not asking the user to check anything).
_DESCRIPTIVE = {"not_in_kaplan_meier", "below_lloq", "nadir_below_lloq"}
#: Sample flags that describe the specimen: whole blood loses most of its events to the scatter
#: gate (granulocytes); lymphocytes lost with them raise their own flags
#: (scatter_gate_not_applied, qc_removed_lineage_cells).
_DESCRIPTIVE_SAMPLE = {"debris_removed_most", "no_cd3_in_panel"}


def _split(value: object) -> list[str]:
    return [part for part in cell_text(value).split(";") if part]


def flag_table(samples: pd.DataFrame, kinetics: pd.DataFrame | None = None,
               gates: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every flag of a run, one row each (``FLAG_TABLE_COLUMNS``; module docstring).

    ``kind`` is ``decides`` (a value is not evaluable, or a result implausible: read the
    numbers only after checking), ``informative`` (a method note) or ``timeline`` (a
    kinetics flag that describes the timeline).
    """
    rows: list[tuple] = []
    patients = dict(zip(samples.get("sample_id", []), samples.get("patient_id", []),
                        strict=False))
    for record in samples.itertuples(index=False):
        sample_id = str(record.sample_id)
        patient = str(getattr(record, "patient_id", ""))
        for flag in _split(getattr(record, "sample_flags", "")):
            rows.append(("sample", sample_id, patient, flag,
                         "informative" if flag in _DESCRIPTIVE_SAMPLE else "decides", ""))
        not_evaluable = _split(getattr(record, "not_evaluable", ""))
        if not_evaluable:
            rows.append(("sample", sample_id, patient, "not_evaluable", "decides",
                         f"{', '.join(not_evaluable)}: "
                         f"{cell_text(getattr(record, 'not_evaluable_reason', ''))}"))
        for flag in _split(getattr(record, "gate_flags", "")):
            rows.append(("gate", sample_id, patient, flag, "informative", ""))
    if gates is not None and not gates.empty and "reliability" in gates.columns:
        bad = gates[gates["reliability"].isin(("unreliable", "nonspecific"))]
        for record in bad.itertuples(index=False):
            level = "" if record.level == "pos" else f"({record.level})"
            rows.append(("gate", str(record.sample_id),
                         str(patients.get(record.sample_id, "")),
                         f"{record.marker}{level}:{record.reliability}", "decides",
                         cell_text(getattr(record, "reliability_detail", ""))))
    if kinetics is not None and "flags" in kinetics.columns:
        for record in kinetics.itertuples(index=False):
            where = f"{record.patient_id}:{record.modality}:{record.measure}"
            for flag in _split(record.flags):
                kind = "timeline" if flag in _DESCRIPTIVE else (
                    "decides" if flag in ("gate_not_evaluable", "not_evaluable")
                    else "informative")
                detail = ""
                if flag in ("gate_not_evaluable", "not_evaluable", "few_events"):
                    detail = f"days not evaluable: {getattr(record, 'not_evaluable_days', '')}"
                rows.append(("patient", where, str(record.patient_id), flag, kind, detail))
    return pd.DataFrame(rows, columns=list(FLAG_TABLE_COLUMNS))


def read_results(results: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """The tables a summary reads, those that exist (a failed run may lack some)."""
    results = Path(results)
    paths = {"samples": results / "tables" / "samples.tsv",
             "kinetics": results / "tables" / "kinetics.tsv",
             "gates": results / "models" / "gates.tsv",
             "flags": results / "tables" / "flags.tsv"}
    from ..errors import BcellmapError
    from ..io.readers import read_table

    tables = {}
    for name, path in paths.items():
        if path.is_file():
            try:
                tables[name] = read_table(path, what=f"{name} table", empty_ok=True)
            except BcellmapError:
                continue
    return tables


def _count_by(frame: pd.DataFrame, column: str = "flag") -> str:
    counts = frame.groupby(column)["id"].nunique().sort_values(ascending=False)
    return ", ".join(f"{flag} {n}" for flag, n in counts.items())


def summary_text(results: str | os.PathLike, *, flags_page: Sequence[str] = ()) -> str:
    """The end-of-run summary (module docstring); empty tables give a short note."""
    tables = read_results(results)
    header, rule = ["", "bcellmap run summary " + "-" * 58], "-" * 80
    if "flags" in tables:
        table = tables["flags"]
    elif "samples" in tables:
        table = flag_table(tables["samples"], tables.get("kinetics"), tables.get("gates"))
    else:
        return "\n".join([*header, "no results tables yet: the run ended before samples.tsv "
                          "was written (see the errors above)", rule])
    samples = tables.get("samples")
    lines = list(header)
    n_samples = len(samples) if samples is not None else 0
    deciding = table[table["kind"] == "decides"]
    flagged = deciding[deciding["level"] == "sample"]
    lines.append(f"samples: {n_samples}; flagged {flagged['id'].nunique()}"
                 + (f" ({_count_by(flagged)})" if not flagged.empty else ""))
    notes = table[(table["level"] == "sample") & (table["kind"] == "informative")]
    if not notes.empty:
        lines.append(f"sample notes (informative): {_count_by(notes)}")
    gates = deciding[deciding["level"] == "gate"]
    informative = table[(table["level"] == "gate") & (table["kind"] == "informative")]
    lines.append(f"gates not to be relied on: {len(gates)}"
                 + (f" in {gates['id'].nunique()} samples ({_count_by(gates)})"
                    if not gates.empty else ""))
    if not informative.empty:
        lines.append(f"gate method notes (informative): {_count_by(informative)}")
    patients = table[(table["level"] == "patient") & (table["kind"] != "timeline")]
    lines.append(f"patient timelines flagged: {patients['id'].nunique()}"
                 + (f" ({_count_by(patients)})" if not patients.empty else ""))
    if samples is not None and "not_evaluable" in samples.columns:
        values = samples["not_evaluable"].fillna("").astype(str)
        n_values = int(values.str.split(";").apply(lambda v: len([x for x in v if x])).sum())
        lines.append(f"values not evaluable (NA, resting on an unreliable gate): {n_values} "
                     f"in {int((values != '').sum())} samples")
        for record in samples[values != ""].head(10).itertuples(index=False):
            lines.append(f"  {record.sample_id}: {record.not_evaluable} -- "
                         f"{getattr(record, 'not_evaluable_reason', '')}")
        if int((values != "").sum()) > 10:
            lines.append("  ... (see the flags page)")
    for page in flags_page:
        lines.append(f"flags page: {page}")
    lines.append(rule)
    return "\n".join(lines)


def failing_flags(table: pd.DataFrame, fail_on: Iterable[str]) -> pd.DataFrame:
    """The rows of a flag table that ``fail_on`` names.

    An entry matches a flag by its name (``few_b_cells_at_baseline``,
    ``debris_removed_most``), and a flag that decides (kind ``decides``) also by its part
    after the marker (``nonspecific`` matches ``CD19:nonspecific``) or its suffix
    (``removed_most`` matches ``dead_removed_most``, not the informative
    ``debris_removed_most`` of whole blood).
    """
    wanted = [str(item) for item in fail_on if str(item)]
    if not wanted or table.empty:
        return table.iloc[0:0]

    def matches(row: pd.Series) -> bool:
        flag = str(row["flag"])
        if flag in wanted:
            return True
        tail = flag.split(":", 1)[-1]
        return row["kind"] == "decides" and any(
            item == tail or flag.endswith(f"_{item}") for item in wanted)

    return table[table.apply(matches, axis=1)]
