# %% [markdown]
# # bcellmap from Python: a CAR-T cohort, from FCS files to B-cell kinetics
#
# The workflow (`snakemake --cores N`) runs every step as a command and writes files between
# them. The same steps are Python functions that take and return AnnData objects and tables,
# in memory, grouped by layer as in scanpy:
#
# | namespace | functions |
# |---|---|
# | `bcellmap.flow` | `read_fcs`, `compensate`, `transform`, `qc`, `ingest` (all four) |
# | `bcellmap.tl` | `train_som`, `map_som`, `gate`, `annotate` |
# | `bcellmap.tl` (kernels) | `pca`, `neighbors`, `leiden`, `kmeans` |
# | `bcellmap.cohort` | `quantify`, `kinetics`, `cohort_summary`, `concordance` |
# | `bcellmap.pl` | the report's figures |
#
# Every function runs without a config file (the package defaults), accepts `config=` (a
# mapping or a YAML file, as the workflow's) and keyword overrides, records its settings in
# `adata.uns["bcellmap"]`, and calls the algorithm the workflow's command calls, so the results
# are the workflow's. This script runs as is (`python docs/tutorial.py`, about a minute on two
# CPU cores) or cell by cell in an editor that knows `# %%` cells.

# %%
import logging
import tempfile
from pathlib import Path

import bcellmap as bl
from bcellmap.demo.simulate import simulate_cohort
from bcellmap.io.samplesheet import read_sample_sheet

# bcellmap logs every gate it had to place from few events; the tables carry those flags too.
logging.getLogger("bcellmap").setLevel(logging.ERROR)

# %% [markdown]
# ## A small simulated cohort
#
# Five patients through CD19 CAR-T, a baseline and ten visits each up to day 365, one FCS
# file per visit (here 5,000 events each, and no lysed-whole-blood visits, to keep it quick),
# with the truth beside them (`truth_patients.tsv`: when B cells went and came back).

# %%
workdir = Path(tempfile.mkdtemp(prefix="bcellmap-tutorial-"))
sheet_path = simulate_cohort(workdir / "demo", events_per_file=5000, scrna=False,
                             lymphopenic=False)
sheet = read_sample_sheet(sheet_path)
print(sheet[["patient_id", "day", "lymphocytes_per_ul"]].head())

# %% [markdown]
# ## Ingest: read, compensate, transform, QC
#
# One file step by step: `read_fcs` gives linear events (channels in `var`, FCS keywords and
# the spillover matrix in `uns`), then each step changes the AnnData in place.

# %%
first = sheet.iloc[0]
adata = bl.flow.read_fcs(first["path"], sample_id=first["sample_id"])
print(adata)
bl.flow.compensate(adata)   # the file's $SPILLOVER; or spillover=<DataFrame>
bl.flow.transform(adata)    # arcsinh(x / 150) on fluorescence, scatter scaled to 0-10
bl.flow.qc(adata)           # margin, doublets, dead, debris (scatter gate), time anomalies
print(adata.obs["qc_reason"].value_counts())

# %% [markdown]
# `ingest` does the four at once, as `bcellmap ingest-flow` does. Every visit of the cohort:

# %%
adatas = {
    sample_id: bl.flow.ingest(row["path"], sample_id=sample_id, patient_id=row["patient_id"],
                              day=row["day"], lymphocytes_per_ul=row["lymphocytes_per_ul"])
    for sample_id, row in sheet.iterrows()
}

# %% [markdown]
# ## Cluster: one SOM for the cohort, every event mapped to it

# %%
model = bl.tl.train_som(adatas)      # a bounded subsample of every sample; device="auto"
for adata in adatas.values():
    bl.tl.map_som(adata)             # obs["som_node"], obs["metacluster"]
print(f"{model['xdim']}x{model['ydim']} SOM on {', '.join(model['markers'])}")

# %% [markdown]
# ## Gate and annotate
#
# `gate` learns the cohort's hierarchical gates (lymphocytes -> CD3- -> B cells -> subsets),
# each inside its parent population, with every visit registered onto the cohort; `annotate`
# calls each event's cell type and B-cell subset with its sample's own gates.

# %%
thresholds, gates = bl.tl.gate(adatas)
for adata in adatas.values():
    bl.tl.annotate(adata, gates=(thresholds, gates))
obs = adatas[first["sample_id"]].obs
print(obs.loc[obs["cell_type"] == "B", "b_subset"].value_counts())

# %% [markdown]
# ## Per-sample table and per-patient kinetics

# %%
samples = bl.cohort.quantify(adatas, sample_sheet=sheet)
kinetics = bl.cohort.kinetics(samples)
summary = bl.cohort.cohort_summary(kinetics)
b_cells = kinetics[(kinetics["measure"] == "b") & (kinetics["modality"] == "flow")]
print(b_cells[["patient_id", "baseline_value", "depletion_day", "reconstitution_day",
               "aplasia_days", "censored", "unit", "flags"]].to_string(index=False))

# %% [markdown]
# ## A figure

# %%
figure = bl.pl.patient(samples, kinetics=kinetics, patient_id="P01")
# figure.savefig("patient_P01.png")  -- or let the notebook show it
print(f"the cohort was simulated into {workdir}; remove it when done")
