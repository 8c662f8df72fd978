"""A Tahoe-100M stand-in corpus: the real layout and statistics, cells made from real cells.

Nothing can be downloaded here, so tests and benchmarks read a corpus written in the exact Hub layout:

    ROOT/data/train-XXXXX-of-NNNNN.parquet     expression_data rows, files grouped by plate (as on the Hub)
    ROOT/metadata/gene_metadata.parquet        token_id, ensembl_id, gene_symbol (the embedded sample's genes)
    ROOT/metadata/sample_metadata.parquet      sample, plate, drug, drugname_drugconc, mean QC counts per well
    ROOT/metadata/drug_metadata.parquet        drug, targets, moa-broad, moa-fine, canonical_smiles, pubchem_cid
    ROOT/metadata/cell_line_metadata.parquet   cell_name, Cell_ID_Cellosaur, Cell_ID_DepMap, Organ, Driver_Gene
    ROOT/metadata/obs_metadata.parquet         BARCODE_SUB_LIB_ID, sample, plate, cell_line, gene_count,
                                               tscp_count, pass_filter, phase

Each plate has wells (`sample`), each given one drug at one dose (0.05, 0.5 or 5 uM; `DMSO_TF` at 0 is the
control) and holding many cell lines (Cellosaurus-style ids). A cell is a real cell of the embedded sample (its
line's pool: the sample's cells are dealt to lines, so a line's cells share real gene-gene structure) resampled to a
Tahoe-like library size (log-normal around 1,900 UMIs). At that depth about 700 genes are expressed and half the
counts are 1 (Tahoe: 1,000-1,500 genes, most counts 1): the embedded sample's cells express fewer genes than
Tahoe's, which bounds how many a resampled cell can have.
Drug names carry Tahoe's quirks: a trailing space and a "(DMSO_TF solvate)" variant.

With `responses=True` the corpus is a drug screen with a known answer. Each line is its own kind of cell (a block
of the real cells along their first principal axis, so lines differ at baseline), and each (drug, dose, line) shifts
the expression of its drug's program (60 genes detected in >= 30% of cells) by a known log-fold change: a
dose-response curve (Hill, EC50 per drug) times a line x drug sensitivity s = sigmoid(line axes . drug axes) with
structure shared across lines and drugs (rank 2), and only a share s of a condition's cells respond (responders and
non-responders within a condition). So the mean shift is neither additive in line and drug (it scales with s^2)
nor the same across lines (PerturbMean's assumption), and a population is a mixture, not a shifted mean.
The ground truth, per drug, dose and line, is written to `metadata/simulated_effects.parquet` (`drug`, `dose_um`,
`cell_line_id`, `responder_share`, `genes`, `log_fold_changes`).

    python -m dataset_scripts.tahoe_standin /tmp/tahoe_standin --files 64 --cells_per_file 1600 --responses
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from modeling.conditions import drug_key

from .expression_data import EMBEDDED_SAMPLE, GENE_METADATA_PATH, cell_counts, load_expression_data
from .schema import CLS_TOKEN_ID, CLS_VALUE, EXPRESSION_SCHEMA
from .tahoe_metadata import CONTROL_DRUG

CONTROL = CONTROL_DRUG
DOSES_UM = (0.05, 0.5, 5.0)
# (name as in the data, canonical SMILES, PubChem CID, targets, moa-broad, moa-fine): real compounds, names with
# Tahoe's quirks (a trailing space, a solvate of the control's name).
DRUGS = (
    (CONTROL, "CS(C)=O", "679.0", "", "vehicle", "vehicle"),
    ("Aspirin", "CC(=O)OC1=CC=CC=C1C(=O)O", "2244.0", "PTGS1,PTGS2", "inhibitor", "COX inhibitor"),
    ("Caffeine", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C", "2519.0", "ADORA1,ADORA2A", "antagonist", "adenosine antagonist"),
    ("Ibuprofen ", "CC(C)CC1=CC=C(C=C1)C(C)C(=O)O", "3672.0", "PTGS1,PTGS2", "inhibitor", "COX inhibitor"),
    ("Acetaminophen", "CC(=O)NC1=CC=C(C=C1)O", "1983.0", "PTGS2", "inhibitor", "COX inhibitor"),
    ("Metformin (DMSO_TF solvate)", "CN(C)C(=N)N=C(N)N", "4091.0", "PRKAA1", "activator", "AMPK activator"),
)
ORGANS = ("Lung", "Skin", "Bowel", "Breast", "Pancreas", "Kidney", "Ovary", "Liver")
DRIVERS = ("KRAS", "BRAF", "TP53", "EGFR", "PIK3CA", "NRAS")


def real_cells(data_dir: str | Path = EMBEDDED_SAMPLE) -> list[tuple[np.ndarray, np.ndarray]]:
    """(gene ids, counts) of every cell of a Tahoe-layout folder (by default the embedded real sample)."""
    return [cell_counts(row) for row in load_expression_data(data_dir).rows]


def hill(dose_um: float, ec50_um: float, slope: float = 1.5) -> float:
    """The share of a drug's full effect at a dose: a Hill curve."""
    return dose_um**slope / (dose_um**slope + ec50_um**slope) if dose_um > 0 else 0.0


