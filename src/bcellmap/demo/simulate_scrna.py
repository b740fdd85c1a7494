"""Simulated single-cell RNA visits of demo patients, with per-cell truth.

The generative model is a gamma-Poisson (negative binomial) count model, as used by
splatter: every cell draws a log-normal library size, every cell type has a gene-expression
profile (a shared log-normal baseline, a type-specific program of background genes and its
marker genes), and counts are Poisson draws around the profile scaled by a gamma-distributed
biological variation, which also produces realistic dropout of weakly expressed markers
(CD19 drops out in about half of the B cells). A small share of low-quality cells (high
mitochondrial fraction, small libraries) and heterotypic doublets is mixed in so QC has
something to remove. CAR-T cells are T cells that express the CAR transcript.

Files written per visit: ``{sample_id}.h5ad`` (raw counts in ``X``, 10x-style ``var``) or, for
the first visit when asked, ``{sample_id}.h5`` in the Cell Ranger v3 HDF5 layout (with
CITE-seq antibody features when asked; with ``cite_seq_all_visits`` every visit carries them,
the ``.h5ad`` ones as ``Antibody Capture`` features of ``var``), and ``{sample_id}.truth.tsv``
(one row per cell: barcode, cell_type, b_subset, car_t). ``truth_scrna_samples.tsv`` sums the
truth per visit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..io._atomic import atomic_path, write_h5ad, write_tsv

CELL_TYPES = ("T", "NK", "monocyte", "DC", "B")
B_SUBSETS = ("transitional", "naive", "unswitched_memory", "switched_memory", "plasmablast")

# Marker genes per population: relative abundance (share of the library) when expressed.
_MARKERS: dict[str, dict[str, float]] = {
    "T": {"CD3D": 2e-3, "CD3E": 1.5e-3, "CD2": 1e-3, "IL7R": 1e-3},
    "NK": {"NKG7": 4e-3, "GNLY": 4e-3, "KLRD1": 1e-3},
    "monocyte": {"CD14": 2e-3, "LYZ": 1e-2, "FCGR3A": 6e-4, "S100A8": 5e-3},
    "DC": {"FCER1A": 1.5e-3, "CLEC10A": 1e-3, "HLA-DQA1": 2e-3},
    "B": {"MS4A1": 2e-3, "CD79A": 2e-3, "CD79B": 1.2e-3, "CD19": 2.5e-4, "HLA-DQA1": 2e-3},
}
_SUBSET_MARKERS: dict[str, dict[str, float]] = {
    "transitional": {"IGHD": 2e-3, "IGHM": 4e-3, "TCL1A": 2e-3, "FCER2": 8e-4, "IL4R": 6e-4,
                     "CD38": 1e-3, "CD24": 1e-3, "MME": 5e-4},
    "naive": {"IGHD": 2e-3, "IGHM": 3e-3, "TCL1A": 1.2e-3, "FCER2": 8e-4, "IL4R": 6e-4},
    "unswitched_memory": {"IGHD": 6e-4, "IGHM": 3e-3, "CD27": 8e-4, "AIM2": 5e-4,
                          "TNFRSF13B": 6e-4},
    "switched_memory": {"IGHG1": 3e-3, "IGHA1": 2e-3, "IGHG2": 8e-4, "CD27": 8e-4,
                        "AIM2": 5e-4, "TNFRSF13B": 6e-4},
    "plasmablast": {"MZB1": 4e-3, "JCHAIN": 1e-2, "XBP1": 3e-3, "PRDM1": 6e-4,
                    "IGHG1": 2e-2, "CD27": 1.5e-3, "CD38": 2e-3, "CD79A": 1e-3},
}
_OTHER_GENES = ("IGHG3", "IGHG4", "IGHA2", "CD4", "CD8A")
# Optional populations (``effector_cd8_share``, ``pdc_share``): effector CD8 T cells keep the
# CD3 genes (CD3E detected in ~90%) but express the cytotoxic NK program as highly as NK cells;
# pDCs express MZB1 and JCHAIN (as plasmablasts do) with their own LILRA4/CLEC4C program.
_EFFECTOR_CD8 = {"CD3D": 1e-3, "CD3E": 1e-3, "CD2": 8e-4, "IL7R": 1e-4, "CD8A": 1.5e-3,
                 "CD8B": 8e-4, "NKG7": 6e-3, "GNLY": 6e-3, "KLRD1": 1.5e-3}
_PDC = {"LILRA4": 2e-3, "CLEC4C": 1e-3, "IL3RA": 8e-4, "PLD4": 1.5e-3, "SERPINF1": 6e-4,
        "IRF7": 1.5e-3, "TCF4": 1.5e-3, "MZB1": 2e-3, "JCHAIN": 3e-3, "HLA-DQA1": 1e-3}
#: NK cells of the optional populations carry a few stray CD3E UMIs (~15% detected), as real
#: NK cells do.
_NK_CD3E = 5e-5
_MT_GENES = tuple(f"MT-{g}" for g in ("CO1", "CO2", "CO3", "ND1", "ND2", "ND4", "ATP6", "CYB"))
# Antibody-derived tags for the CITE-seq sample: the B-cell panel that ingest keeps and, with
# ``extended_adt_panel``, the rest of a typical panel (lineage markers and an isotype control).
# The rest is not kept, but it is part of each cell's CLR denominator, as in real panels: with
# the seven B-cell markers alone, a B cell's bright CD19/CD20/IgD/CD24 raise its own geometric
# mean and compress its CLR values towards the negative cells'.
_PROTEINS = ("CD3", "CD19", "CD20", "CD27", "IgD", "CD38", "CD24")
_OTHER_PROTEINS = ("CD4", "CD14", "CD16", "CD56", "HLA-DR", "CD11c", "CD45RA", "IgG1-isotype")

# Composition of the blood sample by phase of the CAR-T course (shares of all cells).
_COMPOSITION = {
    "baseline": {"T": 0.50, "NK": 0.10, "monocyte": 0.22, "DC": 0.03, "B": 0.15},
    "aplasia": {"T": 0.62, "NK": 0.14, "monocyte": 0.23, "DC": 0.01, "B": 0.0},
    "reconstitution": {"T": 0.50, "NK": 0.10, "monocyte": 0.25, "DC": 0.03, "B": 0.12},
}
# Returning B cells are naive/transitional, not class-switched (Müller, NEJM 2024).
_B_COMPOSITION = {
    "baseline": {"transitional": 0.04, "naive": 0.62, "unswitched_memory": 0.08,
                 "switched_memory": 0.23, "plasmablast": 0.03},
    "reconstitution": {"transitional": 0.25, "naive": 0.68, "unswitched_memory": 0.02,
                       "switched_memory": 0.03, "plasmablast": 0.02},
}
_CAR_SHARE_OF_T = {"baseline": 0.0, "aplasia": 0.15, "reconstitution": 0.02}
_LYMPHOCYTES_PER_UL = {"baseline": 1200.0, "aplasia": 600.0, "reconstitution": 1500.0}


def _phase(day: int, reconstitution_day: int) -> str:
    if day < 0:
        return "baseline"
    return "reconstitution" if day >= reconstitution_day else "aplasia"


def _gene_names(n_genes: int, car_feature: str | None, extra: bool = False) -> list[str]:
    named: list[str] = []
    for table in (*_MARKERS.values(), *_SUBSET_MARKERS.values(),
                  *((_EFFECTOR_CD8, _PDC) if extra else ())):
        named.extend(g for g in table if g not in named)
    named.extend(g for g in (*_OTHER_GENES, *_MT_GENES) if g not in named)
    if car_feature:
        named.append(car_feature)
    n_background = max(n_genes - len(named), 50)
    return named + [f"GENE{i:05d}" for i in range(n_background)]


def _profiles(genes: list[str], rng: np.random.Generator, car_feature: str | None,
              extra: bool = False, car_expression: float = 1e-3) -> dict[str, np.ndarray]:
    """Expression profile (share of the library per gene) of every simulated population."""
    index = {g: i for i, g in enumerate(genes)}
    n = len(genes)
    background = np.array([g.startswith("GENE") for g in genes])
    baseline = np.full(n, 2e-6)
    baseline[background] = rng.lognormal(mean=0.0, sigma=1.3, size=background.sum())
    baseline[background] *= 0.55 / baseline[background].sum()
    for g in _MT_GENES:
        baseline[index[g]] = 0.05 / len(_MT_GENES)
    if car_feature:  # the CAR transcript exists only in transduced cells
        baseline[index[car_feature]] = 0.0
    background_idx = np.flatnonzero(background)

    def program(markers: Mapping[str, float], n_program: int = 40) -> np.ndarray:
        profile = baseline.copy()
        chosen = rng.choice(background_idx, size=n_program, replace=False)
        profile[chosen] *= rng.lognormal(mean=1.2, sigma=0.4, size=n_program)
        for gene, share in markers.items():
            profile[index[gene]] = share
        return profile

    profiles = {t: program(_MARKERS[t]) for t in ("T", "NK", "monocyte", "DC")}
    b_profile = program(_MARKERS["B"])
    for subset, markers in _SUBSET_MARKERS.items():
        profile = b_profile.copy()
        if subset == "plasmablast":  # plasmablasts lose MS4A1 and most CD19/CD79B
            for gene in ("MS4A1", "CD19", "CD79B"):
                profile[index[gene]] = 1e-5
            chosen = rng.choice(background_idx, size=40, replace=False)
            profile[chosen] *= rng.lognormal(mean=1.2, sigma=0.4, size=40)
        for gene, share in markers.items():
            profile[index[gene]] = share
        profiles[f"B:{subset}"] = profile
    if extra:  # drawn after the default populations, which stay as they are
        profiles["T:effector"] = profiles["T"].copy()
        for gene, share in _EFFECTOR_CD8.items():
            profiles["T:effector"][index[gene]] = share
        profiles["pDC"] = program(_PDC)
        profiles["NK"][index["CD3E"]] = _NK_CD3E
    if car_feature:  # CAR-T cells are effector cells where those are simulated
        car = profiles["T:effector" if extra else "T"].copy()
        car[index[car_feature]] = car_expression
        profiles["T:car"] = car
    return {k: v / v.sum() for k, v in profiles.items()}


def _barcodes(n: int, rng: np.random.Generator) -> list[str]:
    letters = np.array(list("ACGT"))
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        code = "".join(letters[rng.integers(0, 4, 16)]) + "-1"
        if code not in seen:
            seen.add(code)
            out.append(code)
    return out


def _composition(phase: str, b_share: float | None, pdc_share: float = 0.0
                 ) -> dict[str, float]:
    """Shares of all cells; with ``b_share``, B cells are that share of T + NK + B; with
    ``pdc_share``, pDCs are that share of all cells (the rest scaled down)."""
    composition = dict(_COMPOSITION[phase])
    if pdc_share > 0:
        composition = {k: v * (1.0 - pdc_share) for k, v in composition.items()}
        composition["pDC"] = pdc_share
    if b_share is None:
        return composition
    lymphocytes = composition["T"] + composition["NK"] + composition["B"]
    t_nk = composition["T"] + composition["NK"]
    scale = (1.0 - b_share) * lymphocytes / t_nk
    composition["T"] *= scale
    composition["NK"] *= scale
    composition["B"] = b_share * lymphocytes
    return composition


def _simulate_visit(phase: str, n_cells: int, genes: list[str], profiles: dict[str, np.ndarray],
                    rng: np.random.Generator, b_share: float | None = None, *,
                    pdc_share: float = 0.0, effector_cd8_share: float = 0.0,
                    car_ambient: float = 0.0, car_feature: str | None = None
                    ) -> tuple[sp.csr_matrix, pd.DataFrame, np.ndarray]:
    """Counts (cells x genes) and per-cell truth for one visit; also the population keys."""
    composition = _composition(phase, b_share, pdc_share)
    types = rng.choice(list(composition), size=n_cells, p=list(composition.values()))
    keys = types.astype(object)
    subsets = np.full(n_cells, "", dtype=object)
    b_cells = np.flatnonzero(types == "B")
    if b_cells.size:
        b_mix = _B_COMPOSITION["reconstitution" if phase == "aplasia" else phase]
        subsets[b_cells] = rng.choice(list(b_mix), size=b_cells.size, p=list(b_mix.values()))
        keys[b_cells] = ["B:" + s for s in subsets[b_cells]]
    car = np.zeros(n_cells, dtype=bool)
    t_cells = np.flatnonzero(types == "T")
    if effector_cd8_share > 0 and t_cells.size:
        keys[t_cells[rng.random(t_cells.size) < effector_cd8_share]] = "T:effector"
    if "T:car" in profiles and t_cells.size:
        car[t_cells] = rng.random(t_cells.size) < _CAR_SHARE_OF_T[phase]
        keys[car] = "T:car"

    library = rng.lognormal(mean=np.log(3500), sigma=0.35, size=n_cells)
    library[types == "monocyte"] *= 1.5
    means = np.vstack([profiles[k] for k in keys]) * library[:, None]
    cell_type = types.astype(object)
    # Low-quality cells: small libraries dominated by mitochondrial reads.
    low_quality = rng.random(n_cells) < 0.03
    mt = np.array([g.startswith("MT-") for g in genes])
    means[low_quality] *= 0.25
    means[np.ix_(low_quality, mt)] *= 40.0
    cell_type[low_quality] = "low_quality"
    # Biological variation (gamma, dispersion 0.3) then Poisson sampling: negative binomial.
    dispersion = 0.3
    rates = means * rng.gamma(shape=1 / dispersion, scale=dispersion, size=means.shape)
    counts = rng.poisson(rates).astype(np.float32)
    # Heterotypic doublets: two cells' counts summed into one droplet.
    doublet = (rng.random(n_cells) < 0.04) & ~low_quality
    partners = rng.integers(0, n_cells, size=doublet.sum())
    counts[doublet] += counts[partners]
    if car_ambient > 0 and car_feature:
        # Ambient RNA: every droplet draws CAR UMIs from the soup (lysed CAR-T cells),
        # Poisson with car_ambient x its UMIs.
        column = genes.index(car_feature)
        counts[:, column] += rng.poisson(car_ambient * counts.sum(axis=1))
    cell_type[doublet] = "doublet"
    subsets[low_quality | doublet] = ""
    car &= ~(low_quality | doublet)
    truth = pd.DataFrame({"cell_type": cell_type, "b_subset": subsets, "car_t": car})
    if effector_cd8_share > 0 or pdc_share > 0:
        population = keys.astype(object).copy()
        population[low_quality] = "low_quality"
        population[doublet] = "doublet"
        truth["population"] = population
    return sp.csr_matrix(counts), truth, keys


def _protein_counts(truth: pd.DataFrame, keys: np.ndarray, rng: np.random.Generator,
                    panel: Sequence[str] = _PROTEINS) -> np.ndarray:
    """ADT counts (cells x ``panel``): a background for every cell, a signal where expressed."""
    high = {p: np.zeros(len(truth)) for p in (*_PROTEINS, *_OTHER_PROTEINS)}
    is_t = np.array([str(k).startswith("T") for k in keys], dtype=bool)
    high["CD3"][is_t] = 1.0
    b_keys = {f"B:{s}" for s in B_SUBSETS}
    is_b = np.isin(keys, list(b_keys))
    high["CD19"][is_b] = 1.0
    high["CD20"][is_b & (keys != "B:plasmablast")] = 1.0
    high["IgD"][np.isin(keys, ["B:transitional", "B:naive", "B:unswitched_memory"])] = 1.0
    high["CD27"][np.isin(keys, ["B:unswitched_memory", "B:switched_memory"])] = 1.0
    high["CD27"][keys == "B:plasmablast"] = 2.0
    high["CD38"][keys == "B:transitional"] = 1.5
    high["CD38"][keys == "B:plasmablast"] = 2.0
    high["CD38"][is_b & ~np.isin(keys, ["B:transitional", "B:plasmablast"])] = 0.3
    high["CD24"][is_b] = 0.6
    high["CD24"][keys == "B:transitional"] = 1.5
    high["CD4"][is_t & (keys != "T:effector")] = 1.0  # effector CD8 T cells: CD4-
    high["CD16"][keys == "T:effector"] = 0.5  # some effector memory CD8 T cells are CD16+
    high["CD4"][keys == "monocyte"] = 0.6
    high["CD14"][keys == "monocyte"] = 1.5
    high["CD16"][keys == "NK"] = 1.2
    high["CD16"][keys == "monocyte"] = 0.5
    high["CD56"][keys == "NK"] = 1.2
    high["HLA-DR"][is_b | (keys == "monocyte")] = 1.0
    high["HLA-DR"][keys == "DC"] = 1.5
    high["CD11c"][keys == "monocyte"] = 1.0
    high["CD11c"][keys == "DC"] = 1.2
    high["CD45RA"][is_b | (keys == "NK")] = 1.0
    high["CD45RA"][is_t] = 0.5
    columns = []
    for p in panel:
        mean = 15.0 * np.exp(2.5 * high[p])  # ~15 background, ~180 positive, ~2,000 high
        columns.append(rng.poisson(mean * rng.gamma(5.0, 0.2, size=len(truth))))
    return np.column_stack(columns).astype(np.float32)


def _write_10x_h5(path: Path, counts: sp.csr_matrix, barcodes: list[str], names: list[str],
                  ids: list[str], feature_types: list[str]) -> None:
    """Write cells x features counts in the Cell Ranger v3 ``filtered_feature_bc_matrix.h5``
    layout (features x cells CSC, which shares its arrays with the cells x features CSR)."""
    import h5py

    counts = sp.csr_matrix(counts)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        group = h5.create_group("matrix")
        group.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        group.create_dataset("data", data=counts.data.astype(np.int32))
        group.create_dataset("indices", data=counts.indices.astype(np.int64))
        group.create_dataset("indptr", data=counts.indptr.astype(np.int64))
        group.create_dataset("shape", data=np.array([counts.shape[1], counts.shape[0]],
                                                    dtype=np.int32))
        features = group.create_group("features")
        features.create_dataset("id", data=np.array(ids, dtype="S"))
        features.create_dataset("name", data=np.array(names, dtype="S"))
        features.create_dataset("feature_type", data=np.array(feature_types, dtype="S"))
        features.create_dataset("genome", data=np.array(["GRCh38"] * len(ids), dtype="S"))
        features.create_dataset("_all_tag_keys", data=np.array(["genome"], dtype="S"))


def simulate_scrna_visits(
    outdir: str | os.PathLike,
    *,
    patients: Sequence[str] = ("P01", "P02"),
    seed: int = 42,
    cells_per_sample: int = 2000,
    n_genes: int = 1500,
    days: Sequence[int] = (-7, 28, 150),
    reconstitution_days: Mapping[str, int] | None = None,
    car_feature: str | None = "CAR_FMC63",
    write_10x_h5: bool = True,
    cite_seq: bool = True,
    b_share_of_lymphocytes: Mapping[tuple[str, int], float] | None = None,
    cite_seq_all_visits: bool = False,
    extended_adt_panel: bool = False,
    effector_cd8_share: float = 0.0,
    pdc_share: float = 0.0,
    car_ambient: float = 0.0,
    car_expression: float = 1e-3,
) -> list[dict[str, Any]]:
    """Write simulated scRNA visits of demo patients and return their sample-sheet rows.

    Parameters
    ----------
    outdir
        Folder for the count files and truth tables (created when missing).
    patients
        Patient ids; every patient gets one visit per entry of ``days``.
    seed
        Seed of every random draw; the same seed writes the same files.
    cells_per_sample
        Cells (droplets, doublets and low-quality cells included) per visit.
    n_genes
        Genes per file: the marker, mitochondrial and CAR features plus background genes.
    days
        Visit days relative to CAR-T infusion; negative days are baseline visits.
    reconstitution_days
        Patient -> first day with returning B cells (default 110): visits on or after it
        carry naive/transitional-dominated B cells, earlier post-infusion visits none.
    car_feature
        Name of the CAR transcript feature expressed by CAR-T cells, or None for none.
    write_10x_h5
        Write the first visit as a Cell Ranger v3 ``.h5`` instead of ``.h5ad``.
    cite_seq
        Add antibody-capture features (CD3, CD19, CD20, CD27, IgD, CD38, CD24) to that ``.h5``.
    b_share_of_lymphocytes
        ``(patient, day)`` -> expected share of B cells among T, NK and B cells, so that a
        visit matches another modality's (the demo's flow data); by default the phase's share.
    cite_seq_all_visits
        With ``cite_seq``, every visit carries the antibody-capture features (a cohort of
        CITE-seq visits, aplastic ones included), not only the first (``.h5``) one.
    extended_adt_panel
        With ``cite_seq``, add lineage antibodies and an isotype control (CD4, CD14, CD16,
        CD56, HLA-DR, CD11c, CD45RA, IgG1-isotype) to the seven B-cell ones, as real panels
        have: ingest keeps only the configured markers, but every antibody enters each cell's
        CLR, so B cells are no longer compressed towards the negative cells.
    effector_cd8_share
        Share of the (non-CAR) T cells that are effector CD8 T cells (CD3 genes kept, CD3E
        detected in ~90%, NKG7/GNLY as high as NK cells; CD3+ CD4- protein); with it or
        ``pdc_share``, CAR-T cells carry the effector program too, NK cells a few stray CD3E
        UMIs, and the truth a ``population`` column (``T:effector``, ``T:car``, ``pDC``, ...).
    pdc_share
        Share of all cells that are pDCs (truth cell_type ``pDC``): MZB1 and JCHAIN with
        LILRA4, CLEC4C, IL3RA, PLD4, SERPINF1, IRF7, TCF4; negative for every lineage protein.
    car_ambient
        Ambient CAR UMIs per UMI of every droplet (Poisson), as from lysed CAR-T cells in the
        soup: non-CAR cells then carry stray CAR UMIs.
    car_expression
        Share of a CAR-T cell's library that is the CAR transcript.

    Returns
    -------
    One dict per visit with sample_id, patient_id, day, modality (``scrna``), path (file name
    relative to ``outdir``) and lymphocytes_per_ul.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    extra = effector_cd8_share > 0 or pdc_share > 0
    genes = _gene_names(n_genes, car_feature, extra)
    gene_ids = [f"ENSGSIM{i:08d}" for i in range(len(genes))]
    profiles = _profiles(genes, rng, car_feature, extra, car_expression)
    panel = (*_PROTEINS, *_OTHER_PROTEINS) if extended_adt_panel else _PROTEINS
    recon = dict(reconstitution_days or {})
    rows: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    for p_index, patient in enumerate(patients):
        for d_index, day in enumerate(days):
            visit_rng = np.random.default_rng([seed, p_index, d_index])
            phase = _phase(int(day), recon.get(patient, 110))
            b_share = (b_share_of_lymphocytes or {}).get((patient, int(day)))
            if phase == "aplasia":
                b_share = None  # no B cells at all
            counts, truth, keys = _simulate_visit(
                phase, cells_per_sample, genes, profiles, visit_rng, b_share,
                pdc_share=pdc_share, effector_cd8_share=effector_cd8_share,
                car_ambient=car_ambient, car_feature=car_feature)
            sample_id = f"{patient}_d{int(day)}_scrna"
            barcodes = _barcodes(cells_per_sample, visit_rng)
            truth.insert(0, "barcode", barcodes)
            as_h5 = write_10x_h5 and not rows
            if as_h5:
                file_name = f"{sample_id}.h5"
                names, ids = list(genes), list(gene_ids)
                types = ["Gene Expression"] * len(genes)
                matrix = counts
                if cite_seq:
                    adt = _protein_counts(truth, keys, visit_rng, panel)
                    names += [f"{p}_TotalSeqB" for p in panel]
                    ids += [f"ADT_{p}" for p in panel]
                    types += ["Antibody Capture"] * len(panel)
                    matrix = sp.hstack([counts, sp.csr_matrix(adt)], format="csr")
                _write_10x_h5(outdir / file_name, matrix, barcodes, names, ids, types)
            else:
                import anndata as ad

                file_name = f"{sample_id}.h5ad"
                var = pd.DataFrame({"gene_ids": gene_ids,
                                    "feature_types": "Gene Expression"}, index=genes)
                matrix = counts
                if cite_seq and cite_seq_all_visits:
                    adt = _protein_counts(truth, keys, visit_rng, panel)
                    var = pd.concat([var, pd.DataFrame(
                        {"gene_ids": [f"ADT_{p}" for p in panel],
                         "feature_types": "Antibody Capture"},
                        index=[f"{p}_TotalSeqB" for p in panel])])
                    matrix = sp.hstack([counts, sp.csr_matrix(adt)], format="csr")
                adata = ad.AnnData(X=matrix, obs=pd.DataFrame(index=barcodes), var=var)
                write_h5ad(adata, outdir / file_name)
            write_tsv(truth, outdir / f"{sample_id}.truth.tsv")
            jitter = float(visit_rng.lognormal(0.0, 0.15))
            lymphocytes_per_ul = round(_LYMPHOCYTES_PER_UL[phase] * jitter, 1)
            rows.append({"sample_id": sample_id, "patient_id": patient, "day": int(day),
                         "modality": "scrna", "path": file_name,
                         "lymphocytes_per_ul": lymphocytes_per_ul})
            singlets = truth[~truth["cell_type"].isin(["doublet", "low_quality"])]
            summary.append({
                "sample_id": sample_id, "patient_id": patient, "day": int(day), "phase": phase,
                "cells": len(truth), "singlets": len(singlets),
                "lymphocytes": int(singlets["cell_type"].isin(["T", "B", "NK"]).sum()),
                "t_cells": int((singlets["cell_type"] == "T").sum()),
                "b_cells": int((singlets["cell_type"] == "B").sum()),
                "car_t": int(singlets["car_t"].sum()),
                **{f"{s}_count": int((singlets["b_subset"] == s).sum()) for s in B_SUBSETS},
                "cite_seq": bool(cite_seq and (as_h5 or cite_seq_all_visits)),
            })
    write_tsv(pd.DataFrame(summary), outdir / "truth_scrna_samples.tsv")
    return rows
