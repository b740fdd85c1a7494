"""GatingML 2.0 export of a sample's gates, checked by FlowKit applying it to the raw FCS file.

The truth is a peer library: FlowKit reads the exported file (validating it against the
GatingML 2.0 schema), compensates, transforms and gates the raw events itself. Every
population must then hold exactly the events bcellmap called, once the QC steps that are not
gates (non-finite values, detector margins, time bins) are taken out.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

import bcellmap as bl
from bcellmap.cli import main
from bcellmap.config import load_config
from bcellmap.demo.simulate_visit import simulate_visit
from bcellmap.errors import InputError
from bcellmap.flow.gatingml import gating_strategy, write_gatingml
from bcellmap.flow.subsets import load_subset_rules

flowkit = pytest.importorskip("flowkit")

#: The QC steps with no gate: their events are in FlowKit's populations, not in bcellmap's.
NOT_GATES = ["qc_non_finite", "qc_margin", "qc_time_anomaly"]
EXPORT_PANEL = {"panels": {"export": {"channels": {}, "compensation": {"source": "none"},
                                      "transform": {"method": "none"}}}}


def _annotated(path: Path, config: dict | None = None, panel: str | None = None):
    adata = bl.flow.ingest(path, sample_id="v", patient_id="H", day=-1, panel=panel,
                           config=config)
    bl.tl.gate({"v": adata}, config=config)
    bl.tl.annotate(adata, config=config)
    return adata


def _called(adata, population: str) -> np.ndarray:
    obs = adata.obs
    if population == "lymphocytes":
        return obs["lymphocyte"].to_numpy().astype(bool)
    if population in ("T", "B", "NK", "lymphocyte_unresolved"):
        return (obs["cell_type"] == population).to_numpy()
    return (obs["b_subset"] == population).to_numpy()


def _compare(adata, xml: Path, fcs: Path, table) -> dict[str, tuple[int, int, int, int]]:
    """Per population: bcellmap's count, FlowKit's, FlowKit's among the events every gated QC
    step kept, and the events on which the last and bcellmap differ."""
    strategy = flowkit.parse_gating_xml(str(xml))
    result = strategy.gate_sample(flowkit.Sample(str(fcs), ignore_offset_error=True))
    index = adata.obs["event_index"].to_numpy()
    n_events = int(adata.uns["source"]["n_events"]) if "n_events" in adata.uns["source"] \
        else int(index.max()) + 1
    kept = np.zeros(n_events, dtype=bool)
    kept[index[~adata.obs[NOT_GATES].to_numpy().any(axis=1)]] = True
    out = {}
    for row in table[table["population"] != ""].itertuples():
        member = result.get_gate_membership(row.gate_id, gate_path=tuple(
            row.gate_path.split("/")))
        called = np.zeros(n_events, dtype=bool)
        called[index[_called(adata, row.population)]] = True
        out[row.population] = (int(called.sum()), int(member.sum()),
                               int((member & kept).sum()), int(((member & kept) != called).sum()))
    return out


@pytest.mark.parametrize("export", ["raw", "compressed"])
def test_flowkit_applying_the_export_gets_every_population_event_for_event(tmp_path, export):
    fcs = tmp_path / "v.fcs"
    simulate_visit(fcs, profile="healthy_adult", export=export, seed=3, n_events=8000)
    config = EXPORT_PANEL if export == "compressed" else None
    adata = _annotated(fcs, config, "export" if config else None)
    rules = load_subset_rules(load_config(overrides=config))
    table = write_gatingml(adata, tmp_path / "v.xml", rules=rules)
    ids = set(table["gate_id"])
    # The whole hierarchy: geometric QC gates, lineage, NK core, every subset.
    assert {"Singlets", "Live", "Scatter", "CD3_pos", "B_cells", "NK_cells", "Lymphocytes",
            "Lymphocyte_core"} <= ids
    assert set(table["gate_path"]) >= {"root/Singlets/Live/Scatter"}
    compared = _compare(adata, tmp_path / "v.xml", fcs, table)
    assert set(compared) == {"T", "B", "NK", "lymphocytes", "transitional", "naive",
                             "unswitched_memory", "switched_memory", "double_negative",
                             "plasmablast"}
    for population, (ours, _, theirs, differ) in compared.items():
        assert differ == 0 and ours == theirs, (population, compared[population])
    assert compared["B"][0] > 200
    # The only difference is the QC steps that are no gates.
    removed = adata.obs[NOT_GATES].to_numpy().any(axis=1)
    assert compared["lymphocytes"][1] >= compared["lymphocytes"][0]
    if compared["lymphocytes"][1] > compared["lymphocytes"][0]:
        assert removed.any()


def test_logicle_channels_export_as_gatingml_logicle(tmp_path):
    fcs = tmp_path / "v.fcs"
    simulate_visit(fcs, profile="naive_return", seed=4, n_events=6000)
    config = {"ingest": {"transform": {"per_channel": {
        marker: {"method": "logicle"} for marker in ("CD19", "CD20", "IgD", "CD27")}}}}
    adata = _annotated(fcs, config)
    assert set(adata.var.loc[adata.var["canonical"].isin(["CD19", "CD27"]), "transform"]) == {
        "logicle"}
    table = write_gatingml(adata, tmp_path / "v.xml",
                           rules=load_subset_rules(load_config(overrides=config)))
    text = (tmp_path / "v.xml").read_text()
    assert "transforms:logicle" in text and "transforms:fasinh" in text
    for population, (ours, _, theirs, differ) in _compare(adata, tmp_path / "v.xml", fcs,
                                                         table).items():
        assert differ == 0 and ours == theirs, population


def test_export_names_the_sample_when_it_cannot_be_written(tmp_path):
    fcs = tmp_path / "v.fcs"
    simulate_visit(fcs, profile="healthy_adult", seed=5, n_events=3000)
    adata = bl.flow.ingest(fcs, sample_id="v", patient_id="H", day=-1)
    rules = load_subset_rules(load_config())
    with pytest.raises(InputError, match="no gates.*'v'|'v'.*no gates"):
        gating_strategy(adata, rules=rules, sample_id="v")
    adata = _annotated(fcs)
    adata.uns["normalisation"] = {"method": "reference", "markers": ["CD19", "CD20"]}
    with pytest.raises(InputError, match="normalised"):
        gating_strategy(adata, rules=rules, sample_id="v")
    assert not list(tmp_path.glob("*.xml"))


def test_export_gates_command_writes_one_file_per_annotated_sample(tmp_path, caplog):
    for name, seed in (("s1", 6), ("s2", 7)):
        fcs = tmp_path / f"{name}.fcs"
        simulate_visit(fcs, profile="healthy_adult", seed=seed, n_events=3000)
        adata = _annotated(fcs)
        del adata.layers["compensated"]
        adata.write_h5ad(tmp_path / f"{name}.h5ad")
    with caplog.at_level(logging.INFO):
        main(["export-gates", "--annotated", str(tmp_path / "s1.h5ad"),
              str(tmp_path / "s2.h5ad"), "--outdir", str(tmp_path / "gates")])
    written = sorted(p.name for p in (tmp_path / "gates").iterdir())
    assert written == ["s1.gatingml.xml", "s2.gatingml.xml"]
    strategy = flowkit.parse_gating_xml(str(tmp_path / "gates" / "s1.gatingml.xml"))
    assert "B_cells" in {gate_id for gate_id, _ in strategy.get_gate_ids()}


# --------------------------------------------------------------------------- real files

REAL_PANELS = {"panels": {
    "ff": {"channels": {}, "compensation": {"source": "none"}, "transform": {"method": "none"}},
    "flowai": {"channels": {}, "compensation": {"source": "none"},
               "required_markers": ["CD19"]},
    "bpanel": {"channels": {}, "required_markers": ["CD19"]}}}


def _panel(name: str) -> str | None:
    for prefix, panel in (("flowsom", "ff"), ("flowai", "flowai"), ("fcsparser", "bpanel")):
        if name.startswith(prefix):
            return panel
    return None


@pytest.mark.realfcs
def test_flowkit_reproduces_every_population_on_the_real_files(realfcs_dir, tmp_path):
    rules = load_subset_rules(load_config(overrides=REAL_PANELS))
    checked = []
    for fcs in sorted(realfcs_dir.glob("*.fcs")):
        adata = _annotated(fcs, REAL_PANELS, _panel(fcs.name))
        xml = tmp_path / f"{fcs.stem}.xml"
        table = write_gatingml(adata, xml, rules=rules, sample_id=fcs.stem)
        compared = _compare(adata, xml, fcs, table)
        for population, (ours, _, theirs, differ) in compared.items():
            assert differ == 0 and ours == theirs, (fcs.name, population, compared[population])
        checked.append(fcs.name)
    assert len(checked) >= 17


# --------------------------------------------------------------------------- corrections in

def _edited(source: Path, target: Path, edits: dict[str, float]) -> None:
    """A cytometrist's correction, made with FlowKit: gate id -> new lower edge (GatingML
    units, on the file's own transform)."""
    strategy = flowkit.parse_gating_xml(str(source))
    for gate_id, low in edits.items():
        strategy.get_gate(gate_id).dimensions[0].min = low
    with target.open("wb") as handle:
        flowkit.export_gatingml(strategy, handle)


