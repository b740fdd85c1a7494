"""The density helpers against scipy, which they replace to keep per-sample jobs light."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter1d
from scipy.signal import find_peaks

from bcellmap.kernels.density import _gaussian_smooth, _local_maxima, learn_marker_threshold


@pytest.mark.parametrize("seed", range(20))
def test_local_maxima_are_scipy_find_peaks(seed):
    rng = np.random.default_rng(seed)
    # Small integers make ties and flat tops (plateaus) common, including at the ends.
    values = rng.integers(0, 4, size=int(rng.integers(1, 60))).astype(float)
    np.testing.assert_array_equal(_local_maxima(values), find_peaks(values)[0])


def test_local_maxima_of_a_flat_top_is_its_middle():
    values = np.array([0.0, 1, 3, 3, 3, 3, 1, 0, 2, 2, 0, 5, 5])
    # Flat tops at 2..5 (middle 3) and 8..9 (middle 8); 11..12 touches the end: no peak.
    np.testing.assert_array_equal(_local_maxima(values), [3, 8])
    np.testing.assert_array_equal(find_peaks(values)[0], [3, 8])


@pytest.mark.parametrize("sigma", [1.0, 2.7, 9.3, 80.0])
def test_gaussian_smooth_is_scipy_gaussian_filter(sigma):
    counts = np.random.default_rng(1).poisson(20, size=256).astype(float)
    expected = gaussian_filter1d(counts, sigma=sigma, mode="constant")
    np.testing.assert_allclose(_gaussian_smooth(counts, sigma=sigma), expected,
                               rtol=1e-10, atol=1e-12)


def test_first_valley_threshold_sits_between_two_populations():
    # Dead cells (dim, 10%) below live cells: the first valley lies between them.
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(0.0, 0.3, 2_000), rng.normal(3.0, 0.4, 18_000)])
    fit = learn_marker_threshold(values, valley="first")
    assert fit.method == "valley" and 0.9 < fit.threshold < 2.1
