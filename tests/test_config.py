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


def test_wrong_types_and_ranges_are_all_listed_with_their_key_paths(tmp_path):
    from bcellmap.config import load_config
    from bcellmap.errors import ConfigError

    config = tmp_path / "bad.yaml"
    config.write_text("device: tpu\ncluster:\n  som:\n    xdim: ten\nseed: 1.5\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    message = str(caught.value)
    assert "3 invalid setting(s)" in message
    for path in ("device:", "cluster.som.xdim:", "seed:"):
        assert path in message, message


def test_overrides_are_checked_and_sections_are_read_only():
    from bcellmap.config import default_config, load_config, section
    from bcellmap.errors import ConfigError

    config = load_config(overrides={"kinetics": {"loq_events": 20}})
    assert config["kinetics"]["loq_events"] == 20
    # Everything else is the package default, from defaults.yaml alone.
    assert config["kinetics"]["km_days"] == default_config()["kinetics"]["km_days"]
    with pytest.raises(ConfigError, match="kinetics.loq_event"):
        load_config(overrides={"kinetics": {"loq_event": 20}})
    kinetics = section(config, "kinetics")
    with pytest.raises(TypeError):
        kinetics["loq_events"] = 1  # type: ignore[index]
    frozen = load_config(frozen=True)
    with pytest.raises(TypeError):
        frozen["annotate"]["gating"]["naive_sd"] = 3.0  # type: ignore[index]


def test_schema_ships_with_the_package():
    from importlib import resources

    assert resources.files("bcellmap").joinpath("schemas", "config.schema.yaml").is_file()