def _learned_export(tmp_path: Path, *, seed: int, n_events: int):
    """A simulated healthy visit, gated alone and annotated, its gates in learned.xml."""
    fcs = tmp_path / "v.fcs"
    simulate_visit(fcs, profile="healthy_adult", seed=seed, n_events=n_events)
    rules = load_subset_rules(load_config())
    learned = _annotated(fcs)
    write_gatingml(learned, tmp_path / "learned.xml", rules=rules)
    return fcs, learned, rules


def test_a_corrected_export_fed_back_gives_what_flowkit_gives_on_it(tmp_path):
    fcs, learned, rules = _learned_export(tmp_path, seed=8, n_events=8000)
    strategy = flowkit.parse_gating_xml(str(tmp_path / "learned.xml"))
    igd = strategy.get_gate("IgD_pos").dimensions[0].min
    cd27 = strategy.get_gate("CD27_pos").dimensions[0].min
    # The cytometrist raises IgD+ and lowers CD27+ (a correction of the IgD x CD27 quadrants).
    _edited(tmp_path / "learned.xml", tmp_path / "corrected.xml",
            {"IgD_pos": igd * 1.25, "CD27_pos": cd27 * 0.8})

    adata = bl.flow.ingest(fcs, sample_id="v", patient_id="H", day=-1)
    _, gates = bl.tl.gate({"v": adata}, user_gates={"v": tmp_path / "corrected.xml"})
    bl.tl.annotate(adata)
    # Every marker gate of the file is the user's now: method user, nothing flagged.
    assert set(gates["method"]) == {"user"}
    assert (gates["flag"].fillna("") == "").all() and set(gates["reliability"]) == {"ok"}
    assert gates["reliability_detail"].str.contains("corrected.xml").all()
    # The truth is FlowKit applying the corrected file to the raw events.
    table = write_gatingml(adata, tmp_path / "fed_back.xml", rules=rules)
    compared = _compare(adata, tmp_path / "corrected.xml", fcs, table)
    for population, (ours, _, theirs, differ) in compared.items():
        assert differ == 0 and ours == theirs, (population, compared[population])
    # ... and the correction moved the subsets it touches.
    before = learned.uns["counts"]
    after = adata.uns["counts"]
    assert after["b_cells"] == before["b_cells"]
    assert after["naive_count"] < before["naive_count"]
    assert after["switched_memory_count"] > before["switched_memory_count"]


