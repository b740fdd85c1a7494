"""FCS reading: round trip through flowio's writer, linearisation, bad files."""

from __future__ import annotations

import numpy as np
import pytest

from bcellmap.errors import InputError
from bcellmap.fcs import _linearise, read_fcs


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
