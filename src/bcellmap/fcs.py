"""Reading FCS 2.0/3.0/3.1 files with flowio, linearised as the FCS standard says.

flowio's ``as_array(preprocess=True)`` divides *every* channel by ``$PnG``, applies the
``$PnE`` log decoding to float data too, and multiplies Time by ``$TIMESTEP``. The FCS 3.1
standard (section 3.3.32/3.3.40) says that log decoding applies to integer data only (float
data must carry ``$PnE 0,0``) and that ``$PnG`` is the gain of a linear channel. So we take
the raw values (``preprocess=False``) and apply:

* integer data with ``$PnE f1,f2`` and ``f1 > 0``: ``x = f2 * 10 ** (f1 * xc / $PnR)``
  (``f2 = 0`` read as 1, as the standard allows);
* linear channels with ``$PnG`` not 0 or 1: ``x = xc / $PnG``;
* Time is kept as acquired (in ``$TIMESTEP`` units); ``$TIMESTEP`` is recorded in the
  result so a caller can convert to seconds.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)

_TIME = re.compile(r"^\s*time\s*$", re.IGNORECASE)


@dataclass
class FcsData:
    """The linearised events and the metadata of one FCS file.

    Attributes
    ----------
    path
        The file read.
    events
        float64 array (events x channels), linearised but not compensated.
    channels
        ``$PnN`` per channel.
    markers
        ``$PnS`` per channel, stripped ("" when absent or blank).
    ranges
        ``$PnR`` per channel, as float.
    version
        FCS version from the header, e.g. "3.1".
    datatype
        ``$DATATYPE`` (I, F, D or A).
    text
        All TEXT keywords as flowio gives them (lower case, without ``$``).
    cytometer
        ``$CYT`` ("" when absent).
    date
        ``$DATE`` ("" when absent).
    timestep
        ``$TIMESTEP`` as float, or None.
    offset_error_ignored
        True when the file's data offset was off by one and was read anyway.
    """

    path: str
    events: np.ndarray
    channels: list[str]
    markers: list[str]
    ranges: np.ndarray
    version: str
    datatype: str
    text: dict[str, str] = field(repr=False)
    cytometer: str = ""
    date: str = ""
    timestep: float | None = None
    offset_error_ignored: bool = False

    @property
    def n_events(self) -> int:
        """Number of events (rows)."""
        return int(self.events.shape[0])


def _open_flowdata(path: Path, *, sample_id: str | None):
    """Open ``path`` with flowio, retrying once for the common off-by-one data offset."""
    import flowio
    from flowio.exceptions import FCSParsingError, FlowIOException

    def _fail(reason: str) -> InputError:
        return InputError(f"not a readable FCS file: {reason}", path=path, sample_id=sample_id)

    try:
        try:
            return flowio.FlowData(str(path)), False
        except FCSParsingError as exc:
            if "off by 1" not in str(exc):
                raise
            log.warning("%s: the data offset in the header is off by one byte; read anyway "
                        "(review this file's events before trusting them)", path)
            with warnings.catch_warnings():
                # flowio repeats the same warning; ours above says it once, with the path.
                warnings.simplefilter("ignore")
                return flowio.FlowData(str(path), ignore_offset_error=True), True
    except FlowIOException as exc:
        raise _fail(str(exc)) from None
    except NotImplementedError as exc:
        raise _fail(str(exc)) from None
    except (ValueError, KeyError, IndexError, UnicodeDecodeError, EOFError, OSError) as exc:
        # flowio signals a garbage header or TEXT segment with these.
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise _fail(f"header or TEXT segment is invalid ({detail})") from None


def _linearise(raw: np.ndarray, channel_meta: list[dict], *, datatype: str,
               time_index: int | None) -> np.ndarray:
    """Apply $PnE log decoding (integer data) and $PnG gain (linear channels), in place."""
    for index, meta in enumerate(channel_meta):
        if index == time_index:
            continue
        decades, log_zero = meta["pne"]
        if decades > 0 and datatype.upper() == "I":
            raw[:, index] = log_zero * np.power(10.0, decades * raw[:, index] / meta["pnr"])
        elif meta["png"] not in (0.0, 1.0):
            raw[:, index] /= meta["png"]
    return raw


def read_fcs(path: str | os.PathLike, *, sample_id: str | None = None) -> FcsData:
    """Read one FCS file (2.0, 3.0 or 3.1) into linear-scale events and metadata.

    Parameters
    ----------
    path
        The FCS file.
    sample_id
        Named in error messages.

    Returns
    -------
    FcsData
        Events linearised per the FCS standard (see the module docstring).

    Raises
    ------
    InputError
        The file is missing, empty, truncated, has a garbage header, or holds no events.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("FCS file not found", path=path, sample_id=sample_id)
    size = path.stat().st_size
    if size == 0:
        raise InputError("FCS file is empty (0 bytes)", path=path, sample_id=sample_id)
    if size < 58:
        raise InputError(f"not a readable FCS file: only {size} bytes, shorter than an FCS "
                         "header", path=path, sample_id=sample_id)
    with path.open("rb") as handle:
        magic = handle.read(6)
    if not magic.startswith(b"FCS"):
        raise InputError(f"not a readable FCS file: header starts with {magic!r}, not 'FCS'",
                         path=path, sample_id=sample_id)

    flow, offset_ignored = _open_flowdata(path, sample_id=sample_id)
    n_channels = int(flow.channel_count)
    n_events = int(flow.event_count)
    n_values = len(flow.events)
    if n_events == 0 or n_values == 0:
        raise InputError("FCS file holds 0 events", path=path, sample_id=sample_id)
    if n_values != n_events * n_channels:
        raise InputError(
            f"FCS file is truncated or inconsistent: $TOT={n_events} events x $PAR={n_channels} "
            f"channels needs {n_events * n_channels} values, the DATA segment holds {n_values}",
            path=path, sample_id=sample_id,
        )
    channel_meta = [flow.channels[number] for number in sorted(flow.channels)]
    channels = [str(meta["pnn"]).strip() for meta in channel_meta]
    markers = [str(meta.get("pns", "")).strip() for meta in channel_meta]
    time_index = next((i for i, name in enumerate(channels) if _TIME.match(name)), None)
    raw = flow.as_array(preprocess=False)
    events = _linearise(raw, channel_meta, datatype=str(flow.data_type), time_index=time_index)
    text = dict(flow.text)
    timestep = None
    try:
        timestep = float(text["timestep"]) if text.get("timestep", "").strip() else None
    except ValueError:
        timestep = None
    return FcsData(
        path=str(path),
        events=events,
        channels=channels,
        markers=markers,
        ranges=np.array([float(meta["pnr"]) for meta in channel_meta]),
        version=str(flow.version),
        datatype=str(flow.data_type).upper(),
        text=text,
        cytometer=str(text.get("cyt", "")).strip(),
        date=str(text.get("date", "")).strip(),
        timestep=timestep,
        offset_error_ignored=offset_ignored,
    )