def test_a_single_corrected_gate_replaces_only_that_gate_and_its_parent_follows(tmp_path):
    fcs, learned, _ = _learned_export(tmp_path, seed=9, n_events=8000)
    # A file holding one gate: CD19+ and CD20+ above every event (a sample the core judged
    # to hold no B cells). FlowKit builds it on the exported transform of each channel.
    full = flowkit.parse_gating_xml(str(tmp_path / "learned.xml"))
    only = flowkit.GatingStrategy()
    for gate_id in ("CD19_pos", "CD20_pos"):
        gate = full.get_gate(gate_id)
        dimension = gate.dimensions[0]
        only.add_transform(dimension.transformation_ref,
                           full.get_transform(dimension.transformation_ref))
        if dimension.compensation_ref not in ("uncompensated", "FCS", *only.comp_matrices):
            only.add_comp_matrix(dimension.compensation_ref,
                                 full.get_comp_matrix(dimension.compensation_ref))
        dimension.min = 1.5  # GatingML scale: 1.0 is the channel's top
        only.add_gate(gate, ("root",))
    with (tmp_path / "b.xml").open("wb") as handle:
        flowkit.export_gatingml(only, handle)
    adata = bl.flow.ingest(fcs, sample_id="v", patient_id="H", day=-1)
    _, gates = bl.tl.gate({"v": adata}, user_gates={"v": tmp_path / "b.xml"})
    bl.tl.annotate(adata)
    methods = dict(zip(gates["marker"] + ":" + gates["level"], gates["method"], strict=True))
    assert methods["CD19:pos"] == methods["CD20:pos"] == "user"
    assert methods["CD3:pos"] != "user" and methods["IgD:pos"] != "user"
    assert adata.uns["counts"]["b_cells"] == 0
    assert learned.uns["counts"]["b_cells"] > 300


