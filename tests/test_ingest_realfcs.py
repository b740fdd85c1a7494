"""Every real FCS file in ../shared/data/realfcs is read, compensated, transformed and QC'd,
with the facts its README states."""

from __future__ import annotations

import numpy as np
import pytest

from bcellmap.config import load_config, merge
from bcellmap.errors import InputError
from bcellmap.flow._ingest import ingest_flow

pytestmark = pytest.mark.realfcs

# file: (events, channels, FCS version, {canonical marker: $PnN} from the README)
FACTS = {
    "flowai_bcells_1.fcs": (64562, 13, "3.1", {"Live": "APC-Cy7-A", "CD19": "Qdot 655-A",
                                               "CD27": "AmCyan-A", "CD24": "PE-A"}),
    "flowai_bcells_2.fcs": (30562, 13, "3.1", {"CD19": "Qdot 655-A"}),
    "flowai_bcells_3.fcs": (30000, 13, "3.1", {"CD19": "Qdot 655-A"}),
    "flowsom_ff.fcs": (19225, 18, "3.0", {"CD19": "PE-Cy5-A", "CD3": "PE-Cy7-A",
                                          "Live": "AmCyan-A", "CD4": "PE-Texas Red-A"}),
    "flowkit_100715.fcs": (65016, 16, "2.0", {"CD3": "R780-A", "CD19": "G710-A",
                                              "CD27": "G660-A", "Live": "V450-A"}),
    "flowkit_test_comp_example.fcs": (10703, 18, "3.0", {"CD20": "PerCP-Cy55-A",
                                                         "CD3": "PE-Cy7-A", "CD33": "PE-A"}),
    "tidytof_121002hipsurg_102_1h.fcs": (100, 45, "3.0", {"CD19": "CD19_Nd142",
                                                          "CD3": "CD3_Er170"}),
    "tidytof_121002hipsurg_102_24h.fcs": (100, 45, "3.0", {"CD20": "CD20_Sm147"}),
    "tidytof_121002hipsurg_102_1mo.fcs": (100, 45, "3.0", {"CD27": "CD27_Er167"}),
    "tidytof_ddpr_Healthy1_Basal.fcs": (100, 52, "3.0", {"Live": "viability_Pt195",
                                                         "CD38": "CD38_Er168",
                                                         "CD24": "CD24_Gd160"}),
    "fcsparser_facs_diva_test.fcs": (83411, 12, "3.0", {"CD19": "APC-A", "CD20": "FITC-A",
                                                        "CD38": "Alexa700-A"}),
}
FLOWAI = ("flowai_bcells_1.fcs", "flowai_bcells_2.fcs", "flowai_bcells_3.fcs")


def _config(**ingest):
    return merge(load_config(), {"ingest": {"required_markers": [], **ingest}})


def _check(adata, name):
    events, channels, version, markers = FACTS[name]
    assert adata.shape == (events, channels)
    assert adata.uns["source"]["fcs_version"] == version
    canonical = dict(zip(adata.var["canonical"], adata.var["channel"], strict=True))
    for marker, channel in markers.items():
        assert canonical.get(marker) == channel, (marker, canonical)
    assert np.isfinite(adata.X).all()
    assert adata.obs["qc_pass"].sum() > 0
    for flag in ("qc_margin", "qc_doublet", "qc_dead", "qc_debris", "qc_time_anomaly"):
        assert adata.obs[flag].dtype == bool


@pytest.mark.parametrize("name", sorted(set(FACTS) - set(FLOWAI) - {"flowsom_ff.fcs"}))
def test_real_file_ingests(realfcs_dir, name):
    adata = ingest_flow(realfcs_dir / name, config=_config(), sample_id=name[:-4])
    _check(adata, name)
    mass = name.startswith("tidytof")
    assert adata.uns["source"]["mass_cytometry"] is mass
    fluor = adata.var["kind"].isin(["fluorescence", "viability"]).to_numpy()
    cofactors = {p for p, f in zip(adata.uns["transform"]["parameters"], fluor, strict=True) if f}
    assert all(('"cofactor": 5.0' if mass else '"cofactor": 150.0') in p for p in cofactors)
    if not mass:
        assert adata.uns["compensation"]["source"] == "keyword"
    if name == "flowkit_test_comp_example.fcs":
        assert adata.uns["source"]["offset_error_ignored"]


@pytest.mark.parametrize("name", FLOWAI)
def test_flowai_matrix_is_refused_then_read(realfcs_dir, name):
    with pytest.raises(InputError, match="spillover matrix .* cannot be right: diagonal is not 1"):
        ingest_flow(realfcs_dir / name, config=_config(), sample_id="s")
    adata = ingest_flow(realfcs_dir / name, config=_config(compensation={"source": "none"}),
                        sample_id="s")
    _check(adata, name)
    adata = ingest_flow(realfcs_dir / name, config=_config(compensation={"allow_invalid": True}),
                        sample_id="s")
    _check(adata, name)


def test_flowai_frame1_negative_scatter_is_margin(realfcs_dir):
    """README: frame 1 has 2,503 events with negative FSC-A or SSC-A (down to about -7e6)."""
    adata = ingest_flow(realfcs_dir / "flowai_bcells_1.fcs",
                        config=_config(compensation={"source": "none"}), sample_id="s")
    linear = adata.layers["compensated"]
    fsc, ssc = (list(adata.var["canonical"]).index(c) for c in ("FSC-A", "SSC-A"))
    negative = (linear[:, fsc] < 0) | (linear[:, ssc] < 0)
    assert negative.sum() == 2503
    far_negative = (linear[:, fsc] < -111) | (linear[:, ssc] < -111)
    assert adata.obs["qc_margin"].to_numpy()[far_negative].all()


def test_preprocessed_flowsom_file_with_per_file_override(realfcs_dir):
    config = merge(load_config(), {"panels": {"preprocessed": {
        "channels": {}, "compensation": {"source": "none"}, "transform": {"method": "none"},
        "required_markers": []}}})
    adata = ingest_flow(realfcs_dir / "flowsom_ff.fcs", config=config, sample_id="ff",
                        panel="preprocessed")
    _check(adata, "flowsom_ff.fcs")
    fluor = adata.var["kind"].isin(["fluorescence", "viability"]).to_numpy()
    np.testing.assert_allclose(adata.X[:, fluor], adata.layers["compensated"][:, fluor])
    # README: already logicle-like transformed, values about -2 to 4.3.
    assert -3 < adata.X[:, fluor].min() and adata.X[:, fluor].max() < 5
