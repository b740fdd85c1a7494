"""A sample's learned gates as GatingML 2.0, for review in FlowJo, FlowKit or Cytobank.

FlowKit (``flowkit.GatingStrategy``, ``export_gatingml``) writes the file; nothing here
writes XML by hand. The gates are written on the sample's own compensation (the spillover
matrix bcellmap used, ``uns["compensation"]``) and transforms (``uns["transform"]``), so that
a cytometry tool applying the file to the raw FCS file gets bcellmap's populations:

==========================  ==================================================================
bcellmap                    GatingML
==========================  ==================================================================
``arcsinh(x / c)``          ``asinh`` with T = the channel's ``$PnR``, M = asinh(T / c) / ln 10,
                            A = 0, which is ``arcsinh(x / c) / arcsinh(T / c)``; gate positions
                            are divided by ``arcsinh(T / c)``
``logicle`` (T, W, M, A)    ``logicle`` with the same parameters (both on the 0-1 scale)
scatter ``x / $PnR * 10``   ``flin`` with T = ``$PnR / 10``, A = 0
``none``                    no transform (the file's values as they are)
==========================  ==================================================================

The hierarchy, under the QC gates that are geometric:

- ``Singlets`` (FSC-A/FSC-H ratio, an ``fratio`` dimension), ``Live`` (viability at or below
  its gate), ``Scatter`` (the lymphocyte scatter gate: one ellipse per mixture component, their
  union a Boolean ``or``). A QC step that was skipped or not applied has no gate.
- One rectangle per marker gate: ``CD19_pos`` (at or above the ``pos`` gate), ``CD27_hi``
  (at or above the ``hi`` gate). A negative level (CD3-, CD27-) is the rectangle's
  complement in a Boolean gate, never a second rectangle: moving ``CD27_pos`` in FlowJo
  moves CD27- with it.
- Boolean populations: ``B_cells`` (CD3- and (CD19+ or CD20+)), ``NK_cells`` (lineage-negative,
  with the panel's NK markers, inside the T and B cells' scatter core ``Lymphocyte_core``),
  ``Lymphocytes`` (T, B or NK) and one gate per called B-cell subset, named as in
  ``contracts.SUBSETS``: the rule's levels within ``B_cells``, outside every earlier subset
  (first match wins, as in :func:`bcellmap.flow.annotate.call_subsets`). T cells are
  ``CD3_pos``.

Not gates, so not in the file: the QC steps ``non_finite``, ``margin`` (detector saturation)
and ``time_anomaly`` (time bins). A tool applying the file keeps the events only they
removed (``obs["qc_margin"]`` etc. of the ingested sample name them), so its populations
hold those events too. Batch normalisation (a per-cluster quantile map) has no GatingML
form: :func:`gating_strategy` refuses a normalised sample, and :func:`read_user_gates` a
corrected gate on a normalised marker.

A user's corrected file comes back through :func:`read_user_gates`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError
from .subsets import SubsetRule

#: Id of the spillover matrix in the GatingML file.
SPILLOVER_ID = "bcellmap_spillover"
#: FlowKit's name for "no compensation".
_UNCOMPENSATED = "uncompensated"
#: ``$PnR`` assumed where a channel's range is missing (an 18-bit detector).
_DEFAULT_TOP = 262_144.0
def _xml_id(text: str) -> str:
    """``text`` as an XML id (GatingML ids are ``xs:ID``: no spaces, no ``+`` or ``/``)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", text)
    return name if re.match(r"[A-Za-z_]", name) else f"_{name}"


