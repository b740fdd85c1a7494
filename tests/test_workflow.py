"""End to end: the real `snakemake` CLI on the simulated demo cohort, checked against the
simulator's truth (not against bcellmap's own output)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBSETS = ["transitional", "naive", "unswitched_memory", "switched_memory", "double_negative",
           "plasmablast"]

pytestmark = pytest.mark.e2e


def _snakemake(*args: str, cwd: Path, env_extra: dict | None = None, check: bool = True):
    """Run the snakemake CLI of this environment; show its output when it fails."""
    executable = Path(sys.executable).with_name("snakemake")
    env = dict(os.environ)
    # The rules call `bcellmap`: it must come from the same environment as the tests.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(env_extra or {})
    result = subprocess.run(
        [str(executable), "-s", str(ROOT / "Snakefile"), *args],
        cwd=cwd, env=env, capture_output=True, text=True,
    )
    if check and result.returncode != 0:
        logs = "\n".join(
            f"--- {log}\n{log.read_text()[-2000:]}" for log in sorted(cwd.glob("logs/**/*.log"))
        )
        pytest.fail(f"snakemake {' '.join(args)} failed:\n{result.stderr[-6000:]}\n{logs[-6000:]}")
    return result


def _run_demo(workdir: Path, device: str) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "my.yaml").write_text(
        f"demo:\n  outdir: {workdir / 'demo'}\n  preset: fixture\ndevice: {device}\n"
    )
    result = _snakemake("--cores", "2", "--configfile", "my.yaml", cwd=workdir,
                        env_extra={"BCELLMAP_DEVICE": device})
    # What the user saw on the terminal (the end-of-run summary is in it).
    (workdir / "terminal.txt").write_text(result.stdout + result.stderr)
    return workdir


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """The demo cohort run once on the CPU from a folder outside the repository."""
    return _run_demo(tmp_path_factory.mktemp("demo_cpu"), "cpu")


@pytest.fixture(scope="session")
def truth(demo_run) -> tuple[pd.DataFrame, pd.DataFrame]:
    samples = pd.read_csv(demo_run / "demo" / "truth_samples.tsv", sep="\t")
    patients = pd.read_csv(demo_run / "demo" / "truth_patients.tsv", sep="\t")
    return samples.set_index("sample_id"), patients.set_index("patient_id")


def _table(run: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(run / "results" / "tables" / name, sep="\t")


def test_outputs_exist_one_row_per_sample(demo_run):
    import anndata as ad

    sheet = pd.read_csv(demo_run / "demo" / "samples.tsv", sep="\t")
    table = _table(demo_run, "samples.tsv")
    assert sorted(table["sample_id"]) == sorted(sheet["sample_id"])
    assert table["sample_id"].is_unique
    contract = ["sample_id", "patient_id", "day", "modality", "events_total", "events_qc_pass",
                "lymphocytes", "b_cells", "cd19_pos", "cd20_pos", "cd19neg_cd20pos",
                "b_pct_lymphocytes", "cd19_pct_lymphocytes", "cd20_pct_lymphocytes", "b_per_ul",
                "lloq_pct_lymphocytes"]
    contract += [f"{s}_count" for s in SUBSETS] + [f"{s}_pct_b" for s in SUBSETS]
    assert not set(contract) - set(table.columns)
    qc = _table(demo_run, "qc.tsv")
    assert set(qc["sample_id"]) == set(sheet["sample_id"])
    kinetics = _table(demo_run, "kinetics.tsv")
    assert {"b", "cd19", "cd20"} <= set(kinetics["measure"])
    first = sheet["sample_id"].iloc[0]
    annotated = ad.read_h5ad(demo_run / "results" / "annotated" / f"{first}.h5ad")
    assert {"event_index", "cell_type", "b_subset"} <= set(annotated.obs.columns)
    row = table.set_index("sample_id").loc[first]
    assert annotated.n_obs == row["events_qc_pass"]
    # Source order: event indices strictly increase.
    assert np.all(np.diff(annotated.obs["event_index"].to_numpy()) > 0)
    # Every flow sample's gates as GatingML, for review in the cytometrist's own tools.
    flow_ids = sheet.loc[sheet["modality"] == "flow", "sample_id"]
    assert sorted(p.name for p in (demo_run / "results" / "gates").iterdir()) == sorted(
        f"{s}.gatingml.xml" for s in flow_ids)


def test_depletion_and_reconstitution_days_equal_truth(demo_run, truth):
    _, patients = truth
    kinetics = _table(demo_run, "kinetics.tsv")
    b = kinetics[(kinetics["measure"] == "b") & (kinetics["modality"] == "flow")]
    b = b.set_index("patient_id")
    assert sorted(b.index) == sorted(patients.index)
    for patient, expected in patients.iterrows():
        got = b.loc[patient]
        assert got["depletion_day"] == expected["depletion_day"], patient
        if bool(expected["censored"]):
            assert bool(got["censored"]), patient
            assert pd.isna(got["reconstitution_day"]), patient
        else:
            assert not bool(got["censored"]), patient
            assert got["reconstitution_day"] == expected["reconstitution_day"], patient


def test_b_cell_frequencies_match_truth(demo_run, truth):
    samples, _ = truth
    table = _table(demo_run, "samples.tsv").set_index("sample_id")
    for sample_id, expected in samples.iterrows():
        got = table.loc[sample_id, "b_pct_lymphocytes"]
        want = expected["b_pct_lymphocytes"]
        if want < 0.5:
            assert abs(got - want) <= 0.05, (sample_id, got, want)
        else:
            assert abs(got - want) <= 0.10 * want, (sample_id, got, want)


def test_subset_frequencies_match_truth_where_b_cells_suffice(demo_run, truth):
    samples, _ = truth
    table = _table(demo_run, "samples.tsv").set_index("sample_id")
    checked = 0
    for sample_id, expected in samples[samples["b_cells"] >= 200].iterrows():
        for subset in SUBSETS:
            got = table.loc[sample_id, f"{subset}_pct_b"]
            want = expected[f"{subset}_pct_b"]
            assert abs(got - want) <= 2.5, (sample_id, subset, got, want)
            checked += 1
    assert checked >= 6 * 10  # the demo has baseline and reconstitution visits with B cells


def test_only_the_masking_patient_is_flagged_for_cd19_cd20_discordance(demo_run, truth):
    _, patients = truth
    kinetics = _table(demo_run, "kinetics.tsv")
    flow = kinetics[kinetics["modality"] == "flow"]
    flagged = {
        patient for patient, flags in zip(flow["patient_id"], flow["flags"].fillna(""), strict=True)
        if "cd19_cd20_discordance" in flags.split(";")
    }
    masking = set(patients.index[patients["masking"].astype(bool)])
    assert masking and flagged == masking


def test_aplastic_samples_report_no_phantom_b_cells(demo_run, truth):
    samples, _ = truth
    table = _table(demo_run, "samples.tsv").set_index("sample_id")
    # Aplasia: no naive or memory B cells at all, at most a stray long-lived plasmablast.
    aplastic = samples.index[samples["b_cells"] == samples["plasmablast_count"]]
    assert len(aplastic) >= 10
    assert samples.loc[aplastic, "b_cells"].max() <= 2
    assert table.loc[aplastic, "b_cells"].max() <= 5


def test_lymphocytes_are_counted_by_markers_in_lymphopenic_whole_blood(demo_run, truth):
    import anndata as ad

    samples, _ = truth
    codes = pd.read_csv(demo_run / "demo" / "truth_codes.tsv", sep="\t").set_index("code")
    qc = _table(demo_run, "qc.tsv")
    lineage = qc[qc["step"] == "lineage_gate"].set_index("sample_id")
    assert set(lineage.index) == set(samples.index)  # every flow sample has its row
    lymphopenic = samples.index[samples["lymphopenic"].astype(bool)]
    assert len(lymphopenic) >= 10
    myeloid_share = []
    for sample_id in lymphopenic:
        annotated = ad.read_h5ad(demo_run / "results" / "annotated" / f"{sample_id}.h5ad")
        event_codes = np.load(demo_run / "demo" / "truth_events" / f"{sample_id}.npy")
        category = codes.loc[event_codes[annotated.obs["event_index"].to_numpy()],
                             "category"].to_numpy()
        true = np.isin(category, ["t_cells", "nk_cells", "b_cells"])
        called = annotated.obs["lymphocyte"].to_numpy().astype(bool)
        assert (true & called).sum() / called.sum() >= 0.97, sample_id  # purity
        assert (true & called).sum() / true.sum() >= 0.95, sample_id  # recall
        assert lineage.loc[sample_id, "events_out"] == called.sum()
        # The challenge is in the data, whatever the scatter gate does with it: myeloid
        # events of the whole file (truth) outnumber the lymphocytes.
        all_categories = codes.loc[event_codes, "category"].to_numpy()
        myeloid_share.append((all_categories == "myeloid").sum()
                             / max(np.isin(all_categories, ["t_cells", "nk_cells",
                                                            "b_cells"]).sum(), 1))
    assert min(myeloid_share) > 1.0


def test_the_run_says_what_it_could_not_stand_behind(demo_run):
    terminal = (demo_run / "terminal.txt").read_text()
    assert "bcellmap run summary" in terminal
    assert "flags page: results/tables/flags.tsv" in terminal
    flags = _table(demo_run, "flags.tsv")
    assert {"level", "id", "flag", "kind"} <= set(flags.columns)
    # Every gate of the demo can be stood behind: nothing is not evaluable.
    gates = pd.read_csv(demo_run / "results" / "models" / "gates.tsv", sep="\t")
    assert set(gates["reliability"]) <= {"ok", "not_assessed"}
    assert "values not evaluable (NA, resting on an unreliable gate): 0" in terminal
    # The lymphopenic whole-blood visits lose most events to the scatter gate: said, by name.
    lymphopenic = set(pd.read_csv(demo_run / "demo" / "truth_samples.tsv", sep="\t").query(
        "lymphopenic")["sample_id"])
    removed = set(flags.loc[flags["flag"] == "debris_removed_most", "id"])
    assert removed == lymphopenic
    assert "debris_removed_most" in terminal


def test_no_flag_is_raised_on_every_sample_of_a_normal_cohort(demo_run):
    flags = _table(demo_run, "flags.tsv")
    flow = set(_table(demo_run, "samples.tsv").query("modality == 'flow'")["sample_id"])
    per_sample = flags[flags["level"].isin(["sample", "gate"])]
    for flag, rows in per_sample.groupby("flag"):
        assert set(rows["id"]) < flow, flag


def test_fail_on_turns_a_chosen_flag_into_an_error_and_reruns_nothing_else(demo_run):
    result = _snakemake("--cores", "1", "--configfile", "my.yaml", "--config",
                        "fail_on=[debris_removed_most]", cwd=demo_run, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "debris_removed_most" in output and "bcellmap run summary" in output
    assert "check_flags" in output
    for rule in ("thresholds", "quantify", "kinetics", "map_annotate_flow"):
        assert f"rule {rule}:" not in output, rule
    assert not (demo_run / "results" / "tables" / "fail_on.txt").exists()
    # A flag the run did not raise passes.
    _snakemake("--cores", "1", "--configfile", "my.yaml", "--config",
               "fail_on=[nonspecific]", cwd=demo_run)
    assert (demo_run / "results" / "tables" / "fail_on.txt").exists()
    (demo_run / "results" / "tables" / "fail_on.txt").unlink()
    # Back to the run's own config (results/config.yaml records the config of the last run).
    _snakemake("--cores", "1", "--configfile", "my.yaml", cwd=demo_run)


def test_a_real_blood_visit_gets_the_same_calls_alone_and_inside_the_demo(demo_run, tmp_path):
    """A simulated healthy adult (naive-dominant, IgD and CD27 as real blood shows them),
    gated as a cohort of one and inside the demo cohort: the same calls within 1 point, and
    within 2 points of the truth."""
    import anndata as ad

    import bcellmap as bl
    from bcellmap.demo.simulate import codes_table
    from bcellmap.demo.simulate_visit import simulate_visit

    path = tmp_path / "healthy.fcs"
    simulate_visit(path, profile="healthy_adult", seed=11)
    visit = bl.flow.ingest(path, sample_id="HC", patient_id="HC", day=-1)
    visit = visit[visit.obs["qc_pass"].to_numpy()].copy()
    codes = np.load(path.with_suffix(".truth.npy"))[visit.obs["event_index"].to_numpy()]
    table = codes_table().set_index("code")
    true_b = table.loc[codes, "category"].to_numpy() == "b_cells"
    true_subset = table.loc[codes, "b_subset"].to_numpy()
    demo = {p.stem: ad.read_h5ad(p) for p in sorted(
        (demo_run / "results" / "annotated").glob("*_v*.h5ad"))}
    calls = {}
    for name, cohort in (("alone", {"HC": visit}), ("demo", {**demo, "HC": visit})):
        adata = visit.copy()
        _, gates = bl.tl.gate(cohort)
        bl.tl.annotate(adata, gates=gates[gates["sample_id"] == "HC"])
        b = adata.obs["cell_type"].to_numpy() == "B"
        subset = adata.obs["b_subset"].astype(str).to_numpy()
        calls[name] = {s: 100.0 * (subset[b] == s).mean() for s in SUBSETS}
    for s in SUBSETS:
        truth = 100.0 * (true_subset[true_b] == s).mean()
        assert calls["alone"][s] == pytest.approx(truth, abs=2.0), s
        assert calls["demo"][s] == pytest.approx(calls["alone"][s], abs=1.0), s


def test_flowkit_applying_the_exported_gates_counts_what_bcellmap_counted(demo_run):
    """The GatingML export of demo visits (a baseline, an aplastic and a lymphopenic
    whole-blood visit among them), applied by FlowKit to the raw FCS file: on the events
    bcellmap kept, every population is the same event for event; FlowKit's extra events are
    only ones that a QC step without a gate removed (margin, time, non-finite)."""
    import anndata as ad

    flowkit = pytest.importorskip("flowkit")
    sheet = pd.read_csv(demo_run / "demo" / "samples.tsv", sep="\t")
    flow = sheet[sheet["modality"] == "flow"].reset_index(drop=True)
    qc = _table(demo_run, "qc.tsv")
    for row in flow.iloc[[0, 3, 6, len(flow) // 2, len(flow) - 1]].itertuples():
        annotated = ad.read_h5ad(demo_run / "results" / "annotated" / f"{row.sample_id}.h5ad")
        strategy = flowkit.parse_gating_xml(
            str(demo_run / "results" / "gates" / f"{row.sample_id}.gatingml.xml"))
        result = strategy.gate_sample(flowkit.Sample(str(demo_run / "demo" / row.path)))
        kept = annotated.obs["event_index"].to_numpy()
        steps = qc[qc["sample_id"] == row.sample_id].set_index("step")["events_removed"]
        not_gates = int(steps[["non_finite", "margin", "time_anomaly"]].sum())
        for gate_id, called in (
                ("B_cells", annotated.obs["cell_type"] == "B"),
                ("CD3_pos", annotated.obs["cell_type"] == "T"),
                ("Lymphocytes", annotated.obs["lymphocyte"].astype(bool)),
                ("naive", annotated.obs["b_subset"] == "naive")):
            path = next(p for g, p in strategy.get_gate_ids() if g == gate_id)
            member = result.get_gate_membership(gate_id, gate_path=path)
            assert np.array_equal(member[kept], called.to_numpy()), (row.sample_id, gate_id)
            assert int(member.sum()) - int(called.sum()) <= not_gates, (row.sample_id, gate_id)


def test_rerun_has_nothing_to_do(demo_run):
    result = _snakemake("--cores", "2", "--configfile", "my.yaml", "-n", cwd=demo_run)
    assert "Nothing to be done" in result.stdout + result.stderr


def test_report_bundles_every_figure(demo_run):
    _snakemake("--cores", "2", "--configfile", "my.yaml", "--report", "report.html",
               cwd=demo_run)
    html = (demo_run / "report.html").read_text(errors="replace")
    figures = sorted((demo_run / "results" / "report").glob("*.png"))
    sheet = pd.read_csv(demo_run / "demo" / "samples.tsv", sep="\t")
    flow_patients = sheet.loc[sheet["modality"] == "flow", "patient_id"].nunique()
    # One kinetics and one gate figure per patient (gates: flow patients), 9 cohort figures.
    assert len(figures) == sheet["patient_id"].nunique() + flow_patients + 9
    assert {f"gates_{p}.png" for p in sheet["patient_id"]} <= {f.name for f in figures}
    for figure in figures:
        assert figure.stat().st_size > 5_000, figure
        assert figure.name in html, figure.name


def test_invalid_sheet_stops_before_any_job(tmp_path, demo_run):
    sheet = pd.read_csv(demo_run / "demo" / "samples.tsv", sep="\t").head(3)
    sheet["path"] = [str(demo_run / "demo" / p) for p in sheet["path"]]
    sheet.loc[2, "sample_id"] = sheet.loc[0, "sample_id"]
    sheet.to_csv(tmp_path / "samples.tsv", sep="\t", index=False)
    (tmp_path / "my.yaml").write_text("samples: samples.tsv\n")
    result = _snakemake("--cores", "1", "--configfile", "my.yaml", cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "line 4" in result.stderr and "duplicate sample_id" in result.stderr
    assert not (tmp_path / "results" / "flow").exists()


@pytest.mark.gpu
def test_gpu_run_gives_the_same_tables(demo_run, tmp_path_factory):
    pytest.importorskip("cupy")
    from bcellmap.kernels.backend import gpu_available

    if not gpu_available():
        pytest.skip("no usable GPU")
    gpu_run = tmp_path_factory.mktemp("demo_gpu")
    shutil.copytree(demo_run / "demo", gpu_run / "demo")
    _run_demo(gpu_run, "gpu")
    # Clusters may be numbered differently (so may the events whose call differs from their
    # cluster's); every per-event flow count and call must agree. (scRNA cell types are
    # cluster-majority calls, so they follow Leiden's partition and are compared by ARI in
    # the clustering tests instead.)
    for name in ("samples.tsv", "kinetics.tsv"):
        cpu, gpu = _table(demo_run, name), _table(gpu_run, name)
        cpu = cpu[cpu["modality"] == "flow"].reset_index(drop=True)
        gpu = gpu[gpu["modality"] == "flow"].reset_index(drop=True)
        cluster_columns = [c for c in cpu.columns if "cluster" in c]
        pd.testing.assert_frame_equal(cpu.drop(columns=cluster_columns),
                                      gpu.drop(columns=cluster_columns),
                                      check_exact=False, rtol=1e-6)


# --- lean results, no parse-time side effects, rerun triggers ---------------------------------


def test_parsing_writes_nothing(tmp_path):
    """Building the DAG (a dry run) neither simulates the demo nor writes the config."""
    (tmp_path / "my.yaml").write_text(f"demo:\n  outdir: {tmp_path / 'demo'}\n")
    result = _snakemake("--cores", "1", "--configfile", "my.yaml", "-n", cwd=tmp_path)
    output = result.stdout + result.stderr
    # The jobs that make them are planned instead.
    assert "simulate_demo" in output and "write_config" in output
    written = [p for p in tmp_path.rglob("*")
               if ".snakemake" not in p.relative_to(tmp_path).parts and p.name != "my.yaml"]
    assert written == []


def test_demo_sheet_is_known_before_the_cohort_is_simulated(demo_run):
    from bcellmap.cli.workflow import demo_sample_sheet
    from bcellmap.io.samplesheet import read_sample_sheet

    written = read_sample_sheet(demo_run / "demo" / "samples.tsv")
    planned = demo_sample_sheet(demo_run / "demo", preset="fixture", seed=20241121)
    pd.testing.assert_frame_equal(planned, written, check_like=True)


def _input_bytes(run: Path) -> int:
    sheet = pd.read_csv(run / "demo" / "samples.tsv", sep="\t")
    paths = [run / "demo" / p for p in sheet["path"]]
    return sum(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir()
               else p.stat().st_size for p in paths)


def test_results_are_at_most_one_and_a_half_times_the_input(demo_run):
    import anndata as ad

    results = demo_run / "results"
    size = sum(p.stat().st_size for p in results.rglob("*") if p.is_file())
    assert size <= 1.5 * _input_bytes(demo_run)
    # The per-event intermediates are gone once used ...
    for folder in ("flow", "mapped", "normalised", "scrna", "scrna_mapped"):
        assert not list((results / folder).glob("*.h5ad")), folder
    # ... and the annotated files keep the values and calls, not the source's layers.
    sheet = pd.read_csv(demo_run / "demo" / "samples.tsv", sep="\t").set_index("modality")
    for modality in ("flow", "scrna"):
        sample_id = sheet.loc[modality, "sample_id"].iloc[0]
        annotated = ad.read_h5ad(results / "annotated" / f"{sample_id}.h5ad")
        assert not list(annotated.layers), modality
        assert annotated.n_vars > 0 and {"event_index", "cell_type"} <= set(annotated.obs)


def _edit(run: Path, edit: str, *args: str) -> str:
    """Stdout of ``snakemake ARGS`` in ``run`` with ``edit`` (YAML) merged over its config."""
    (run / "edit.yaml").write_text(edit)
    return _snakemake("--cores", "1", "--configfile", "my.yaml", "edit.yaml", *args,
                      cwd=run).stdout


def _params_changed(run: Path, edit: str) -> set[str]:
    """Rules with an output whose params changed after ``edit`` (``snakemake --summary``).

    The summary judges every output on its own; the dry run's reasons do not name a params
    change of a job that must rerun anyway because its input is remade.
    """
    rows = [line.split("\t") for line in _edit(run, edit, "--summary").splitlines()]
    return {row[2] for row in rows[1:] if len(row) > 4 and row[4] == "params changed"}


def _planned(run: Path, edit: str) -> set[str]:
    """Rules of the jobs a dry run plans after ``edit``."""
    return {line.split()[1].rstrip(":") for line in _edit(run, edit, "-n").splitlines()
            if line.startswith(("rule ", "localrule "))}


# Each edit (a config file merged over the run's) and the rules that read what it changes.
RERUN_CASES = {
    "annotate.thresholds": ("annotate:\n  thresholds:\n    fallback_sd: 3.5\n", {"thresholds"}),
    "annotate.gating": ("annotate:\n  gating:\n    naive_sd: 2.5\n",
                        {"thresholds", "map_annotate_flow"}),
    "cluster.som": ("cluster:\n  som:\n    rlen: 5\n", {"train_flow"}),
    "cluster.markers": ("cluster:\n  markers: [CD3, CD19, CD20, IgD, CD27, CD38]\n",
                        {"train_flow", "report_clusters"}),
    "scrna.annotate.car": ("scrna:\n  annotate:\n    car_min_counts: 2\n",
                           {"map_annotate_scrna"}),
    "scrna.annotate.markers": ("scrna:\n  annotate:\n    markers:\n      B: [MS4A1, CD79A]\n",
                               {"train_scrna", "map_annotate_scrna"}),
    "scrna.qc": ("scrna:\n  qc:\n    min_genes: 150\n", {"ingest_scrna"}),
    "kinetics.depletion": ("kinetics:\n  depletion:\n    per_ul: 2.0\n", {"kinetics"}),
    "kinetics.loq_events": ("kinetics:\n  loq_events: 40\n", {"quantify", "kinetics"}),
    "report.dpi": ("report:\n  dpi: 100\n", {"report", "report_clusters", "report_gates"}),
    "report.gate_events": ("report:\n  gate_events: 5000\n", {"report_gates"}),
    "ingest.qc": ("ingest:\n  qc:\n    doublets:\n      mad_cutoff: 5.0\n", {"ingest_flow"}),
}


@pytest.mark.parametrize("case", list(RERUN_CASES))
def test_editing_a_setting_changes_the_params_of_exactly_the_rules_that_read_it(demo_run, case):
    edit, readers = RERUN_CASES[case]
    # write_config records the merged config; no rule reruns because it was rewritten.
    assert _params_changed(demo_run, edit) == readers | {"write_config"}


def test_kinetics_and_report_settings_rerun_nothing_upstream(demo_run):
    assert _planned(demo_run, RERUN_CASES["kinetics.depletion"][0]) == {
        "write_config", "kinetics", "flags", "report", "all"}
    assert _planned(demo_run, RERUN_CASES["report.dpi"][0]) == {
        "write_config", "report", "report_clusters", "report_gates", "all"}


@pytest.fixture(scope="session")
def kept_run(demo_run, tmp_path_factory) -> Path:
    """Patient P01 of the demo (6 flow and 4 scRNA visits), run with keep_intermediates."""
    run = tmp_path_factory.mktemp("kept")
    sheet = pd.read_csv(demo_run / "demo" / "samples.tsv", sep="\t")
    sheet = sheet[sheet["patient_id"] == "P01"]
    sheet = pd.concat([sheet[sheet["modality"] == "flow"].head(6),
                       sheet[sheet["modality"] == "scrna"]])
    sheet["path"] = [str(demo_run / "demo" / p) for p in sheet["path"]]
    sheet.to_csv(run / "samples.tsv", sep="\t", index=False)
    (run / "my.yaml").write_text("samples: samples.tsv\ndevice: cpu\nkeep_intermediates: true\n"
                                 "report: {enabled: false}\nscrna: {car_feature: CAR_FMC63}\n")
    _snakemake("--cores", "2", "--configfile", "my.yaml", cwd=run,
               env_extra={"BCELLMAP_DEVICE": "cpu"})
    return run


# Counting, the QC table and the cohort tables follow every per-sample job.
_TABLES = {"collect_qc", "quantify", "kinetics", "concordance", "flags"}
KEPT_CASES = {
    "annotate.gating": {"thresholds", "map_annotate_flow", "export_gates", *_TABLES},
    "cluster.som": {"train_flow", "map_annotate_flow", "export_gates", *_TABLES},
    "scrna.annotate.car": {"map_annotate_scrna", *_TABLES} - {"collect_qc"},
    "scrna.qc": {"ingest_scrna", "train_scrna", "map_annotate_scrna", *_TABLES},
    "kinetics.depletion": {"kinetics", "flags"},
}


@pytest.mark.parametrize("case", list(KEPT_CASES))
def test_with_kept_intermediates_an_edit_reruns_its_readers_and_what_follows(kept_run, case):
    """No ingest (or other upstream step) reruns: the intermediates are there to be read."""
    edit, readers = RERUN_CASES[case]
    assert _params_changed(kept_run, edit) == readers | {"write_config"}
    assert _planned(kept_run, edit) == KEPT_CASES[case] | {"write_config", "all"}
    for folder in ("flow", "mapped", "scrna", "scrna_mapped"):
        assert list((kept_run / "results" / folder).glob("*.h5ad")), folder


def test_a_corrected_gate_reruns_what_rests_on_it_and_the_kinetics_follow(kept_run):
    """A cytometrist's GatingML correction (sheet column gatingml) replaces the learned gates
    it names; gating and what follows rerun, ingest and clustering do not. Kept last: it
    leaves the run with the correction."""
    flowkit = pytest.importorskip("flowkit")
    results = kept_run / "results"
    kinetics = _table(kept_run, "kinetics.tsv").set_index(["modality", "measure"])
    day = kinetics.loc[("flow", "b"), "depletion_day"]
    assert pd.notna(day), "P01 depletes within its first six flow visits"
    sheet = pd.read_csv(kept_run / "samples.tsv", sep="\t")
    flow = sheet["modality"] == "flow"
    sample_id = sheet.loc[flow & (sheet["day"] == int(day)), "sample_id"].item()
    before = _table(kept_run, "samples.tsv").set_index("sample_id").loc[sample_id, "b_cells"]
    # The core moves the first depleted visit's CD19+ and CD20+ gates down to 0 (on the
    # exported scale: every event with a positive compensated value): it now holds B cells.
    strategy = flowkit.parse_gating_xml(str(results / "gates" / f"{sample_id}.gatingml.xml"))
    for gate_id in ("CD19_pos", "CD20_pos"):
        strategy.get_gate(gate_id).dimensions[0].min = 0.0
    with (kept_run / "corrected.xml").open("wb") as handle:
        flowkit.export_gatingml(strategy, handle)
    sheet["gatingml"] = np.where(sheet["sample_id"] == sample_id, "corrected.xml", "")
    sheet.to_csv(kept_run / "samples.tsv", sep="\t", index=False)

    # (The config is unchanged, so write_config has nothing to do either.)
    assert _planned(kept_run, "{}\n") == {
        "thresholds", "map_annotate_flow", "export_gates", *_TABLES, "all"}
    _snakemake("--cores", "2", "--configfile", "my.yaml", "edit.yaml", cwd=kept_run,
               env_extra={"BCELLMAP_DEVICE": "cpu"})
    gates = pd.read_csv(results / "models" / "gates.tsv", sep="\t", keep_default_na=False)
    # The file is the sample's whole export: every marker gate in it is the user's now, the
    # two moved ones at 0, and no other sample's.
    user = gates[gates["method"] == "user"]
    assert set(user["sample_id"]) == {sample_id} and (user["flag"] == "").all()
    assert len(user) == (gates["sample_id"] == sample_id).sum()
    moved = user.set_index(["marker", "level"])["threshold"]
    assert moved[("CD19", "pos")] == moved[("CD20", "pos")] == 0.0
    after = _table(kept_run, "samples.tsv").set_index("sample_id")
    assert after.loc[sample_id, "b_cells"] > 100 * max(before, 1)
    # The visit is no longer depleted: the depletion day moves to the next visit.
    kinetics = _table(kept_run, "kinetics.tsv").set_index(["modality", "measure"])
    assert kinetics.loc[("flow", "b"), "depletion_day"] > day
