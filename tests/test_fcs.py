"""FCS reading: round trip through flowio's writer, linearisation, bad files."""

from __future__ import annotations

import numpy as np
import pytest

from bcellmap.errors import InputError
from bcellmap.io.fcs import _linearise, read_fcs


def _write(path, events, channels, markers=None, metadata=None):
    import flowio

    with open(path, "wb") as handle:
        flowio.create_fcs(handle, events.astype(np.float32).ravel().tolist(), channels,
                          opt_channel_names=markers, metadata_dict=metadata)
    return path


def test_round_trip_values_names_and_metadata(tmp_path):
    events = np.random.default_rng(3).uniform(0, 1000, size=(25, 3)).astype(np.float32)
    path = _write(tmp_path / "a.fcs", events, ["FSC-A", "PE-A", "Time"], ["", "CD19", ""],
                  {"$CYT": "LSRII", "$TIMESTEP": "0.01", "$P2G": "2.0"})
    fcs = read_fcs(path, sample_id="S1")
    assert fcs.n_events == 25 and fcs.channels == ["FSC-A", "PE-A", "Time"]
    assert fcs.markers == ["", "CD19", ""] and fcs.cytometer == "LSRII"
    assert fcs.timestep == pytest.approx(0.01) and fcs.version == "3.1"
    np.testing.assert_allclose(fcs.events[:, 0], events[:, 0])
    # Linear channel with $PnG 2: divided by the gain; Time kept as acquired.
    np.testing.assert_allclose(fcs.events[:, 1], events[:, 1] / 2.0)
    np.testing.assert_allclose(fcs.events[:, 2], events[:, 2])


def test_linearise_log_integer_channel_per_fcs_standard():
    # $PnE 4,1 on a 1024-channel integer parameter: x = 1 * 10^(4 * c / 1024).
    raw = np.array([[0.0, 256.0], [512.0, 1023.0]])
    meta = [{"pne": (4.0, 1.0), "png": 1.0, "pnr": 1024.0},
            {"pne": (0.0, 0.0), "png": 4.0, "pnr": 1024.0}]
    out = _linearise(raw.copy(), meta, datatype="I", time_index=None)
    np.testing.assert_allclose(out[:, 0], [1.0, 100.0])
    np.testing.assert_allclose(out[:, 1], [64.0, 1023.0 / 4])
    # Float data must not be log-decoded (FCS 3.1: $PnE is 0,0 for F/D data).
    out = _linearise(raw.copy(), meta, datatype="F", time_index=None)
    np.testing.assert_allclose(out[:, 0], raw[:, 0])


@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated", "zero_events", "missing"])
def test_bad_files_name_file_and_sample(tmp_path, kind):
    path = tmp_path / f"{kind}.fcs"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"this is not an FCS file at all" * 10)
    elif kind == "truncated":
        _write(path, np.ones((200, 4)), ["A", "B", "C", "D"])
        path.write_bytes(path.read_bytes()[:-500])
    elif kind == "zero_events":
        _write(path, np.zeros((0, 2)), ["A", "B"])
    with pytest.raises(InputError) as info:
        read_fcs(path, sample_id="S7")
    assert str(path) in str(info.value) and "S7" in str(info.value)


def _hand_built(path, keywords, data, *, blank_header=False, delimiter="/"):
    """An FCS 3.0 file composed byte by byte (HEADER, TEXT, DATA), independent of any reader."""
    def text_for(begin, end):
        pairs = {**keywords, "$BEGINDATA": str(begin), "$ENDDATA": str(end)}
        return (delimiter + "".join(f"{k}{delimiter}{v}{delimiter}"
                                    for k, v in pairs.items())).encode()
    text = text_for(0, 0)
    begin = 58 + len(text) + 20          # room for the offsets' digits
    text = text_for(begin, begin + len(data) - 1)
    text = text.ljust(begin - 58, b" ")
    offsets = [58, 58 + len(text) - 1, begin, begin + len(data) - 1, 0, 0]
    fields = [" " * 8 if blank_header and k in (2, 3) else f"{v:>8}"
              for k, v in enumerate(offsets)]
    path.write_bytes(b"FCS3.0    " + "".join(fields).encode() + text + data)
    return path


def _keywords(n_events, widths, ranges, datatype="I", byteord="1,2,3,4", **extra):
    out = {"$DATATYPE": datatype, "$MODE": "L", "$BYTEORD": byteord, "$NEXTDATA": "0",
           "$PAR": str(len(widths)), "$TOT": str(n_events)}
    for n, (width, pnr) in enumerate(zip(widths, ranges, strict=True), start=1):
        out.update({f"$P{n}N": f"CH{n}", f"$P{n}B": str(width), f"$P{n}R": str(pnr),
                    f"$P{n}E": "0,0"})
    out.update(extra)
    return out