class ResponseModel:
    """Known drug responses: per drug a program of genes and their full log-fold changes, per drug an EC50, and a
    line x drug sensitivity of rank 2 (lines and drugs share response axes) with a share of responder cells."""

    def __init__(self, genes: np.ndarray, drugs: list[str], lines: list[str], rng: np.random.Generator):
        self.drugs, self.lines = drugs, lines
        self.programs = {d: np.sort(rng.choice(genes, 60, replace=False)) for d in drugs}
        self.full_effects = {d: rng.normal(0.0, 1.0, 60) for d in drugs}
        self.ec50 = {d: float(10 ** rng.uniform(-1.5, 0.5)) for d in drugs}
        line_axes, drug_axes = rng.normal(size=(len(lines), 2)), rng.normal(size=(len(drugs), 2))
        self.sensitivity = 1.0 / (1.0 + np.exp(-(line_axes @ drug_axes.T)))  # (lines, drugs) in (0, 1)

    def effect(self, drug: str, dose_um: float, line: str) -> tuple[np.ndarray, np.ndarray, float]:
        """(genes, log-fold changes of a responder cell, share of responders) of a line treated with a drug."""
        d, l_ = self.drugs.index(drug), self.lines.index(line)
        strength = hill(dose_um, self.ec50[drug]) * self.sensitivity[l_, d]
        return self.programs[drug], strength * 3.0 * self.full_effects[drug], float(self.sensitivity[l_, d])


