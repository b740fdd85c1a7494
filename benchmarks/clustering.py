"""bcellmap's clustering kernels against flowsom and scikit-learn, like for like.

Usage::

    python benchmarks/clustering.py                      # CPU, default sizes (a few minutes)
    python benchmarks/clustering.py --events 2000000     # bigger SOM / k-means runs
    python benchmarks/clustering.py --device gpu         # CuPy kernels; cuML peers if present
    python benchmarks/clustering.py --only som --repeats 5

Every comparison runs in this one process on identical input: the same events (a seeded
Gaussian mixture of 20 populations plus one rare population of 0.2%, 12 markers, float32;
flowsom gets the same values as float64, its faster path), the same grid, passes, ``k`` and
seeds. Runs are interleaved (bcellmap, peer, bcellmap, peer, ...) and the best of
``--repeats`` is kept, so load from other processes hits both alike. Warm-up runs are
excluded: flowsom's numba functions are compiled on a small slice first, bcellmap runs once on
a small slice (CuPy compiles its kernels on first use), and on the CPU bcellmap's compiled
argmin and sums (numba, ``bcellmap.kernels._nearest_cpu``) are loaded first; the time that
load takes, once per process, is printed with the summary. Ratio = peer time / bcellmap time.

Sections:

- SOM: a 10x10 SOM trained on all events (rlen 10), metaclustered (k = number of simulated
  populations) and all events mapped; bcellmap against flowsom's ``FlowSOMEstimator``
  (``fit_predict``: train, metacluster, map). ``BatchFlowSOMEstimator`` is shown for
  reference: one serial pass then rlen/2 rounds of parallel batches, about half the updates,
  so not like for like.
- Workflow subsample: bcellmap trained on subsamples (``--train-events``), all events mapped,
  as the workflow does; its accuracy cost against training on all events.
- k-means: k = 30, each tool from its own k-means++ (seeds 0, 1, ...), Lloyd to convergence
  (tol 1e-4, at most 300 iterations); scikit-learn's ``KMeans`` (lloyd, n_init=1). Also the
  k-means++ initialisations alone.
- exact kNN: 50,000 x 50 (20-component mixture, float64), k = 15, every row against all;
  scikit-learn's ``NearestNeighbors(algorithm="brute")``. ``--knn-recall`` adds pynndescent.

Accuracy columns: ARI against the simulated populations, and the rare population's recall:
the fraction of its events that land in a (meta)cluster whose majority is that population.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import adjusted_rand_score

from bcellmap.kernels.backend import Backend, get_backend, host_threads
from bcellmap.kernels.kmeans import kmeans, kmeans_plusplus
from bcellmap.kernels.knn import nearest_neighbors
from bcellmap.kernels.metacluster import consensus_metaclusters
from bcellmap.kernels.som import map_to_nodes, train_som

RARE_FRACTION = 0.002
N_COMMON = 20


@dataclass
class Row:
    """One line of the summary table."""

    section: str
    name: str
    seconds: float
    ratio: float | None = None
    ari: float | None = None
    recall: float | None = None
    note: str = ""


def mixture(n: int, d: int, n_common: int, *, seed: int, rare: float = RARE_FRACTION,
            chunk: int = 1_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Seeded Gaussian mixture (float32), generated chunk by chunk.

    ``n_common`` populations with Dirichlet weights share ``1 - rare`` of the events; one
    more population (label ``n_common``) holds the fraction ``rare`` (none when 0). Centres
    are uniform in ``[0, 6]^d``, spread 0.4 in every marker.
    """
    rng = np.random.default_rng(seed)
    n_pops = n_common + (rare > 0)
    centres = rng.uniform(0, 6, size=(n_pops, d)).astype(np.float32)
    weights = rng.dirichlet(np.full(n_common, 2.0)) * (1.0 - rare)
    if rare > 0:
        weights = np.append(weights, rare)
    data = np.empty((n, d), dtype=np.float32)
    truth = np.empty(n, dtype=np.int16)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        labels = rng.choice(n_pops, size=stop - start, p=weights)
        data[start:stop] = centres[labels]
        data[start:stop] += rng.standard_normal((stop - start, d), dtype=np.float32) * 0.4
        truth[start:stop] = labels
    return data, truth