@dataclass
class _Builder:
    """The strategy under construction and what is needed to place gates on its scale."""

    strategy: Any
    channel: dict[str, str]          # canonical marker -> channel ($PnN)
    transform_of: dict[str, str | None]   # channel -> transform id (None: no transform)
    factor: dict[str, float]         # channel -> bcellmap units per GatingML unit
    compensated: set[str]            # channels in the spillover matrix
    parent: tuple[str, ...] = ("root",)
    gates: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    def dimension(self, channel: str, *, low: float | None = None, high: float | None = None):
        from flowkit import Dimension

        factor = self.factor[channel]
        return Dimension(channel, SPILLOVER_ID if channel in self.compensated else _UNCOMPENSATED,
                         self.transform_of[channel],
                         range_min=None if low is None else float(low) / factor,
                         range_max=None if high is None else float(high) / factor)

    def add(self, gate: Any, path: tuple[str, ...] | None = None) -> str:
        where = self.parent if path is None else path
        self.strategy.add_gate(gate, where)
        self.gates.append((gate.gate_name, where))
        return gate.gate_name

    def ref(self, gate_id: str, *, complement: bool = False) -> dict[str, Any]:
        return {"ref": gate_id, "path": self.parent, "complement": complement}


def _parameters(adata: Any) -> dict[str, dict[str, Any]]:
    transform = adata.uns.get("transform") or {}
    channels = list(np.asarray(transform.get("channel", []), dtype=object))
    parameters = list(np.asarray(transform.get("parameters", []), dtype=object))
    return {str(c): json.loads(str(p)) for c, p in zip(channels, parameters, strict=True)}


def _add_transforms(builder: _Builder, parameters: Mapping[str, Mapping[str, Any]],
                    ranges: Mapping[str, float], *, sample_id: str) -> None:
    from flowkit import transforms

    for channel, used in parameters.items():
        method = used.get("method")
        top = ranges.get(channel) or 0.0
        top = float(top) if np.isfinite(top) and top > 0 else _DEFAULT_TOP
        transform_id = _xml_id(f"{channel}_{method}")
        if method == "arcsinh":
            cofactor = float(used["cofactor"])
            scale = float(np.arcsinh(top / cofactor))
            builder.strategy.add_transform(transform_id, transforms.AsinhTransform(
                top, scale / np.log(10.0), 0.0))
            builder.factor[channel] = scale
        elif method == "logicle":
            builder.strategy.add_transform(transform_id, transforms.LogicleTransform(
                float(used["T"]), float(used["W"]), float(used["M"]), float(used["A"])))
            builder.factor[channel] = 1.0
        elif method == "linear":
            builder.strategy.add_transform(transform_id, transforms.LinearTransform(
                1.0 / float(used["scale"]), 0.0))
            builder.factor[channel] = 1.0
        elif method == "none":
            transform_id = None
            builder.factor[channel] = 1.0
        else:
            raise InputError(f"channel {channel}: transform {method!r} has no GatingML form",
                             sample_id=sample_id)
        builder.transform_of[channel] = transform_id


def _qc_gates(builder: _Builder, qc: Mapping[str, Any]) -> list[str]:
    """The geometric QC gates, nested in the order bcellmap applies them."""
    from flowkit import RatioDimension, gates, transforms

    written: list[str] = []
    doublets = qc.get("doublets") or {}
    if "ratio_cutoff" in doublets and {"FSC-A", "FSC-H"} <= set(builder.channel):
        area, height = builder.channel["FSC-A"], builder.channel["FSC-H"]
        builder.strategy.add_transform("FSC_A_over_H", transforms.RatioTransform(
            [area, height], 1.0, 0.0, 0.0))
        # bcellmap removes ratio > cutoff and a non-positive FSC-H (range_min 0 keeps them out).
        dimension = RatioDimension("FSC_A_over_H", _UNCOMPENSATED, None, range_min=0.0,
                                   range_max=float(doublets["ratio_cutoff"]))
        builder.parent = (*builder.parent, builder.add(gates.RectangleGate("Singlets",
                                                                           [dimension])))
        written.append("doublets")
    dead = qc.get("dead") or {}
    if "threshold" in dead and "Live" in builder.channel:
        dimension = builder.dimension(builder.channel["Live"], high=float(dead["threshold"]))
        builder.parent = (*builder.parent, builder.add(gates.RectangleGate("Live",
                                                                           [dimension])))
        written.append("dead")
    debris = qc.get("debris") or {}
    if "gate_means" in debris and {"FSC-A", "SSC-A"} <= set(builder.channel):
        radius = float((debris.get("settings") or {}).get("max_mahalanobis", 3.0))
        parts = _ellipses(builder, "Scatter", np.asarray(debris["gate_means"], dtype=float),
                          np.asarray(debris["gate_covariances"], dtype=float), radius)
        if len(parts) > 1:
            union = gates.BooleanGate("Scatter", "or", [builder.ref(p) for p in parts])
            builder.parent = (*builder.parent, builder.add(union))
        else:
            builder.parent = (*builder.parent, parts[0])
        written.append("debris")
    return written


