"""Reading FCS 2.0/3.0/3.1 files, linearised as the FCS standard says.

The HEADER and TEXT segments are parsed here (they are small and real files bend the
standard in ways flowio's parser does not forgive); the DATA segment is decoded by flowio
(``preprocess=False``, with its ``ignore_offset_error``, ``ignore_offset_discrepancy``,
``use_header_offsets`` and ``nextdata_offset`` options chosen from what the TEXT says), and
by :func:`_decode_data` where flowio cannot: integers whose ``$PnB`` is not 8/16/32 (Cytek
xP3/xP5 24-bit data), ``$DATATYPE A`` (ASCII), or a file whose TEXT flowio cannot parse.

Variants of the standard that are read (each with a log line saying so):

* empty keyword values written as doubled delimiters (CellQuest FCS 2.0: ``\\$P3S\\\\$P4S\\``)
  when the standard reading (a doubled delimiter is an escaped one) loses required keywords;
* keywords padded with spaces (Partec: ``/   $DATATYPE/I/``);
* blank or zero HEADER offsets (large files): the TEXT ``$BEGINDATA``/``$ENDDATA`` are used;
* HEADER and TEXT DATA offsets that disagree (Accuri C6): the pair that lies outside the
  HEADER/TEXT segments and holds exactly ``$TOT`` events is used;
* a DATA end offset one byte too far (a common writer bug);
* several data sets (``$NEXTDATA``, Beckman Coulter ``.LMD``: an FCS 2.0 data set of 10-bit
  values followed by the same events as an FCS 3.0 data set): the list-mode data set of the
  highest FCS version is read (the first such set when versions tie).

Anything else that is not readable raises :class:`~bcellmap.errors.InputError` with one line
naming the file, the reason and the remedy.

Linearisation: flowio's ``as_array(preprocess=True)`` divides *every* channel by ``$PnG``,
applies the ``$PnE`` log decoding to float data too, and multiplies Time by ``$TIMESTEP``.
The FCS 3.1 standard (section 3.3.32/3.3.40) says that log decoding applies to integer data
only (float data must carry ``$PnE 0,0``) and that ``$PnG`` is the gain of a linear channel.
So we take the raw values and apply:

* integer data with ``$PnE f1,f2`` and ``f1 > 0``: ``x = f2 * 10 ** (f1 * xc / $PnR)``
  (``f2 = 0`` read as 1, as the standard allows);
* linear channels with ``$PnG`` not 0 or 1: ``x = xc / $PnG``;
* Time is kept as acquired (in ``$TIMESTEP`` units); ``$TIMESTEP`` is recorded in the
  result so a caller can convert to seconds.

``FcsData.saturation`` is, per channel, the linearised value of raw channel ``$PnR - 1``:
since the decoding is monotone, ``linear >= saturation`` is exactly ``raw >= $PnR - 1``, the
detector-saturation test on raw channel values (QC ``margin``).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

_TIME = re.compile(r"^\s*time\s*$", re.IGNORECASE)
_HEADER_BYTES = 58
#: Most data sets followed through $NEXTDATA (guards against offset loops).
_MAX_DATA_SETS = 32


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
        FCS version from the header of the data set read, e.g. "3.1".
    datatype
        ``$DATATYPE`` (I, F, D or A).
    text
        All TEXT keywords, as flowio names them (lower case, without the leading ``$``).
    cytometer
        ``$CYT`` ("" when absent).
    date
        ``$DATE`` ("" when absent).
    timestep
        ``$TIMESTEP`` as float, or None.
    offset_error_ignored
        True when the file's data end offset was off by one and was read anyway.
    saturation
        Per channel, the linearised value of raw channel ``$PnR - 1`` (see module docstring).
    data_set, n_data_sets
        Which data set was read (0-based) of how many in the file.
    notes
        The variants of the standard met while reading (also logged).
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
    saturation: np.ndarray | None = field(default=None, repr=False)
    data_set: int = 0
    n_data_sets: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def n_events(self) -> int:
        """Number of events (rows)."""
        return int(self.events.shape[0])


class _Refused(Exception):
    """A reason the file cannot be read (turned into an InputError naming the file)."""


# --------------------------------------------------------------------------- HEADER / TEXT

def _header_int(field_bytes: bytes) -> int:
    """A HEADER offset; blank (as large files write it) reads as 0."""
    text = field_bytes.decode("ascii", "replace").strip()
    if not text:
        return 0
    if not text.isdigit():
        raise _Refused(f"HEADER offset {text!r} is not a number")
    return int(text)


def parse_header(block: bytes) -> dict:
    """The 58-byte HEADER: version and segment offsets (blank offsets read as 0)."""
    if len(block) < _HEADER_BYTES or not block.startswith(b"FCS"):
        raise _Refused("no FCS HEADER at this offset")
    names = ("text_start", "text_stop", "data_start", "data_stop", "analysis_start",
             "analysis_stop")
    header = {"version": block[3:6].decode("ascii", "replace")}
    for k, name in enumerate(names):
        header[name] = _header_int(block[10 + 8 * k:18 + 8 * k])
    return header


def _split_pairs(body: str, delimiter: str, *, doubled_is_empty: bool) -> dict[str, str] | None:
    """Keyword/value pairs of a TEXT segment body (after the first delimiter)."""
    if body.endswith(delimiter):
        body = body[:-1]
    if doubled_is_empty:
        tokens = body.split(delimiter)
    else:
        sentinel = "\x00"
        tokens = [t.replace(sentinel, delimiter)
                  for t in body.replace(delimiter * 2, sentinel).split(delimiter)]
    if len(tokens) % 2 and tokens[-1] == "":
        tokens = tokens[:-1]
    if len(tokens) % 2:
        return None
    pairs: dict[str, str] = {}
    for key, value in zip(tokens[::2], tokens[1::2], strict=True):
        key = key.strip().lower()
        pairs[key[1:] if key.startswith("$") else key] = value
    return pairs


def _missing_required(pairs: dict[str, str]) -> list[str]:
    """The required keywords (for reading events) absent from ``pairs``."""
    missing = [k for k in ("par", "tot", "datatype") if not pairs.get(k, "").strip()]
    try:
        n_channels = int(pairs.get("par", "0"))
    except ValueError:
        return ["par"]
    for n in range(1, n_channels + 1):
        missing += [f"p{n}{s}" for s in "nbr" if f"p{n}{s}" not in pairs]
    return missing


def parse_text(raw: bytes) -> tuple[dict[str, str], list[str]]:
    """TEXT keywords (lower case, leading ``$`` dropped, keys stripped) and notes.

    A doubled delimiter is an escaped delimiter (the standard); when that reading loses a
    required keyword or merges two keywords (a key holding ``<delimiter>$``) and reading
    doubled delimiters as empty values does not (CellQuest), the second reading is used.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    text = text.rstrip("\x00 \r\n")
    if len(text) < 2:
        raise _Refused("the TEXT segment is empty")
    delimiter, body = text[0], text[1:]
    strict = _split_pairs(body, delimiter, doubled_is_empty=False)
    # A key holding "<delimiter>$" is two keywords merged by an empty value written as a
    # doubled delimiter, not a keyword with an escaped delimiter in it.
    merged = strict is not None and any(delimiter + "$" in key for key in strict)
    if strict is not None and not merged and not _missing_required(strict):
        return strict, []
    loose = _split_pairs(body, delimiter, doubled_is_empty=True)
    if loose is not None and not _missing_required(loose):
        return loose, ["empty keyword values written as doubled delimiters were read as empty"]
    best = strict or loose
    if best is None:
        raise _Refused("the TEXT segment does not hold keyword/value pairs")
    raise _Refused("required TEXT keyword(s) missing: "
                   + ", ".join("$" + k.upper() for k in _missing_required(best)[:8]))