def rare_recall(truth: np.ndarray, labels: np.ndarray, rare_label: int) -> float:
    """Fraction of the rare population's events in clusters where it is the majority."""
    labels = np.asarray(labels, dtype=np.int64)
    table = np.zeros((labels.max() + 1, int(truth.max()) + 1), dtype=np.int64)
    np.add.at(table, (labels, truth.astype(np.int64)), 1)
    dominated = table.argmax(axis=1) == rare_label
    return float(table[dominated, rare_label].sum() / max(1, table[:, rare_label].sum()))


def _sync(backend: Backend) -> None:
    if backend.is_gpu:
        backend.xp.cuda.Stream.null.synchronize()


def _timed(function: Callable[[], Any], backend: Backend | None = None) -> tuple[float, Any]:
    start = time.perf_counter()
    result = function()
    if backend is not None:
        _sync(backend)
    return time.perf_counter() - start, result


def _interleaved(runs: dict[str, Callable[[], Any]], repeats: int,
                 backend: Backend) -> dict[str, tuple[float, list[Any]]]:
    """Best time and every result of each run, the runs taking turns ``repeats`` times."""
    best = {name: np.inf for name in runs}
    results: dict[str, list[Any]] = {name: [] for name in runs}
    for repeat in range(repeats):
        for name, function in runs.items():
            seconds, result = _timed(lambda f=function, r=repeat: f(r), backend)
            best[name] = min(best[name], seconds)
            results[name].append(result)
            print(f"  {name}: {seconds:.3f} s", flush=True)
    return {name: (best[name], results[name]) for name in runs}


def _accuracy(truth: np.ndarray, labels: np.ndarray, rare_label: int) -> tuple[float, float]:
    return adjusted_rand_score(truth, labels), rare_recall(truth, labels, rare_label)


def bench_som(data: np.ndarray, truth: np.ndarray, backend: Backend, rows: list[Row], *,
              repeats: int, rlen: int, train_events: list[int], skip_peers: bool) -> None:
    """SOM + metaclusters + mapping on all events, bcellmap vs flowsom; then the subsample."""
    n_clusters = int(truth.max()) + 1
    rare = n_clusters - 1
    section = f"SOM 10x10, rlen {rlen}, {n_clusters} metaclusters, {data.shape[0]:,} x 12"
    print(f"\n{section}")
    parts: dict[str, float] = {"train": np.inf, "metacluster": np.inf, "map": np.inf}

    def ours(repeat: int) -> np.ndarray:
        seed = repeat + 1
        start = time.perf_counter()
        codes = train_som(data, backend=backend, seed=seed, rlen=rlen)
        trained = time.perf_counter()
        node_meta = consensus_metaclusters(codes, n_clusters=n_clusters, seed=seed)
        meta_done = time.perf_counter()
        nodes, _ = map_to_nodes(data, codes, backend=backend)
        _sync(backend)
        for key, seconds in (("train", trained - start), ("metacluster", meta_done - trained),
                             ("map", time.perf_counter() - meta_done)):
            parts[key] = min(parts[key], seconds)
        return node_meta[nodes]

    runs: dict[str, Callable[[int], Any]] = {"bcellmap": ours}
    train_som(data[:20_000], backend=backend, seed=0, rlen=2)  # warm-up, not timed
    try:
        if skip_peers:
            raise ImportError("--skip-peers")
        import flowsom as fs
    except ImportError as error:
        print(f"flowsom is not importable ({error}): its rows are skipped")
    else:
        # The same events as float64 (exactly the same values): flowsom's codes are float64
        # and its numba loops run faster on float64 input than on float32.
        data64 = data.astype(np.float64)
        for name, estimator in (("flowsom FlowSOMEstimator", fs.models.FlowSOMEstimator),
                                ("flowsom BatchFlowSOMEstimator",
                                 fs.models.BatchFlowSOMEstimator)):
            # numba compiles on first use, per input dtype: warm up on a slice, not timed.
            estimator(xdim=10, ydim=10, n_clusters=n_clusters, seed=1, rlen=1
                      ).fit_predict(data64[:2000])
            runs[name] = (lambda repeat, est=estimator: est(
                xdim=10, ydim=10, n_clusters=n_clusters, seed=repeat + 1, rlen=rlen
            ).fit_predict(data64))
    timings = _interleaved(runs, repeats, backend)
    ours_time = timings["bcellmap"][0]
    train_map = parts["train"] + parts["map"]
    full = {}
    for name, (seconds, results) in timings.items():
        ari, recall = np.array([_accuracy(truth, lab, rare) for lab in results]).mean(axis=0)
        if name == "bcellmap":
            full = {"ari": ari, "recall": recall}
            note = ", ".join(f"{key} {value:.3f} s" for key, value in parts.items())
            rows.append(Row(section, f"bcellmap ({backend.device}) train+meta+map", seconds,
                            None, ari, recall, note))
            rows.append(Row(section, "bcellmap train+map only", train_map))
        else:
            # flowsom's fit_predict metaclusters by one agglomerative clustering of the codes
            # (milliseconds): it is train + map; bcellmap's consensus takes 100 resamples.
            note = f"vs bcellmap train+map: {seconds / train_map:.1f}x"
            if "Batch" in name:  # its rlen/2 rounds of parallel batches: ~n(1 + rlen/2) updates
                note += f"; about {1 + rlen // 2} passes' worth of updates, not {rlen}"
            rows.append(Row(section, f"{name} fit_predict", seconds, seconds / ours_time, ari,
                            recall, note))

    # The workflow's strategy: train on a subsample, map every event.
    for n_train in sorted({min(size, data.shape[0]) for size in train_events}, reverse=True):
        sub_section = f"workflow: train on {n_train:,} of {data.shape[0]:,}, map all"
        print(f"\n{sub_section}")
        rng = np.random.default_rng(0)
        subsample = data[np.sort(rng.choice(data.shape[0], n_train, replace=False))]

        def ours_subsample(repeat: int, subsample: np.ndarray = subsample) -> np.ndarray:
            codes = train_som(subsample, backend=backend, seed=repeat + 1, rlen=rlen)
            node_meta = consensus_metaclusters(codes, n_clusters=n_clusters, seed=repeat + 1)
            return node_meta[map_to_nodes(data, codes, backend=backend)[0]]

        seconds, results = _interleaved({"bcellmap subsample": ours_subsample}, repeats,
                                        backend)["bcellmap subsample"]
        ari, recall = np.array([_accuracy(truth, lab, rare) for lab in results]).mean(axis=0)
        rows.append(Row(sub_section, f"bcellmap ({backend.device}) subsample+meta+map",
                        seconds, None, ari, recall,
                        f"vs training on all: ARI {ari - full['ari']:+.4f}, rare recall "
                        f"{recall - full['recall']:+.4f}, {ours_time / seconds:.1f}x faster"))


