"""train-flow and map-flow on small synthetic flow AnnData files with known populations."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import adjusted_rand_score

from bcellmap.cli import main
from bcellmap.cli.flow import cli_train_flow
from bcellmap.errors import InputError

MARKERS = ["CD3", "CD19", "CD20"]


@pytest.fixture(autouse=True)
def _cpu(monkeypatch):
    monkeypatch.setenv("BCELLMAP_DEVICE", "cpu")


def _flow_h5ad(path, sample_id, *, n, seed, qc_pass_share=0.9, channels=None):
    """Three populations (T: CD3+, B: CD19+CD20+, other: all negative) plus a scatter column."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 3, n)
    means = np.array([[4.0, 0.2, 0.2], [0.2, 4.0, 3.5], [0.2, 0.2, 0.2]])
    values = means[truth] + rng.normal(0, 0.3, (n, 3))
    x = np.column_stack([rng.uniform(0, 10, n), values]).astype(np.float32)
    canonical = channels or ["FSC-A", *MARKERS]
    obs = pd.DataFrame({"event_index": np.arange(n, dtype=np.int64),
                        "qc_pass": rng.random(n) < qc_pass_share})
    obs.index = obs.index.astype(str)
    var = pd.DataFrame({"canonical": canonical}, index=[f"ch{i}" for i in range(4)])
    adata = ad.AnnData(X=x, obs=obs, var=var)
    adata.uns["sample"] = {"sample_id": sample_id}
    adata.write_h5ad(path)
    return truth


def _config(tmp_path, **cluster):
    path = tmp_path / "config.yaml"
    settings = {"markers": MARKERS, "events_per_sample": 800,
                "som": {"xdim": 4, "ydim": 4}, "n_metaclusters": 3, "consensus_resamples": 20}
    settings.update(cluster)
    path.write_text(yaml.safe_dump({"cluster": settings, "seed": 7}))
    return str(path)


def _train(tmp_path, inputs, config):
    args = argparse.Namespace(config=config, inputs=[str(p) for p in inputs],
                              model=str(tmp_path / "model.npz"), info=str(tmp_path / "model.json"))
    cli_train_flow(args)
    return args


def _map(config, input, model, out):
    """``bcellmap map-flow``."""
    assert main(["map-flow", "--config", str(config), "--input", str(input), "--model",
                 str(model), "--out", str(out)]) == 0


def test_train_and_map_recover_populations(tmp_path):
    truths = {f"s{i}": _flow_h5ad(tmp_path / f"s{i}.h5ad", f"s{i}", n=1500, seed=i)
              for i in range(3)}
    config = _config(tmp_path)
    args = _train(tmp_path, [tmp_path / f"s{i}.h5ad" for i in range(3)], config)
    info = json.loads((tmp_path / "model.json").read_text())
    assert info["device"] == "cpu"
    assert [s["events_used"] for s in info["samples"]] == [800, 800, 800]
    model = np.load(args.model)
    assert model["codes"].shape == (16, 3) and list(model["markers"]) == MARKERS
    out = tmp_path / "mapped" / "s1.h5ad"
    _map(config, str(tmp_path / "s1.h5ad"), args.model, str(out))
    mapped = ad.read_h5ad(out)
    source = ad.read_h5ad(tmp_path / "s1.h5ad")
    passed = source.obs["qc_pass"].to_numpy()
    assert mapped.n_obs == passed.sum()  # QC-passed events only, in source order
    assert np.array_equal(mapped.obs["event_index"], source.obs["event_index"][passed])
    assert mapped.obs["som_node"].dtype.kind == "i" and mapped.obs["metacluster"].dtype.kind == "i"
    assert adjusted_rand_score(truths["s1"][passed], mapped.obs["metacluster"]) > 0.95
    # Training is deterministic for the seed.
    first = model["codes"].copy()
    _train(tmp_path, [tmp_path / f"s{i}.h5ad" for i in range(3)], config)
    assert np.array_equal(first, np.load(args.model)["codes"])


def test_empty_sample_maps_to_zero_events(tmp_path):
    _flow_h5ad(tmp_path / "a.h5ad", "a", n=1000, seed=1)
    _flow_h5ad(tmp_path / "aplasia.h5ad", "aplasia", n=300, seed=2, qc_pass_share=0.0)
    config = _config(tmp_path)
    args = _train(tmp_path, [tmp_path / "a.h5ad", tmp_path / "aplasia.h5ad"], config)
    out = tmp_path / "aplasia_mapped.h5ad"
    _map(config, str(tmp_path / "aplasia.h5ad"), args.model, str(out))
    mapped = ad.read_h5ad(out)
    assert mapped.n_obs == 0 and {"som_node", "metacluster"} <= set(mapped.obs.columns)


