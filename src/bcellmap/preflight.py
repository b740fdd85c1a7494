"""Preflight: check the sample sheet, the config and every file's header before any job runs.

``bcellmap check-samples --deep`` and the workflow (``workflow/rules/common.smk``) run
:func:`run_preflight`. It reads each FCS file's HEADER and TEXT segments (plus at most
``VALUE_EVENTS`` events for a value-range check, never the whole data) and reports every
problem at once, per sample and for the cohort:

- the sheet: every line's problems (:func:`bcellmap.io.samplesheet.read_sample_sheet`);
- markers found and missing per panel (``ingest.required_markers`` missing: error;
  ``cluster.markers`` missing: warning);
- compensation: the source (keyword, matrix file, none) and whether the matrix passes
  :func:`bcellmap.flow.compensation.matrix_problems`;
- values already compensated or transformed (fluorescence values within a few units while
  ``$PnR`` is in the thousands, ``Comp-`` channel names, flowCore's ``transformation=custom``,
  FlowSOM/UMAP columns of an analysis export) while the panel still compensates or
  transforms: an error (double processing), unless the panel says ``compensation:
  {source: none}`` / ``transform: {method: none}``;
- mixed instruments: mass cytometry and fluorescence files in one panel (error) or in one
  cohort (warning), and differing ``$CYT`` within a panel (warning);
- ``device: gpu`` without a usable GPU (error).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BcellmapError, InputError, SampleSheetError

#: Events read for the value-range check (from the start of the DATA segment).
VALUE_EVENTS = 5000
#: Fluorescence values whose 99.9th percentile stays at or below this in *every* fluorescence
#: channel are transformed (arcsinh/logicle give about -2..9), not linear (thousands).
TRANSFORMED_MAX = 30.0
_COMP_PREFIX = re.compile(r"^comp[-_ ]", re.IGNORECASE)
_ANALYSIS_COLUMN = re.compile(r"^(flowsom|meta_?cluster|metaclustering|som_?cluster|"
                              r"cluster_?id|phenograph|umap|tsne|t-sne|opt-?sne)", re.IGNORECASE)

ERROR, WARNING, NOTE = "error", "warning", "note"


@dataclass
class Finding:
    """One preflight finding: ``level`` is error, warning or note."""

    level: str
    text: str


@dataclass
class SampleReport:
    """What the preflight learnt about one sheet line."""

    sample_id: str
    line: int
    modality: str
    path: str
    panel: str = "default"
    file: str = ""
    instrument: str = ""
    markers_found: list[str] = field(default_factory=list)
    markers_missing: list[str] = field(default_factory=list)
    other_markers: list[str] = field(default_factory=list)
    compensation: str = ""
    transform: str = ""
    findings: list[Finding] = field(default_factory=list)
    mass_cytometry: bool | None = None
    cytometer: str = ""

    def add(self, level: str, text: str) -> None:
        self.findings.append(Finding(level, text))


@dataclass
class PreflightReport:
    """Every finding of one preflight: per sample and for the cohort."""

    sheet: str
    samples: list[SampleReport] = field(default_factory=list)
    cohort: list[Finding] = field(default_factory=list)
    n_patients: int = 0

    def _all(self) -> list[Finding]:
        return self.cohort + [f for s in self.samples for f in s.findings]

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self._all() if f.level == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self._all() if f.level == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self) -> str:
        """The readable report: per sample, then the cohort, then a summary line."""
        lines = [f"Preflight of {self.sheet}: {len(self.samples)} sample(s), "
                 f"{self.n_patients} patient(s)"]
        for s in self.samples:
            flagged = ("ERROR" if any(f.level == ERROR for f in s.findings)
                       else "warning" if any(f.level == WARNING for f in s.findings) else "ok")
            lines.append("")
            lines.append(f"{s.sample_id or '?'} (line {s.line}, {s.modality or '?'}): {flagged}")
            lines.append(f"  file:          {s.path}")
            if s.file:
                lines.append(f"                 {s.file}")
            if s.modality == "flow" and (s.markers_found or s.markers_missing):
                lines.append(f"  panel:         {s.panel}")
                lines.append(f"  markers found: {', '.join(s.markers_found) or 'none'}")
                lines.append(f"  missing:       {', '.join(s.markers_missing) or 'none'}")
                if s.other_markers:
                    lines.append(f"  other markers: {', '.join(s.other_markers)}")
            if s.compensation:
                lines.append(f"  compensation:  {s.compensation}")
            if s.transform:
                lines.append(f"  transform:     {s.transform}")
            for f in s.findings:
                lines.append(f"  {f.level.upper() if f.level == ERROR else f.level}: {f.text}")
        if self.cohort:
            lines.append("")
            lines.append("cohort:")
            for f in self.cohort:
                lines.append(f"  {f.level.upper() if f.level == ERROR else f.level}: {f.text}")
        lines.append("")
        n_err, n_warn = len(self.errors), len(self.warnings)
        verdict = "fix the errors above before running the workflow" if n_err else "ok"
        lines.append(f"{n_err} error(s), {n_warn} warning(s): {verdict}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- headers

@dataclass
class _Header:
    channels: list[str]
    markers: list[str]
    ranges: list[float]
    text: dict[str, str]
    version: str
    datatype: str
    n_events: int
    sample: np.ndarray | None  # first events, linear as stored (None: not read)
    note: str = ""


def _first_events(path: Path, flow: Any, n_channels: int, n_events: int) -> np.ndarray | None:
    """Read up to VALUE_EVENTS events of float data straight from the DATA segment."""
    text = flow.text
    datatype = str(flow.data_type).upper()
    if datatype not in ("F", "D"):
        return None
    width = 4 if datatype == "F" else 8
    order = str(text.get("byteord", "1,2,3,4")).replace(" ", "")
    endian = "<" if order.startswith("1") else ">"
    start = int(flow.header.get("data_start") or 0)
    if not start:
        try:
            start = int(str(text.get("begindata", "0")).strip())
        except ValueError:
            return None
    n = min(n_events, VALUE_EVENTS)
    with path.open("rb") as handle:
        handle.seek(start)
        buffer = handle.read(n * n_channels * width)
    n = len(buffer) // (n_channels * width)
    if n == 0:
        return None
    dtype = np.dtype(f"{endian}f{width}")
    return np.frombuffer(buffer[: n * n_channels * width], dtype=dtype).reshape(n, n_channels)


def read_header(path: str | os.PathLike, *, sample_id: str | None = None) -> _Header:
    """Read one FCS file's HEADER and TEXT (and its first events for float data).

    Falls back to :func:`bcellmap.io.fcs.read_fcs` (the whole file) when flowio cannot parse
    the TEXT segment alone, so that the preflight accepts every file ingest accepts.
    """
    import warnings

    import flowio

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flow = flowio.FlowData(str(path), only_text=True)
        meta = [flow.channels[k] for k in sorted(flow.channels, key=int)]
        channels = [str(m["pnn"]).strip() for m in meta]
        markers = [str(m.get("pns", "") or "").strip() for m in meta]
        ranges = [float(m.get("pnr", 0) or 0) for m in meta]
        n_events = int(flow.event_count)
        try:
            sample = _first_events(path, flow, len(channels), n_events)
        except (OSError, ValueError):
            sample = None
        return _Header(channels, markers, ranges, dict(flow.text), str(flow.version),
                       str(flow.data_type).upper(), n_events, sample)
    except Exception:  # noqa: BLE001 - any flowio failure: let the full reader decide
        from .io.fcs import read_fcs

        data = read_fcs(path, sample_id=sample_id)
        return _Header(list(data.channels), list(data.markers), [float(r) for r in data.ranges],
                       dict(data.text), data.version, data.datatype, data.n_events,
                       data.events[:VALUE_EVENTS],
                       note="TEXT segment needed the full reader")


# ----------------------------------------------------------------------------- checks

def _alternatives(entry: Any) -> list[str]:
    return [entry] if isinstance(entry, str) else [str(e) for e in entry]


def _panel_settings(config: Mapping[str, Any], panel: str) -> tuple[dict, dict]:
    from .flow._ingest import _ingest_settings

    return _ingest_settings(config, panel)


def check_flow_file(report: SampleReport, config: Mapping[str, Any]) -> None:
    """Fill ``report`` from one FCS file's header (markers, compensation, transform)."""
    from .flow._transform import is_mass_cytometry
    from .flow.compensation import matrix_problems, read_matrix_file, spillover_from_text
    from .io.panel import CANONICAL_MARKERS, channel_kind, resolve_panel

    panel = report.panel
    try:
        panel_config, settings = _panel_settings(config, panel)
    except BcellmapError as exc:
        report.add(ERROR, str(exc))
        return
    try:
        header = read_header(report.path, sample_id=report.sample_id)
    except InputError as exc:
        report.add(ERROR, exc.problem)
        return
    text = header.text
    cytometer = str(text.get("cyt", "") or "").strip()
    mass = is_mass_cytometry(cytometer, header.channels)
    report.mass_cytometry, report.cytometer = mass, cytometer
    report.instrument = "mass cytometry" if mass else "fluorescence flow"
    creator = str(text.get("creator", "") or "").strip()
    report.file = (f"FCS {header.version}, {header.n_events:,} events x {len(header.channels)} "
                   f"channels, {report.instrument}"
                   + (f", $CYT {cytometer}" if cytometer else "")
                   + (f", {creator}" if creator else "")
                   + (f" ({header.note})" if header.note else ""))
    if header.n_events == 0:
        report.add(ERROR, "the file holds 0 events")

    # Markers.
    try:
        canonicals = resolve_panel(header.channels, header.markers,
                                   explicit=panel_config.get("channels"))
    except InputError as exc:
        report.add(ERROR, f"{exc.problem} (config panels.{panel}.channels)")
        canonicals = resolve_panel(header.channels, header.markers)
    present = [c for c in canonicals if c]
    required = settings.get("required_markers") or []
    cluster_markers = [str(m) for m in (config.get("cluster") or {}).get("markers") or []]
    wanted = list(dict.fromkeys([*CANONICAL_MARKERS, *cluster_markers]))
    report.markers_found = [m for m in wanted if m in present]
    report.markers_missing = [m for m in wanted if m not in present]
    kinds = [channel_kind(c, n) for c, n in zip(canonicals, header.channels, strict=True)]
    report.other_markers = [c for c, k in zip(canonicals, kinds, strict=True)
                            if c and c not in wanted and k in ("fluorescence", "viability")]
    missing_required = [" or ".join(_alternatives(e)) for e in required
                        if not set(_alternatives(e)) & set(present)]
    if missing_required:
        where = f"panels.{panel}.required_markers" if "required_markers" in panel_config \
            else "ingest.required_markers"
        report.add(ERROR, f"required marker(s) not found: {'; '.join(missing_required)} "
                          f"({where}). Map the channels in panels.{panel}.channels, or change "
                          f"{where}")
    missing_cluster = [m for m in cluster_markers if m not in present]
    if missing_cluster:
        report.add(WARNING, f"cluster.markers not in this file: {', '.join(missing_cluster)}")

    # Already processed? Evidence from names, keywords and values.
    fluor = [i for i, k in enumerate(kinds) if k in ("fluorescence", "viability")]
    evidence_comp: list[str] = []
    evidence_trans: list[str] = []
    comp_named = [header.channels[i] for i in fluor if _COMP_PREFIX.match(header.channels[i])]
    if comp_named:
        evidence_comp.append(f"channel names {', '.join(comp_named[:3])}"
                             f"{', ...' if len(comp_named) > 3 else ''} say compensated")
    keyword = str(text.get("transformation", "") or "").strip().lower()
    if keyword and keyword != "applied":
        evidence_trans.append(f"keyword TRANSFORMATION={keyword} (a flowCore transform)")
    analysis = [c for c in header.channels if _ANALYSIS_COLUMN.match(c)]
    looks_transformed = None
    if header.sample is not None and fluor:
        values = np.asarray(header.sample[:, fluor], dtype=float)
        finite = np.isfinite(values)
        if not finite.all():
            report.add(WARNING, f"{int((~finite).sum())} non-finite value(s) among the first "
                                f"{values.shape[0]} events")
        values = np.where(finite, values, np.nan)
        high = np.nanpercentile(values, 99.9, axis=0) if values.size else np.array([])
        ranges = np.array([header.ranges[i] for i in fluor])
        if high.size and np.all(np.isfinite(high)):
            looks_transformed = bool(np.max(high) <= TRANSFORMED_MAX
                                     and np.max(ranges) > 10 * TRANSFORMED_MAX)
            if looks_transformed:
                evidence_trans.append(
                    f"fluorescence values reach only {np.max(high):.3g} (99.9th percentile, "
                    f"first {values.shape[0]} events) while $PnR is {np.max(ranges):.0f}")
    if looks_transformed:
        evidence_comp.append("transformed values are compensated before transforming")
    if analysis:
        report.add(WARNING, f"analysis columns {', '.join(analysis)}: this is an export of a "
                            "processed file (FlowSOM/FlowJo/UMAP), not an acquisition")

    # Compensation.
    comp = settings.get("compensation") or {}
    source = str(comp.get("source", "auto")).lower()
    allow_invalid = bool(comp.get("allow_invalid", False))
    fluor_channels = [header.channels[i] for i in fluor]
    matrix = None
    if source == "none":
        report.compensation = "none (compensation.source: none)"
    elif source == "file":
        matrix_file = comp.get("matrix_file")
        if not matrix_file:
            report.add(ERROR, "compensation.source is 'file' but matrix_file is not set")
        else:
            try:
                matrix = (*read_matrix_file(matrix_file), f"file {matrix_file}")
            except InputError as exc:
                report.add(ERROR, str(exc))
    elif source == "auto":
        try:
            parsed, unreadable = spillover_from_text(text), False
        except InputError as exc:
            report.add(ERROR, f"{exc.problem}; set panels.{panel}.compensation.source: none "
                              "or give a matrix_file")
            parsed, unreadable = None, True
            report.compensation = "keyword $SPILLOVER/SPILL present but INVALID"
        if parsed is not None:
            matrix = (*parsed, "keyword $SPILLOVER/SPILL")
        elif not unreadable:
            if mass:
                report.compensation = "none (mass cytometry, no spillover keyword)"
            else:
                report.compensation = "none (no spillover keyword in the file)"
                if len(fluor_channels) > 1 and not looks_transformed:
                    report.add(WARNING, "no spillover keyword: the events are not compensated "
                                        "(fine only if they were compensated before export; "
                                        "else give compensation.matrix_file)")
    else:
        report.add(ERROR, f"compensation.source {source!r} is not auto, file or none")
    if matrix is not None:
        values, names, origin = matrix
        problems = matrix_problems(values, names, channels=header.channels,
                                   kinds=[channel_kind(c, n) for c, n in
                                          zip(canonicals, header.channels, strict=True)])
        state = "valid" if not problems else "INVALID (see below)"
        report.compensation = f"{origin}, {len(names)} detectors, {state}"
        if problems and not allow_invalid:
            report.add(ERROR, f"the spillover matrix cannot be right ({'; '.join(problems)}). "
                              f"Set panels.{panel}.compensation.source: none if the data are "
                              "already compensated, give a matrix_file, or allow_invalid: true")
        elif problems:
            report.add(WARNING, "an invalid spillover matrix is used (allow_invalid: true)")
        if evidence_comp:
            report.add(ERROR, f"values look already compensated ({'; '.join(evidence_comp)}) "
                              f"but compensation.source is {source}: they would be compensated "
                              f"twice. Set panels.{panel}.compensation: {{source: none}} "
                              "(use a panel of its own for these files)")

    # Transform.
    transform = settings.get("transform") or {}
    method = str(transform.get("method", "arcsinh")).lower()
    cofactor = transform.get("cofactor")
    if method == "arcsinh":
        cofactor = cofactor or (5 if mass else 150)
        report.transform = f"arcsinh, cofactor {cofactor:g}"
    else:
        report.transform = method
    if transform.get("per_channel"):
        report.transform += f" (per-channel settings for {len(transform['per_channel'])})"
    if evidence_trans:
        report.transform += "; values look ALREADY TRANSFORMED"
        if method != "none":
            report.add(ERROR, f"values look already transformed ({'; '.join(evidence_trans)}) "
                              f"but transform.method is {method}: they would be transformed "
                              f"twice. Set panels.{panel}.transform: {{method: none}} "
                              "(use a panel of its own for these files)")
    elif looks_transformed is False:
        report.transform += "; values look linear (raw)"
        if method == "none":
            report.add(ERROR, f"transform.method is none but the values look linear "
                              f"(fluorescence reaches thousands): they would be clustered and "
                              f"gated untransformed. Set panels.{panel}.transform.method to "
                              "arcsinh or logicle")
    if keyword == "applied":
        report.add(NOTE, "keyword TRANSFORMATION=applied (flowCore's mark of linearisation "
                         "on reading, not a transform)")


