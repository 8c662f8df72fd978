"""What the stand-in corpus (`tahoe_standin`) and the stand-in screen (`tahoe_screen`) share: the real cells they
are made of, Tahoe's drug names with their quirks, and the metadata tables of the Hub layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .expression_data import EMBEDDED_SAMPLE, cell_counts, load_expression_data
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


def prepare_root(root: str | Path, overwrite: bool = False) -> Path:
    """`root`, ready for a new corpus: a folder that holds none (`data/`, `metadata/` and `oracle/` hold no parquet
    file). With `overwrite`, an earlier corpus's parquet files there are deleted first (nothing else is), so no file
    of it is left beside the new one; without it, an earlier corpus is an error."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root} is a file, not a folder: give another root")
    earlier = sorted(path for folder in ("data", "metadata", "oracle/data", "oracle/metadata", "oracle")
                     for path in (root / folder).glob("*.parquet"))  # fmt: skip
    if earlier and not overwrite:
        raise FileExistsError(f"{root} holds an earlier corpus ({len(earlier)} parquet files, e.g. "
                              f"{earlier[0].relative_to(root)}): pass --overwrite (overwrite=True) to replace it, or "
                              "give another root")  # fmt: skip
    for path in earlier:
        path.unlink()
    return root


def real_cells(data_dir: str | Path = EMBEDDED_SAMPLE) -> list[tuple[np.ndarray, np.ndarray]]:
    """(gene ids, counts) of every cell of a Tahoe-layout folder (by default the embedded real sample)."""
    return [cell_counts(row) for row in load_expression_data(data_dir).rows]


def first_principal_axis(cells: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
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


def write_metadata(root: Path, samples, obs, lines, rng, drugs=DRUGS) -> None:
    """The metadata tables of a corpus: wells `samples` (sample, plate, drug, drugname_drugconc) with their cells'
    mean QC counts, the `drugs` table, one row per line and driver, and the cells' `obs` records."""
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
        pa.table({c: [d[i] for d in drugs] for i, c in enumerate(columns)}),
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
    write_obs_metadata(root, obs, rng)


def write_obs_metadata(root: Path, obs, rng) -> None:
    """`metadata/obs_metadata.parquet`: one row per cell (barcode, sample, plate, line, gene and UMI counts), all
    passing the filter, with a drawn cell-cycle phase."""
    names = ("BARCODE_SUB_LIB_ID", "sample", "plate", "cell_line", "gene_count", "tscp_count")
    table = {n: [o[i] for o in obs] for i, n in enumerate(names)}
    table["pass_filter"] = ["full"] * len(obs)
    table["phase"] = rng.choice(["G1", "S", "G2M"], len(obs)).tolist()
    pq.write_table(pa.table(table), root / "metadata" / "obs_metadata.parquet")
