"""ingest-flow end to end through the CLI: the h5ad/QC-table contract and bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bcellmap.cli import main

CHANNELS = ["FSC-A", "FSC-H", "SSC-A", "FITC-A", "PE-A", "APC-Cy7-A", "Time"]
MARKERS = ["", "", "", "CD3 FITC", "CD19-PE", "Live/Dead", ""]
SPILL = "3,FITC-A,PE-A,APC-Cy7-A,1,0.1,0,0.02,1,0.05,0,0,1"


def _events(n=3000, seed=11):
    rng = np.random.default_rng(seed)
    fsc = rng.normal(60000, 6000, n)
    return np.column_stack([fsc, fsc / rng.normal(1.15, 0.03, n), rng.normal(20000, 3000, n),
                            rng.gamma(2, 500, n), rng.gamma(2, 300, n), rng.gamma(2, 100, n),
                            np.sort(rng.uniform(0, 1000, n))])


def _write(path, events, channels=CHANNELS, markers=MARKERS, metadata=None):
    import flowio

    meta = {"SPILL": SPILL} if metadata is None else metadata
    with open(path, "wb") as handle:
        flowio.create_fcs(handle, events.astype(np.float32).ravel().tolist(), channels,
                          opt_channel_names=markers, metadata_dict=meta)
    return path


def _config(tmp_path, text="ingest:\n  required_markers: [CD3, [CD19, CD20]]\n"):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_ingest_with_sheet_writes_the_contract(tmp_path):
    events = _events()
    _write(tmp_path / "p1_d0.fcs", events)
    sheet = tmp_path / "samples.tsv"
    sheet.write_text("sample_id\tpatient_id\tday\tmodality\tpath\n"
                     "P1_D0\tP1\t-3\tflow\tp1_d0.fcs\n")
    out, qc = tmp_path / "results/flow/P1_D0.h5ad", tmp_path / "results/qc/P1_D0.tsv"
    code = main(["ingest-flow", "--config", _config(tmp_path), "--samples", str(sheet),
                 "--sample-id", "P1_D0", "--out", str(out), "--qc", str(qc)])
    assert code == 0
    import anndata as ad

    adata = ad.read_h5ad(out)
    assert adata.shape == (3000, 7) and adata.X.dtype == np.float32
    assert list(adata.var["canonical"]) == ["FSC-A", "FSC-H", "SSC-A", "CD3", "CD19", "Live",
                                            "Time"]
    assert list(adata.var["kind"]) == ["scatter"] * 3 + ["fluorescence"] * 2 + \
        ["viability", "time"]
    np.testing.assert_array_equal(adata.obs["event_index"].to_numpy(), np.arange(3000))
    # Independent check of compensation and transform: solve by hand, arcsinh(x/150).
    spill = np.array([[1, 0.1, 0], [0.02, 1, 0.05], [0, 0, 1.0]])
    measured = events[:, 3:6].astype(np.float32).astype(np.float64)
    true = np.linalg.solve(spill.T, measured.T).T
    np.testing.assert_allclose(adata.layers["compensated"][:, 3:6], true, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(adata.X[:, 3:6], np.arcsinh(true / 150), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(adata.X[:, 0], events[:, 0] / 262144 * 10, rtol=1e-5)
    assert adata.uns["sample"]["patient_id"] == "P1" and adata.uns["sample"]["day"] == -3
    assert list(adata.uns["compensation"]["channels"]) == ["FITC-A", "PE-A", "APC-Cy7-A"]
    table = pd.read_csv(qc, sep="\t")
    assert list(table.columns) == ["sample_id", "step", "events_in", "events_removed",
                                   "events_out", "detail"]
    assert list(table["step"]) == ["non_finite", "margin", "doublets", "dead", "debris",
                                   "time_anomaly"]
    assert table["events_out"].iloc[-1] == adata.obs["qc_pass"].sum()
    assert set(adata.obs["qc_reason"].cat.categories) >= {"pass", "margin"}


def test_ingest_fcs_alone_with_panel_overrides(tmp_path):
    _write(tmp_path / "x.fcs", _events(), markers=["", "", "", "", "", "", ""])
    config = _config(tmp_path, "ingest:\n  required_markers: [CD3]\n"
                               "panels:\n  default:\n    channels: {CD3: FITC-A}\n"
                               "    compensation: {source: none}\n"
                               "    transform: {method: none}\n")
    out, qc = tmp_path / "x.h5ad", tmp_path / "x.tsv"
    assert main(["ingest-flow", "--config", config, "--fcs", str(tmp_path / "x.fcs"),
                 "--out", str(out), "--qc", str(qc)]) == 0
    import anndata as ad

    adata = ad.read_h5ad(out)
    assert adata.uns["sample"]["sample_id"] == "x"
    assert adata.var.loc["FITC-A", "canonical"] == "CD3"
    assert adata.uns["compensation"]["source"] == "none"
    np.testing.assert_allclose(adata.X[:, 3], adata.layers["compensated"][:, 3])


def _bad(tmp_path, kind):
    path = tmp_path / f"{kind}.fcs"
    if kind == "truncated":
        _write(path, _events())
        path.write_bytes(path.read_bytes()[:-4000])
    elif kind == "garbage":
        path.write_bytes(b"\x00\x01garbage header" * 40)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "missing_marker":
        _write(path, _events(), markers=["", "", "", "CD4", "CD8", "Live/Dead", ""])
    elif kind == "unknown_spill_channel":
        _write(path, _events(), metadata={"SPILL": "2,FITC-A,BV421-A,1,0.1,0.05,1"})
    return path


@pytest.mark.parametrize(("kind", "message"), [
    ("truncated", "truncated"), ("garbage", "not a readable FCS file"),
    ("empty", "empty"), ("missing_marker", "required marker"),
    ("unknown_spill_channel", "BV421-A"),
])
def test_bad_input_exits_1_names_file_and_sample_and_leaves_nothing(tmp_path, capsys, kind,
                                                                     message):
    path = _bad(tmp_path, kind)
    out, qc = tmp_path / "out" / "S1.h5ad", tmp_path / "out" / "S1.tsv"
    code = main(["ingest-flow", "--config", _config(tmp_path), "--fcs", str(path),
                 "--sample-id", "S1", "--out", str(out), "--qc", str(qc)])
    assert code == 1
    err = capsys.readouterr().err
    assert str(path) in err and "'S1'" in err and message in err
    assert not out.exists() and not qc.exists()
    assert not any(p.name.endswith((".h5ad", ".tsv")) for p in (tmp_path / "out").glob("*")) \
        if (tmp_path / "out").exists() else True