def _read_data_sets(handle, size: int) -> list[dict]:
    """HEADER and TEXT of every data set, following ``$NEXTDATA``."""
    sets: list[dict] = []
    offset = 0
    seen = set()
    while len(sets) < _MAX_DATA_SETS:
        handle.seek(offset)
        header = parse_header(handle.read(_HEADER_BYTES))
        start, stop = header["text_start"], header["text_stop"]
        if not 0 < start <= stop or offset + stop >= size:
            raise _Refused(f"HEADER TEXT offsets {start}-{stop} do not fit in the file")
        handle.seek(offset + start)
        keywords, notes = parse_text(handle.read(stop - start + 1))
        sets.append({"offset": offset, "header": header, "text": keywords, "notes": notes})
        seen.add(offset)
        try:
            nextdata = int(keywords.get("nextdata", "0").strip() or 0)
        except ValueError:
            nextdata = 0
        if nextdata <= 0 or offset + nextdata in seen or offset + nextdata >= size:
            break
        offset += nextdata
    return sets


def _choose_data_set(sets: list[dict]) -> int:
    """The list-mode data set of the highest FCS version (the first when versions tie)."""
    listmode = [i for i, s in enumerate(sets) if s["text"].get("mode", "L").strip().upper() == "L"]
    if not listmode:
        mode = sets[0]["text"].get("mode", "").strip()
        raise _Refused(f"$MODE is {mode!r}: histogram data hold no events (export list-mode "
                       "data, $MODE L, from the acquisition software)")
    return max(listmode, key=lambda i: (sets[i]["header"]["version"], -i))


