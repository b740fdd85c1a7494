"""Time bcellmap's clustering kernels against flowsom and scikit-learn on the same data.

Usage::

    python benchmarks/clustering.py --device cpu --events 1000000
    python benchmarks/clustering.py --device gpu --events 10000000 --skip-peers

Data: a seeded Gaussian mixture (20 populations, 12 markers, float32) generated in chunks, so
10M events need about 0.5 GB. Runs, each in this process on the same data:

- SOM: bcellmap trains a 10x10 SOM on a 100,000-event subsample (as the workflow does),
  metaclusters (k=20) and maps all events; flowsom's FlowSOMEstimator and
  BatchFlowSOMEstimator fit all events (rlen 10). ARI against the simulated truth.
- k-means: 20 Lloyd iterations from the same k-means++ start (k=30, tol=0), scikit-learn vs
  bcellmap (on the CPU bcellmap calls scikit-learn's Lloyd; its array kernel is timed too).
- exact kNN on 50,000 x 50 (k=15): scikit-learn brute force vs bcellmap; with
  ``--knn-recall``, pynndescent's recall against the exact answer.

Prints one summary table with times, ratios, ARI and the peak resident memory.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np
from sklearn.metrics import adjusted_rand_score

from bcellmap.kernels.backend import get_backend
from bcellmap.kernels.kmeans import kmeans, kmeans_plusplus
from bcellmap.kernels.knn import nearest_neighbors
from bcellmap.kernels.metacluster import consensus_metaclusters
from bcellmap.kernels.som import map_to_nodes, train_som


def mixture(n: int, d: int, k: int, *, seed: int, chunk: int = 1_000_000):
    """Seeded Gaussian mixture, generated chunk by chunk into one float32 array."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 6, size=(k, d)).astype(np.float32)
    weights = rng.dirichlet(np.full(k, 2.0))
    data = np.empty((n, d), dtype=np.float32)
    truth = np.empty(n, dtype=np.int16)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        labels = rng.choice(k, size=stop - start, p=weights)
        data[start:stop] = centres[labels]
        data[start:stop] += rng.standard_normal((stop - start, d), dtype=np.float32) * 0.4
        truth[start:stop] = labels
    return data, truth


def _sync(backend) -> None:
    if backend.is_gpu:
        backend.xp.cuda.Stream.null.synchronize()


def _timed(function, backend=None):
    start = time.perf_counter()
    result = function()
    if backend is not None:
        _sync(backend)
    return time.perf_counter() - start, result


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _gpu_peak_mb(backend) -> str:
    if not backend.is_gpu:
        return "-"
    pool = backend.xp.get_default_memory_pool()
    return f"{pool.total_bytes() / 2**20:.0f} (pool)"


def bench_som(data, truth, backend, rows, *, skip_peers: bool, train_events: int) -> None:
    rng = np.random.default_rng(0)
    subsample = data[np.sort(rng.choice(data.shape[0], min(train_events, data.shape[0]),
                                        replace=False))]
    # Warm-up on a small slice (CuPy kernel compilation, BLAS threads), not timed.
    train_som(subsample[:5000], backend=backend, seed=0, rlen=2)

    def ours():
        codes = train_som(subsample, backend=backend, seed=1)
        meta = consensus_metaclusters(codes, n_clusters=20, seed=1)
        nodes, _ = map_to_nodes(data, codes, backend=backend)
        return codes, meta[nodes]

    t_train, codes = _timed(lambda: train_som(subsample, backend=backend, seed=1), backend)
    t_map, _ = _timed(lambda: map_to_nodes(data, codes, backend=backend), backend)
    t_total, (_, labels) = _timed(ours, backend)
    ari = adjusted_rand_score(truth, labels)
    rows.append((f"SOM train (subsample {subsample.shape[0]:,})", t_train, None, None))
    rows.append((f"SOM map all {data.shape[0]:,} events", t_map, None, None))
    rows.append(("bcellmap SOM+meta+map", t_total, ari, None))
    if skip_peers:
        return
    try:
        import flowsom as fs
    except ImportError as error:  # e.g. on a GPU node without it: time the other peers
        print(f"flowsom is not importable ({error}): its rows are skipped")
        return

    data64 = data.astype(np.float64)
    for name, estimator in (("flowsom BatchFlowSOMEstimator", fs.models.BatchFlowSOMEstimator),
                            ("flowsom FlowSOMEstimator", fs.models.FlowSOMEstimator)):
        # numba compiles on first use: warm up on a small slice.
        estimator(xdim=10, ydim=10, n_clusters=20, seed=1, rlen=1).fit_predict(data64[:2000])
        t_peer, peer_labels = _timed(lambda est=estimator: est(
            xdim=10, ydim=10, n_clusters=20, seed=1, rlen=10).fit_predict(data64))
        rows.append((name, t_peer, adjusted_rand_score(truth, peer_labels), t_peer / t_total))