def _ellipses(builder: _Builder, name: str, means: np.ndarray, covariances: np.ndarray,
              radius: float) -> list[str]:
    """Ellipse gates on (FSC-A, SSC-A), bcellmap's scaled scatter (``flin`` keeps its units)."""
    from flowkit import gates

    dimensions = [builder.dimension(builder.channel["FSC-A"]),
                  builder.dimension(builder.channel["SSC-A"])]
    ids = []
    for index, (mean, covariance) in enumerate(zip(means.reshape(-1, 2),
                                                   covariances.reshape(-1, 2, 2), strict=True)):
        gate_id = name if len(means.reshape(-1, 2)) == 1 else f"{name}_{index + 1}"
        ids.append(builder.add(gates.EllipsoidGate(gate_id, dimensions, list(map(float, mean)),
                                                   covariance.tolist(), radius ** 2)))
    return ids


def _level_ref(builder: _Builder, marker: str, level: str,
               cut: Mapping[str, Mapping[str, float]], made: set[str]) -> dict[str, Any]:
    """A Boolean operand for ``marker`` at ``level``: its ``pos`` or ``hi`` rectangle, or
    that rectangle's complement for ``neg`` and ``lo``. One gate per position, so that a
    correction of ``CD27_pos`` moves CD27- too."""
    from flowkit import gates

    side = "pos" if level in ("pos", "neg") else "hi"
    gate_id = _xml_id(f"{marker}_{side}")
    if gate_id not in made:
        dimension = builder.dimension(builder.channel[marker], low=cut[marker][side])
        builder.add(gates.RectangleGate(gate_id, [dimension]))
        made.add(gate_id)
    return builder.ref(gate_id, complement=level in ("neg", "lo"))


def _boolean(builder: _Builder, name: str, kind: str, refs: Sequence[dict[str, Any]]) -> str:
    from flowkit import gates

    return builder.add(gates.BooleanGate(name, kind, list(refs)))


def _thresholds(adata: Any) -> dict[str, dict[str, float]]:
    table = adata.uns.get("gates")
    if not isinstance(table, pd.DataFrame) or table.empty:
        return {}
    cut: dict[str, dict[str, float]] = {}
    for row in table.itertuples(index=False):
        value = float(row.threshold)
        if np.isfinite(value):
            cut.setdefault(str(row.marker), {})[str(row.level)] = value
    return cut