# --------------------------------------------------------------------------- DATA

def _widths(keywords: dict[str, str], n_channels: int) -> list[str]:
    return [keywords[f"p{n}b"].strip() for n in range(1, n_channels + 1)]


def _row_bytes(keywords: dict[str, str], n_channels: int) -> int | None:
    """Bytes per event of binary data; None for delimited ASCII (``$PnB *``)."""
    widths = _widths(keywords, n_channels)
    datatype = keywords["datatype"].strip().upper()
    if datatype == "A":
        return None if "*" in widths else sum(int(w) for w in widths)
    bits = [int(w) for w in widths]
    if datatype in ("F", "D"):
        need = 32 if datatype == "F" else 64
        if any(b != need for b in bits):
            raise _Refused(f"$DATATYPE {datatype} needs $PnB {need}, found {sorted(set(bits))}")
    elif datatype != "I":
        raise _Refused(f"$DATATYPE {datatype!r} is not I, F, D or A")
    if any(b % 8 or not 8 <= b <= 64 for b in bits):
        raise _Refused(f"$PnB {sorted(set(bits))}: integer widths that are not whole bytes")
    return sum(bits) // 8


def _byte_order(keywords: dict[str, str]) -> str:
    order = keywords.get("byteord", "").replace(" ", "")
    if order in ("1,2,3,4", "1,2", "1", "1,2,3,4,5,6,7,8"):
        return "<"
    if order in ("4,3,2,1", "2,1", "8,7,6,5,4,3,2,1"):
        return ">"
    raise _Refused(f"$BYTEORD {order!r} is neither little- nor big-endian")


