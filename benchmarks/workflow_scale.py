"""How the workflow scales: time, peak memory and footprint against events per file and samples.

Runs the real workflow (``snakemake --cores N``, flow only, figures off, ``device: cpu``) on
simulated cohorts, one run per scenario in its own folder, and reads the rules' ``benchmark:``
files (``logs/benchmarks/{rule}/...tsv``: wall seconds and peak RSS of every job). Prints one
row per scenario and one per rule and scenario, and checks that

* the time of the per-sample rules grows about linearly with the events per file (the ratio
  of time per job to events is printed), and
* no job's peak RSS exceeds the memory the config allows it: the largest file's events held
  a few times over plus ``memory.host_budget_mb`` for the chunked kernels (the cohort steps
  see bounded subsamples: ``cluster.events_per_sample`` / ``cluster.train_events`` and
  ``annotate.thresholds.events_per_sample``, so they do not grow with the events per file).

Cohorts: the demo simulator's visits (its first patients, then copies of them under new
patient ids once its 55 visits are used up), each FCS file with the given number of events.
Only the visits used are simulated.

Usage::

    python benchmarks/workflow_scale.py                      # 20k and 200k events x 10 samples
    python benchmarks/workflow_scale.py --events 20000 200000 1000000 --samples 10
    python benchmarks/workflow_scale.py --events 20000 --samples 10 100

Defaults run in a few minutes on 2 cores; 1M events per file and 100 samples are options.
``--keep`` keeps the run folders (under ``--workdir``, default a temporary folder).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Events held at once by a per-sample job, in copies of the float32 event matrix (read,
#: compensated, transformed, QC and AnnData copies); a generous bound for the check.
EVENT_COPIES = 12


def simulate_visits(folder: Path, *, n_samples: int, events: int, seed: int) -> Path:
    """Write ``n_samples`` flow visits of ``events`` events each and their sample sheet.

    Uses the demo simulator's design, one visit after another; past its 55 visits the
    sheet names the same files again under new patient ids (a patient has one visit per
    day), so only 55 files at most are simulated.
    """
    import numpy as np
    import pandas as pd

    from bcellmap.demo import simulate as sim

    folder.mkdir(parents=True, exist_ok=True)
    visits = sim._design(seed)
    rows = []
    for number in range(n_samples):
        visit = visits[number % len(visits)]
        copy = number // len(visits)
        path = folder / f"{visit.sample_id}.fcs"
        if not path.exists():
            # As bcellmap.demo.simulate._write_cohort does for each visit (no truth tables).
            rng = np.random.default_rng([seed, 1000 + visits.index(visit)])
            staining, gain = sim._drift(seed, visits.index(visit), True)
            simulated = sim._simulate_events(visit, events, rng, staining=staining, gain=gain)
            sim._write_fcs(path, visit, simulated)
        suffix = f"c{copy}" if copy else ""
        rows.append({"sample_id": f"{visit.sample_id}{suffix}",
                     "patient_id": f"{visit.patient.patient_id}{suffix}", "day": visit.day,
                     "modality": "flow", "path": path.name,
                     "lymphocytes_per_ul": int(visit.lymphocytes_per_ul),
                     "disease": visit.patient.disease, "batch": sim._batch(visit.day),
                     "panel": ""})
    sheet = folder / "samples.tsv"
    pd.DataFrame(rows).to_csv(sheet, sep="\t", index=False)
    return sheet


def _size_mb(paths) -> float:
    total = 0
    for path in paths:
        path = Path(path)
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return total / 1e6


def read_benchmarks(run: Path) -> dict[str, list[dict[str, float]]]:
    """``rule -> [{"s": wall seconds, "max_rss": MB, "cpu_time": s}, ...]`` of one run."""
    by_rule: dict[str, list[dict[str, float]]] = {}
    for path in sorted((run / "logs" / "benchmarks").rglob("*.tsv")):
        rule = path.parent.name if path.parent.name != "benchmarks" else path.stem
        with path.open() as handle:
            for row in csv.DictReader(handle, delimiter="\t"):
                by_rule.setdefault(rule, []).append(
                    {key: float(row[key]) if row.get(key) not in (None, "", "NA") else 0.0
                     for key in ("s", "max_rss", "cpu_time")})
    return by_rule


def run_scenario(workdir: Path, *, events: int, n_samples: int, cores: int, seed: int,
                 extra_config: str) -> dict:
    """Simulate one cohort, run the workflow on it, and summarise its benchmark files."""
    data = workdir / f"data_{events}"
    sheet = simulate_visits(data, n_samples=n_samples, events=events, seed=seed)
    sheet_n = data / f"samples_{n_samples}.tsv"
    shutil.copy(sheet, sheet_n)
    run = workdir / f"run_{events}_{n_samples}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    (run / "bench.yaml").write_text(
        f"samples: {sheet_n}\ndevice: cpu\nreport: {{enabled: false}}\n{extra_config}")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               BCELLMAP_DEVICE="cpu")
    command = [str(Path(sys.executable).with_name("snakemake")), "-s", str(ROOT / "Snakefile"),
               "--cores", str(cores), "--configfile", "bench.yaml", "--quiet", "all"]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=run, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"snakemake failed in {run}:\n{result.stderr[-4000:]}")
    import pandas as pd

    # Per sheet row: past 55 samples rows share files, but a real cohort's would not.
    used = pd.read_csv(sheet_n, sep="\t")["path"]
    return {"events": events, "samples": n_samples, "wall": wall,
            "rules": read_benchmarks(run),
            "input_mb": sum(_size_mb([data / p]) for p in used),
            "results_mb": _size_mb([run / "results"])}


def _load_budget(extra_config: str) -> float:
    import yaml

    from bcellmap.config import default_config, merge

    config = merge(default_config(), yaml.safe_load(extra_config) or {})
    return float(config["memory"]["host_budget_mb"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, nargs="+", default=[20_000, 200_000],
                        help="events per FCS file, one scenario each (default 20000 200000)")
    parser.add_argument("--samples", type=int, nargs="+", default=[10],
                        help="samples per cohort, one scenario each (default 10)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--seed", type=int, default=20241121)
    parser.add_argument("--config", default="", metavar="YAML",
                        help="extra config for every run, e.g. 'memory: {host_budget_mb: 512}'")
    parser.add_argument("--workdir", default=None, help="run folders (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bcellmap-scale-"))
    budget = _load_budget(args.config)
    results = []
    try:
        for n_samples in args.samples:
            for events in args.events:
                print(f"running {n_samples} samples x {events:,} events ...", flush=True)
                results.append(run_scenario(workdir, events=events, n_samples=n_samples,
                                            cores=args.cores, seed=args.seed,
                                            extra_config=args.config))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"run folders kept in {workdir}")

    print(f"\nmachine: {os.cpu_count()} CPUs, --cores {args.cores}; "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    print(f"\n{'events/file':>11} {'samples':>7} {'jobs':>5} {'wall s':>7} {'job s (sum)':>11} "
          f"{'peak RSS MB':>11} {'input MB':>9} {'results MB':>10} {'results/input':>13}")
    for r in results:
        jobs = [j for rows in r["rules"].values() for j in rows]
        print(f"{r['events']:>11,} {r['samples']:>7} {len(jobs):>5} {r['wall']:>7.1f} "
              f"{sum(j['s'] for j in jobs):>11.1f} {max(j['max_rss'] for j in jobs):>11.0f} "
              f"{r['input_mb']:>9.1f} {r['results_mb']:>10.1f} "
              f"{r['results_mb'] / r['input_mb']:>13.2f}")

    print(f"\n{'rule':<20} {'events/file':>11} {'samples':>7} {'jobs':>5} {'mean s':>7} "
          f"{'max s':>7} {'mean cpu s':>10} {'us/event':>9} {'peak RSS MB':>11} {'limit MB':>9}")
    failures = []
    for r in results:
        limit = EVENT_COPIES * r["events"] * 16 * 4 / 1e6 + budget + 400  # + the interpreter
        for rule, rows in sorted(r["rules"].items()):
            mean = sum(j["s"] for j in rows) / len(rows)
            cpu = sum(j["cpu_time"] for j in rows) / len(rows)
            rss = max(j["max_rss"] for j in rows)
            per_sample = rule in ("ingest_flow", "map_annotate_flow")
            per_event = f"{1e6 * mean / r['events']:.2f}" if per_sample else ""
            print(f"{rule:<20} {r['events']:>11,} {r['samples']:>7} {len(rows):>5} "
                  f"{mean:>7.2f} {max(j['s'] for j in rows):>7.2f} {cpu:>10.2f} "
                  f"{per_event:>9} {rss:>11.0f} {limit:>9.0f}")
            if rss > limit:
                failures.append(f"{rule} at {r['events']:,} events: peak RSS {rss:.0f} MB > "
                                f"{limit:.0f} MB")
    for rule in ("ingest_flow", "map_annotate_flow"):
        points = sorted((r["events"], sum(j["s"] for j in r["rules"].get(rule, []))
                         / max(1, len(r["rules"].get(rule, [])))) for r in results
                        if r["samples"] == args.samples[0])
        if len(points) > 1:
            (e0, t0), (e1, t1) = points[0], points[-1]
            print(f"{rule}: {e1 / e0:.0f}x the events -> {t1 / t0:.1f}x the time per job")
    if failures:
        print("\nMEMORY ABOVE THE LIMIT:\n  " + "\n  ".join(failures))
        return 1
    print("\nevery job's peak RSS is within its limit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
