"""Config loading: unknown keys are errors with a "did you mean" naming the key path."""

from __future__ import annotations

import pytest

from bcellmap.cli import main
from bcellmap.config import load_config, unknown_keys
from bcellmap.errors import ConfigError


def test_typos_get_did_you_mean_with_the_key_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("devise: cpu\nkinetics:\n  depletion:\n    per_uL: 5\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "devise: unknown key (did you mean 'device'?)" in message
    assert "kinetics.depletion.per_uL: unknown key (did you mean 'kinetics.depletion.per_ul'?)" \
        in message


def test_free_form_mappings_stay_free_and_panels_are_checked():
    user = {
        "panels": {"lyoplate": {"channels": {"CD19": "PE-Cy7-A"},
                                "transform": {"method": "none", "cofactr": 5}}},
        "annotate": {"thresholds": {"fixed": {"CD3": 1.0}, "fixed_hi": {"CD38": 3.0}},
                     "gating": {"hi_method": {"CD27": "positive_mode"}}},
        "ingest": {"transform": {"per_channel": {"FITC-A": {"method": "none"}}}},
        "scrna": {"annotate": {"markers": {"Treg": ["FOXP3"]},
                               "subset_markers": {"atypical": ["ITGAX"]}}},
    }
    assert unknown_keys(user) == [
        "panels.lyoplate.transform.cofactr: unknown key "
        "(did you mean 'panels.lyoplate.transform.cofactor'?)"]


def test_shipped_config_has_no_unknown_keys():
    from pathlib import Path

    import yaml

    shipped = Path(__file__).resolve().parents[1] / "config" / "config.yaml"
    assert unknown_keys(yaml.safe_load(shipped.read_text()) or {}) == []


def test_every_command_refuses_a_typo(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("devise: cpu\n")
    sheet = tmp_path / "s.tsv"
    sheet.write_text("sample_id\tpatient_id\tday\tmodality\tpath\n")
    assert main(["check-samples", "--config", str(config), "--samples", str(sheet)]) == 1
    assert "did you mean 'device'" in capsys.readouterr().err