def _data_offsets(data_set: dict, size: int, n_bytes: int | None) -> tuple[int, int, str, list]:
    """DATA start and stop (relative to the data set), their source and notes.

    Candidates: the TEXT ``$BEGINDATA``/``$ENDDATA`` (FCS 3.x) and the HEADER offsets; the
    first that lies past the TEXT segment, inside the file and (for binary data) spans
    exactly ``$TOT`` events, or one byte more, is used.
    """
    header, keywords, offset = data_set["header"], data_set["text"], data_set["offset"]
    candidates = []
    try:
        text_pair = (int(keywords["begindata"].strip()), int(keywords["enddata"].strip()))
    except (KeyError, ValueError):
        text_pair = None
    header_pair = (header["data_start"], header["data_stop"])
    if header["version"].startswith("2"):
        candidates = [("HEADER", header_pair), ("TEXT", text_pair)]
    else:
        candidates = [("TEXT", text_pair), ("HEADER", header_pair)]
    tried = []
    for source, pair in candidates:
        if pair is None or pair[0] <= 0:
            continue
        start, stop = pair
        span = stop - start + 1
        overlaps = start <= header["text_stop"] and stop >= header["text_start"]
        fits = offset + start < size and offset + stop <= size
        right_size = n_bytes is None or span in (n_bytes, n_bytes + 1)
        tried.append(f"{source} {start}-{stop}")
        if not overlaps and fits and right_size and span > 0:
            notes = []
            if len(tried) > 1 or (text_pair and header_pair[0] and text_pair != header_pair
                                  and text_pair[0] != header_pair[0]):
                other = text_pair if source == "HEADER" else header_pair
                if other and other[0] and other != pair:
                    notes.append(f"HEADER and TEXT DATA offsets disagree ({other[0]} vs "
                                 f"{start}); the {source} offsets hold the events")
            if n_bytes is not None and span == n_bytes + 1:
                stop -= 1
                notes.append("the DATA end offset is one byte too far; read anyway")
            return start, stop, source, notes
    need = "" if n_bytes is None else f" ({n_bytes} bytes for $TOT x $PAR)"
    raise _Refused(f"no DATA offsets fit the file{need}: tried {', '.join(tried) or 'none'}; "
                   "the file is truncated or its offsets are wrong (re-export it)")