def test_hand_built_24bit_little_endian_with_range_mask(tmp_path):
    values = [[1, 70000], [16777215, 5], [262143, 262144]]
    data = b"".join(v.to_bytes(3, "little") for row in values for v in row)
    path = _hand_built(tmp_path / "a.fcs", _keywords(3, [24, 24], [16777216, 262144]), data)
    fcs = read_fcs(path)
    # Channel 2 has $PnR 262144: bits above 2**18 are ignored (262144 -> 0).
    np.testing.assert_array_equal(fcs.events, [[1, 70000], [16777215, 5], [262143, 0]])


def test_hand_built_mixed_widths_big_endian(tmp_path):
    data = b"".join(a.to_bytes(1, "big") + b.to_bytes(3, "big") + c.to_bytes(2, "big")
                    for a, b, c in [(7, 1000000, 512), (255, 3, 65535)])
    path = _hand_built(tmp_path / "m.fcs",
                       _keywords(2, [8, 24, 16], [256, 16777216, 65536], byteord="4,3,2,1"),
                       data)
    np.testing.assert_array_equal(read_fcs(path).events, [[7, 1000000, 512], [255, 3, 65535]])


def test_hand_built_delimited_ascii(tmp_path):
    data = b"1.5,2\n3 4e2\t5,6\n"
    path = _hand_built(tmp_path / "a.fcs", _keywords(3, ["*", "*"], [1024, 1024],
                                                     datatype="A"), data)
    np.testing.assert_array_equal(read_fcs(path).events, [[1.5, 2], [3, 400], [5, 6]])


def test_blank_header_data_offsets_use_text(tmp_path):
    data = np.array([[1.0, 2.0], [3.0, 4.0]], dtype="<f4").tobytes()
    keywords = _keywords(2, [32, 32], [1024, 1024], datatype="F")
    path = _hand_built(tmp_path / "b.fcs", keywords, data, blank_header=True)
    assert read_fcs(path).events.tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_padded_keywords_and_empty_values(tmp_path):
    keywords = _keywords(1, [16, 16], [1024, 1024], **{"$P1S": "", "$P2S": "CD19"})
    keywords = {("    " + k if k == "$DATATYPE" else k): v for k, v in keywords.items()}
    data = np.array([[3, 1023]], dtype="<u2").tobytes()
    fcs = read_fcs(_hand_built(tmp_path / "p.fcs", keywords, data))
    assert fcs.markers == ["", "CD19"] and fcs.events.tolist() == [[3.0, 1023.0]]


@pytest.mark.parametrize("problem, reason", [
    ("odd_width", "not whole bytes"),
    ("histogram", "list-mode"),
    ("short", "no DATA offsets fit"),
    ("byteord", "neither little- nor big-endian"),
    ("missing_pnr", "$P2R"),
])
def test_unreadable_variants_are_refused_in_one_line(tmp_path, problem, reason):
    widths, data = [16, 16], np.zeros((4, 2), dtype="<u2").tobytes()
    keywords = _keywords(4, widths, [1024, 1024])
    if problem == "odd_width":
        keywords["$P1B"] = "12"
    elif problem == "histogram":
        keywords["$MODE"] = "C"
    elif problem == "short":
        keywords["$TOT"] = "40"
    elif problem == "byteord":
        keywords["$BYTEORD"] = "3,4,1,2"
    elif problem == "missing_pnr":
        del keywords["$P2R"]
    path = _hand_built(tmp_path / f"{problem}.fcs", keywords, data)
    with pytest.raises(InputError) as info:
        read_fcs(path, sample_id="S9")
    message = str(info.value)
    assert reason in message and str(path) in message and "\n" not in message


def test_saturation_is_the_linear_value_of_raw_range_minus_one(tmp_path):
    keywords = _keywords(2, [16, 16], [1024, 1024], **{"$P2E": "4,1", "$P1G": "2"})
    data = np.array([[1023, 1023], [10, 800]], dtype="<u2").tobytes()
    fcs = read_fcs(_hand_built(tmp_path / "s.fcs", keywords, data))
    np.testing.assert_allclose(fcs.saturation, [1023 / 2, 10 ** (4 * 1023 / 1024)])
    assert (fcs.events[0] >= fcs.saturation).all() and (fcs.events[1] < fcs.saturation).all()
