"""k-means and the nearest-centre kernel against scikit-learn and brute force, on NumPy and CuPy."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.cluster import kmeans_plusplus as sklearn_plusplus

from bcellmap.kernels.backend import get_backend
from bcellmap.kernels.kmeans import assign_nearest, kmeans, kmeans_plusplus


def _data(n: int = 4000, d: int = 5, k: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, size=(k, d))
    return centres[rng.integers(0, k, n)] + rng.normal(0, 1.0, size=(n, d))


def _brute(data: np.ndarray, centres: np.ndarray) -> np.ndarray:
    return ((data[:, None, :].astype(np.float64) - centres[None]) ** 2).sum(axis=2)


@pytest.mark.parametrize("use_sklearn", [False, True])
def test_inertia_matches_sklearn_from_same_start(device, use_sklearn):
    data = _data()
    backend = get_backend(device=device)
    init = kmeans_plusplus(data, n_clusters=8, backend=backend, seed=4)
    ours = kmeans(data, n_clusters=8, backend=backend, seed=4, init=init, max_iter=100,
                  tol=1e-6, use_sklearn=use_sklearn)
    reference = KMeans(n_clusters=8, init=init, n_init=1, max_iter=100, tol=1e-6,
                       algorithm="lloyd").fit(data)
    assert ours.inertia == pytest.approx(reference.inertia_, rel=1e-3)
    # Inertia by hand from the returned centres and labels.
    by_hand = ((data - ours.centres[ours.labels]) ** 2).sum()
    assert ours.inertia == pytest.approx(by_hand, rel=1e-6)


def test_end_to_end_inertia_matches_sklearn(device):
    # Each from its own k-means++ (different random draws): equal on average over seeds.
    rng = np.random.default_rng(1)
    centres = rng.uniform(0, 6, size=(12, 6))
    data = (centres[rng.integers(0, 12, 6000)] + rng.normal(0, 0.5, size=(6000, 6))
            ).astype(np.float32)
    backend = get_backend(device=device)
    ours = np.mean([kmeans(data, n_clusters=15, backend=backend, seed=s).inertia
                    for s in range(8)])
    theirs = np.mean([KMeans(n_clusters=15, n_init=1, random_state=s).fit(data).inertia_
                      for s in range(8)])
    assert ours <= 1.01 * theirs, (ours, theirs)


def test_plusplus_potential_matches_sklearn(device):
    # Same greedy k-means++: the same distribution of initial potentials, over many seeds.
    data = _data(n=3000, k=20, seed=2).astype(np.float32)
    backend = get_backend(device=device)

    def potential(centres: np.ndarray) -> float:
        return float(_brute(data, centres).min(axis=1).sum())

    ours = [potential(kmeans_plusplus(data, n_clusters=20, backend=backend, seed=s))
            for s in range(30)]
    theirs = [potential(sklearn_plusplus(data, 20, random_state=s)[0].astype(np.float64))
              for s in range(30)]
    assert np.mean(ours) <= 1.05 * np.mean(theirs), (np.mean(ours), np.mean(theirs))


def test_plusplus_spreads_centres(device):
    data = _data(k=8)
    backend = get_backend(device=device)
    init = kmeans_plusplus(data, n_clusters=8, backend=backend, seed=0)
    # One centre per true blob: each init centre is a data row, nearest blobs all distinct.
    rng = np.random.default_rng(0)
    blobs = rng.normal(0, 4, size=(8, 5))
    nearest_blob = ((init[:, None] - blobs[None]) ** 2).sum(axis=2).argmin(axis=1)
    assert len(set(nearest_blob.tolist())) >= 7
    assert all((data == row).all(axis=1).any() for row in init)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_centres", [1, 7, 30, 33, 100])
def test_assign_nearest_is_brute_force(device, dtype, n_centres):
    rng = np.random.default_rng(n_centres)
    data = rng.normal(0, 3, size=(2500, 9)).astype(dtype)
    centres = rng.normal(0, 3, size=(n_centres, 9))
    result = assign_nearest(data, centres, backend=get_backend(device=device), with_sums=True)
    labels = np.asarray(get_backend(device=device).to_host(result.labels))
    brute = _brute(data, centres)
    assert (labels == brute.argmin(axis=1)).mean() > 0.999  # float32 near-ties aside
    sqdist = get_backend(device=device).to_host(result.sqdist)
    np.testing.assert_allclose(sqdist, brute[np.arange(2500), labels], rtol=1e-4, atol=1e-3)
    sums = get_backend(device=device).to_host(result.sums)
    counts = get_backend(device=device).to_host(result.counts)
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=n_centres))
    by_hand = np.array([data[labels == j].sum(axis=0, dtype=np.float64)
                        for j in range(n_centres)])
    np.testing.assert_allclose(sums, by_hand, rtol=1e-9, atol=1e-9)


def test_far_from_origin_matches_sklearn(device):
    # float32 rows around 1e4: ||x||^2 ~ 5e8, where float32 resolves 32; the kernel's shift
    # keeps the clustering that of float64 scikit-learn from the same start.
    data = (_data(seed=3) + 1e4).astype(np.float32)
    backend = get_backend(device=device)
    init = kmeans_plusplus(data, n_clusters=8, backend=backend, seed=1)
    ours = kmeans(data, n_clusters=8, backend=backend, seed=1, init=init, tol=1e-6)
    reference = KMeans(n_clusters=8, init=init, n_init=1, tol=1e-6,
                       algorithm="lloyd").fit(data.astype(np.float64))
    assert ours.inertia == pytest.approx(reference.inertia_, rel=1e-3)
    assert (ours.labels == reference.labels_).mean() > 0.999


def test_tiny_budget_identical(device):
    data = _data(n=1500).astype(np.float32)
    init = kmeans_plusplus(data, n_clusters=5, backend=get_backend(device=device), seed=1)
    results = [kmeans(data, n_clusters=5, backend=get_backend(device=device, budget_mb=mb),
                      seed=1, init=init, max_iter=50, use_sklearn=False)
               for mb in (256, 0.001)]
    assert np.array_equal(results[0].labels, results[1].labels)
    np.testing.assert_allclose(results[0].centres, results[1].centres, rtol=1e-9)
    tiny = get_backend(device=device, budget_mb=0.001)
    assign = assign_nearest(data, init, backend=tiny, with_sums=True)
    assert float(assign.counts.sum()) == data.shape[0]
    # k-means++ too, with the trial matrix recomputed rather than kept (over the budget).
    np.testing.assert_allclose(kmeans_plusplus(data, n_clusters=5, backend=tiny, seed=1), init)


def test_deterministic_for_a_seed(device):
    data = _data(n=3000).astype(np.float32)
    backend = get_backend(device=device)
    runs = [kmeans(data, n_clusters=6, backend=backend, seed=3) for _ in "ab"]
    assert np.array_equal(runs[0].labels, runs[1].labels)
    assert np.array_equal(runs[0].centres, runs[1].centres)


def test_bad_input(device):
    backend = get_backend(device=device)
    with pytest.raises(ValueError, match="fewer than the 10 clusters"):
        kmeans(_data(n=5), n_clusters=10, backend=backend, seed=0)
    data = _data(n=50)
    data[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        kmeans(data, n_clusters=3, backend=backend, seed=0)


# The CPU pass has NumPy steps and compiled (numba) steps that must give identical answers;
# which runs depends on the size of the work, so each is forced here.

def _force_steps(monkeypatch, compiled: bool) -> None:
    from bcellmap.kernels import kmeans as kmeans_module
    from bcellmap.kernels import som as som_module

    def choose(backend, row_passes, n_centres):
        return compiled and not backend.is_gpu

    monkeypatch.setattr(kmeans_module, "_use_compiled", choose)
    monkeypatch.setattr(som_module, "_use_compiled", choose)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_centres", [1, 7, 30, 100])
def test_cpu_steps_are_brute_force(monkeypatch, compiled, dtype, n_centres):
    _force_steps(monkeypatch, compiled)
    rng = np.random.default_rng(n_centres)
    # More rows than one CPU chunk (32,768), so that chunk sums are added together.
    data = rng.normal(0, 3, size=(40_000, 9)).astype(dtype)
    centres = rng.normal(0, 3, size=(n_centres, 9))
    result = assign_nearest(data, centres, backend=get_backend(device="cpu"), with_sums=True)
    brute = _brute(data, centres)
    assert (result.labels == brute.argmin(axis=1)).mean() > 0.999  # float32 near-ties aside
    np.testing.assert_allclose(result.sqdist, brute[np.arange(len(data)), result.labels],
                               rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(result.counts, np.bincount(result.labels,
                                                             minlength=n_centres))
    by_hand = np.array([data[result.labels == j].sum(axis=0, dtype=np.float64)
                        for j in range(n_centres)])
    np.testing.assert_allclose(result.sums, by_hand, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("compiled", [False, True])
def test_cpu_steps_break_ties_as_argmin(monkeypatch, compiled):
    # Small integers and centres whose mean is an integer: every score is exact in float32,
    # so equidistant centres tie exactly and the first one must win, as np.argmin decides.
    _force_steps(monkeypatch, compiled)
    centres = np.array([[2, 0], [0, 0], [4, 6], [2, 6]], dtype=np.float64)
    data = np.array([[1, 0], [3, 6], [1, 1], [3, 5], [2, 3]] * 50, dtype=np.float32)
    backend = get_backend(device="cpu")
    for order in ([0, 1, 2, 3], [1, 0, 3, 2]):
        result = assign_nearest(data, centres[order], backend=backend)
        expected = _brute(data, centres[order]).argmin(axis=1)  # first of the tied centres
        np.testing.assert_array_equal(result.labels, expected)
        assert result.labels[0] == 0 and result.labels[1] == 2


def test_compiled_and_numpy_steps_agree_exactly(monkeypatch):
    # The same k-means and SOM, once with each CPU step: bit-identical answers, so that the
    # size-based choice of the steps never changes a result.
    from bcellmap.kernels.som import train_som

    data = _data(n=70_000, d=6, k=12, seed=5).astype(np.float32)
    backend = get_backend(device="cpu")
    runs = {}
    for compiled in (False, True):
        _force_steps(monkeypatch, compiled)
        runs[compiled] = (kmeans(data, n_clusters=12, backend=backend, seed=2, tol=0),
                          train_som(data, backend=backend, seed=2, xdim=5, ydim=5, rlen=4))
    (numpy_kmeans, numpy_som), (compiled_kmeans, compiled_som) = runs[False], runs[True]
    assert numpy_kmeans.n_iter == compiled_kmeans.n_iter
    np.testing.assert_array_equal(numpy_kmeans.labels, compiled_kmeans.labels)
    np.testing.assert_array_equal(numpy_kmeans.centres, compiled_kmeans.centres)
    assert numpy_kmeans.inertia == compiled_kmeans.inertia
    np.testing.assert_array_equal(numpy_som, compiled_som)


def test_lloyd_switches_to_compiled_steps_after_paying_their_load(monkeypatch):
    # Lloyd iterations run NumPy until the rows passed would have paid for loading the
    # compiled steps, then the compiled steps: iterations 1-3 NumPy here, the rest compiled.
    from bcellmap.kernels import kmeans as kmeans_module

    data = _data(n=5000, seed=6).astype(np.float32)
    calls = []
    original = kmeans_module._assign

    def recording(*args, **kwargs):
        calls.append(kwargs["compiled"])
        return original(*args, **kwargs)

    monkeypatch.setattr(kmeans_module, "_COMPILED_MIN_WORK", 3 * 5000 * 8)
    monkeypatch.setattr(kmeans_module, "_assign", recording)
    monkeypatch.setattr("bcellmap.kernels._nearest_cpu.is_loaded", lambda: False)
    result = kmeans(data, n_clusters=8, backend=get_backend(device="cpu"), seed=0, tol=0)
    assert result.n_iter >= 5
    assert calls == [False] * 3 + [True] * (len(calls) - 3)


def test_small_passes_do_not_load_numba():
    # A workflow job maps about 20,000 events: importing numba and loading the compiled steps
    # (about 0.45 s) would cost more than the pass, so a small pass must not even import it.
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "from bcellmap.kernels.backend import get_backend\n"
            "from bcellmap.kernels.kmeans import kmeans\n"
            "from bcellmap.kernels.som import map_to_nodes, train_som\n"
            "backend = get_backend(device='cpu')\n"
            "data = np.random.default_rng(0).normal(size=(20000, 12)).astype(np.float32)\n"
            "codes = train_som(data, backend=backend, seed=0, rlen=2)\n"
            "map_to_nodes(data, codes, backend=backend)\n"
            "kmeans(data[:5000], n_clusters=5, backend=backend, seed=0)\n"
            "print('numba' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False", result.stderr