def _decode_data(raw: bytes, keywords: dict[str, str], n_events: int,
                 n_channels: int) -> np.ndarray:
    """Raw channel values (float64, events x channels) from the DATA segment bytes.

    Binary integers of any whole-byte width (24-bit included) are masked to the next power
    of two of ``$PnR`` as the standard says; ASCII data are fixed-width (``$PnB`` digits) or
    delimited (``$PnB *``).
    """
    datatype = keywords["datatype"].strip().upper()
    if datatype == "A":
        text = raw.decode("ascii", "replace")
        widths = _widths(keywords, n_channels)
        if "*" in widths:
            values = np.array([float(v) for v in re.split(r"[\s,]+", text.strip()) if v])
            values = values[:n_events * n_channels]
        else:
            row = [int(w) for w in widths]
            step, values = sum(row), []
            for e in range(n_events):
                at = e * step
                for w in row:
                    values.append(float(text[at:at + w]))
                    at += w
            values = np.array(values)
        if values.size != n_events * n_channels:
            raise _Refused(f"the ASCII DATA segment holds {values.size} values, "
                           f"$TOT x $PAR needs {n_events * n_channels}")
        return values.reshape(n_events, n_channels).astype(np.float64)
    order = _byte_order(keywords)
    if datatype in ("F", "D"):
        dtype = np.dtype(f"{order}f{4 if datatype == 'F' else 8}")
        return np.frombuffer(raw, dtype=dtype, count=n_events * n_channels).reshape(
            n_events, n_channels).astype(np.float64)
    widths = [int(w) // 8 for w in _widths(keywords, n_channels)]
    rows = np.frombuffer(raw, dtype=np.uint8, count=n_events * sum(widths)).reshape(
        n_events, sum(widths))
    out = np.empty((n_events, n_channels), dtype=np.float64)
    at = 0
    for index, width in enumerate(widths):
        chunk = rows[:, at:at + width].astype(np.uint64)
        significance = range(width) if order == "<" else range(width - 1, -1, -1)
        value = np.zeros(n_events, dtype=np.uint64)
        for column, byte in enumerate(significance):
            value |= chunk[:, column] << np.uint64(8 * byte)
        pnr = int(float(keywords[f"p{index + 1}r"]))
        if 0 < pnr < 2 ** (8 * width):
            value &= np.uint64((1 << (pnr - 1).bit_length()) - 1)
        out[:, index] = value
        at += width
    return out


def _flowio_events(path: Path, data_set: dict, *, source: str, off_by_one: bool,
                   n_events: int, n_channels: int) -> np.ndarray | None:
    """The raw events as flowio decodes them with matching options, or None if it cannot."""
    import flowio

    version = data_set["header"]["version"]
    if version.startswith("2") and source != "HEADER":
        return None  # flowio reads FCS 2.0 DATA from the HEADER offsets only
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flow = flowio.FlowData(
                str(path), ignore_offset_error=off_by_one,
                ignore_offset_discrepancy=True,
                use_header_offsets=source == "HEADER" and not version.startswith("2"),
                nextdata_offset=data_set["offset"])
    except Exception:  # noqa: BLE001 - any flowio failure falls back to our decoder
        return None
    if (flow.events is None or int(flow.channel_count) != n_channels
            or int(flow.event_count) != n_events or len(flow.events) != n_events * n_channels
            or str(flow.data_type).upper() != data_set["text"]["datatype"].strip().upper()):
        return None
    return flow.as_array(preprocess=False)


# --------------------------------------------------------------------------- linearise

def _channel_meta(keywords: dict[str, str], n_channels: int, notes: list[str]) -> list[dict]:
    meta = []
    for n in range(1, n_channels + 1):
        pne = keywords.get(f"p{n}e", "").strip() or "0,0"
        try:
            decades, log_zero = (float(x) for x in pne.split(","))
        except ValueError:
            notes.append(f"$P{n}E {pne!r} is not 'f1,f2'; channel {n} read as linear")
            decades, log_zero = 0.0, 0.0
        if decades > 0 and log_zero == 0:
            log_zero = 1.0
        try:
            gain = float(keywords.get(f"p{n}g", "").strip() or 1.0)
        except ValueError:
            gain = 1.0
        try:
            pnr = float(keywords[f"p{n}r"].strip())
        except ValueError:
            raise _Refused(f"$P{n}R {keywords[f'p{n}r']!r} is not a number") from None
        meta.append({"pnn": keywords[f"p{n}n"], "pns": keywords.get(f"p{n}s", ""),
                     "pne": (decades, log_zero), "png": gain, "pnr": pnr})
    return meta


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


# --------------------------------------------------------------------------- read_fcs

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
        One line naming the file, the reason and the remedy: missing, empty, truncated,
        garbage header, histogram data, no events, ...
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("FCS file not found", path=path, sample_id=sample_id)
    size = path.stat().st_size
    if size == 0:
        raise InputError("FCS file is empty (0 bytes)", path=path, sample_id=sample_id)
    if size < _HEADER_BYTES:
        raise InputError(f"not a readable FCS file: only {size} bytes, shorter than an FCS "
                         "header", path=path, sample_id=sample_id)
    with path.open("rb") as handle:
        magic = handle.read(6)
    if not magic.startswith(b"FCS"):
        raise InputError(f"not a readable FCS file: header starts with {magic!r}, not 'FCS'",
                         path=path, sample_id=sample_id)
    try:
        return _read(path, size, sample_id=sample_id)
    except _Refused as exc:
        raise InputError(f"not a readable FCS file: {exc}", path=path,
                         sample_id=sample_id) from None
    except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError,
            EOFError, OSError) as exc:
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise InputError(f"not a readable FCS file: header or TEXT segment is invalid "
                         f"({detail}); re-export it from the acquisition software",
                         path=path, sample_id=sample_id) from None