def check_scrna_path(report: SampleReport) -> None:
    """A light look at an scRNA input: the kind of file or folder it is."""
    path = Path(report.path)
    if path.is_dir():
        names = {p.name for p in path.iterdir()}
        if not any(n.startswith("matrix.mtx") for n in names):
            report.add(ERROR, "an scRNA folder must be a 10x mtx folder (matrix.mtx[.gz], "
                              "features/genes, barcodes)")
        report.file = "10x mtx folder"
    elif path.suffix.lower() in (".h5", ".h5ad"):
        report.file = {".h5": "10x HDF5", ".h5ad": "AnnData"}[path.suffix.lower()]
    elif path.exists():
        report.add(ERROR, "an scRNA path must be a 10x .h5, a 10x mtx folder or an .h5ad")


def _lenient_rows(sheet_path: Path) -> list[dict[str, str]]:
    """The sheet's rows as text (for inspecting files when the sheet itself has errors)."""
    import pandas as pd

    try:
        frame = pd.read_csv(sheet_path, sep="\t", dtype=str, keep_default_na=False)
    except Exception:  # noqa: BLE001 - the sheet error is reported already
        return []
    frame.columns = [c.strip() for c in frame.columns]
    if not {"sample_id", "modality", "path"} <= set(frame.columns):
        return []
    return [{k: str(v).strip() for k, v in row.items()} for row in frame.to_dict("records")]