def gating_strategy(adata: Any, *, rules: Sequence[SubsetRule], sample_id: str | None = None
                    ) -> tuple[Any, pd.DataFrame]:
    """One annotated sample's gates as a FlowKit ``GatingStrategy``.

    Parameters
    ----------
    adata
        An annotated flow sample (:func:`bcellmap.tl.annotate`, or
        ``results/annotated/{sample_id}.h5ad``): its ``uns`` holds the compensation, the
        transforms, the QC gates, the sample's own marker gates and the lymphocyte core.
    rules
        The subset rule table the sample was annotated with (``flow.subsets``).
    sample_id
        For messages; default ``uns["sample"]["sample_id"]``.

    Returns
    -------
    strategy, gates
        The FlowKit strategy, and one row per gate: ``gate_id``, ``gate_path`` (the parent
        gates, ``/``-joined) and ``population`` (the bcellmap population it is, or empty for a
        building block such as ``CD19_pos``).

    Raises
    ------
    InputError
        The sample was batch-normalised (its gates are on a scale no GatingML transform
        reaches), has no gates, or a transform has no GatingML form.
    """
    from flowkit import GatingStrategy, Matrix

    sample_id = sample_id or str((adata.uns.get("sample") or {}).get("sample_id", ""))
    if adata.uns.get("normalisation"):
        raise InputError("the sample was batch-normalised: its gates are on the normalised "
                         "scale, which has no GatingML transform", sample_id=sample_id)
    cut = _thresholds(adata)
    if not cut:
        raise InputError("the sample has no gates (uns['gates']): annotate it first",
                         sample_id=sample_id)
    var = adata.var
    channel = {str(c): str(ch) for ch, c in zip(var["channel"], var["canonical"], strict=True)
               if str(c)}
    ranges = {str(ch): float(r) for ch, r in zip(var["channel"], var["range"], strict=True)}
    builder = _Builder(strategy=GatingStrategy(), channel=channel, transform_of={}, factor={},
                       compensated=set())
    compensation = adata.uns.get("compensation") or {}
    if compensation.get("matrix") is not None and len(compensation.get("channels", [])):
        detectors = [str(c) for c in compensation["channels"]]
        builder.strategy.add_comp_matrix(SPILLOVER_ID, Matrix(
            np.asarray(compensation["matrix"], dtype=float), detectors, detectors))
        builder.compensated = set(detectors)
    _add_transforms(builder, _parameters(adata), ranges, sample_id=sample_id)
    _qc_gates(builder, adata.uns.get("qc") or {})

    populations: dict[str, str] = {}
    made: set[str] = set()
    lineage = [m for m in ("CD19", "CD20") if m in channel and "pos" in cut.get(m, {})]
    if not lineage:
        raise InputError("neither CD19 nor CD20 has a gate: no B cells to export",
                         sample_id=sample_id)
    has_cd3 = "CD3" in channel and "pos" in cut.get("CD3", {})
    b_lineage = [_level_ref(builder, m, "pos", cut, made) for m in lineage]
    if len(b_lineage) > 1:
        b_lineage = [builder.ref(_boolean(builder, "CD19_or_CD20", "or", b_lineage))]
    if has_cd3:
        cd3_neg = _level_ref(builder, "CD3", "neg", cut, made)
        populations["T"] = cd3_neg["ref"]
        populations["B"] = _boolean(builder, "B_cells", "and", [*b_lineage, cd3_neg])
    else:
        # GatingML's and/or take two operands or more: one population, named, is its
        # gate twice.
        populations["B"] = _boolean(builder, "B_cells", "and", b_lineage * 2)

    nk_refs = [builder.ref(populations["B"], complement=True)]
    if has_cd3:
        nk_refs.append(_level_ref(builder, "CD3", "neg", cut, made))
    for marker, level in (("CD45", "pos"), ("CD14", "neg")):
        if marker in channel and "pos" in cut.get(marker, {}):
            nk_refs.append(_level_ref(builder, marker, level, cut, made))
    nk_markers = [m for m in ("CD56", "CD16") if m in channel and "pos" in cut.get(m, {})]
    if nk_markers and has_cd3:
        refs = [_level_ref(builder, m, "pos", cut, made) for m in nk_markers]
        nk_refs.append(refs[0] if len(refs) == 1 else builder.ref(
            _boolean(builder, "CD56_or_CD16", "or", refs)))
    core = (adata.uns.get("annotate") or {}).get("lymphocyte_core") or {}
    if "mean" in core and {"FSC-A", "SSC-A"} <= set(channel):
        nk_refs.append(builder.ref(_ellipses(
            builder, "Lymphocyte_core", np.asarray(core["mean"], dtype=float),
            np.asarray(core["covariance"], dtype=float), float(core["max_mahalanobis"]))[0]))
    # Without CD3, the lineage-negative lymphocytes are T or NK cells (annotate's
    # ``lymphocyte_unresolved``).
    other = "NK" if has_cd3 else "lymphocyte_unresolved"
    populations[other] = _boolean(builder, "NK_cells" if has_cd3 else "Unresolved_lymphocytes",
                                  "and", nk_refs if len(nk_refs) > 1 else nk_refs * 2)
    lineage_refs = [builder.ref(populations[p]) for p in ("T", "B", other) if p in populations]
    populations["lymphocytes"] = _boolean(builder, "Lymphocytes", "or",
                                          lineage_refs if len(lineage_refs) > 1
                                          else lineage_refs * 2)

    earlier: list[dict[str, Any]] = []
    for rule in rules:
        if not all(m in channel and ("pos" if lv in ("pos", "neg") else "hi") in cut.get(m, {})
                   for m, lv in rule.levels.items()):
            continue  # not called for this panel: no gate
        refs = [builder.ref(populations["B"]),
                *(_level_ref(builder, m, lv, cut, made) for m, lv in rule.levels.items()),
                *earlier]
        populations[rule.name] = _boolean(builder, rule.name, "and", refs)
        earlier.append(builder.ref(rule.name, complement=True))

    names = {gate_id: population for population, gate_id in populations.items()}
    table = pd.DataFrame({
        "gate_id": [g for g, _ in builder.gates],
        "gate_path": ["/".join(path) for _, path in builder.gates],
        "population": [names.get(g, "") for g, _ in builder.gates]})
    return builder.strategy, table


