"""bcellmap's calls held against the manual gates of a FlowJo workspace, sample by sample.

FlowKit (``flowkit.Workspace``) reads the workspace, matches its samples to FCS files by
their ``$FIL`` keyword (not the file name) and applies its gates with the workspace's own
compensation and transforms. Each bcellmap population is matched to one workspace gate:
by a mapping the user gives (population -> gate name or ``/``-joined path), else by the
common gate names in :data:`DEFAULT_GATE_NAMES` (case and spacing ignored; a name that
matches several gate paths of a sample is ambiguous and left out, and said so).

Per sample and population (:func:`gate_agreement`): both counts, each as % of its parent
(the workspace gate's parent gate; bcellmap's parent population: lymphocytes for T and B
cells, B cells for the subsets) and as % of all events of the file (the like-for-like
number: one denominator for both), and the per-event agreement, events matched in file
order: F1, precision and recall of bcellmap's call against the workspace's gate. Events
bcellmap's QC removed count as not called. Where bcellmap reports the population as not
evaluable (its gate is unreliable or nonspecific), ``bcellmap_not_evaluable`` says why: the
per-event numbers then show what the gate it would not stand behind did.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError

#: Workspace gate names taken for each bcellmap population when no mapping is given.
DEFAULT_GATE_NAMES: dict[str, tuple[str, ...]] = {
    "B": ("B cells", "B", "B-cells", "Bcells", "CD19+", "CD19", "CD19+ B cells", "CD20+",
          "CD19+CD20+", "B lymphocytes"),
    "T": ("T cells", "T", "T-cells", "CD3+", "CD3", "T lymphocytes"),
    "naive": ("Naive B", "Naive B cells", "naive", "IgD+CD27-", "IgD+ CD27-", "CD27-IgD+"),
    "unswitched_memory": ("Unswitched memory", "Non-switched memory", "IgD+CD27+",
                          "IgD+ CD27+", "CD27+IgD+", "Marginal zone"),
    "switched_memory": ("Switched memory", "Class-switched memory", "IgD-CD27+",
                        "IgD- CD27+", "CD27+IgD-"),
    "double_negative": ("Double negative", "DN", "DN B cells", "IgD-CD27-", "IgD- CD27-",
                        "CD27-IgD-"),
    "transitional": ("Transitional", "Transitional B", "CD24hiCD38hi", "CD24++CD38++"),
    "plasmablast": ("Plasmablasts", "Plasmablast", "PB", "CD27hiCD38hi", "CD27++CD38++"),
}
#: The parent population of each bcellmap population (its % of parent).
_PARENT = {"B": "lymphocytes", "T": "lymphocytes"}
AGREEMENT_COLUMNS = (
    "sample_id", "workspace_sample", "population", "gate_path", "events", "workspace_count",
    "workspace_parent", "workspace_pct_parent", "bcellmap_count", "bcellmap_parent",
    "bcellmap_pct_parent", "workspace_pct_events", "bcellmap_pct_events",
    "difference_pct_points", "f1", "precision", "recall", "bcellmap_not_evaluable", "note")
#: The counts-table column of each population (its evaluability).
_COUNT = {"B": "b_cells", "T": "t_cells"}


def _key(name: str) -> str:
    return re.sub(r"\s+", "", str(name)).lower()


def read_workspace(path: str | os.PathLike, fcs_dir: str | os.PathLike | None = None) -> Any:
    """A FlowJo workspace with its FCS files (FlowKit; samples matched by ``$FIL``).

    ``fcs_dir`` defaults to the workspace's folder. Samples the workspace lists without a file
    are left out (FlowKit's warnings about them are silenced; :func:`workspace_files` lists
    the ones found).

    Raises
    ------
    InputError
        The workspace cannot be read, or none of its samples has its file.
    """
    from flowkit import Workspace

    path = Path(path)
    folder = Path(fcs_dir) if fcs_dir is not None else path.parent
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            workspace = Workspace(str(path), fcs_samples=str(folder))
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"cannot read the FlowJo workspace ({exc})", path=path) from None
    if not workspace.get_sample_ids(loaded_only=True):
        raise InputError(f"none of the workspace's samples has its FCS file in {folder}",
                         path=path)
    return workspace


def workspace_files(workspace: Any, fcs_dir: str | os.PathLike) -> dict[str, Path]:
    """``{workspace sample id: FCS file}`` of the samples whose file was found.

    Matched as FlowKit matches them, by the file's ``$FIL`` keyword (a file renamed after
    acquisition keeps it), else by file name.
    """
    import flowio

    by_fil: dict[str, Path] = {}
    for path in sorted(Path(fcs_dir).glob("*.fcs")):
        try:
            text = flowio.FlowData(str(path), only_text=True).text
        except Exception:  # noqa: BLE001 - any unreadable file simply matches nothing
            continue
        by_fil.setdefault(str(text.get("fil") or path.name), path)
        by_fil.setdefault(path.name, path)
    found = {}
    for sample_id in workspace.get_sample_ids(loaded_only=True):
        name = workspace.get_sample(sample_id).original_filename
        if name in by_fil or sample_id in by_fil:
            found[sample_id] = by_fil.get(name) or by_fil[sample_id]
    return found


def workspace_labels(workspace: Any, sample_id: str) -> dict[str, str]:
    """``{$PnN: marker label}`` from the workspace's own keywords (``$PnS``).

    FlowJo users often leave marker names out of the FCS files, or correct them, in the
    workspace: its labels are the ones to believe.
    """
    keywords = workspace.get_keywords(sample_id)
    labels: dict[str, str] = {}
    for key, value in keywords.items():
        match = re.fullmatch(r"\$P(\d+)S", key)
        name = keywords.get(f"$P{match[1]}N") if match else None
        if name and str(value).strip():
            labels[str(name)] = str(value).strip()
    return labels


def workspace_panel(workspace: Any, sample_id: str) -> dict[str, str]:
    """``{canonical marker: $PnN}`` of the workspace's labels (:func:`workspace_labels`).

    A label naming two markers (``CD3-IgD``, one detector for both) maps to none.
    """
    from ..io.panel import canonical_name

    channels: dict[str, str] = {}
    for name, label in workspace_labels(workspace, sample_id).items():
        if (marker := canonical_name(label)) and marker not in channels:
            channels[marker] = name
    return channels


def match_gates(workspace: Any, sample_id: str, mapping: Mapping[str, str] | None = None
                ) -> tuple[dict[str, tuple[str, tuple[str, ...]]], list[str]]:
    """Each bcellmap population's workspace gate in one sample, and what could not be matched.

    Returns
    -------
    matched
        ``population -> (gate name, gate path)``.
    notes
        Populations left out, and why (no such gate, or a name on several paths).
    """
    gate_ids = workspace.get_gate_ids(sample_id)
    by_name: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for name, path in gate_ids:
        by_name.setdefault(_key(name), []).append((name, tuple(path)))
    matched: dict[str, tuple[str, tuple[str, ...]]] = {}
    notes = []
    wanted = dict(mapping or {})
    for population, names in DEFAULT_GATE_NAMES.items():
        given = wanted.pop(population, None)
        if given is not None:
            parts = [p for p in str(given).split("/") if p]
            hits = [(n, p) for n, p in gate_ids if _key(n) == _key(parts[-1])
                    and (len(parts) == 1 or [_key(x) for x in p[1:]] ==
                         [_key(x) for x in parts[:-1]])]
            if len(hits) != 1:
                notes.append(f"{population}: the mapped gate {given!r} "
                             f"{'is on several paths' if hits else 'is not in the workspace'}")
                continue
            matched[population] = (hits[0][0], tuple(hits[0][1]))
            continue
        keys = dict.fromkeys(_key(name) for name in names)
        hits = [hit for key in keys for hit in by_name.get(key, [])]
        if len(hits) == 1:
            matched[population] = hits[0]
        elif len(hits) > 1:
            notes.append(f"{population}: gate names on several paths "
                         f"({', '.join('/'.join((*p[1:], n)) for n, p in hits)}); map one")
    for population in wanted:
        notes.append(f"{population}: not a bcellmap population (mapping ignored)")
    return matched, notes


def _called(adata: Any, population: str) -> np.ndarray:
    obs = adata.obs
    if population == "lymphocytes":
        return obs["lymphocyte"].to_numpy().astype(bool)
    if population in ("T", "B"):
        return (obs["cell_type"] == population).to_numpy()
    return (obs["b_subset"] == population).to_numpy()


def gate_agreement(workspace: Any, samples: Mapping[str, tuple[str, Any]], *,
                   mapping: Mapping[str, str] | None = None) -> pd.DataFrame:
    """bcellmap's calls against the workspace's gates, per sample and population.

    Parameters
    ----------
    workspace
        A FlowKit ``Workspace`` (:func:`read_workspace`).
    samples
        ``{bcellmap sample id: (workspace sample id, annotated AnnData)}``. The AnnData's
        ``obs["event_index"]`` places its events in the FCS file; ``uns["source"]["n_events"]``
        is the file's event count.
    mapping
        ``{population: gate name or path}`` overriding :data:`DEFAULT_GATE_NAMES`.

    Returns
    -------
    pandas.DataFrame
        :data:`AGREEMENT_COLUMNS`, one row per sample and matched population (a sample with
        no matched gate gets one row saying so in ``note``).
    """
    rows = []
    for sample_id, (workspace_sample, adata) in samples.items():
        matched, notes = match_gates(workspace, workspace_sample, mapping)
        if not matched:
            rows.append({"sample_id": sample_id, "workspace_sample": workspace_sample,
                         "note": "; ".join(notes) or "no workspace gate matches a bcellmap "
                                                     "population: give a mapping"})
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            workspace.analyze_samples(sample_id=workspace_sample, use_mp=False)
        report = workspace.get_gating_results(workspace_sample).report
        n_events = int((adata.uns.get("source") or {}).get("n_events")
                       or workspace.get_sample(workspace_sample).event_count)
        index = adata.obs["event_index"].to_numpy()
        for population, (gate_name, gate_path) in matched.items():
            theirs = np.asarray(workspace.get_gate_membership(
                workspace_sample, gate_name, gate_path=gate_path), dtype=bool)
            if theirs.size != n_events:
                raise InputError(f"the workspace's sample has {theirs.size} events, the file "
                                 f"{n_events}", sample_id=sample_id)
            ours = np.zeros(n_events, dtype=bool)
            ours[index[_called(adata, population)]] = True
            parent_name = _PARENT.get(population, "B")
            parent = int(_called(adata, parent_name).sum())
            entry = report[(report["gate_name"] == gate_name)
                           & (report["gate_path"].map(tuple) == gate_path)].iloc[0]
            both = int((ours & theirs).sum())
            precision = both / ours.sum() if ours.sum() else np.nan
            recall = both / theirs.sum() if theirs.sum() else np.nan
            rejected = str((adata.uns.get("counts") or {}).get("not_evaluable") or "")
            reason = str((adata.uns.get("counts") or {}).get("not_evaluable_reason") or "")
            column = _COUNT.get(population, f"{population}_count")
            rows.append({
                "bcellmap_not_evaluable": reason or "gate not reliable"
                if column in rejected.split(";") else "",
                "sample_id": sample_id, "workspace_sample": workspace_sample,
                "population": population, "gate_path": "/".join((*gate_path[1:], gate_name)),
                "events": n_events, "workspace_count": int(theirs.sum()),
                "workspace_parent": gate_path[-1],
                "workspace_pct_parent": float(entry["relative_percent"]),
                "bcellmap_count": int(ours.sum()),
                "bcellmap_parent": "B cells" if parent_name == "B" else parent_name,
                "bcellmap_pct_parent": 100.0 * ours.sum() / parent if parent else np.nan,
                "workspace_pct_events": 100.0 * theirs.sum() / n_events,
                "bcellmap_pct_events": 100.0 * ours.sum() / n_events,
                "difference_pct_points": 100.0 * (int(ours.sum()) - int(theirs.sum()))
                / n_events,
                "f1": 2.0 * both / (ours.sum() + theirs.sum()) if ours.sum() + theirs.sum()
                else np.nan,
                "precision": precision, "recall": recall, "note": "; ".join(notes)})
    return pd.DataFrame(rows, columns=list(AGREEMENT_COLUMNS))


def safe_id(sample_id: str) -> str:
    """A workspace sample id as a bcellmap sample id (``[A-Za-z0-9_.-]``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", sample_id)
