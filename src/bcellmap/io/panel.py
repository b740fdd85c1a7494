"""Panel resolution: canonical marker names (CD19, Live, FSC-A, ...) for FCS channels.

A channel's canonical name comes from, in order: the panel's explicit mapping
(``config["panels"][panel]["channels"]``, ``{canonical: $PnN}``), scatter/time recognised from
``$PnN``, then the marker label ``$PnS``, then ``$PnN`` itself (mass cytometry files often
carry the marker only there, e.g. ``CD19_Nd142``).

Marker labels are split into tokens at spaces, ``_``, ``-``, ``/``, ``(``, ``)`` and ``,``, so
"CD19", "CD19 PE-Cy7", "PE-Cy7 CD19", "CD19-PECy7" and "CD19_Nd142" all give ``CD19``, and a
CD token must match whole (``CD19`` is never ``CD193``; ``CD3`` never ``CD33`` or ``CD38``).
Viability stains ("Live", "Live/Dead", "L/D", "Viability", "Zombie Aqua", "7-AAD",
"viability_Pt195", a "VIVID / CD14" dump channel, ...) map to ``Live``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InputError

#: Canonical markers the B-cell workflow relies on (other CDs are found generically).
CANONICAL_MARKERS = ("CD3", "CD19", "CD20", "IgD", "CD27", "CD38", "CD24", "Live")
SCATTER = ("FSC-A", "FSC-H", "FSC-W", "SSC-A", "SSC-H", "SSC-W")
TIME = "Time"

_SCATTER = re.compile(r"^(FSC|SSC|FS|SS)[\s_-]?(A|H|W)$", re.IGNORECASE)
_TIME = re.compile(r"^time$", re.IGNORECASE)
_SPLIT = re.compile(r"[\s_/(),;:-]+")
# A whole CD token: CD + number + optional isoform suffix (CD45RA, CD11b, CD62L).
_CD = re.compile(r"^CD(\d{1,3})(RA|RO|RB|[A-EL])?$", re.IGNORECASE)
_IG = re.compile(r"^IG([ADEGM])$", re.IGNORECASE)
# Viability stains. "L/D" is matched on the raw label because "/" splits tokens.
_VIABILITY_TOKENS = {"live", "dead", "livedead", "viability", "viab", "zombie", "vivid",
                     "7aad", "7-aad", "fvs", "cisplatin", "ld"}
_VIABILITY_RAW = re.compile(r"(^|[^a-z])l\s*/\s*d([^a-z]|$)|7-?aad|live\s*/\s*dead", re.IGNORECASE)


def _cd_name(match: re.Match) -> str:
    number, suffix = match.group(1), match.group(2) or ""
    suffix = suffix.upper() if len(suffix) == 2 or suffix.upper() == "L" else suffix.lower()
    return f"CD{int(number)}{suffix}"


def canonical_name(label: str) -> str:
    """Return the canonical marker name a channel label denotes, or "".

    Parameters
    ----------
    label
        A ``$PnS`` marker label or ``$PnN`` channel name.

    Returns
    -------
    str
        ``FSC-A`` ... ``SSC-W``, ``Time``, ``Live``, ``IgD``/``IgM``/..., ``CD<n>[suffix]``,
        or "" when the label names no marker or names several different ones
        (e.g. ``CD235_CD61``), which would be ambiguous.
    """
    text = str(label).strip()
    if not text:
        return ""
    scatter = _SCATTER.match(text)
    if scatter:
        kind = "FSC" if scatter.group(1).upper().startswith("F") else "SSC"
        return f"{kind}-{scatter.group(2).upper()}"
    if _TIME.match(text):
        return TIME
    tokens = [token for token in _SPLIT.split(text) if token]
    if _VIABILITY_RAW.search(text) or any(t.lower() in _VIABILITY_TOKENS for t in tokens):
        return "Live"
    found: list[str] = []
    for token in tokens:
        cd = _CD.match(token)
        if cd:
            found.append(_cd_name(cd))
            continue
        ig = _IG.match(token)
        if ig:
            found.append(f"Ig{ig.group(1).upper()}")
    unique = list(dict.fromkeys(found))
    return unique[0] if len(unique) == 1 else ""


def channel_kind(canonical: str, channel: str) -> str:
    """Classify a channel as ``scatter``, ``time``, ``viability`` or ``fluorescence``.

    ``fluorescence`` also covers mass cytometry metal channels.
    """
    if canonical in SCATTER or _SCATTER.match(channel.strip()):
        return "scatter"
    if canonical == TIME or _TIME.match(channel.strip()):
        return "time"
    if canonical == "Live":
        return "viability"
    return "fluorescence"


def resolve_panel(
    channels: Sequence[str],
    markers: Sequence[str],
    *,
    explicit: Mapping[str, str] | None = None,
    path: object = None,
    sample_id: str | None = None,
) -> list[str]:
    """Give each channel its canonical marker name ("" when it has none).

    Parameters
    ----------
    channels
        ``$PnN`` per channel.
    markers
        ``$PnS`` per channel ("" when absent).
    explicit
        ``{canonical: $PnN}`` from the panel config; overrides name matching. A marker
        mapped to None (or "") is on no channel: a file whose label names it (a detector
        labelled "CD3" that also carries IgD) does not give it that marker.
    path, sample_id
        Named in error messages.

    Returns
    -------
    list of str
        One canonical name per channel. A canonical name is given to one channel only: when
        name matching finds it on several, the first channel keeps it.

    Raises
    ------
    InputError
        The explicit mapping names a channel the file does not have.
    """
    explicit = dict(explicit or {})
    result = [""] * len(channels)
    taken: set[str] = set()
    for canonical, channel in explicit.items():
        if channel is None or str(channel) == "":
            taken.add(str(canonical))  # explicitly on no channel
            continue
        if channel not in channels:
            raise InputError(
                f"panel maps {canonical} to channel {channel!r}, which the file does not have "
                f"(channels: {', '.join(channels)})", path=path, sample_id=sample_id)
        result[list(channels).index(channel)] = str(canonical)
        taken.add(str(canonical))
    for index, (channel, marker) in enumerate(zip(channels, markers, strict=True)):
        if result[index]:
            continue
        from_channel = canonical_name(channel)
        if from_channel in SCATTER or from_channel == TIME:
            name = from_channel
        else:
            # A marker label equal to the channel name carries no extra information.
            name = canonical_name(marker) if marker and marker != channel else ""
            name = name or from_channel
        if name and name not in taken:
            result[index] = name
            taken.add(name)
    return result


def _as_alternatives(entry: str | Sequence[str]) -> list[str]:
    return [entry] if isinstance(entry, str) else [str(e) for e in entry]


def check_required(
    canonicals: Sequence[str],
    required: Iterable[str | Sequence[str]],
    *,
    channels: Sequence[str],
    markers: Sequence[str],
    path: object = None,
    sample_id: str | None = None,
) -> None:
    """Raise InputError when a required marker (or every one of a group) is missing.

    Parameters
    ----------
    canonicals
        Resolved canonical name per channel.
    required
        Entries of ``config["ingest"]["required_markers"]``; a list entry means "at least
        one of these".
    channels, markers
        ``$PnN``/``$PnS`` per channel, listed in the message.
    """
    present = {c for c in canonicals if c}
    missing = []
    for entry in required:
        options = _as_alternatives(entry)
        if not present.intersection(options):
            missing.append(" or ".join(options))
    if missing:
        have = ", ".join(f"{ch} ({mk})" if mk and mk != ch else ch
                         for ch, mk in zip(channels, markers, strict=True))
        found = ", ".join(sorted(present)) or "none"
        raise InputError(
            f"required marker(s) not found: {'; '.join(missing)}. Markers recognised: {found}. "
            f"Channels in the file: {have}. Map them in config panels.<panel>.channels "
            "or change ingest.required_markers", path=path, sample_id=sample_id)


def find_marker(adata: Any, name: str) -> str | None:
    """Return the ``var_name`` of the channel carrying marker ``name``, or None.

    ``name`` may be a canonical name (``CD19``), any spelling that resolves to one
    (``cd19``, ``Live/Dead``) or a channel name (``PE-Cy7-A``).
    """
    canonical = adata.var["canonical"].astype(str) if "canonical" in adata.var else None
    if canonical is not None:
        for wanted in (name, canonical_name(name)):
            if wanted:
                hits = list(adata.var_names[canonical.to_numpy() == wanted])
                if hits:
                    return str(hits[0])
    if name in adata.var_names:
        return str(name)
    return None


def marker_values(adata: Any, markers: Sequence[str]) -> np.ndarray:
    """Return the ``X`` columns (events x markers) of the named canonical markers.

    Parameters
    ----------
    adata
        A flow AnnData as written by ``bcellmap ingest-flow``.
    markers
        Canonical marker names (or spellings / channel names ``find_marker`` accepts).

    Raises
    ------
    InputError
        Naming every marker that the data does not have.
    """
    columns = [find_marker(adata, marker) for marker in markers]
    missing = [m for m, c in zip(markers, columns, strict=True) if c is None]
    if missing:
        sample = adata.uns.get("sample", {}) if hasattr(adata, "uns") else {}
        source = adata.uns.get("source", {}) if hasattr(adata, "uns") else {}
        have = ", ".join(c for c in adata.var["canonical"].astype(str) if c) \
            if "canonical" in adata.var else ""
        raise InputError(f"marker(s) not in the data: {', '.join(missing)} "
                         f"(markers present: {have or 'none'})",
                         path=source.get("path"), sample_id=sample.get("sample_id"))
    indices = [adata.var_names.get_loc(c) for c in columns]
    values = adata.X[:, indices]
    return np.asarray(values.toarray() if hasattr(values, "toarray") else values)


def marker_columns(adata: Any, markers: Iterable[str]) -> dict[str, np.ndarray]:
    """Return the ``X`` column (float64) of every named canonical marker the sample has.

    Markers the sample lacks are left out (a panel without CD3 simply has no CD3 gate);
    :func:`marker_values` is the strict variant that names the missing ones.

    Raises
    ------
    InputError
        When ``var`` has no ``canonical`` column (the file was not written by ingest).
    """
    if "canonical" not in adata.var.columns:
        raise InputError("var has no 'canonical' column naming the markers")
    canonical = list(adata.var["canonical"].astype(str))
    columns: dict[str, np.ndarray] = {}
    x = adata.X
    for marker in markers:
        if marker in canonical:
            column = x[:, canonical.index(marker)]
            column = column.toarray().ravel() if hasattr(column, "toarray") else column
            columns[marker] = np.asarray(column, dtype=np.float64).ravel()
    return columns