def test_user_gates_that_do_not_fit_the_sample_are_named(tmp_path):
    fcs, learned, _ = _learned_export(tmp_path, seed=10, n_events=3000)

    def broken(change) -> str:
        strategy = flowkit.parse_gating_xml(str(tmp_path / "learned.xml"))
        change(strategy.get_gate("CD19_pos").dimensions[0])
        path = tmp_path / "broken.xml"
        with path.open("wb") as handle:
            flowkit.export_gatingml(strategy, handle)
        return path.read_text()

    cases = {
        # CD19's gate drawn on another detector.
        "channel": broken(lambda dimension: setattr(dimension, "id", "APC-A")),
        # Drawn on uncompensated values where bcellmap compensates.
        "compensated": broken(lambda dimension: setattr(dimension, "compensation_ref",
                                                        "uncompensated")),
        "not GatingML": "<xml>nothing</xml>",
    }
    for problem, content in cases.items():
        path = tmp_path / f"{problem.replace(' ', '_')}.xml"
        path.write_text(content)
        adata = bl.flow.ingest(fcs, sample_id="v", patient_id="H", day=-1)
        with pytest.raises(InputError) as error:
            bl.tl.gate({"v": adata}, user_gates={"v": path})
        message = str(error.value)
        assert path.name in message and "'v'" in message, (problem, message)
        assert {"channel": "channel", "compensated": "compensated",
                "not GatingML": "GatingML"}[problem] in message
    with pytest.raises(InputError, match="does not exist"):
        bl.tl.gate({"v": learned}, user_gates={"v": tmp_path / "missing.xml"})
    # A batch-normalised marker: a gate drawn on the file's values has no place there.
    adata = bl.flow.ingest(fcs, sample_id="v", patient_id="H", day=-1)
    adata.uns["normalisation"] = {"method": "reference", "markers": ["CD19"]}
    with pytest.raises(InputError, match="CD19_pos: CD19 was batch-normalised"):
        bl.tl.gate({"v": adata}, user_gates={"v": tmp_path / "learned.xml"})