def bench_kmeans(data: np.ndarray, truth: np.ndarray, backend: Backend, rows: list[Row], *,
                 repeats: int, n_clusters: int, skip_peers: bool) -> None:
    """k-means end to end (k-means++ included), bcellmap vs scikit-learn (and cuML)."""
    rare = int(truth.max())
    section = f"k-means k={n_clusters}, {data.shape[0]:,} x 12, own k-means++, tol 1e-4"
    print(f"\n{section}")
    kmeans(data[:20_000], n_clusters=n_clusters, backend=backend, seed=0)  # warm-up
    runs: dict[str, Callable[[int], Any]] = {
        "bcellmap": lambda repeat: kmeans(data, n_clusters=n_clusters, backend=backend,
                                          seed=repeat),
    }
    init_runs: dict[str, Callable[[int], Any]] = {
        "bcellmap k-means++": lambda repeat: kmeans_plusplus(
            data, n_clusters=n_clusters, backend=backend, seed=repeat),
    }
    if not skip_peers:
        from sklearn.cluster import KMeans
        from sklearn.cluster import kmeans_plusplus as sk_plusplus

        KMeans(n_clusters=n_clusters, n_init=1, random_state=0).fit(data[:20_000])
        runs["scikit-learn KMeans"] = lambda repeat: KMeans(
            n_clusters=n_clusters, n_init=1, algorithm="lloyd", tol=1e-4, max_iter=300,
            random_state=repeat).fit(data)
        init_runs["scikit-learn kmeans_plusplus"] = lambda repeat: sk_plusplus(
            data, n_clusters, random_state=repeat)
        cuml = _cuml() if backend.is_gpu else None
        if cuml is not None:
            runs["cuML KMeans"] = lambda repeat: cuml.KMeans(
                n_clusters=n_clusters, n_init=1, random_state=repeat, tol=1e-4,
                max_iter=300).fit(data)
    timings = _interleaved(runs, repeats, backend)
    ours_time = timings["bcellmap"][0]
    ours_inertia = np.mean([result.inertia for result in timings["bcellmap"][1]])
    for name, (seconds, results) in timings.items():
        if name == "bcellmap":
            labels = [r.labels for r in results]
            inertia = ours_inertia
            iterations = np.mean([r.n_iter for r in results])
        else:
            labels = [_host(r.labels_) for r in results]
            inertia = np.mean([float(r.inertia_) for r in results])
            iterations = np.mean([float(r.n_iter_) for r in results])
        ari, recall = np.array([_accuracy(truth, lab, rare) for lab in labels]).mean(axis=0)
        note = f"mean inertia {inertia:.6g}, {iterations:.0f} iterations"
        if name != "bcellmap":
            note += f"; bcellmap's inertia / this {ours_inertia / inertia:.4f}"
        rows.append(Row(section, f"{name}" + (f" ({backend.device})" if name == "bcellmap"
                                              else ""), seconds,
                        None if name == "bcellmap" else seconds / ours_time, ari, recall, note))
    init = _interleaved(init_runs, repeats, backend)
    init_time = init["bcellmap k-means++"][0]
    for name, (seconds, _) in init.items():
        rows.append(Row(section, f"{name} only", seconds,
                        None if name.startswith("bcellmap") else seconds / init_time))