def _read(path: Path, size: int, *, sample_id: str | None) -> FcsData:
    with path.open("rb") as handle:
        sets = _read_data_sets(handle, size)
        chosen = _choose_data_set(sets)
        data_set = sets[chosen]
        keywords = data_set["text"]
        notes = list(data_set["notes"])
        if len(sets) > 1:
            notes.append(f"the file holds {len(sets)} data sets; read data set {chosen + 1} "
                         f"(FCS {data_set['header']['version']}, list mode)")
        n_channels, n_events = int(keywords["par"]), int(keywords["tot"])
        if n_events == 0 or n_channels == 0:
            raise InputError("FCS file holds 0 events", path=path, sample_id=sample_id)
        if keywords.get("mode", "L").strip().upper() != "L":
            raise _Refused("histogram data ($MODE C/U) hold no events: export list-mode data")
        row_bytes = _row_bytes(keywords, n_channels)
        n_bytes = None if row_bytes is None else row_bytes * n_events
        start, stop, source, offset_notes = _data_offsets(data_set, size, n_bytes)
        notes += offset_notes
        off_by_one = any("one byte too far" in n for n in offset_notes)
        raw = None
        if keywords["datatype"].strip().upper() != "A":
            _byte_order(keywords)  # refuse an unknown order before flowio guesses one
            raw = _flowio_events(path, data_set, source=source,
                                 off_by_one=off_by_one, n_events=n_events,
                                 n_channels=n_channels)
        if raw is None:
            handle.seek(data_set["offset"] + start)
            data = handle.read(stop - start + 1)
            if n_bytes is not None and len(data) < n_bytes:
                raise _Refused(f"truncated: $TOT={n_events} events x $PAR={n_channels} "
                               f"channels need {n_bytes} bytes, the DATA segment holds "
                               f"{len(data)}; re-export or re-copy the file")
            raw = _decode_data(data, keywords, n_events, n_channels)
    for note in notes:
        log.warning("%s: %s", path, note)

    channel_meta = _channel_meta(keywords, n_channels, notes)
    channels = [str(meta["pnn"]).strip() for meta in channel_meta]
    markers = [str(meta["pns"]).strip() for meta in channel_meta]
    time_index = next((i for i, name in enumerate(channels) if _TIME.match(name)), None)
    datatype = keywords["datatype"].strip().upper()
    events = _linearise(raw, channel_meta, datatype=datatype, time_index=time_index)
    ranges = np.array([meta["pnr"] for meta in channel_meta])
    saturation = _linearise((ranges - 1.0)[None, :].copy(), channel_meta, datatype=datatype,
                            time_index=time_index)[0]
    timestep = None
    try:
        timestep = float(keywords["timestep"]) if keywords.get("timestep", "").strip() else None
    except ValueError:
        timestep = None
    return FcsData(
        path=str(path),
        events=events,
        channels=channels,
        markers=markers,
        ranges=ranges,
        version=data_set["header"]["version"],
        datatype=datatype,
        text=dict(keywords),
        cytometer=str(keywords.get("cyt", "")).strip(),
        date=str(keywords.get("date", "")).strip(),
        timestep=timestep,
        offset_error_ignored=off_by_one,
        saturation=saturation,
        data_set=chosen,
        n_data_sets=len(sets),
        notes=notes,
    )


def spillover_keyword_problem(text: dict[str, str]) -> str | None:
    """Why the file's ``$SPILLOVER``/``SPILL`` keyword cannot be a matrix, or None.

    Catches the shape problems (names without values, wrong value count) with a reason a
    user can act on; the values themselves are checked by ``compensation.matrix_problems``.
    """
    for keyword in ("spillover", "spill"):
        value = (text.get(keyword) or "").strip()
        if not value or value == "0":
            continue
        parts = [p.strip() for p in value.split(",")]
        try:
            n = int(parts[0])
        except ValueError:
            return f"${keyword.upper()} does not start with the number of detectors"
        found = len(parts) - 1 - n
        if found != n * n:
            names = min(n, len(parts) - 1)
            return (f"${keyword.upper()} names {names} detector(s) but holds {max(found, 0)} "
                    f"of the {n * n} values of an {n}x{n} matrix")
        return None
    return None
