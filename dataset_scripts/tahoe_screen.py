"""A stand-in drug screen with a known answer: Tahoe-100M's layout, real cells, drug effects of realistic shape.

    python -m dataset_scripts.tahoe_standin ROOT --responses [--lines 6] [--drugs N] [--cells_per_condition 150]
        [--plates 6] [--seed 0]

writes the layout and metadata of `tahoe_standin` (`ROOT/data/train-XXXXX-of-NNNNN.parquet`, the five tables of
`ROOT/metadata/`) and beside them the answer and a second draw of it:

    ROOT/metadata/simulated_effects.parquet        one row per (drug, dose_um, cell_line_id): genes (token ids),
                                                   log_fold_changes (the shift applied to every cell's expression
                                                   profile on those genes), survival, depth_factor
    ROOT/metadata/simulated_plate_offsets.parquet  plate, genes, log_offsets (applied to every cell of the plate)
    ROOT/oracle/                                   a Tahoe-layout folder of its own (data/, metadata/): a fresh,
                                                   independent draw of every well (same samples, plates, drugs,
                                                   doses, lines and cells per well and line; new barcodes)
    ROOT/oracle/expected_expression.parquet        per well (plate, drug, dose_um) and cell_line_id, the mean
                                                   log-normalised expression of 600 fresh cells on the source's
                                                   2,048 most-detected genes: the expected profile

The repository's readers of ROOT (`load_expression_data`, `tahoe_builder`) read `ROOT/data/*.parquet` only, never
`ROOT/oracle/`.

Lines: each line is its own kind of cell, a block of the source's real cells along their first principal axis.
Drugs: `SCREEN_DRUGS`, 26 real compounds in structural families (NSAIDs, xanthines, biguanides, corticosteroids,
statins, EGFR quinazolines, ...) after the `DMSO_TF` control; the first five are the plain corpus's. A screen of
fewer drugs (`--drugs N`: the first N) gives them the effects they have in the full screen.

Effects. A drug d given to line l at dose x shifts the log expression profile of every cell by
`e * (a_d + b_ld)` on its genes, with `e = hill(x, EC50_d) * s_ld`:
- `a_d`, the drug's shared full-dose effect on its program (30 genes of a pool of 160 drawn among the source's 300
  most-detected genes, so a 512-gene panel of the most-detected genes holds them). Per gene, the drugs' values are
  jointly Gaussian with covariance the Tanimoto similarity of their Morgan fingerprints (radius 2, 2,048 bits),
  centred over drugs, plus a jitter: similar drugs move the same genes the same way, and the mean over drugs
  carries little of any one drug's effect (random signs). Sizes: that Gaussian times a per-gene Student-t scale,
  |log-fold change| mostly 0.5-1 with a long tail, capped at 3 (with `b_ld` too).
- `b_ld`, the line's own extra effect of the drug: 8 genes of the pool, Student-t sizes.
- `s_ld` in [0.3, 1], a line x drug sensitivity of rank 2; EC50 per drug within 0.05-5 uM (Hill slope 1.5).
- Cytotoxicity: a condition keeps a share `survival = 1 - 0.4 * toxicity_d * e` (in [0.6, 1]) of its cells;
  depth: its cells' library sizes are multiplied by `exp(depth_slope_d * e)`.
- Plates: each adds its own N(0, 0.1) log offset on 100 of the 1,000 most-detected genes to every cell on it,
  controls included.
A cell: a real cell of its line, its profile multiplied by exp(plate offset + condition shift) and renormalised,
Poisson counts around a log-normal library size (median 1,900 UMIs) times the condition's depth factor.

Layout: plate p holds one dose, `DOSES_UM[p % 3]`: one well of every drug at that dose and two DMSO wells; every
well holds cells of every line. A (line, drug, dose) has cells in proportion to its survival, the most toxic
condition exactly `cells_per_condition`, spread over its dose's plates; each line has `control_cells_per_line` DMSO
cells spread over every plate. A plate's wells are written in files of about 8,192 cells, one plate per file group.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from modeling.conditions import drug_key

from .expression_data import EMBEDDED_SAMPLE, GENE_METADATA_PATH
from .molecules import tanimoto_similarity
from .schema import CLS_TOKEN_ID, CLS_VALUE, EXPRESSION_SCHEMA, METADATA_COLUMNS
from .standin_tables import (
    CONTROL,
    DOSES_UM,
    DRUGS,
    first_principal_axis,
    prepare_root,
    real_cells,
    write_metadata,
    write_obs_metadata,
)

# (targets, moa-broad, moa-fine) of a family of drugs
_COX = ("PTGS1,PTGS2", "inhibitor", "COX inhibitor")
_ADENOSINE = ("ADORA1,ADORA2A", "antagonist", "adenosine antagonist")
_GLUCOCORTICOID = ("NR3C1", "agonist", "glucocorticoid receptor agonist")
_STATIN = ("HMGCR", "inhibitor", "HMG-CoA reductase inhibitor")
_EGFR = ("EGFR", "inhibitor", "EGFR inhibitor")
# (name as in the data, canonical SMILES, PubChem CID, targets, moa-broad, moa-fine), grouped by structural family;
# the control and the plain corpus's five drugs first, in their order.
SCREEN_DRUGS = DRUGS + (
    ("Naproxen", "CC(C1=CC2=C(C=C1)C=C(C=C2)OC)C(=O)O", "156391.0", *_COX),
    ("Ketoprofen", "CC(C1=CC(=CC=C1)C(=O)C2=CC=CC=C2)C(=O)O", "3825.0", *_COX),
    ("Flurbiprofen", "CC(C1=CC(=C(C=C1)C2=CC=CC=C2)F)C(=O)O", "3394.0", *_COX),
    ("Diclofenac", "C1=CC=C(C(=C1)CC(=O)O)NC2=C(C=CC=C2Cl)Cl", "3033.0", *_COX),
    ("Indomethacin", "CC1=C(C2=C(N1C(=O)C3=CC=C(C=C3)Cl)C=CC(=C2)OC)CC(=O)O", "3715.0", *_COX),
    ("Theophylline", "CN1C2=C(C(=O)N(C1=O)C)NC=N2", "2153.0", *_ADENOSINE),
    ("Theobromine", "CN1C=NC2=C1C(=O)NC(=O)N2C", "5429.0", *_ADENOSINE),
    ("Phenformin", "C1=CC=C(C=C1)CCN=C(N)N=C(N)N", "8249.0", "PRKAA1", "activator", "AMPK activator"),
    ("Dexamethasone", "CC1CC2C3CCC4=CC(=O)C=CC4(C3(C(CC2(C1(C(=O)CO)O)C)O)F)C", "5743.0", *_GLUCOCORTICOID),
    ("Prednisolone", "CC12CC(C3C(C1CCC2(C(=O)CO)O)CCC4=CC(=O)C=CC34C)O", "5755.0", *_GLUCOCORTICOID),
    ("Hydrocortisone", "CC12CCC(=O)C=C1CCC3C2C(CC4(C3CCC4(C(=O)CO)O)C)O", "5754.0", *_GLUCOCORTICOID),
    ("Lovastatin", "CCC(C)C(=O)OC1CC(C=C2C1C(C(C=C2)C)CCC3CC(CC(=O)O3)O)C", "53232.0", *_STATIN),
    ("Simvastatin", "CCC(C)(C)C(=O)OC1CC(C=C2C1C(C(C=C2)C)CCC3CC(CC(=O)O3)O)C", "54454.0", *_STATIN),
    ("Gefitinib", "COC1=C(C=C2C(=C1)N=CN=C2NC3=CC(=C(C=C3)F)Cl)OCCCN4CCOCC4", "123631.0", *_EGFR),
    ("Erlotinib", "COCCOC1=C(C=C2C(=C1)C(=NC=N2)NC3=CC=CC(=C3)C#C)OCCOC", "176870.0", *_EGFR),
    (
        "Lapatinib",
        "CS(=O)(=O)CCNCC1=CC=C(O1)C2=CC3=C(C=C2)N=CN=C3NC4=CC(=C(C=C4)OCC5=CC(=CC=C5)F)Cl",
        "208908.0",
        "EGFR,ERBB2",
        "inhibitor",
        "EGFR inhibitor",
    ),
    (
        "Imatinib",
        "CC1=C(C=C(C=C1)NC(=O)C2=CC=C(C=C2)CN3CCN(CC3)C)NC4=NC=CC(=N4)C5=CN=CC=C5",
        "5291.0",
        "ABL1,KIT,PDGFRA",
        "inhibitor",
        "BCR-ABL inhibitor",
    ),
    ("5-Fluorouracil", "C1=C(C(=O)NC(=O)N1)F", "3385.0", "TYMS", "inhibitor", "thymidylate synthase inhibitor"),
    (
        "Methotrexate",
        "CN(CC1=CN=C2C(=N1)C(=NC(=N2)N)N)C3=CC=C(C=C3)C(=O)NC(CCC(=O)O)C(=O)O",
        "126941.0",
        "DHFR",
        "inhibitor",
        "DHFR inhibitor",
    ),
    (
        "Tamoxifen",
        "CCC(=C(C1=CC=CC=C1)C2=CC=C(C=C2)OCCN(C)C)C3=CC=CC=C3",
        "2733526.0",
        "ESR1",
        "antagonist",
        "estrogen receptor antagonist",
    ),
    (
        "Vorinostat",
        "C1=CC=C(C=C1)NC(=O)CCCCCCC(=O)NO",
        "5311.0",
        "HDAC1,HDAC2,HDAC3,HDAC6",
        "inhibitor",
        "HDAC inhibitor",
    ),
)
CANDIDATE_GENES = 300  # the responsive pool is drawn among the source's most-detected genes
POOL_SIZE = 160
PROGRAM_SIZE = 30  # genes of a drug's shared program
LINE_PROGRAM_SIZE = 8  # genes of a line's own extra effect of a drug
EFFECT_SCALE = 0.35  # with the program's selection and the t scale: |shared log-fold change| mostly 0.5-1
LINE_EFFECT_SCALE = 0.6
T_DEGREES = 4  # the Student-t's: a long tail of large effects
MAX_LOG_FOLD_CHANGE = 3.0  # e^3 = 20-fold
SENSITIVITY_FLOOR = 0.3
SURVIVAL_FLOOR = 0.6
PLATE_OFFSET_GENES, PLATE_OFFSET_CANDIDATES, PLATE_OFFSET_SD = 100, 1000, 0.1
CONTROL_WELLS_PER_PLATE = 2
CELLS_PER_FILE = 8192
# The oracle's expected expression: cells drawn per well and line, on the source's most-detected genes.
EXPECTED_CELLS, EXPECTED_GENES = 600, 2048


def hill(dose_um: float, ec50_um: float, slope: float = 1.5) -> float:
    """The share of a drug's full effect at a dose: a Hill curve."""
    return dose_um**slope / (dose_um**slope + ec50_um**slope) if dose_um > 0 else 0.0