def write_gatingml(adata: Any, path: str | os.PathLike, *, rules: Sequence[SubsetRule],
                   sample_id: str | None = None) -> pd.DataFrame:
    """Write one annotated sample's gates as GatingML 2.0 (:func:`gating_strategy`).

    The file is written atomically; the gate table of :func:`gating_strategy` is returned.
    """
    from flowkit import export_gatingml

    from ..io._atomic import atomic_path

    strategy, table = gating_strategy(adata, rules=rules, sample_id=sample_id)
    with atomic_path(path) as target, open(target, "wb") as handle:
        export_gatingml(strategy, handle)
    return table


# --------------------------------------------------------------------------- user gates

#: Gate ids read back from a user's file: ``{canonical marker}_{level}``.
_USER_GATE = re.compile(r"^(?P<marker>.+)_(?P<level>pos|neg|hi|lo)$")


def _to_sample_scale(values: np.ndarray, used: Mapping[str, Any]) -> np.ndarray:
    """Linear (compensated) values on the sample's own transformed scale (ingest's rule)."""
    method = used.get("method")
    if method == "arcsinh":
        return np.arcsinh(values / float(used["cofactor"]))
    if method == "logicle":
        from flowutils.transforms import logicle

        return np.asarray(logicle(np.ascontiguousarray(values, dtype=np.float64), None,
                                  t=float(used["T"]), w=float(used["W"]), m=float(used["M"]),
                                  a=float(used["A"]))).ravel()
    if method == "linear":
        return values * float(used["scale"])
    return values