def run_preflight(
    sheet_path: str | os.PathLike,
    config: Mapping[str, Any],
    *,
    deep: bool = True,
    check_gpu: bool = True,
) -> PreflightReport:
    """Check the sheet, the config and (``deep``) every file's header; report everything.

    Parameters
    ----------
    sheet_path
        The tab-separated sample sheet.
    config
        The merged config (package defaults plus the user's keys).
    deep
        Read every flow file's header (and first events); False checks the sheet only.
    check_gpu
        Check that a GPU is usable when ``device`` (or ``BCELLMAP_DEVICE``) asks for one.

    Returns
    -------
    PreflightReport
        Never raises for problems in the input: they are findings (``report.errors``).
    """
    from .io.samplesheet import SampleSheetErrors, read_sample_sheet

    sheet_path = Path(sheet_path)
    report = PreflightReport(sheet=str(sheet_path))
    panels = list(config.get("panels") or {})
    bad_lines: set[int] = set()
    sheet = None
    try:
        sheet = read_sample_sheet(sheet_path, panels=panels)
    except SampleSheetError as exc:
        errors = exc.errors if isinstance(exc, SampleSheetErrors) else [exc]
        for error in errors:
            where = f"line {error.row}, " if error.row else ""
            column = f"column {error.column!r}: " if error.column else ""
            report.cohort.append(Finding(ERROR, f"sample sheet {where}{column}{error.problem}"))
            if error.row:
                bad_lines.add(error.row)
    if sheet is not None:
        rows = [dict(r) for r in sheet.to_dict("records")]
        report.n_patients = int(sheet["patient_id"].nunique())
    else:
        rows = _lenient_rows(sheet_path)
        base = sheet_path.resolve().parent
        for row in rows:
            if row.get("path") and not Path(row["path"]).is_absolute():
                row["path"] = str(base / row["path"])
        report.n_patients = len({r.get("patient_id", "") for r in rows})

    for position, row in enumerate(rows):
        line = position + 2
        sample = SampleReport(sample_id=str(row.get("sample_id", "")), line=line,
                              modality=str(row.get("modality", "")), path=str(row.get("path", "")),
                              panel=str(row.get("panel", "") or "") or "default")
        report.samples.append(sample)
        if not deep or line in bad_lines and not _fcs_like(sample):
            continue
        if sample.modality == "flow":
            if _fcs_like(sample):
                check_flow_file(sample, config)
        elif sample.modality == "scrna":
            check_scrna_path(sample)

    for panel, value in sorted(((config.get("annotate") or {}).get("user_gates") or {}).items()):
        given = Path(str(value)).expanduser()
        if not (given if given.is_absolute() else Path.cwd() / given).is_file():
            report.cohort.append(Finding(ERROR, (
                f"annotate.user_gates: panel {panel!r}'s GatingML file {given} does not exist "
                f"(looked for {given if given.is_absolute() else Path.cwd() / given})")))
        elif panel not in panels and panel != "default":
            report.cohort.append(Finding(ERROR, (
                f"annotate.user_gates names panel {panel!r}, which is not defined in the "
                f"config (defined: {', '.join(panels)})")))
    if deep:
        _check_instruments(report)
    if check_gpu:
        _check_device(report, config)
    return report


