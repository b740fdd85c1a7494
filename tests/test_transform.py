"""Transforms against their formulas and the published logicle properties."""

from __future__ import annotations

import numpy as np
import pytest

from bcellmap.flow._transform import is_mass_cytometry, transform_events

CHANNELS = ["FSC-A", "SSC-A", "PE-A", "APC-A", "Time"]
CANON = ["FSC-A", "SSC-A", "CD19", "CD3", "Time"]
KINDS = ["scatter", "scatter", "fluorescence", "fluorescence", "time"]
RANGES = [262144.0, 262144.0, 262144.0, 262144.0, 262144.0]


def _events() -> np.ndarray:
    rng = np.random.default_rng(0)
    values = rng.normal(0, 2000, size=(50, 5))
    values[:, 0] = np.linspace(0, 262144, 50)
    values[:, 4] = np.arange(50) * 7.0
    return values


def _run(settings, *, mass=False, events=None):
    return transform_events(_events() if events is None else events, channels=CHANNELS,
                            canonicals=CANON, kinds=KINDS, ranges=RANGES, settings=settings,
                            mass_cytometry=mass)


def test_arcsinh_scatter_and_time_follow_their_formulas():
    events = _events()
    X, methods, params = _run({"method": "arcsinh", "cofactor": None}, events=events)
    assert methods == ["linear", "linear", "arcsinh", "arcsinh", "none"]
    # arcsinh(x / 150) = log(x/150 + sqrt((x/150)^2 + 1)), written out independently.
    scaled = events[:, 2] / 150.0
    np.testing.assert_allclose(X[:, 2], np.log(scaled + np.sqrt(scaled ** 2 + 1)), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(X[:, 0], events[:, 0] / 262144 * 10, rtol=1e-6)
    assert X[-1, 0] == pytest.approx(10.0)
    np.testing.assert_allclose(X[:, 4], events[:, 4])
    assert params["PE-A"] == {"method": "arcsinh", "cofactor": 150.0}
    assert X.dtype == np.float32


def test_mass_cytometry_default_cofactor_is_5_unless_configured():
    events = _events()
    X, _, params = _run({"method": "arcsinh", "cofactor": None}, mass=True, events=events)
    assert params["APC-A"]["cofactor"] == 5.0
    np.testing.assert_allclose(X[:, 3], np.arcsinh(events[:, 3] / 5.0), rtol=1e-5)
    _, _, params = _run({"method": "arcsinh", "cofactor": 40}, mass=True)
    assert params["APC-A"]["cofactor"] == 40.0


def test_logicle_published_properties_and_flowutils_values():
    from flowutils.transforms import logicle

    T, W, M = 262144.0, 0.5, 4.5
    events = np.zeros((3, 5))
    events[:, 2] = [0.0, T, T / 10]
    X, methods, _ = _run({"method": "logicle", "logicle": {"T": T, "W": W, "M": M, "A": 0.0}},
                         events=events)
    assert methods[2] == "logicle"
    # Moore & Parks 2012: zero maps to W/(M+A), the top of scale T to 1, and one decade
    # below T to about 1 - 1/M (the scale is logarithmic at the high end).
    assert X[0, 2] == pytest.approx(W / M, abs=1e-6)
    assert X[1, 2] == pytest.approx(1.0, abs=1e-6)
    assert X[2, 2] == pytest.approx(1 - 1 / M, abs=1e-3)
    points = np.array([-100.0, 10.0, 1000.0, 50000.0])
    events = np.zeros((4, 5))
    events[:, 3] = points
    X, _, _ = _run({"method": "logicle", "logicle": {"T": T, "W": W, "M": M, "A": 0.0}},
                   events=events)
    np.testing.assert_allclose(X[:, 3], logicle(points, None, t=T, m=M, w=W, a=0.0), rtol=1e-6)


def test_per_channel_overrides_by_canonical_and_channel_name():
    events = _events()
    settings = {"method": "arcsinh", "cofactor": 150,
                "per_channel": {"CD19": {"method": "none"}, "APC-A": {"cofactor": 1000}}}
    X, methods, params = _run(settings, events=events)
    assert methods[2] == "none" and params["APC-A"]["cofactor"] == 1000
    np.testing.assert_allclose(X[:, 2], events[:, 2].astype(np.float32))
    np.testing.assert_allclose(X[:, 3], np.arcsinh(events[:, 3] / 1000), rtol=1e-5)


@pytest.mark.parametrize(("cyt", "channels", "expected"), [
    ("Helios", ["Time", "Event_length"], True),
    ("CyTOF2", ["Time"], True),
    ("", ["Time", "CD19_Nd142", "CD3_Er170"], True),
    ("", ["Time", "Nd142Di", "Er170Di"], True),
    ("LSRII", ["FSC-A", "SSC-A", "PE-Cy7-A", "Qdot 605-A", "BV421-A", "Alexa Fluor 700-A"], False),
    ("Main Aria (FACSAria)", ["B515-A", "R780-A", "V800-A", "G560-A"], False),
])
def test_mass_cytometry_detection(cyt, channels, expected):
    assert is_mass_cytometry(cyt, channels) is expected