def test_mixed_panels_cluster_on_shared_markers_and_name_what_is_missing(tmp_path):
    import json

    _flow_h5ad(tmp_path / "a.h5ad", "a", n=600, seed=1)
    _flow_h5ad(tmp_path / "b.h5ad", "b", n=600, seed=2, channels=["FSC-A", "CD3", "CD19", ""])
    args = _train(tmp_path, [tmp_path / "a.h5ad", tmp_path / "b.h5ad"], _config(tmp_path))
    assert list(np.load(args.model)["markers"]) == ["CD3", "CD19"]
    assert json.loads(Path(args.info).read_text())["markers_dropped"] == {"CD20": ["b"]}
    # No shared marker: every sample and what it lacks, at once; no model.
    _flow_h5ad(tmp_path / "c.h5ad", "c", n=600, seed=3, channels=["FSC-A", "", "", "CD20"])
    (tmp_path / "model.npz").unlink()
    with pytest.raises(InputError,
                       match=r"CD3: missing in c; CD19: missing in c; CD20: missing in b"):
        _train(tmp_path, [tmp_path / n for n in ("a.h5ad", "b.h5ad", "c.h5ad")],
               _config(tmp_path))
    assert not (tmp_path / "model.npz").exists()  # nothing written on failure


def test_too_few_events_and_nan(tmp_path):
    _flow_h5ad(tmp_path / "small.h5ad", "small", n=10, seed=1)
    with pytest.raises(InputError, match="fewer than the 16 SOM nodes"):
        _train(tmp_path, [tmp_path / "small.h5ad"], _config(tmp_path))
    _flow_h5ad(tmp_path / "nan.h5ad", "nan", n=400, seed=1, qc_pass_share=1.0)
    adata = ad.read_h5ad(tmp_path / "nan.h5ad")
    adata.X[5, 2] = np.nan
    adata.write_h5ad(tmp_path / "nan.h5ad")
    with pytest.raises(InputError, match="NaN or infinite"):
        _train(tmp_path, [tmp_path / "nan.h5ad"], _config(tmp_path))


def test_scaled_model_maps_consistently(tmp_path):
    truth = _flow_h5ad(tmp_path / "a.h5ad", "a", n=1500, seed=4, qc_pass_share=1.0)
    config = _config(tmp_path, scale=True)
    args = _train(tmp_path, [tmp_path / "a.h5ad"], config)
    model = np.load(args.model)
    assert not np.allclose(model["scale"], 1.0)
    out = tmp_path / "a_mapped.h5ad"
    _map(config, str(tmp_path / "a.h5ad"), args.model, str(out))
    assert adjusted_rand_score(truth, ad.read_h5ad(out).obs["metacluster"]) > 0.95


def test_train_events_caps_the_training_subsample_of_a_large_cohort(tmp_path):
    paths = [tmp_path / f"s{i}.h5ad" for i in range(3)]
    for i, path in enumerate(paths):
        _flow_h5ad(path, f"s{i}", n=1500, seed=i)
    _train(tmp_path, paths, _config(tmp_path, train_events=900))
    info = json.loads((tmp_path / "model.json").read_text())
    assert [s["events_used"] for s in info["samples"]] == [300, 300, 300]
    assert info["training_events"] == 900


# --- the workflow's per-sample job: map + annotate in one process -------------------------------


def _sheet_and_gates(tmp_path, sample_ids):
    sheet = tmp_path / "samples.tsv"
    pd.DataFrame([{"sample_id": s, "patient_id": "P1", "day": 10 * i, "modality": "flow",
                   "path": f"{s}.fcs"} for i, s in enumerate(sample_ids)]
                 ).to_csv(sheet, sep="\t", index=False)
    table = pd.DataFrame([("all", m, "pos", 2.0, "fixed") for m in MARKERS],
                         columns=["group", "marker", "level", "threshold", "method"])
    table.to_csv(tmp_path / "thresholds.tsv", sep="\t", index=False)
    gates = pd.concat([table.drop(columns="group").assign(sample_id=s, group="all", parent="",
                                                          n_events=0, flag="")
                       for s in sample_ids])
    gates.to_csv(tmp_path / "gates.tsv", sep="\t", index=False)
    return sheet