def _fcs_like(sample: SampleReport) -> bool:
    path = Path(sample.path)
    if sample.modality != "flow" or not path.is_file():
        return False
    try:
        with path.open("rb") as handle:
            return handle.read(3) == b"FCS"
    except OSError:
        return False


def _check_instruments(report: PreflightReport) -> None:
    """Mass cytometry with fluorescence in one panel (error) or one cohort (warning)."""
    flow = [s for s in report.samples if s.mass_cytometry is not None]
    if not flow:
        return
    by_panel: dict[str, list[SampleReport]] = {}
    for s in flow:
        by_panel.setdefault(s.panel, []).append(s)
    for panel, members in by_panel.items():
        mass = [s.sample_id for s in members if s.mass_cytometry]
        fluor = [s.sample_id for s in members if not s.mass_cytometry]
        if mass and fluor:
            report.cohort.append(Finding(ERROR, (
                f"panel {panel!r} mixes mass cytometry ({', '.join(mass)}) and fluorescence "
                f"flow ({', '.join(fluor)}): their values have different scales, so thresholds "
                "and clusters learned on them together are wrong. Give each instrument type a "
                "panel of its own (sheet column 'panel', config panels)")))
        cytometers = sorted({s.cytometer for s in members if s.cytometer})
        if len(cytometers) > 1:
            report.cohort.append(Finding(WARNING, (
                f"panel {panel!r} holds files from {len(cytometers)} instruments "
                f"($CYT: {', '.join(cytometers)}); detector settings differ between "
                "instruments: consider a batch per instrument (annotate.thresholds.method: "
                "batch) or reference-sample normalisation")))
    kinds = {bool(s.mass_cytometry) for s in flow}
    if len(kinds) > 1 and len(by_panel) > 1:
        report.cohort.append(Finding(WARNING, (
            "the cohort mixes mass cytometry and fluorescence flow files (in separate panels); "
            "compare their B-cell results per panel")))


def _check_device(report: PreflightReport, config: Mapping[str, Any]) -> None:
    from .kernels.backend import ENV_DEVICE, resolve_device

    requested = os.environ.get(ENV_DEVICE, "").strip() or str(config.get("device", "auto"))
    if requested.strip().lower() != "gpu":
        return
    try:
        _, reason = resolve_device(config.get("device"))
    except BcellmapError as exc:
        report.cohort.append(Finding(ERROR, f"{exc}. Set device: auto (or cpu), or run where "
                                            "a GPU is visible"))
        return
    report.cohort.append(Finding(NOTE, reason))
