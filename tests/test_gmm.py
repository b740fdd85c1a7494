"""The Gaussian mixture kernel against a simulated truth and against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture

import bcellmap.flow._qc as qc_module
from bcellmap.config import load_config
from bcellmap.flow._ingest import ingest_flow
from bcellmap.kernels.gmm import gaussian_mixture

TRUE_MEANS = np.array([[0.0, 0.0], [4.0, 1.0], [1.0, 5.0]])
TRUE_COVARIANCES = np.array([[[1.0, 0.5], [0.5, 1.0]], [[0.5, 0.0], [0.0, 2.0]],
                             [[0.3, 0.1], [0.1, 0.3]]])
TRUE_WEIGHTS = np.array([0.5, 0.3, 0.2])


def _simulate(n: int, seed: int, *, offset: float = 0.0, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, size=n, p=TRUE_WEIGHTS)
    points = np.empty((n, 2))
    for component in range(3):
        rows = labels == component
        points[rows] = rng.multivariate_normal(TRUE_MEANS[component],
                                               TRUE_COVARIANCES[component], rows.sum())
    return points * scale + offset, labels


def _order(means: np.ndarray) -> np.ndarray:
    """Components matched to the truth by their nearest true mean."""
    return np.array([np.argmin(((means - true) ** 2).sum(axis=1)) for true in TRUE_MEANS])


@pytest.mark.parametrize(("offset", "scale"), [(0.0, 1.0), (50_000.0, 1_000.0)])
def test_recovers_the_simulated_mixture(offset, scale):
    # Far from the origin and on a linear-scatter scale as well: the moments are taken on
    # centred rows, so the covariances keep their precision.
    points, labels = _simulate(30_000, seed=3, offset=offset, scale=scale)
    fitted = gaussian_mixture(points, n_components=3, seed=0, n_init=2)
    order = _order((fitted.means - offset) / scale)
    assert sorted(order) == [0, 1, 2]
    np.testing.assert_allclose((fitted.means[order] - offset) / scale, TRUE_MEANS, atol=0.05)
    np.testing.assert_allclose(fitted.covariances[order] / scale**2, TRUE_COVARIANCES, atol=0.06)
    np.testing.assert_allclose(fitted.weights[order], TRUE_WEIGHTS, atol=0.01)
    assert fitted.converged
    assert adjusted_rand_score(labels, fitted.predict(points)) > 0.9


def test_matches_scikit_learn_on_the_same_data():
    points, _ = _simulate(20_000, seed=5)
    rng = np.random.default_rng(6)
    # Background noise, as debris and doublets add to a scatter plot.
    points = np.vstack([points, rng.uniform(-3, 8, size=(2_000, 2))])
    ours = gaussian_mixture(points, n_components=4, seed=1, n_init=5, reg_covar=1e-4)
    peer = GaussianMixture(4, covariance_type="full", reg_covar=1e-4, n_init=5,
                           random_state=1).fit(points)
    assert ours.lower_bound == pytest.approx(peer.lower_bound_, abs=2e-3)
    assert adjusted_rand_score(ours.predict(points), peer.predict(points)) > 0.95
    log_likelihood, log_posterior = ours.log_responsibilities(points)
    np.testing.assert_allclose(np.exp(log_posterior).sum(axis=1), 1.0, atol=1e-12)
    # With the peer's parameters our density is the peer's density.
    from bcellmap.kernels.gmm import GaussianMixtureResult
    as_peer = GaussianMixtureResult(weights=peer.weights_, means=peer.means_,
                                    covariances=peer.covariances_, lower_bound=0.0,
                                    converged=True, n_iter=0)
    np.testing.assert_allclose(as_peer.log_responsibilities(points)[0],
                               peer.score_samples(points), rtol=1e-10, atol=1e-10)
    assert log_likelihood.mean() == pytest.approx(peer.score(points), abs=2e-3)


def test_is_deterministic_for_a_seed():
    points, _ = _simulate(5_000, seed=8)
    first = gaussian_mixture(points, n_components=3, seed=4, n_init=3)
    second = gaussian_mixture(points, n_components=3, seed=4, n_init=3)
    np.testing.assert_array_equal(first.means, second.means)
    np.testing.assert_array_equal(first.covariances, second.covariances)


def test_bad_input_is_refused():
    points, _ = _simulate(100, seed=1)
    with pytest.raises(ValueError, match="n_components"):
        gaussian_mixture(points[:2], n_components=3, seed=0)
    bad = points.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        gaussian_mixture(bad, n_components=2, seed=0)
    with pytest.raises(ValueError, match="n_init"):
        gaussian_mixture(points, n_components=2, seed=0, n_init=0)


@pytest.mark.realfcs
@pytest.mark.parametrize("name", ["flowkit_100715.fcs", "flowsom_ff.fcs"])
def test_scatter_gate_mixture_matches_scikit_learn_on_real_files(realfcs_dir, name, monkeypatch):
    """The QC scatter gate's mixture on a real file's FSC-A/SSC-A, as the ingest step fits it."""
    captured = {}
    original = qc_module.scatter_gate_flags

    def _capture(fsc, ssc, **options):
        # run_qc narrows the fit mask in place after the step; keep the one the step saw.
        captured.update(fsc=fsc, ssc=ssc, fit_mask=options["fit_mask"].copy())
        return original(fsc, ssc, **options)

    monkeypatch.setattr(qc_module, "scatter_gate_flags", _capture)
    ingest_flow(realfcs_dir / name, config=load_config(), sample_id=name[:-4])
    points = np.column_stack([captured["fsc"], captured["ssc"]])[captured["fit_mask"]]
    points = points[np.random.default_rng(0).permutation(len(points))[:20_000]].astype(float)
    ours = gaussian_mixture(points, n_components=4, seed=0, n_init=5, reg_covar=1e-4)
    peer = GaussianMixture(4, covariance_type="full", reg_covar=1e-4, n_init=5,
                           random_state=0).fit(points)
    assert ours.lower_bound == pytest.approx(peer.lower_bound_, abs=5e-3)
    assert adjusted_rand_score(ours.predict(points), peer.predict(points)) > 0.9
