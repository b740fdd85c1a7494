"""Panel resolution: real-world marker spellings -> canonical names."""

from __future__ import annotations

import numpy as np
import pytest

from bcellmap.errors import InputError
from bcellmap.io.panel import (
    canonical_name,
    channel_kind,
    check_required,
    find_marker,
    marker_values,
    resolve_panel,
)


@pytest.mark.parametrize(("label", "expected"), [
    ("CD19", "CD19"), ("CD19 PE-Cy7", "CD19"), ("PE-Cy7 CD19", "CD19"), ("CD19-PECy7", "CD19"),
    ("CD19_Nd142", "CD19"), ("cd19", "CD19"), ("CD193", "CD193"), ("CD193 BV421", "CD193"),
    ("CD3", "CD3"), ("CD33", "CD33"), ("CD38", "CD38"), ("CD3_Er170", "CD3"),
    ("CD38 APC-R700", "CD38"), ("IgD", "IgD"), ("IGD", "IgD"), ("IgD FITC", "IgD"),
    ("CD20", "CD20"), ("CD27", "CD27"), ("CD24", "CD24"), ("CD4", "CD4"), ("CD8", "CD8"),
    ("CD45", "CD45"), ("CD45RA_Eu153", "CD45RA"), ("CD11b_Nd144", "CD11b"),
    ("Live", "Live"), ("Live/Dead", "Live"), ("Live/ Dead", "Live"), ("L/D", "Live"),
    ("l/d", "Live"), ("Viability", "Live"), ("Zombie Aqua", "Live"), ("viability_Pt195", "Live"),
    ("VIVID / CD14", "Live"), ("7-AAD", "Live"),
    ("FSC-A", "FSC-A"), ("FSC-H", "FSC-H"), ("SSC-A", "SSC-A"), ("SSC-H", "SSC-H"),
    ("Time", "Time"), ("TIME", "Time"),
    ("PE-Cy7-A", ""), ("APC-A", ""), ("Qdot 605-A", ""), ("HLADR_Yb174", ""), ("", ""),
    ("CD235_CD61_In113", ""), ("DNA1_Ir191", ""), ("Syto 41", ""), ("BC1_Pd102", ""),
])
def test_canonical_name_table(label, expected):
    assert canonical_name(label) == expected


def test_resolve_panel_prefers_marker_label_and_keeps_scatter():
    channels = ["FSC-A", "SSC-A", "PE-Cy7-A", "APC-A", "APC-Cy7-A", "Time"]
    markers = ["", " ", "CD3", "CD19", "Live/Dead", ""]
    canon = resolve_panel(channels, markers)
    assert canon == ["FSC-A", "SSC-A", "CD3", "CD19", "Live", "Time"]
    kinds = [channel_kind(c, ch) for c, ch in zip(canon, channels, strict=True)]
    assert kinds == ["scatter", "scatter", "fluorescence", "fluorescence", "viability", "time"]


def test_explicit_mapping_overrides_and_unknown_channel_is_an_error():
    channels = ["FSC-A", "B1-A", "B2-A"]
    markers = ["", "CD19", "something"]
    canon = resolve_panel(channels, markers, explicit={"CD19": "B2-A"})
    assert canon == ["FSC-A", "", "CD19"]
    with pytest.raises(InputError, match="NOPE-A"):
        resolve_panel(channels, markers, explicit={"CD19": "NOPE-A"}, path="x.fcs")


def test_a_marker_mapped_to_no_channel_is_not_taken_from_a_label():
    # A detector labelled "CD3" that also carries IgD (one dye for both) is no CD3 channel.
    channels = ["FSC-A", "B1-A", "B2-A"]
    markers = ["", "CD3", "CD19"]
    assert resolve_panel(channels, markers) == ["FSC-A", "CD3", "CD19"]
    assert resolve_panel(channels, markers, explicit={"CD3": None}) == ["FSC-A", "", "CD19"]
    assert resolve_panel(channels, markers, explicit={"CD3": ""}) == ["FSC-A", "", "CD19"]


def test_check_required_lists_what_the_file_has():
    canon = ["FSC-A", "CD3", "CD20"]
    check_required(canon, ["CD3", ["CD19", "CD20"]], channels=["FSC-A", "B-A", "C-A"],
                   markers=["", "CD3", "CD20"])
    with pytest.raises(InputError) as info:
        check_required(canon, ["CD3", "IgD"], channels=["FSC-A", "B-A", "C-A"],
                       markers=["", "CD3", "CD20"], path="f.fcs", sample_id="S1")
    message = str(info.value)
    assert "IgD" in message and "C-A (CD20)" in message and "S1" in message


def test_marker_values_and_find_marker():
    import anndata as ad
    import pandas as pd

    X = np.arange(12, dtype=np.float32).reshape(4, 3)
    var = pd.DataFrame({"canonical": ["FSC-A", "CD19", ""]}, index=["FSC-A", "PE-A", "FITC-A"])
    adata = ad.AnnData(X=X, var=var)
    assert find_marker(adata, "cd19") == "PE-A"
    assert find_marker(adata, "FITC-A") == "FITC-A"
    assert find_marker(adata, "CD3") is None
    np.testing.assert_array_equal(marker_values(adata, ["CD19", "FSC-A"]), X[:, [1, 0]])
    with pytest.raises(InputError, match="CD3, IgD"):
        marker_values(adata, ["CD19", "CD3", "IgD"])