def read_user_gates(path: str | os.PathLike, adata: Any, *, sample_id: str | None = None
                    ) -> dict[tuple[str, str], float]:
    """A user's GatingML gates as ``{(marker, level): threshold}`` on a sample's own scale.

    The gates read are the one-dimensional rectangles named ``{marker}_{level}`` (as
    :func:`write_gatingml` names them, e.g. ``CD19_pos``, ``CD27_hi``): the lower edge of a
    ``pos`` or ``hi`` gate, the upper edge of a ``neg`` or ``lo`` one (a file written
    elsewhere may hold those); where a file has both, ``pos`` and ``hi`` win.
    Every other gate (QC, Boolean populations) is left to bcellmap. A position is taken back
    to linear values through the file's own transform and onto the sample's scale through the
    sample's (``uns["transform"]``), so a gate drawn in FlowJo on its biexponential axis lands
    where it was drawn.

    Parameters
    ----------
    path
        The GatingML 2.0 file (FlowKit reads and validates it).
    adata
        The sample (ingested or annotated): ``var`` (``channel``, ``canonical``) and ``uns``
        (``transform``, ``compensation``).
    sample_id
        For messages.

    Raises
    ------
    InputError
        The file cannot be read as GatingML, a gate names a marker the sample lacks or sits
        on another channel, has no edge at its level, or is on compensated values where the
        sample was read uncompensated (or the reverse, or with another spillover matrix).
    """
    import warnings

    from flowkit import gates

    from ..errors import InputError

    def fail(problem: str) -> InputError:
        return InputError(f"user gates: {problem}", path=path, sample_id=sample_id)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            strategy = _parse(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise fail(f"not a GatingML 2.0 file FlowKit can read ({exc})") from None
    channel = {str(c): str(ch) for ch, c in zip(adata.var["channel"], adata.var["canonical"],
                                                strict=True) if str(c)}
    normalised = set(map(str, (adata.uns.get("normalisation") or {}).get("markers", [])))
    parameters = _parameters(adata)
    compensation = adata.uns.get("compensation") or {}
    compensated = ({str(c) for c in compensation.get("channels", [])}
                   if compensation.get("matrix") is not None else set())
    found: dict[tuple[str, str], float] = {}
    for gate_id, _ in strategy.get_gate_ids():
        match = _USER_GATE.match(gate_id)
        if match is None:
            continue
        gate = strategy.get_gate(gate_id)
        marker, level = match["marker"], match["level"]
        if not isinstance(gate, gates.RectangleGate) or len(gate.dimensions) != 1:
            raise fail(f"gate {gate_id} must be a one-dimensional rectangle (a range on "
                       f"{marker})")
        if marker not in channel:
            raise fail(f"gate {gate_id}: the sample has no {marker} channel")
        if marker in normalised:
            raise fail(f"gate {gate_id}: {marker} was batch-normalised, and a gate drawn on "
                       "the file's values has no place on the normalised scale")
        dimension = gate.dimensions[0]
        if str(dimension.id) != channel[marker]:
            raise fail(f"gate {gate_id} is on channel {dimension.id}, but the sample's "
                       f"{marker} is {channel[marker]}")
        edge = dimension.min if level in ("pos", "hi") else dimension.max
        if edge is None:
            raise fail(f"gate {gate_id} has no {'lower' if level in ('pos', 'hi') else 'upper'}"
                       " edge")
        reference = str(dimension.compensation_ref)
        if (reference == _UNCOMPENSATED) != (channel[marker] not in compensated):
            raise fail(f"gate {gate_id} is on {'un' if reference == _UNCOMPENSATED else ''}"
                       f"compensated values, but bcellmap read {channel[marker]} "
                       f"{'' if channel[marker] in compensated else 'un'}compensated: set "
                       "the sample's compensation to match, or redraw the gate")
        if reference not in (_UNCOMPENSATED, "FCS"):
            drawn = strategy.get_comp_matrix(reference)
            ours = pd.DataFrame(np.asarray(compensation["matrix"], dtype=float),
                                index=list(compensation["channels"]),
                                columns=list(compensation["channels"]))
            theirs = drawn.as_dataframe(fluoro_labels=False).reindex(
                index=ours.index, columns=ours.columns)
            if not np.allclose(theirs.to_numpy(dtype=float), ours.to_numpy(), atol=1e-6):
                raise fail(f"gate {gate_id} was drawn with spillover matrix {reference}, "
                           "which differs from the one bcellmap used")
        linear = np.array([[float(edge)]])
        if dimension.transformation_ref is not None:
            linear = strategy.get_transform(dimension.transformation_ref).inverse(linear)
        value = float(_to_sample_scale(np.asarray(linear, dtype=float).ravel(),
                                       parameters.get(channel[marker], {"method": "none"}))[0])
        side = "pos" if level in ("pos", "neg") else "hi"
        if (marker, side) in found and level in ("neg", "lo"):
            continue  # the pos/hi gate of the pair wins
        found[(marker, side)] = value
    return found


def _parse(path: str | os.PathLike) -> Any:
    from flowkit import parse_gating_xml

    return parse_gating_xml(str(path))
