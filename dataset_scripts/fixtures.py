"""Synthetic shards in the exact Tahoe-100M schema, for tests and benchmarks of the data path.

The cells look like Tahoe-100M's at the level the data code cares about: a few hundred to ~5,500 expressed genes
per cell (log-uniform), counts mostly 1 with a heavy (Zipf) tail, the `<cls>` marker at position 0, several plates,
drugs (DMSO_TF among them) and cell lines, unique barcodes. They carry no biology.

Example:
    python -m dataset_scripts.fixtures /tmp/tahoe_fixture --shards 4 --cells-per-shard 500
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .schema import CLS_TOKEN_ID, CLS_VALUE, EXPRESSION_SCHEMA, FIRST_GENE_TOKEN_ID, GENE_METADATA_SCHEMA

DRUGS = ("DMSO_TF", "Bortezomib", "Trametinib", "Paclitaxel", "Staurosporine")
CELL_LINES = ("CVCL_0023", "CVCL_0031", "CVCL_0292", "CVCL_1056")


def gene_metadata_table(num_genes: int) -> pa.Table:
    """A `gene_metadata` table with token ids from 3, made-up Ensembl ids and symbols."""
    token_ids = np.arange(FIRST_GENE_TOKEN_ID, FIRST_GENE_TOKEN_ID + num_genes)
    return pa.table(
        [
            pa.array(token_ids, pa.int64()),
            pa.array([f"ENSG{i:011d}" for i in token_ids]),
            pa.array([f"GENE{i}" for i in token_ids]),
        ],
        schema=GENE_METADATA_SCHEMA,
    )


def expression_table(
    num_cells: int,
    num_genes: int,
    rng: np.random.Generator,
    *,
    plate: str = "plate1",
    expressed_range: tuple[int, int] = (300, 5500),
) -> pa.Table:
    """`num_cells` rows of `expression_data` drawn from a gene vocabulary of `num_genes` ids."""
    popularity = 1.0 / np.arange(1, num_genes + 1) ** 0.8  # a few genes are in most cells, most in few
    popularity = rng.permutation(popularity / popularity.sum())
    low, high = expressed_range[0], min(expressed_range[1], num_genes)
    genes, expressions = [], []
    for size in np.exp(rng.uniform(np.log(min(low, high)), np.log(high), num_cells)).astype(int):
        chosen = np.sort(rng.choice(num_genes, size, replace=False, p=popularity)) + FIRST_GENE_TOKEN_ID
        counts = np.minimum(rng.zipf(2.2, size), 5000).astype(np.float32)
        genes.append(np.concatenate([[CLS_TOKEN_ID], chosen]))
        expressions.append(np.concatenate([[CLS_VALUE], counts]).astype(np.float32))
    drug = rng.choice(DRUGS, num_cells)
    cell_line = rng.choice(CELL_LINES, num_cells)
    sample = [f"smp_{d}_{c}" for d, c in zip(drug, cell_line)]
    columns = {
        "genes": pa.array(genes, pa.list_(pa.int64())),
        "expressions": pa.array(expressions, pa.list_(pa.float32())),
        "drug": pa.array(drug),
        "sample": pa.array(sample),
        "BARCODE_SUB_LIB_ID": pa.array([f"{plate}_{rng.integers(2**62):016x}" for _ in range(num_cells)]),
        "cell_line_id": pa.array(cell_line),
        "moa-fine": pa.array(["unclear" if d != "DMSO_TF" else "vehicle" for d in drug]),
        "canonical_smiles": pa.array(["C" if d != "DMSO_TF" else "CS(C)=O" for d in drug]),
        "pubchem_cid": pa.array(["1923.0" if d != "DMSO_TF" else "679.0" for d in drug]),
        "plate": pa.array([plate] * num_cells),
    }
    return pa.table([columns[name] for name in EXPRESSION_SCHEMA.names], schema=EXPRESSION_SCHEMA)


def write_tahoe_fixture(
    root: str | Path,
    *,
    num_shards: int = 3,
    cells_per_shard: int = 64,
    num_genes: int = 8000,
    num_plates: int = 3,
    expressed_range: tuple[int, int] = (300, 5500),
    row_group_size: int | None = None,
    seed: int = 0,
) -> list[Path]:
    """Write `root/data/train-XXXXX-of-NNNNN.parquet` and `root/metadata/gene_metadata.parquet` (Hub layout).

    Shard i holds cells of plate `i % num_plates + 1`, in row groups of `row_group_size` cells (one row group when
    None). Returns the shard paths.
    """
    root = Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    pq.write_table(gene_metadata_table(num_genes), root / "metadata" / "gene_metadata.parquet")
    rng = np.random.default_rng(seed)
    shards = []
    for i in range(num_shards):
        table = expression_table(
            cells_per_shard, num_genes, rng, plate=f"plate{i % num_plates + 1}", expressed_range=expressed_range
        )
        path = root / "data" / f"train-{i:05d}-of-{num_shards:05d}.parquet"
        pq.write_table(table, path, row_group_size=row_group_size)
        shards.append(path)
    return shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--cells-per-shard", type=int, default=64)
    parser.add_argument("--genes", type=int, default=8000, help="size of the gene vocabulary")
    parser.add_argument("--plates", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shards = write_tahoe_fixture(
        args.root,
        num_shards=args.shards,
        cells_per_shard=args.cells_per_shard,
        num_genes=args.genes,
        num_plates=args.plates,
        seed=args.seed,
    )
    print(f"wrote {len(shards)} shards to {args.root / 'data'}")


if __name__ == "__main__":
    main()