def _first_axis(cells: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Each cell's coordinate on the first principal axis of the cells' library-size-normalised log counts."""
    from scipy import sparse
    from sklearn.utils.extmath import randomized_svd

    rows = np.repeat(np.arange(len(cells)), [len(g) for g, _ in cells])
    genes = np.concatenate([g for g, _ in cells])
    values = np.concatenate([np.log1p(1e4 * c / c.sum()) for _, c in cells])
    _, columns = np.unique(genes, return_inverse=True)
    matrix = sparse.csr_matrix((values, (rows, columns))).toarray()
    u, s, _ = randomized_svd(matrix - matrix.mean(axis=0), 1, random_state=0)
    return u[:, 0] * s[0]


def _resample(genes, counts, library_size, rng, shift=None):
    """A cell of `library_size` UMIs drawn from a real cell's expression profile (optionally shifted)."""
    profile = counts / counts.sum()
    if shift is not None:
        profile = profile * np.exp(shift)
        profile /= profile.sum()
    drawn = rng.multinomial(library_size, profile)
    keep = drawn > 0
    return genes[keep], drawn[keep].astype(np.float32)


def write_standin_corpus(
    root: str | Path,
    *,
    num_files: int = 64,
    cells_per_file: int = 1600,
    num_plates: int = 8,
    wells_per_file: int = 4,
    num_lines: int = 50,
    median_library_size: int = 1900,
    responses: bool = False,
    source: str | Path = EMBEDDED_SAMPLE,
    seed: int = 0,
) -> Path:
    """Write a stand-in corpus (see the module docstring) and return its root."""
    if num_files < num_plates:
        raise ValueError(f"num_files ({num_files}) must be at least num_plates ({num_plates}): files hold one plate")
    root = Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(source) / GENE_METADATA_PATH, root / "metadata" / "gene_metadata.parquet")
    rng = np.random.default_rng(seed)
    cells = real_cells(source)
    lines = [f"CVCL_{1000 + 37 * i:04d}" for i in range(num_lines)]
    pools = [list(range(i, len(cells), num_lines)) or [i % len(cells)] for i in range(num_lines)]  # cells per line
    drugs = [name for name, *_ in DRUGS]
    model = None
    if responses:
        # A screen: each line its own kind of cell (a block of the cells ordered along their first principal axis),
        # each drug's program among the genes detected in at least 30% of the cells (so its effect can be seen).
        order = np.argsort(_first_axis(cells), kind="stable")
        pools = [block.tolist() for block in np.array_split(order, num_lines)]
        genes, detected = np.unique(np.concatenate([g for g, _ in cells]), return_counts=True)
        common = genes[detected >= 0.3 * len(cells)]
        model = ResponseModel(common, [drug_key(d) for d in drugs if d != CONTROL], lines, rng)
    layout = [(CONTROL, 0.0)] + [(drug, dose) for drug in drugs if drug != CONTROL for dose in DOSES_UM]
    plate_of_file = np.repeat(np.arange(num_plates), -(-num_files // num_plates))[:num_files]
    wells = _Wells(cells, lines, pools, model, median_library_size, rng)
    samples = []
    for file_index in range(num_files):
        plate = f"plate{plate_of_file[file_index] + 1}"
        rows = {name: [] for name in EXPRESSION_SCHEMA.names}
        for well in range(wells_per_file):
            well_index = file_index * wells_per_file + well
            sample = f"smp_{well_index:05d}"
            if model is not None:  # a screen's layout: every (drug, dose) and the control in turn, equally often
                if well_index % len(layout) == 0:
                    rng.shuffle(layout)
                drug, dose = layout[well_index % len(layout)]
            else:
                drug = drugs[rng.integers(len(drugs))]
                dose = 0.0 if drug == CONTROL else float(rng.choice(DOSES_UM))
            samples.append((sample, plate, drug, f"[('{drug}', {dose}, 'uM')]"))
            for _ in range(cells_per_file // wells_per_file):
                wells.add_cell(rows, plate, sample, drug, dose)
        path = root / "data" / f"train-{file_index:05d}-of-{num_files:05d}.parquet"
        pq.write_table(pa.table(rows, schema=EXPRESSION_SCHEMA), path)
    _write_metadata(root, samples, wells.obs, lines, rng)
    if model is not None:
        _write_effects(root, wells.effects)
    return root


class _Wells:
    """Draws the cells of a well: a real cell of the line, resampled to a library size, shifted by the drug's effect
    in a responding cell (a screen), with its row columns and QC record."""

    def __init__(self, cells, lines, pools, model, median_library_size, rng):
        self.cells, self.lines, self.pools, self.model = cells, lines, pools, model
        self.median_library_size, self.rng = median_library_size, rng
        self.obs, self.effects = [], {}

    def add_cell(self, rows: dict, plate: str, sample: str, drug: str, dose: float) -> None:
        rng = self.rng
        line_index = int(rng.integers(len(self.lines)))
        line, pool = self.lines[line_index], self.pools[line_index]
        genes, counts = self.cells[pool[rng.integers(len(pool))]]
        library_size = max(200, int(rng.lognormal(np.log(self.median_library_size), 0.5)))
        shift = None
        if self.model is not None and drug != CONTROL:
            program, lfc, responders = self.model.effect(drug_key(drug), dose, line)
            self.effects[(drug_key(drug), dose, line)] = (program, lfc, responders)
            if rng.random() < responders:
                shift = np.zeros(len(genes))
                where = np.searchsorted(program, genes).clip(max=len(program) - 1)
                hit = program[where] == genes
                shift[hit] = lfc[where[hit]]
        cell_genes, cell_counts_ = _resample(genes, counts, library_size, rng, shift)
        barcode = f"{plate}_{sample}_{rng.integers(2**62):016x}"
        name, smiles, cid, _, _, moa = DRUGS[[d for d, *_ in DRUGS].index(drug)]
        rows["genes"].append([CLS_TOKEN_ID, *cell_genes.tolist()])
        rows["expressions"].append([CLS_VALUE, *cell_counts_.tolist()])
        for column, value in (("drug", drug), ("sample", sample), ("BARCODE_SUB_LIB_ID", barcode),
                              ("cell_line_id", line), ("moa-fine", moa), ("canonical_smiles", smiles),
                              ("pubchem_cid", cid), ("plate", plate)):  # fmt: skip
            rows[column].append(value)
        self.obs.append((barcode, sample, plate, line, len(cell_genes), int(cell_counts_.sum())))


def _write_effects(root: Path, effects: dict) -> None:
    """The simulated ground truth of a screen: each (drug, dose, line)'s program, log-fold changes and responders."""
    keys = sorted(effects)
    table = pa.table(
        {
            "drug": [k[0] for k in keys],
            "dose_um": [k[1] for k in keys],
            "cell_line_id": [k[2] for k in keys],
            "responder_share": [effects[k][2] for k in keys],
            "genes": [effects[k][0].tolist() for k in keys],
            "log_fold_changes": [effects[k][1].tolist() for k in keys],
        }
    )
    pq.write_table(table, root / "metadata" / "simulated_effects.parquet")


def _write_metadata(root: Path, samples, obs, lines, rng) -> None:
    qc = {}
    for _, sample, _, _, gene_count, tscp_count in obs:
        qc.setdefault(sample, []).append((gene_count, tscp_count))
    pq.write_table(
        pa.table(
            {
                "sample": [s[0] for s in samples],
                "plate": [s[1] for s in samples],
                "drug": [s[2] for s in samples],
                "drugname_drugconc": [s[3] for s in samples],
                "mean_gene_count": [float(np.mean([q[0] for q in qc.get(s[0], [(0, 0)])])) for s in samples],
                "mean_tscp_count": [float(np.mean([q[1] for q in qc.get(s[0], [(0, 0)])])) for s in samples],
            }
        ),
        root / "metadata" / "sample_metadata.parquet",
    )
    columns = ("drug", "canonical_smiles", "pubchem_cid", "targets", "moa-broad", "moa-fine")
    pq.write_table(
        pa.table({c: [d[i] for d in DRUGS] for i, c in enumerate(columns)}),
        root / "metadata" / "drug_metadata.parquet",
    )
    line_rows = []  # one row per line and driver mutation, as the real table
    for i, line in enumerate(lines):
        for driver in rng.choice(DRIVERS, int(rng.integers(1, 3)), replace=False):
            line_rows.append((f"LINE{i:02d}", line, f"ACH-{i:06d}", ORGANS[i % len(ORGANS)], str(driver)))
    names = ("cell_name", "Cell_ID_Cellosaur", "Cell_ID_DepMap", "Organ", "Driver_Gene")
    pq.write_table(
        pa.table({n: [r[i] for r in line_rows] for i, n in enumerate(names)}),
        root / "metadata" / "cell_line_metadata.parquet",
    )
    names = ("BARCODE_SUB_LIB_ID", "sample", "plate", "cell_line", "gene_count", "tscp_count")
    table = {n: [o[i] for o in obs] for i, n in enumerate(names)}
    table["pass_filter"] = ["full"] * len(obs)
    table["phase"] = rng.choice(["G1", "S", "G2M"], len(obs)).tolist()
    pq.write_table(pa.table(table), root / "metadata" / "obs_metadata.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--cells_per_file", type=int, default=1600)
    parser.add_argument("--plates", type=int, default=8)
    parser.add_argument("--lines", type=int, default=50)
    parser.add_argument("--median_library_size", type=int, default=1900, help="UMIs per cell (Tahoe: about 1,900)")
    parser.add_argument("--responses", action="store_true", help="simulate drug responses with known ground truth")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_standin_corpus(args.root, num_files=args.files, cells_per_file=args.cells_per_file, num_plates=args.plates,
                         num_lines=args.lines, median_library_size=args.median_library_size, responses=args.responses,
                         seed=args.seed)  # fmt: skip
    print(f"wrote {args.files} files of {args.cells_per_file} cells to {args.root}")


if __name__ == "__main__":
    main()