def bench_knn(backend: Backend, rows: list[Row], *, repeats: int, n_rows: int, k: int,
              skip_peers: bool, recall: bool) -> None:
    """Exact kNN of every row among all rows, bcellmap vs scikit-learn's brute force."""
    section = f"exact kNN {n_rows:,} x 50 (float64), k={k}"
    print(f"\n{section}")
    data, _ = mixture(n_rows, 50, 20, seed=5, rare=0.0)
    data = data.astype(np.float64)
    nearest_neighbors(data[:2000], k=k, backend=backend)  # warm-up
    runs: dict[str, Callable[[int], Any]] = {
        "bcellmap": lambda repeat: nearest_neighbors(data, k=k, backend=backend)}
    if not skip_peers:
        from sklearn.neighbors import NearestNeighbors

        runs["scikit-learn brute"] = lambda repeat: NearestNeighbors(
            n_neighbors=k, algorithm="brute").fit(data).kneighbors(data)[::-1]
        cuml = _cuml() if backend.is_gpu else None
        if cuml is not None:
            runs["cuML NearestNeighbors"] = lambda repeat: cuml.NearestNeighbors(
                n_neighbors=k).fit(data).kneighbors(data)[::-1]
    timings = _interleaved(runs, repeats, backend)
    ours_time, (ours_result, *_) = timings["bcellmap"]
    for name, (seconds, (result, *_)) in timings.items():
        note = ""
        if name != "bcellmap":
            indices, distances = (_host(a) for a in result)
            same = np.mean([set(a) == set(b) for a, b in zip(
                ours_result[0].tolist(), indices.tolist(), strict=True)])
            note = (f"identical neighbour sets {same:.4%}; max |distance difference| "
                    f"{np.abs(ours_result[1] - distances).max():.1e}")
        rows.append(Row(section, name + (f" ({backend.device})" if name == "bcellmap" else ""),
                        seconds, None if name == "bcellmap" else seconds / ours_time,
                        note=note))
    if recall:
        cpu = get_backend(device="cpu")
        seconds, (approx, _) = _timed(lambda: nearest_neighbors(
            data, k=k, backend=cpu, method="approximate", seed=0))
        hits = np.mean([len(set(a) & set(b)) / k for a, b in zip(
            approx.tolist(), ours_result[0].tolist(), strict=True)])
        rows.append(Row(section, "pynndescent (approximate, numba compiles)", seconds,
                        None, note=f"recall@{k} {hits:.4f}"))


def _load_compiled_steps() -> float:
    """Load bcellmap's compiled CPU steps for float32 (as a large run's first pass would) and
    return the seconds it took: numba's import plus its cached machine code, or a compile."""
    start = time.perf_counter()
    from bcellmap.kernels import _nearest_cpu

    scores = np.zeros((2, 8), dtype=np.float32)
    labels = np.empty(8, dtype=np.int64)
    _nearest_cpu.nearest_columns(scores, np.zeros(2, dtype=np.float32), labels)
    _nearest_cpu.centre_sums(np.zeros((8, 3), dtype=np.float32), labels, 2)
    return time.perf_counter() - start