def test_map_annotate_flow_equals_map_flow_then_annotate(tmp_path):
    paths = [tmp_path / f"s{i}.h5ad" for i in range(3)]
    for i, path in enumerate(paths):
        _flow_h5ad(path, f"s{i}", n=1500, seed=i)
    # An ingested file carries the compensated layer (keep_intermediates, or bcellmap alone).
    source = ad.read_h5ad(paths[1])
    source.layers["compensated"] = source.X * 100
    source.write_h5ad(paths[1])
    config = _config(tmp_path)
    args = _train(tmp_path, paths, config)
    sheet = _sheet_and_gates(tmp_path, ["s0", "s1", "s2"])
    common = ["--config", config, "--samples", str(sheet), "--sample-id", "s1",
              "--thresholds", str(tmp_path / "thresholds.tsv"),
              "--gates", str(tmp_path / "gates.tsv")]
    old = tmp_path / "old"
    _map(config, str(paths[1]), args.model, str(old / "mapped.h5ad"))
    assert main(["annotate", *common, "--input", str(old / "mapped.h5ad"),
                 "--out", str(old / "annotated.h5ad"), "--counts", str(old / "counts.tsv"),
                 "--lineage-qc", str(old / "lineage.tsv")]) == 0
    new = tmp_path / "new"
    assert main(["map-annotate-flow", *common, "--input", str(paths[1]), "--model", args.model,
                 "--out", str(new / "annotated.h5ad"), "--counts", str(new / "counts.tsv"),
                 "--lineage-qc", str(new / "lineage.tsv"),
                 "--mapped", str(new / "mapped.h5ad")]) == 0

    for name in ("counts.tsv", "lineage.tsv"):
        assert (old / name).read_text() == (new / name).read_text(), name
    before, after = ad.read_h5ad(old / "annotated.h5ad"), ad.read_h5ad(new / "annotated.h5ad")
    pd.testing.assert_frame_equal(before.obs, after.obs)
    assert np.array_equal(before.X, after.X)
    # The layer the source file holds is left out; the mapped file is map-flow's.
    assert list(before.layers) == ["compensated"] and not list(after.layers)
    mapped_old, mapped_new = ad.read_h5ad(old / "mapped.h5ad"), ad.read_h5ad(new / "mapped.h5ad")
    pd.testing.assert_frame_equal(mapped_old.obs, mapped_new.obs)
    assert list(mapped_new.layers) == ["compensated"]
    # --keep-layers keeps it in the annotated file too.
    assert main(["map-annotate-flow", *common, "--input", str(paths[1]), "--model", args.model,
                 "--out", str(new / "kept.h5ad"), "--counts", str(new / "counts.tsv"),
                 "--lineage-qc", str(new / "lineage.tsv"), "--keep-layers"]) == 0
    assert list(ad.read_h5ad(new / "kept.h5ad").layers) == ["compensated"]


def test_map_annotate_flow_leaves_nothing_behind_on_failure(tmp_path):
    paths = [tmp_path / f"s{i}.h5ad" for i in range(2)]
    for i, path in enumerate(paths):
        _flow_h5ad(path, f"s{i}", n=800, seed=i)
    config = _config(tmp_path)
    args = _train(tmp_path, paths, config)
    sheet = _sheet_and_gates(tmp_path, ["s0"])  # no gates for s1
    sheet_rows = pd.read_csv(sheet, sep="\t")
    pd.concat([sheet_rows, sheet_rows.assign(sample_id="s1", day=5)]).to_csv(sheet, sep="\t",
                                                                             index=False)
    out = tmp_path / "out"
    assert main(["map-annotate-flow", "--config", config, "--samples", str(sheet),
                 "--sample-id", "s1", "--input", str(paths[1]), "--model", args.model,
                 "--thresholds", str(tmp_path / "thresholds.tsv"),
                 "--gates", str(tmp_path / "gates.tsv"), "--out", str(out / "a.h5ad"),
                 "--counts", str(out / "c.tsv"), "--lineage-qc", str(out / "l.tsv"),
                 "--mapped", str(out / "m.h5ad")]) == 1
    assert not out.exists() or not list(out.iterdir())


def test_gates_learned_on_ingested_files_equal_those_learned_on_mapped_ones(tmp_path):
    """The thresholds step reads the QC-passed events of the ingested files (not mapped ones)."""
    ingested, mapped = tmp_path / "ingested", tmp_path / "mapped"
    ingested.mkdir()
    mapped.mkdir()
    ids = [f"s{i}" for i in range(3)]
    for i, sample_id in enumerate(ids):
        _flow_h5ad(ingested / f"{sample_id}.h5ad", sample_id, n=3000, seed=i)
        adata = ad.read_h5ad(ingested / f"{sample_id}.h5ad")
        adata[adata.obs["qc_pass"].to_numpy()].copy().write_h5ad(mapped / f"{sample_id}.h5ad")
    sheet = _sheet_and_gates(tmp_path, ids)
    tables = {}
    for folder in (ingested, mapped):
        assert main(["thresholds", "--samples", str(sheet), "--inputs",
                     *[str(folder / f"{s}.h5ad") for s in ids],
                     "--out", str(folder / "thresholds.tsv"),
                     "--gates", str(folder / "gates.tsv")]) == 0
        tables[folder.name] = pd.read_csv(folder / "gates.tsv", sep="\t")
    assert len(tables["ingested"]) >= 3 * 3  # CD3, CD19 and CD20 gates of every sample
    pd.testing.assert_frame_equal(tables["ingested"], tables["mapped"])