def bench_kmeans(data, backend, rows, *, skip_peers: bool) -> None:
    init = kmeans_plusplus(data[:200_000], n_clusters=30, backend=backend, seed=3)
    # Warm-up (CuPy compiles each kernel on first use), not timed.
    kmeans(data[:20_000], n_clusters=30, backend=backend, seed=3, init=init, max_iter=2, tol=0.0)
    t_ours, ours = _timed(lambda: kmeans(data, n_clusters=30, backend=backend, seed=3,
                                         init=init, max_iter=20, tol=0.0), backend)
    rows.append((f"bcellmap k-means 20 it ({'sklearn' if not backend.is_gpu else 'cupy'})",
                 t_ours, None, None))
    if not backend.is_gpu:
        t_xp, xp_run = _timed(lambda: kmeans(data, n_clusters=30, backend=backend, seed=3,
                                             init=init, max_iter=20, tol=0.0, use_sklearn=False))
        rows.append(("bcellmap k-means 20 it (numpy kernel)", t_xp, None, None))
    if skip_peers:
        return
    from sklearn.cluster import KMeans

    t_sk, model = _timed(lambda: KMeans(n_clusters=30, init=init.astype(np.float32), n_init=1,
                                        max_iter=20, tol=0.0, algorithm="lloyd").fit(data))
    rows.append(("sklearn KMeans 20 it", t_sk, None, t_sk / t_ours))
    print(f"k-means inertia: bcellmap {ours.inertia:.6g}, sklearn {model.inertia_:.6g} "
          f"(relative difference {abs(ours.inertia / model.inertia_ - 1):.2e})")


def bench_knn(backend, rows, *, skip_peers: bool, recall: bool) -> None:
    data, _ = mixture(50_000, 50, 20, seed=5)
    data = data.astype(np.float64)
    nearest_neighbors(data[:2000], k=15, backend=backend)  # warm-up
    t_ours, (idx, _) = _timed(lambda: nearest_neighbors(data, k=15, backend=backend), backend)
    rows.append(("bcellmap exact kNN 50k x 50", t_ours, None, None))
    if not backend.is_gpu:
        t_xp, (idx_xp, _) = _timed(lambda: nearest_neighbors(data, k=15, backend=backend,
                                                             use_sklearn=False))
        rows.append(("bcellmap exact kNN (numpy kernel)", t_xp, None, None))
    if not skip_peers:
        from sklearn.neighbors import NearestNeighbors

        t_sk, _ = _timed(lambda: NearestNeighbors(n_neighbors=15, algorithm="brute")
                         .fit(data).kneighbors(data))
        rows.append(("sklearn brute kNN 50k x 50", t_sk, None, t_sk / t_ours))
    if recall:
        t_ap, (idx_ap, _) = _timed(lambda: nearest_neighbors(
            data, k=15, backend=get_backend(device="cpu"), method="approximate", seed=0))
        hits = np.mean([len(set(a) & set(b)) / 15 for a, b in zip(idx_ap, idx, strict=True)])
        rows.append((f"pynndescent kNN (recall {hits:.4f})", t_ap, None, None))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and print the summary table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--train-events", type=int, default=100_000)
    parser.add_argument("--skip-peers", action="store_true", help="time bcellmap only")
    parser.add_argument("--only", choices=["som", "kmeans", "knn"], action="append")
    parser.add_argument("--knn-recall", action="store_true", help="also time pynndescent")
    args = parser.parse_args(argv)
    backend = get_backend({"device": args.device})
    print(f"device: {backend.reason}")
    only = set(args.only or ["som", "kmeans", "knn"])
    rows: list[tuple[str, float, float | None, float | None]] = []
    start = time.perf_counter()
    data, truth = mixture(args.events, 12, 20, seed=1)
    print(f"generated {args.events:,} x 12 float32 in {time.perf_counter() - start:.1f} s")
    if "som" in only:
        bench_som(data, truth, backend, rows, skip_peers=args.skip_peers,
                  train_events=args.train_events)
    if "kmeans" in only:
        bench_kmeans(data, backend, rows, skip_peers=args.skip_peers)
    if "knn" in only:
        bench_knn(backend, rows, skip_peers=args.skip_peers, recall=args.knn_recall)
    print(f"\nsummary ({backend.device}, {args.events:,} events; ratio = peer time / bcellmap)")
    print(f"{'run':<44} {'seconds':>9} {'ARI':>7} {'ratio':>7}")
    for name, seconds, ari, ratio in rows:
        print(f"{name:<44} {seconds:>9.3f} {'' if ari is None else f'{ari:.4f}':>7} "
              f"{'' if ratio is None else f'{ratio:.1f}x':>7}")
    print(f"peak host RSS: {_peak_rss_mb():.0f} MB; GPU memory: {_gpu_peak_mb(backend)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