def _host(array: Any) -> np.ndarray:
    """A NumPy copy of a NumPy, CuPy or cuDF result."""
    for method in ("get", "to_numpy"):
        if hasattr(array, method):
            return np.asarray(getattr(array, method)())
    return np.asarray(array)


def _cuml() -> Any:
    try:
        import cuml
    except ImportError as error:
        print(f"cuML is not importable ({error}): its rows are skipped")
        return None
    return cuml


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_table(rows: list[Row], *, header: str) -> None:
    """The summary: one block per section."""
    print(f"\n{header}")
    print(f"{'run':<50} {'seconds':>8} {'ratio':>7} {'ARI':>7} {'rare':>7}  note")
    section = None
    for row in rows:
        if row.section != section:
            section = row.section
            print(f"-- {section}")
        print(f"{row.name:<50} {row.seconds:>8.3f} "
              f"{'' if row.ratio is None else f'{row.ratio:.2f}x':>7} "
              f"{'' if row.ari is None else f'{row.ari:.4f}':>7} "
              f"{'' if row.recall is None else f'{row.recall:.4f}':>7}  {row.note}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and print the summary table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--events", type=int, default=500_000,
                        help="events for the SOM and k-means sections (default 500,000)")
    parser.add_argument("--train-events", type=int, nargs="+", default=[100_000, 10_000],
                        help="subsample sizes of the workflow section (default 100,000 10,000)")
    parser.add_argument("--rlen", type=int, default=10, help="SOM passes (default 10)")
    parser.add_argument("--clusters", type=int, default=30, help="k-means k (default 30)")
    parser.add_argument("--knn-rows", type=int, default=50_000)
    parser.add_argument("--knn-k", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs, best kept")
    parser.add_argument("--skip-peers", action="store_true", help="time bcellmap only")
    parser.add_argument("--only", choices=["som", "kmeans", "knn"], action="append")
    parser.add_argument("--knn-recall", action="store_true", help="also time pynndescent")
    args = parser.parse_args(argv)
    backend = get_backend({"device": args.device})
    print(f"device: {backend.reason}")
    load_start = os.getloadavg()[0]
    only = set(args.only or ["som", "kmeans", "knn"])
    rows: list[Row] = []
    load_note = ""
    if not backend.is_gpu and only & {"som", "kmeans"}:
        load_note = (f"; bcellmap's compiled CPU steps loaded in {_load_compiled_steps():.2f} s "
                     f"before the timed runs (once per process)")
    if only & {"som", "kmeans"}:
        start = time.perf_counter()
        data, truth = mixture(args.events, 12, N_COMMON, seed=1)
        print(f"generated {args.events:,} x 12 float32 ({N_COMMON} populations + one of "
              f"{RARE_FRACTION:.1%}) in {time.perf_counter() - start:.1f} s")
        if "som" in only:
            bench_som(data, truth, backend, rows, repeats=args.repeats, rlen=args.rlen,
                      train_events=args.train_events, skip_peers=args.skip_peers)
        if "kmeans" in only:
            bench_kmeans(data, truth, backend, rows, repeats=args.repeats,
                         n_clusters=args.clusters, skip_peers=args.skip_peers)
    if "knn" in only:
        bench_knn(backend, rows, repeats=args.repeats, n_rows=args.knn_rows, k=args.knn_k,
                  skip_peers=args.skip_peers, recall=args.knn_recall)
    print_table(rows, header=f"summary ({backend.device}; ratio = peer time / bcellmap time, "
                             f"best of {args.repeats} interleaved runs; ARI and rare-population "
                             f"recall against the simulated truth, mean over runs)")
    print(f"host: {host_threads()} CPU threads; 1-minute load average {load_start:.1f} at the "
          f"start, {os.getloadavg()[0]:.1f} at the end; peak host RSS {_peak_rss_mb():.0f} MB"
          f"{load_note}")
    if backend.is_gpu:
        pool = backend.xp.get_default_memory_pool()
        print(f"GPU memory pool: {pool.total_bytes() / 2**20:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
