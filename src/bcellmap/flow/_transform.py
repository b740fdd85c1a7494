"""Per-channel transforms of compensated events to the scale clustering works on.

* fluorescence and viability: ``arcsinh(x / cofactor)`` (default), ``logicle``
  (``flowutils.transforms.logicle``, output on its 0-1 scale) or ``none`` (data already
  transformed, e.g. FlowSOM's preprocessed example file).
  The arcsinh cofactor defaults to 150 for fluorescence flow and to 5 for mass cytometry.
  A file is taken as mass cytometry when ``$CYT`` names a CyTOF/Helios instrument or at
  least two channel names carry a metal tag such as ``Nd142Di`` or ``CD19_Nd142``.
* scatter: linear, ``x / $PnR * 10``, so the full detector range maps to 0-10.
* time: kept as acquired (``none``).

``ingest.transform.per_channel`` overrides any of this per channel ($PnN) or canonical
marker, e.g. ``{CD19: {method: logicle}, "FITC-A": {method: arcsinh, cofactor: 400}}``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InputError

#: Arcsinh cofactors used when ``ingest.transform.cofactor`` is null.
FLOW_COFACTOR = 150.0
MASS_CYTOMETRY_COFACTOR = 5.0
#: Scatter is scaled linearly so the detector range ($PnR) maps to 0-SCATTER_SCALE.
SCATTER_SCALE = 10.0
METHODS = ("arcsinh", "logicle", "none", "linear")

_METALS = ("La|Pr|Nd|Sm|Eu|Gd|Tb|Dy|Ho|Er|Tm|Yb|Lu|Pt|Ir|In|Cd|Pd|Ba|Cs|Ce|Rh|Bi|Y|Sn|I|Xe"
           "|Hf|Os|Au|Pb")
_METAL_TAG = re.compile(rf"(^|[_\s(])\(?({_METALS})\d{{2,3}}\)?(Di|Dd)?($|[_\s)])|"
                        rf"^\(?({_METALS})\d{{2,3}}\)?(Di|Dd)$")
_CYTOF = re.compile(r"cytof|helios|xt\b|fluidigm|standard biotools", re.IGNORECASE)


def is_mass_cytometry(cytometer: str, channels: Sequence[str]) -> bool:
    """Tell whether a file comes from a mass cytometer.

    Parameters
    ----------
    cytometer
        ``$CYT`` ("" when absent).
    channels
        ``$PnN`` names.
    """
    if cytometer and _CYTOF.search(cytometer):
        return True
    return sum(bool(_METAL_TAG.search(name)) for name in channels) >= 2


def arcsinh(values: np.ndarray, cofactor: float) -> np.ndarray:
    """Return ``arcsinh(values / cofactor)``."""
    return np.arcsinh(values / cofactor)


def _channel_settings(channel: str, canonical: str, kind: str, *, settings: Mapping[str, Any],
                      mass_cytometry: bool) -> dict[str, Any]:
    """The method and parameters for one channel, after per-channel overrides."""
    if kind == "time":
        chosen: dict[str, Any] = {"method": "none"}
    elif kind == "scatter":
        chosen = {"method": "linear"}
    else:
        default_cofactor = MASS_CYTOMETRY_COFACTOR if mass_cytometry else FLOW_COFACTOR
        cofactor = settings.get("cofactor")
        chosen = {"method": str(settings.get("method", "arcsinh")).lower(),
                  "cofactor": float(cofactor) if cofactor is not None else default_cofactor,
                  **dict(settings.get("logicle") or {})}
    per_channel = settings.get("per_channel") or {}
    override = per_channel.get(channel) or (per_channel.get(canonical) if canonical else None)
    if override:
        chosen.update(dict(override))
        if chosen.get("method") == "arcsinh" and chosen.get("cofactor") is None:
            chosen["cofactor"] = MASS_CYTOMETRY_COFACTOR if mass_cytometry else FLOW_COFACTOR
    return chosen


def transform_events(
    compensated: np.ndarray,
    *,
    channels: Sequence[str],
    canonicals: Sequence[str],
    kinds: Sequence[str],
    ranges: Sequence[float],
    settings: Mapping[str, Any],
    mass_cytometry: bool,
    path: object = None,
    sample_id: str | None = None,
) -> tuple[np.ndarray, list[str], dict[str, dict[str, Any]]]:
    """Transform compensated events channel by channel.

    Parameters
    ----------
    compensated
        Compensated linear events (events x channels).
    channels, canonicals, kinds, ranges
        Per channel: ``$PnN``, canonical name, kind and ``$PnR``.
    settings
        ``config["ingest"]["transform"]``.
    mass_cytometry
        Use the mass cytometry arcsinh cofactor (5) where none is configured.

    Returns
    -------
    X, methods, parameters
        float32 transformed events, the method per channel, and ``{channel: parameters}``
        for ``uns["transform"]``.
    """
    from flowutils.transforms import logicle

    result = np.empty(compensated.shape, dtype=np.float32)
    methods: list[str] = []
    parameters: dict[str, dict[str, Any]] = {}
    for index, channel in enumerate(channels):
        chosen = _channel_settings(channel, canonicals[index], kinds[index], settings=settings,
                                   mass_cytometry=mass_cytometry)
        method = chosen["method"]
        column = compensated[:, index]
        if method == "arcsinh":
            cofactor = float(chosen["cofactor"])
            if cofactor <= 0:
                raise InputError(f"arcsinh cofactor for {channel} must be > 0, got {cofactor}",
                                 path=path, sample_id=sample_id)
            result[:, index] = arcsinh(column, cofactor)
            used = {"method": method, "cofactor": cofactor}
        elif method == "logicle":
            params = {"t": float(chosen.get("T") or ranges[index]),
                      "w": float(chosen.get("W", 0.5)), "m": float(chosen.get("M", 4.5)),
                      "a": float(chosen.get("A", 0.0))}
            try:
                result[:, index] = logicle(np.ascontiguousarray(column, dtype=np.float64), None,
                                           **params)
            except (ValueError, RuntimeError) as exc:
                raise InputError(f"logicle parameters for {channel} are invalid ({exc})",
                                 path=path, sample_id=sample_id) from None
            used = {"method": method, **{k.upper(): v for k, v in params.items()}}
        elif method == "linear":
            top = float(ranges[index]) if ranges[index] > 0 else float(np.max(np.abs(column)))
            scale = SCATTER_SCALE / top if top > 0 else 1.0
            result[:, index] = column * scale
            used = {"method": method, "scale": scale}
        elif method == "none":
            result[:, index] = column
            used = {"method": method}
        else:
            raise InputError(f"transform method {method!r} for {channel} is not one of "
                             f"{', '.join(METHODS)}", path=path, sample_id=sample_id)
        methods.append(method)
        parameters[channel] = used
    return result, methods, parameters
