"""Time FCS read + compensate + arcsinh in bcellmap against readfcs + pytometry (scverse).

Writes one N-event, 12-channel FCS file (4 scatter, 7 fluorescence with a SPILL keyword,
Time) to a temporary folder with flowio, then in the same process times:

* bcellmap: ``fcs.read_fcs`` + ``panel.resolve_panel`` + ``compensation.compensate_events``
  + ``transform.transform_events`` (arcsinh, cofactor 150), and the full
  ``ingest.ingest_flow`` (adds QC) for reference;
* peers: ``readfcs.read`` + ``pytometry.pp.compensate`` + ``pytometry.tl.normalize_arcsinh``
  (cofactor 150).

Usage: ``python benchmarks/ingest.py [--events N] [--repeats R]``. Prints the best of R runs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

CHANNELS = ["FSC-A", "FSC-H", "SSC-A", "SSC-H", "FITC-A", "PE-A", "PerCP-Cy5.5-A", "PE-Cy7-A",
            "APC-A", "APC-Cy7-A", "BV421-A", "Time"]
# No "/" in markers: readfcs renames "Live/Dead" to "Live_Dead" in the spillover matrix only,
# and pytometry then silently leaves that channel out of compensation.
MARKERS = ["", "", "", "", "CD3", "CD19", "CD20", "CD27", "IgD", "Viability", "CD38", ""]


def _write_fcs(path: Path, n_events: int, *, seed: int) -> None:
    import flowio

    rng = np.random.default_rng(seed)
    fluor = [c for c in CHANNELS[4:11]]
    spill = np.eye(len(fluor)) + np.triu(rng.uniform(0, 0.1, (len(fluor), len(fluor))), 1)
    events = np.empty((n_events, len(CHANNELS)), dtype=np.float32)
    fsc = rng.normal(60000, 8000, n_events)
    events[:, 0] = fsc
    events[:, 1] = fsc / 1.15
    events[:, 2] = rng.normal(20000, 4000, n_events)
    events[:, 3] = events[:, 2] / 1.1
    events[:, 4:11] = (rng.gamma(2.0, 400.0, (n_events, len(fluor))) @ spill)
    events[:, 11] = np.sort(rng.uniform(0, 10000, n_events))
    spill_text = ",".join([str(len(fluor)), *fluor, *(f"{v:.6f}" for v in spill.ravel())])
    with path.open("wb") as handle:
        flowio.create_fcs(handle, events.ravel().tolist(), CHANNELS, opt_channel_names=MARKERS,
                          metadata_dict={"SPILL": spill_text})


def _bcellmap(path: Path, config: dict) -> np.ndarray:
    from bcellmap.flow._transform import transform_events
    from bcellmap.flow.compensation import compensate_events
    from bcellmap.io.fcs import read_fcs
    from bcellmap.io.panel import channel_kind, resolve_panel

    fcs = read_fcs(path)
    canon = resolve_panel(fcs.channels, fcs.markers)
    kinds = [channel_kind(c, ch) for c, ch in zip(canon, fcs.channels, strict=True)]
    comp, _ = compensate_events(fcs.events, fcs.channels, kinds,
                                settings=config["ingest"]["compensation"], text=fcs.text)
    X, _, _ = transform_events(comp, channels=fcs.channels, canonicals=canon, kinds=kinds,
                               ranges=fcs.ranges, settings=config["ingest"]["transform"],
                               mass_cytometry=False)
    return X


def _peers(path: Path) -> np.ndarray:
    import pytometry as pm
    import readfcs

    if not hasattr(np, "in1d"):
        # pytometry 0.1.6 calls np.in1d, removed in NumPy 2.4; np.isin is its replacement.
        np.in1d = lambda a, b: np.isin(a, b).ravel()  # noqa: NPY201

    adata = readfcs.read(str(path))
    pm.pp.compensate(adata)
    pm.tl.normalize_arcsinh(adata, cofactor=150)
    return np.asarray(adata.X)


def _best(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    """Run the benchmark and print the times and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from bcellmap.config import load_config, merge
    from bcellmap.flow._ingest import ingest_flow

    config = merge(load_config(), {"ingest": {"required_markers": []}})
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.fcs"
        start = time.perf_counter()
        _write_fcs(path, args.events, seed=args.seed)
        print(f"wrote {args.events:,} events x {len(CHANNELS)} channels in "
              f"{time.perf_counter() - start:.1f} s")
        # Warm both paths once (imports, caches) before timing.
        ours_x = _bcellmap(path, config)
        peer_x = _peers(path)
        fluor = slice(4, 11)
        print(f"max |bcellmap - pytometry| on compensated arcsinh fluorescence: "
              f"{np.max(np.abs(ours_x[:, fluor] - peer_x[:, fluor])):.2e}")
        ours = _best(lambda: _bcellmap(path, config), args.repeats)
        peers = _best(lambda: _peers(path), args.repeats)
        full = _best(lambda: ingest_flow(path, config=config, sample_id="bench"), 1)
    print(f"bcellmap read+compensate+arcsinh: {ours:.2f} s")
    print(f"readfcs+pytometry read+compensate+arcsinh: {peers:.2f} s")
    print(f"ratio peers/bcellmap: {peers / ours:.2f} (>1: bcellmap faster)")
    print(f"bcellmap full ingest_flow incl. QC: {full:.2f} s")


if __name__ == "__main__":
    main()