def genes_by_detection(cells: list[tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """The `n` genes expressed in the most cells, most detected first (ties by token id)."""
    genes, detected = np.unique(np.concatenate([g for g, _ in cells]), return_counts=True)
    return genes[np.argsort(-detected, kind="stable")[:n]]


def shared_effects(similarity: np.ndarray, pool_size: int, rng: np.random.Generator) -> np.ndarray:
    """Each drug's full-dose shared log-fold changes over a pool of genes, (drugs, pool_size), 0 off its program.

    Per gene, the drugs' latent values are jointly Gaussian with covariance the structural similarity, centred over
    drugs (any two molecules share some fingerprint bits, which is no shared effect) plus a small jitter, scaled to
    unit variance. A drug's program is its `PROGRAM_SIZE` genes of largest |latent|; an effect is the latent value
    times the gene's Student-t scale (so jointly Student-t: a long tail, some genes strongly responsive to every
    drug that moves them), capped at `MAX_LOG_FOLD_CHANGE`.
    """
    n = len(similarity)
    centring = np.eye(n) - 1.0 / n
    covariance = centring @ similarity @ centring + 0.05 * np.eye(n)
    scale = np.sqrt(np.diag(covariance))
    latent = np.linalg.cholesky(covariance / np.outer(scale, scale)) @ rng.standard_normal((n, pool_size))
    tail = np.sqrt(T_DEGREES / rng.chisquare(T_DEGREES, pool_size))
    effects = np.clip(EFFECT_SCALE * latent * tail, -MAX_LOG_FOLD_CHANGE, MAX_LOG_FOLD_CHANGE)
    cutoff = -np.sort(-np.abs(latent), axis=1)[:, PROGRAM_SIZE - 1 : PROGRAM_SIZE]
    return np.where(np.abs(latent) >= cutoff, effects, 0.0)


@dataclass
class ScreenTruth:
    """The known answer of a screen (see the module docstring): full-dose effects over a pool of genes, and what
    scales them per line, drug and dose. Drug axes follow `drugs` (keys, the control left out)."""

    drugs: list[str]
    lines: list[str]
    pool: np.ndarray  # token ids of the responsive genes, sorted
    shared: np.ndarray  # (drugs, pool) a drug's shared full-dose log-fold changes
    specific: np.ndarray  # (lines, drugs, pool) a line's own extra full-dose log-fold changes
    sensitivity: np.ndarray  # (lines, drugs) in [SENSITIVITY_FLOOR, 1]
    ec50_um: np.ndarray
    toxicity: np.ndarray  # in [0, 1]
    depth_slope: np.ndarray

    def condition(self, line: int, drug: int, dose_um: float) -> tuple[np.ndarray, np.ndarray, float, float]:
        """(genes, log-fold changes, survival, depth factor) of line `line` given drug `drug` at `dose_um`."""
        effect = hill(dose_um, self.ec50_um[drug]) * self.sensitivity[line, drug]
        full = np.clip(self.shared[drug] + self.specific[line, drug], -MAX_LOG_FOLD_CHANGE, MAX_LOG_FOLD_CHANGE)
        hit = full != 0
        survival = 1.0 - (1.0 - SURVIVAL_FLOOR) * self.toxicity[drug] * effect
        return self.pool[hit], effect * full[hit], float(survival), float(np.exp(self.depth_slope[drug] * effect))


def draw_truth(cells, lines: list[str], drugs: list[tuple], rng: np.random.Generator) -> ScreenTruth:
    """A screen's answer for `lines` and `drugs` (rows of `SCREEN_DRUGS`, the control left out), its responsive
    genes drawn among the most-detected genes of `cells` (the source's (genes, counts))."""
    n_lines, n_drugs = len(lines), len(drugs)
    pool = np.sort(rng.choice(genes_by_detection(cells, CANDIDATE_GENES), POOL_SIZE, replace=False))
    shared = shared_effects(tanimoto_similarity([d[1] for d in drugs]), POOL_SIZE, rng)
    specific = np.zeros((n_lines, n_drugs, POOL_SIZE))
    chosen = rng.random(specific.shape).argsort(axis=-1)[..., :LINE_PROGRAM_SIZE]
    sizes = LINE_EFFECT_SCALE * rng.standard_t(T_DEGREES, chosen.shape)
    np.put_along_axis(specific, chosen, np.clip(sizes, -MAX_LOG_FOLD_CHANGE, MAX_LOG_FOLD_CHANGE), axis=-1)
    axes = rng.standard_normal((n_lines, 2)) @ rng.standard_normal((n_drugs, 2)).T  # rank 2
    sensitivity = SENSITIVITY_FLOOR + (1.0 - SENSITIVITY_FLOOR) / (1.0 + np.exp(-axes))
    ec50_um = 10 ** rng.uniform(np.log10(DOSES_UM[0]), np.log10(DOSES_UM[-1]), n_drugs)
    return ScreenTruth([drug_key(d[0]) for d in drugs], lines, pool, shared, specific, sensitivity, ec50_um,
                       rng.uniform(0.0, 1.0, n_drugs), rng.normal(0.0, 0.3, n_drugs))  # fmt: skip


def draw_plate_offsets(cells, plates: list[str], rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per plate, (genes, log offsets): N(0, PLATE_OFFSET_SD) on genes drawn among the most-detected ones."""
    candidates = genes_by_detection(cells, PLATE_OFFSET_CANDIDATES)
    return {
        plate: (
            np.sort(rng.choice(candidates, PLATE_OFFSET_GENES, replace=False)),
            rng.normal(0.0, PLATE_OFFSET_SD, PLATE_OFFSET_GENES),
        )
        for plate in plates
    }


@dataclass
class Well:
    """A well of the screen: one drug (its name as in the data) at one dose, `counts[l]` cells of line l."""

    sample: str
    plate: str
    drug: str
    dose_um: float
    counts: np.ndarray


def _shares(total: int, parts: int) -> np.ndarray:
    """`total` dealt as evenly as possible into `parts` integers."""
    return total // parts + (np.arange(parts) < total % parts)


def condition_cells(truth: ScreenTruth, num_drugs: int, cells_per_condition: int) -> np.ndarray:
    """Cells of each (line, drug, dose) of the first `num_drugs` drugs, (lines, drugs, doses): in proportion to the
    condition's survival, the most toxic condition keeping exactly `cells_per_condition`."""
    survival = np.array([[[truth.condition(line, drug, dose)[2] for dose in DOSES_UM] for drug in range(num_drugs)]
                         for line in range(len(truth.lines))])  # fmt: skip
    return np.ceil(cells_per_condition * survival / survival.min()).astype(int)


def plan_wells(cells: np.ndarray, drugs: list[str], num_plates: int, control_cells_per_line: int,
               rng: np.random.Generator) -> list[list[Well]]:  # fmt: skip
    """The wells of every plate, in a drawn order: plate p a well of every drug (names as in the data) at
    `DOSES_UM[p % 3]` and `CONTROL_WELLS_PER_PLATE` DMSO wells. A condition's `cells` (lines, drugs, doses) are
    spread over its dose's plates, each line's controls over every plate."""
    n_doses = len(DOSES_UM)
    control = _shares(control_cells_per_line, num_plates * CONTROL_WELLS_PER_PLATE)
    plates, sample = [], 0
    for p in range(num_plates):
        same_dose = list(range(p % n_doses, num_plates, n_doses))
        contents = [(CONTROL, 0.0, np.full(len(cells), control[p * CONTROL_WELLS_PER_PLATE + w]))
                    for w in range(CONTROL_WELLS_PER_PLATE)]  # fmt: skip
        for d, name in enumerate(drugs):
            shares = [_shares(n, len(same_dose))[same_dose.index(p)] for n in cells[:, d, p % n_doses]]
            contents.append((name, DOSES_UM[p % n_doses], np.array(shares)))
        wells = []
        for i in rng.permutation(len(contents)):
            name, dose_um, counts = contents[i]
            wells.append(Well(f"smp_{sample:05d}", f"plate{p + 1}", name, dose_um, counts))
            sample += 1
        plates.append(wells)
    return plates


def _file_groups(plates: list[list[Well]]) -> list[list[Well]]:
    """The wells of each file: a plate's wells, in order, in files of at most about `CELLS_PER_FILE` cells."""
    groups = []
    for wells in plates:
        total = sum(int(w.counts.sum()) for w in wells)
        groups += [list(g) for g in np.array_split(np.array(wells, dtype=object), -(-total // CELLS_PER_FILE))]
    return groups


class _CellDrawer:
    """Draws a well's cells from the truth: a real cell of the line, its profile multiplied by exp(the plate's
    offsets + the condition's log-fold changes), Poisson counts around a log-normal library size times the
    condition's depth factor. Vectorised over a well's cells (a loop over cells would take most of the time)."""

    def __init__(self, cells, pools, truth: ScreenTruth, offsets: dict, median_library_size: int):
        self.cells, self.truth, self.offsets, self.median_library_size = cells, truth, offsets, median_library_size
        self.universe = np.unique(np.concatenate([g for g, _ in cells]))  # every gene of the source
        self.columns = [np.searchsorted(self.universe, g) for g, _ in cells]
        self.profiles = [c / c.sum() for _, c in cells]
        self.pools, self.pool_sizes = np.concatenate(pools), np.array([len(p) for p in pools])
        self.pool_starts = np.cumsum(self.pool_sizes) - self.pool_sizes

    def _shift(self, well: Well, line: int) -> tuple[np.ndarray, float]:
        """The log shift over every gene of the source of a line's cells in a well, and their depth factor."""
        shift = np.zeros(len(self.universe))
        genes, offsets = self.offsets[well.plate]
        shift[np.searchsorted(self.universe, genes)] += offsets
        if well.drug == CONTROL:
            return shift, 1.0
        genes, lfc, _, depth = self.truth.condition(line, self.truth.drugs.index(drug_key(well.drug)), well.dose_um)
        shift[np.searchsorted(self.universe, genes)] += lfc
        return shift, depth

    def draw(self, well: Well, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """A well's cells, the lines' cells interleaved: flat genes and counts, each cell's number of genes and
        each cell's line index."""
        shifts, depths = zip(*(self._shift(well, line) for line in range(len(self.pool_sizes))))
        lines = rng.permutation(np.repeat(np.arange(len(self.pool_sizes)), well.counts))
        sources = self.pools[self.pool_starts[lines] + rng.integers(0, self.pool_sizes[lines])]
        library = np.maximum(200, rng.lognormal(np.log(self.median_library_size), 0.5, len(lines)))
        library *= np.array(depths)[lines]
        lengths = np.array([len(self.columns[s]) for s in sources])
        owner, starts = np.repeat(np.arange(len(lines)), lengths), np.cumsum(lengths) - lengths
        columns = np.concatenate([self.columns[s] for s in sources])
        weights = np.concatenate([self.profiles[s] for s in sources]) * np.exp(np.stack(shifts)[lines[owner], columns])
        counts = rng.poisson(weights * (library / np.add.reduceat(weights, starts))[owner])
        keep = counts > 0
        kept = np.add.reduceat(keep.astype(np.int64), starts)
        return self.universe[columns[keep]], counts[keep].astype(np.float32), kept, lines


def _expression_table(genes: np.ndarray, counts: np.ndarray, lengths: np.ndarray, columns: dict) -> pa.Table:
    """Cells as `EXPRESSION_SCHEMA` rows from flat genes and counts (cell i holds `lengths[i]` of them), each row
    led by the `<cls>` marker."""
    offsets = np.concatenate([[0], np.cumsum(lengths + 1)])
    marker = np.zeros(offsets[-1], dtype=bool)
    marker[offsets[:-1]] = True
    flat_genes, flat_counts = np.full(len(marker), CLS_TOKEN_ID, np.int64), np.full(len(marker), CLS_VALUE, np.float32)
    flat_genes[~marker], flat_counts[~marker] = genes, counts
    offsets = pa.array(offsets.astype(np.int32))
    lists = {
        "genes": pa.ListArray.from_arrays(offsets, pa.array(flat_genes)),
        "expressions": pa.ListArray.from_arrays(offsets, pa.array(flat_counts)),
    }
    return pa.table({**lists, **columns}, schema=EXPRESSION_SCHEMA)


def _write_cells(root: Path, groups: list[list[Well]], drawer: _CellDrawer, rng: np.random.Generator) -> list:
    """Draw every well's cells and write them to `root/data`, one file per group; return the cells' obs records."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    rows = {name: row for name, *row in SCREEN_DRUGS}
    lines, obs = np.array(drawer.truth.lines), []
    for index, wells in enumerate(groups):
        cells, columns = [], {name: [] for name in METADATA_COLUMNS}
        for well in wells:
            genes, counts, lengths, line_ids = drawer.draw(well, rng)
            smiles, cid, _, _, moa = rows[well.drug]
            barcodes = [f"{well.plate}_{well.sample}_{b:016x}" for b in rng.integers(2**62, size=len(line_ids))]
            for column, value in (("drug", well.drug), ("sample", well.sample), ("moa-fine", moa),
                                  ("canonical_smiles", smiles), ("pubchem_cid", cid),
                                  ("plate", well.plate)):  # fmt: skip
                columns[column] += [value] * len(line_ids)
            columns["BARCODE_SUB_LIB_ID"] += barcodes
            columns["cell_line_id"] += lines[line_ids].tolist()
            totals = np.bincount(np.repeat(np.arange(len(lengths)), lengths), counts, len(lengths)).astype(int)
            obs += zip(barcodes, [well.sample] * len(barcodes), [well.plate] * len(barcodes),
                       lines[line_ids].tolist(), lengths.tolist(), totals.tolist())  # fmt: skip
            cells.append((genes, counts, lengths))
        genes, counts, lengths = (np.concatenate(part) for part in zip(*cells))
        path = root / "data" / f"train-{index:05d}-of-{len(groups):05d}.parquet"
        pq.write_table(_expression_table(genes, counts, lengths, columns), path)
    return obs


def _write_truth(root: Path, truth: ScreenTruth, offsets: dict, drugs: list[str]) -> None:
    """`metadata/simulated_effects.parquet` (every dose and line of the drug keys `drugs`) and
    `simulated_plate_offsets.parquet`."""
    keys = sorted((drug, dose, line) for drug in drugs for dose in DOSES_UM for line in truth.lines)
    effects = [truth.condition(truth.lines.index(line), truth.drugs.index(drug), dose) for drug, dose, line in keys]
    table = {
        "drug": [k[0] for k in keys],
        "dose_um": [k[1] for k in keys],
        "cell_line_id": [k[2] for k in keys],
        "genes": [e[0].tolist() for e in effects],
        "log_fold_changes": [e[1].tolist() for e in effects],
        "survival": [e[2] for e in effects],
        "depth_factor": [e[3] for e in effects],
    }
    pq.write_table(pa.table(table), root / "metadata" / "simulated_effects.parquet")
    plates = sorted(offsets, key=lambda plate: int(plate.removeprefix("plate")))
    table = {
        "plate": plates,
        "genes": [offsets[p][0].tolist() for p in plates],
        "log_offsets": [offsets[p][1].tolist() for p in plates],
    }
    pq.write_table(pa.table(table), root / "metadata" / "simulated_plate_offsets.parquet")


def _write_oracle(root: Path, groups: list[list[Well]], drawer: _CellDrawer, rng: np.random.Generator,
                  expected_cells: int) -> None:  # fmt: skip
    """`ROOT/oracle`: a fresh draw of every well of the screen, with ROOT's gene, sample, drug and line tables, and
    the expected expression of every well and line ([`_write_expected_expression`])."""
    oracle = root / "oracle"
    (oracle / "metadata").mkdir(parents=True, exist_ok=True)
    for name in ("gene", "sample", "drug", "cell_line"):
        shutil.copy(root / "metadata" / f"{name}_metadata.parquet", oracle / "metadata" / f"{name}_metadata.parquet")
    write_obs_metadata(oracle, _write_cells(oracle, groups, drawer, rng), rng)
    _write_expected_expression(oracle, [well for group in groups for well in group], drawer, rng, expected_cells)


def _write_expected_expression(oracle: Path, wells: list[Well], drawer: _CellDrawer, rng: np.random.Generator,
                               cells_per_line: int) -> None:  # fmt: skip
    """`oracle/expected_expression.parquet`: per well and line, the mean log-normalised expression
    (`log1p(1e4 x count / cell total)`) of a large fresh draw (`cells_per_line` cells) on the `EXPECTED_GENES`
    genes the source detects most, i.e. the expected profile a condition's real cells scatter around. A fresh draw
    the size of the real one is as noisy as the real one; the ceiling's effect is this mean's."""
    genes = np.sort(genes_by_detection(drawer.cells, EXPECTED_GENES))
    rows = []
    for well in wells:
        large = dataclasses.replace(well, counts=np.full(len(well.counts), cells_per_line))
        flat_genes, counts, lengths, lines = drawer.draw(large, rng)
        owner = np.repeat(np.arange(len(lengths)), lengths)
        values = np.log1p(1e4 * counts / np.bincount(owner, counts, len(lengths))[owner])
        where = np.searchsorted(genes, flat_genes).clip(max=len(genes) - 1)
        on = genes[where] == flat_genes
        sums = np.zeros((len(well.counts), len(genes)))
        np.add.at(sums, (lines[owner[on]], where[on]), values[on])
        key = drug_key(well.drug)
        rows += [
            (well.plate, line, key, well.dose_um, total / cells_per_line)
            for line, total in zip(drawer.truth.lines, sums)
        ]
    table = {
        "plate": [r[0] for r in rows],
        "cell_line_id": [r[1] for r in rows],
        "drug": [r[2] for r in rows],
        "dose_um": [r[3] for r in rows],
        "cells": [cells_per_line] * len(rows),
        "genes": [genes.tolist()] * len(rows),
        "mean_log_normalised": [r[4].astype(np.float32) for r in rows],
    }
    pq.write_table(pa.table(table), oracle / "expected_expression.parquet")


def write_standin_screen(
    root: str | Path,
    *,
    num_lines: int = 6,
    num_drugs: int | None = None,
    cells_per_condition: int = 150,
    control_cells_per_line: int | None = None,
    num_plates: int = 6,
    median_library_size: int = 1900,
    oracle: bool = True,
    expected_cells: int = EXPECTED_CELLS,
    source: str | Path = EMBEDDED_SAMPLE,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a stand-in drug screen with its known answer (see the module docstring) and return its root.

    Args:
        root: the folder to write (`data/`, `metadata/`, and `oracle/` when `oracle`).
        num_lines: cell lines, each a block of the source's cells along their first principal axis.
        num_drugs: the first `num_drugs` drugs of `SCREEN_DRUGS` after the control (None: all of them; 5: the
            plain corpus's).
        cells_per_condition: the fewest cells of a (line, drug, dose) after cytotoxicity.
        control_cells_per_line: DMSO cells of each line, spread over every plate (None: 8 x `cells_per_condition`).
        num_plates: plates, at least 3 (plate p holds dose `DOSES_UM[p % 3]`).
        median_library_size: median UMIs of a control cell.
        oracle: also write `oracle/`, an independent draw of every well, and its expected expression.
        expected_cells: cells per well and line of the large draw the expected expression is the mean of.
        source: the Tahoe-layout folder whose real cells the screen is made of.
        seed: the seed of every draw.
        overwrite: replace an earlier corpus in `root` ([`prepare_root`]); without it, one is an error.

    Raises:
        ValueError: an argument out of range (named).
    """
    drugs = _screen_drugs(num_drugs)
    control_cells_per_line = 8 * cells_per_condition if control_cells_per_line is None else control_cells_per_line
    if num_plates < len(DOSES_UM):
        raise ValueError(f"num_plates ({num_plates}) must be at least {len(DOSES_UM)}: a plate holds one dose")
    if cells_per_condition < 1 or control_cells_per_line < num_plates:
        raise ValueError(f"cells_per_condition ({cells_per_condition}) must be at least 1 and control_cells_per_line "
                         f"({control_cells_per_line}) at least num_plates ({num_plates})")  # fmt: skip
    cells = real_cells(source)
    if not 1 <= num_lines <= len(cells):
        raise ValueError(f"num_lines ({num_lines}) must be between 1 and the source's {len(cells)} cells")
    root = prepare_root(root, overwrite)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(source) / GENE_METADATA_PATH, root / "metadata" / "gene_metadata.parquet")
    truth_rng, layout_rng, cell_rng, oracle_rng = np.random.default_rng(seed).spawn(4)
    lines = [f"CVCL_{1000 + 37 * i:04d}" for i in range(num_lines)]
    pools = np.array_split(np.argsort(first_principal_axis(cells), kind="stable"), num_lines)
    truth = draw_truth(cells, lines, list(SCREEN_DRUGS[1:]), truth_rng)  # a screen of fewer drugs: the same effects
    offsets = draw_plate_offsets(cells, [f"plate{p + 1}" for p in range(num_plates)], truth_rng)
    condition_counts = condition_cells(truth, len(drugs) - 1, cells_per_condition)
    plates = plan_wells(condition_counts, [d[0] for d in drugs[1:]], num_plates, control_cells_per_line, layout_rng)
    groups, drawer = _file_groups(plates), _CellDrawer(cells, pools, truth, offsets, median_library_size)
    obs = _write_cells(root, groups, drawer, cell_rng)
    samples = [(w.sample, w.plate, w.drug, f"[('{w.drug}', {w.dose_um}, 'uM')]") for p in plates for w in p]
    write_metadata(root, samples, obs, lines, layout_rng, drugs)
    _write_truth(root, truth, offsets, truth.drugs[: len(drugs) - 1])
    if oracle:
        _write_oracle(root, groups, drawer, oracle_rng, expected_cells)
    return root


def _screen_drugs(num_drugs: int | None) -> tuple:
    """The control and the first `num_drugs` drugs of `SCREEN_DRUGS` (None: all)."""
    available = len(SCREEN_DRUGS) - 1
    num_drugs = available if num_drugs is None else num_drugs
    if not 1 <= num_drugs <= available:
        raise ValueError(f"num_drugs ({num_drugs}) must be between 1 and {available}")
    return SCREEN_DRUGS[: num_drugs + 1]
