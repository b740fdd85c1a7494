"""Compensation against a hand-computed solve; refusal of matrices that cannot be right."""

from __future__ import annotations

import numpy as np
import pytest

from bcellmap.errors import InputError
from bcellmap.flow.compensation import compensate_events, matrix_problems, read_matrix_file

CHANNELS = ["FSC-A", "SSC-A", "FITC-A", "PE-A", "APC-A", "Time"]
KINDS = ["scatter", "scatter", "fluorescence", "fluorescence", "fluorescence", "time"]
SPILL = np.array([[1.0, 0.20, 0.01],
                  [0.05, 1.0, 0.10],
                  [0.0, 0.02, 1.0]])


def _spill_text(matrix, names):
    return ",".join([str(len(names)), *names, *(repr(float(v)) for v in matrix.ravel())])


def _events(n=6, seed=1):
    rng = np.random.default_rng(seed)
    return rng.uniform(-50, 5000, size=(n, len(CHANNELS)))


def test_keyword_compensation_equals_hand_solve():
    events = _events()
    text = {"spill": _spill_text(SPILL, ["FITC-A", "PE-A", "APC-A"])}
    out, info = compensate_events(events, CHANNELS, KINDS, settings={"source": "auto"},
                                  text=text)
    fluor = events[:, 2:5]
    expected = np.linalg.solve(SPILL.T, fluor.T).T
    np.testing.assert_allclose(out[:, 2:5], expected, rtol=1e-10)
    # Forward check: true signal times the spillover gives back what was measured.
    np.testing.assert_allclose(out[:, 2:5] @ SPILL, fluor, rtol=1e-10)
    np.testing.assert_array_equal(out[:, [0, 1, 5]], events[:, [0, 1, 5]])
    assert info["source"] == "keyword" and info["channels"] == ["FITC-A", "PE-A", "APC-A"]
    assert events is not out


def test_keyword_order_differs_from_channel_order():
    events = _events()
    order = [2, 0, 1]  # APC-A, FITC-A, PE-A
    names = [["FITC-A", "PE-A", "APC-A"][i] for i in order]
    text = {"spillover": _spill_text(SPILL[np.ix_(order, order)], names)}
    out, _ = compensate_events(events, CHANNELS, KINDS, settings={"source": "auto"}, text=text)
    np.testing.assert_allclose(out[:, 2:5], np.linalg.solve(SPILL.T, events[:, 2:5].T).T,
                               rtol=1e-10)


def test_no_keyword_or_source_none_leaves_values():
    events = _events()
    for settings, text in (({"source": "auto"}, {}),
                           ({"source": "none"}, {"spill": _spill_text(SPILL, CHANNELS[2:5])})):
        out, info = compensate_events(events, CHANNELS, KINDS, settings=settings, text=text)
        np.testing.assert_array_equal(out, events)
        assert info["matrix"] is None


def test_matrix_file(tmp_path):
    path = tmp_path / "comp.csv"
    path.write_text(",FITC-A,PE-A,APC-A\n" + "\n".join(
        f"{name}," + ",".join(str(v) for v in row)
        for name, row in zip(["FITC-A", "PE-A", "APC-A"], SPILL, strict=True)) + "\n")
    matrix, names = read_matrix_file(path)
    np.testing.assert_allclose(matrix, SPILL)
    events = _events()
    out, info = compensate_events(events, CHANNELS, KINDS, text={},
                                  settings={"source": "file", "matrix_file": str(path)})
    np.testing.assert_allclose(out[:, 2:5], np.linalg.solve(SPILL.T, events[:, 2:5].T).T)
    assert info["source"].startswith("file:")


@pytest.mark.parametrize(("matrix", "names", "message"), [
    (np.array([[0.9, 0.1, 0], [0, 1, 0], [0, 0, 1.0]]), ["FITC-A", "PE-A", "APC-A"],
     "diagonal is not 1"),
    (np.array([[1.0, 0.1, 0], [0, 0, 0], [0, 0, 1.0]]), ["FITC-A", "PE-A", "APC-A"],
     "row(s) of zeros"),
    (np.array([[1.0, 1.0, 0], [1.0, 1.0, 0], [0, 0, 1.0]]), ["FITC-A", "PE-A", "APC-A"],
     "singular"),
    (SPILL, ["FITC-A", "PE-A", "BV421-A"], "not in the file: BV421-A"),
    (SPILL, ["FITC-A", "PE-A", "FSC-A"], "scatter/time"),
])
def test_invalid_matrices_are_refused_unless_allowed(matrix, names, message):
    problems = matrix_problems(matrix, names, channels=CHANNELS, kinds=KINDS)
    assert any(message in p for p in problems)
    text = {"spill": _spill_text(matrix, names)}
    with pytest.raises(InputError) as info:
        compensate_events(_events(), CHANNELS, KINDS, settings={"source": "auto"}, text=text,
                          path="f.fcs", sample_id="S9")
    assert message in str(info.value) and "S9" in str(info.value)
    out, _ = compensate_events(_events(), CHANNELS, KINDS, text=text,
                               settings={"source": "auto", "allow_invalid": True})
    assert np.all(np.isfinite(out))


def test_valid_matrix_has_no_problems():
    assert matrix_problems(SPILL, ["FITC-A", "PE-A", "APC-A"], channels=CHANNELS,
                           kinds=KINDS) == []


def test_spillover_naming_detectors_by_parameter_number_is_mapped_to_pnn():
    from bcellmap.flow.compensation import spillover_from_text

    # As the Accuri C6 writes it: detectors 3 and 4 are parameters 3 and 4 ($P3N, $P4N).
    text = {"p1n": "FSC-A", "p2n": "SSC-A", "p3n": "FL1-A", "p4n": "FL2-A",
            "spillover": "2,3,4,1,0.1,0.02,1"}
    matrix, names = spillover_from_text(text)
    assert names == ["FL1-A", "FL2-A"]
    np.testing.assert_allclose(matrix, [[1, 0.1], [0.02, 1]])
