"""Every real FCS variant in ../shared/data/fcs_variants (see its README) is read with all
its events, and agrees with a peer reader (flowio with the options the file needs, fcsparser
where installed) or with values decoded by hand from the file's bytes."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

from bcellmap.config import load_config, merge
from bcellmap.errors import InputError
from bcellmap.flow._ingest import ingest_flow
from bcellmap.io.fcs import read_fcs

VARIANTS_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "fcs_variants"

# file: ($TOT events, $PAR channels, FCS version of the data set read), from the README/TEXT.
FACTS = {
    "FlowCal__Data003.fcs": (25000, 8, "3.0"),
    "FlowIO__coulter.lmd": (18110, 8, "3.0"),
    "cytoflow__Accuri_-_C6.fcs": (60661, 14, "3.0"),
    "cytoflow__FACEJava_ascii-4_events.fcs": (4, 2, "3.0"),
    "cytoflow__Partec_-_CyFlow_v2.9.fcs": (72989, 4, "3.0"),
    "fcsparser__Miltenyi_FCS_3.1_Well_A1.001.fcs": (10000, 19, "3.1"),
    "flowCore__0877408774.B08": (10000, 8, "2.0"),
}


@pytest.fixture
def variants_dir() -> Path:
    if not VARIANTS_DIR.is_dir():
        pytest.skip(f"FCS variant files not present at {VARIANTS_DIR}")
    return VARIANTS_DIR


def _flowio(path, **options):
    import flowio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return flowio.FlowData(str(path), **options)


@pytest.mark.parametrize("name", sorted(FACTS))
def test_variant_is_read_with_all_its_events(variants_dir, name):
    events, channels, version = FACTS[name]
    fcs = read_fcs(variants_dir / name, sample_id="v")
    assert fcs.events.shape == (events, channels)
    assert fcs.version == version
    assert np.isfinite(fcs.events).all()
    assert len(fcs.channels) == len(fcs.markers) == len(fcs.ranges) == channels


def test_cellquest_doubled_delimiters_are_empty_values(variants_dir):
    fcs = read_fcs(variants_dir / "flowCore__0877408774.B08")
    assert fcs.channels == ["FSC-H", "SSC-H", "FL1-H", "FL2-H", "FL3-H", "FL1-A", "FL4-H",
                            "Time"]
    assert fcs.markers[:5] == ["FSC-H", "SSC-H", "", "", ""] and fcs.cytometer == "FACSCalibur"
    # Peer: flowio reads the same DATA (its TEXT reading merges $P3S..$P6N, not the data).
    flow = _flowio(variants_dir / "flowCore__0877408774.B08")
    raw = flow.as_array(preprocess=False)
    np.testing.assert_array_equal(fcs.events[:, [0, 1, 5, 7]], raw[:, [0, 1, 5, 7]])
    # FL1-H is $PnE 4,1 of $PnR 1024: 10 ** (4 * c / 1024).
    np.testing.assert_allclose(fcs.events[:, 2], 10 ** (4 * raw[:, 2] / 1024))


def test_24bit_integers_match_bytes_decoded_by_hand(variants_dir):
    path = variants_dir / "FlowCal__Data003.fcs"
    fcs = read_fcs(path)
    blob = path.read_bytes()
    start = 4096  # $BEGINDATA; 8 channels x 3 bytes, $BYTEORD 4,3,2,1 (big-endian)
    for event in (0, 1, 777, 24999):
        row = blob[start + 24 * event:start + 24 * (event + 1)]
        values = [int.from_bytes(row[3 * c:3 * c + 3], "big") for c in range(8)]
        masked = [v & (262143 if c == 0 else 1023) for c, v in enumerate(values)]
        for c in (0, 1, 2, 6, 7):  # TIME, FSC, SSC, FSCW, FSCA: $PnE 0,0
            assert fcs.events[event, c] == masked[c]
        for c in (3, 4, 5):  # FL1-3: $PnE 4.0,1.0 of $PnR 1024
            assert fcs.events[event, c] == pytest.approx(10 ** (4 * masked[c] / 1024))


def test_ascii_data_read(variants_dir):
    fcs = read_fcs(variants_dir / "cytoflow__FACEJava_ascii-4_events.fcs")
    # DATA segment bytes: " 125 150 175 150 150 125 150 175" ($PnB 4 characters).
    np.testing.assert_array_equal(fcs.events, [[125, 150], [175, 150], [150, 125], [150, 175]])
    assert fcs.datatype == "A"


def test_partec_padded_keyword_and_log_scatter(variants_dir):
    path = variants_dir / "cytoflow__Partec_-_CyFlow_v2.9.fcs"
    fcs = read_fcs(path)
    assert fcs.channels == ["FSC", "SSC", "FL_Green", "Time"] and fcs.cytometer == "partec PAS"
    blob = path.read_bytes()
    for event in (0, 1, 72988):
        fsc, ssc, green, time = struct.unpack_from("<4H", blob, 3022 + 8 * event)
        assert fcs.events[event, 0] == pytest.approx(10 ** (3 * fsc / 32768))      # $P1E 3,1
        assert fcs.events[event, 1] == pytest.approx(0.1 * 10 ** (4 * ssc / 32768))  # 4,0.1
        assert fcs.events[event, 2] == pytest.approx(0.1 * 10 ** (4 * green / 32768))
        assert fcs.events[event, 3] == time


def test_accuri_header_offsets_hold_the_events(variants_dir):
    path = variants_dir / "cytoflow__Accuri_-_C6.fcs"
    fcs = read_fcs(path)
    assert any("disagree" in n for n in fcs.notes) and fcs.offset_error_ignored
    # Peer: flowio told to use the HEADER offsets.
    raw = _flowio(path, use_header_offsets=True, ignore_offset_error=True).as_array(
        preprocess=False)
    np.testing.assert_array_equal(fcs.events, raw)
    # Independent check: the first event decoded by hand at HEADER $BEGINDATA 2960.
    first = struct.unpack_from(">14I", path.read_bytes(), 2960)
    np.testing.assert_array_equal(fcs.events[0], first)


def test_coulter_lmd_reads_the_fcs3_list_mode_data_set(variants_dir):
    import flowio

    path = variants_dir / "FlowIO__coulter.lmd"
    fcs = read_fcs(path)
    assert (fcs.data_set, fcs.n_data_sets) == (1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sets = flowio.read_multiple_data_sets(str(path), ignore_offset_error=True)
    assert [s.version for s in sets] == ["2.0", "3.0"]
    peer = sets[1]
    assert int(peer.event_count) == fcs.n_events == int(sets[0].event_count)
    assert fcs.channels == [str(c).strip() for c in peer.pnn_labels]
    raw = peer.as_array(preprocess=False)
    linear = [i for i in range(8) if peer.channels[i + 1]["pne"][0] == 0
              and peer.channels[i + 1]["png"] in (0.0, 1.0)]
    assert linear
    np.testing.assert_array_equal(fcs.events[:, linear], raw[:, linear])


def test_miltenyi_read_and_spillover_without_values_refused_with_remedy(variants_dir):
    path = variants_dir / "fcsparser__Miltenyi_FCS_3.1_Well_A1.001.fcs"
    fcs = read_fcs(path)
    raw = _flowio(path, ignore_offset_error=True).as_array(preprocess=False)
    np.testing.assert_array_equal(fcs.events, raw)  # float data, $PnG 1: as stored
    config = merge(load_config(), {"ingest": {"required_markers": []}})
    with pytest.raises(InputError) as info:
        ingest_flow(path, config=config, sample_id="m")
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "names 6 detector(s) but holds 0 of the 36 values" in message
    assert "compensation.source: none" in message
    config = merge(config, {"ingest": {"compensation": {"source": "none"}}})
    adata = ingest_flow(path, config=config, sample_id="m")
    assert adata.n_obs == 10000 and np.isfinite(adata.X).all()


@pytest.mark.parametrize("name", ["fcsparser__Miltenyi_FCS_3.1_Well_A1.001.fcs",
                                  "FlowIO__coulter.lmd"])
def test_fcsparser_peer(variants_dir, name):
    fcsparser = pytest.importorskip("fcsparser")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _, frame = fcsparser.parse(str(variants_dir / name), reformat_meta=True)
        except Exception as exc:  # noqa: BLE001 - a peer's own failure is a skip, not ours
            pytest.skip(f"fcsparser cannot read {name}: {type(exc).__name__}")
    fcs = read_fcs(variants_dir / name)
    assert len(frame) == fcs.n_events  # fcsparser reads the first data set of an LMD
    if name.startswith("fcsparser"):
        np.testing.assert_allclose(fcs.events, frame.to_numpy(dtype=np.float64), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(set(FACTS) - {
    "fcsparser__Miltenyi_FCS_3.1_Well_A1.001.fcs"}))
def test_variant_ingests_without_traceback(variants_dir, name):
    config = merge(load_config(), {"ingest": {"required_markers": []}})
    adata = ingest_flow(variants_dir / name, config=config, sample_id="v")
    if name.startswith("cytoflow__Accuri"):
        # Its $SPILLOVER names detectors by parameter number (3, 4, ...): mapped to $PnN.
        assert list(adata.uns["compensation"]["channels"])[:2] == ["FL1-A", "FL2-A"]
    assert adata.n_obs == FACTS[name][0] and np.isfinite(adata.X).all()
    assert list(adata.uns["qc"]["table"]["step"])[0] == "non_finite"
