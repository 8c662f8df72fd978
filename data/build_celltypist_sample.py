"""Convert the real cells shipped in the `celltypist` wheel into a Tahoe-100M-schema parquet sample.

The `celltypist` wheel (MIT licence) carries `sample_cell_by_gene.csv` (559 cells, raw UMI counts, gene symbols)
and `GENCODEv44_Gene_id2name.csv` (Ensembl id <-> symbol). This script writes, under `data/celltypist_sample/`,
the layout of the Hub dataset `tahoebio/Tahoe-100M`:

    data/train-00000-of-00001.parquet   `expression_data` schema, position-0 marker included
    metadata/gene_metadata.parquet      `gene_metadata` schema (token_id, ensembl_id, gene_symbol)

The gene vocabulary is GENCODE v44 in Ensembl-id order with token ids from 3 (0, 1, 2 are `<pad>`, `<cls>`,
`<eoc>`), the same construction as Tahoe-100M's own `gene_metadata`, but not its exact ids. Symbols that GENCODE v44
does not know are left out and counted in the summary; a symbol with several Ensembl ids maps to the first one.

Usage:
    python data/build_celltypist_sample.py              # downloads the wheel with pip (registry only)
    python data/build_celltypist_sample.py --wheel celltypist-1.7.1-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not
from dataset_scripts.schema import (  # noqa: E402
    CLS_TOKEN_ID,
    CLS_VALUE,
    EXPRESSION_SCHEMA,
    FIRST_GENE_TOKEN_ID,
    GENE_METADATA_SCHEMA,
)

CELLTYPIST_VERSION = "1.7.1"
COUNTS_MEMBER = "celltypist/data/samples/sample_cell_by_gene.csv"
GENCODE_MEMBER = "celltypist/data/samples/GENCODEv44_Gene_id2name.csv"


def download_wheel(directory: Path) -> Path:
    """Fetch the celltypist wheel (no dependencies) from the package registry into `directory`."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
        + ["-d", str(directory), f"celltypist=={CELLTYPIST_VERSION}"],
        check=True,
    )
    return next(directory.glob("celltypist-*.whl"))


def build_gene_metadata(gencode_csv: bytes) -> pa.Table:
    """GENCODE id<->name table -> `gene_metadata` with token ids in Ensembl-id order."""
    table = pacsv.read_csv(
        io.BytesIO(gencode_csv),
        read_options=pacsv.ReadOptions(column_names=["ensembl_id", "gene_symbol"]),
    )
    table = table.sort_by("ensembl_id")
    token_ids = pa.array(np.arange(FIRST_GENE_TOKEN_ID, FIRST_GENE_TOKEN_ID + table.num_rows), pa.int64())
    return pa.table([token_ids, table["ensembl_id"], table["gene_symbol"]], schema=GENE_METADATA_SCHEMA)


def build_expression_data(counts_csv: bytes, gene_metadata: pa.Table) -> tuple[pa.Table, dict]:
    """Cell-by-gene CSV (first column: cell name) -> `expression_data` rows with the position-0 marker."""
    counts = pacsv.read_csv(io.BytesIO(counts_csv))
    cell_names = counts.column(0).to_pylist()
    symbols = counts.column_names[1:]
    matrix = np.column_stack([counts.column(i).to_numpy() for i in range(1, counts.num_columns)])
    rounded = np.rint(matrix)
    if np.abs(matrix - rounded).max() > 1e-6 or rounded.min() < 0:
        raise ValueError(f"{COUNTS_MEMBER} does not hold non-negative integer counts")

    symbol_to_token: dict[str, int] = {}
    for token_id, symbol in zip(gene_metadata["token_id"].to_pylist(), gene_metadata["gene_symbol"].to_pylist()):
        symbol_to_token.setdefault(symbol, token_id)  # Ensembl-id order: the first id wins
    column_tokens = np.array([symbol_to_token.get(s, -1) for s in symbols])
    matched = column_tokens >= 0
    order = np.argsort(column_tokens[matched], kind="stable")
    tokens_sorted = column_tokens[matched][order]
    values_sorted = rounded[:, matched][:, order].astype(np.float32)

    genes, expressions = [], []
    for row in values_sorted:
        expressed = row > 0
        genes.append([CLS_TOKEN_ID] + tokens_sorted[expressed].tolist())
        expressions.append([CLS_VALUE] + row[expressed].tolist())
    n = len(cell_names)
    columns = {name: pa.nulls(n, pa.string()) for name in EXPRESSION_SCHEMA.names}
    columns.update(
        genes=pa.array(genes, pa.list_(pa.int64())),
        expressions=pa.array(expressions, pa.list_(pa.float32())),
        BARCODE_SUB_LIB_ID=pa.array([f"celltypist_sample_{name}" for name in cell_names], pa.string()),
    )
    table = pa.table([columns[name] for name in EXPRESSION_SCHEMA.names], schema=EXPRESSION_SCHEMA)
    summary = {
        "cells": n,
        "genes_in_csv": len(symbols),
        "genes_matched_to_gencode_v44": int(matched.sum()),
        "share_of_counts_matched": float(rounded[:, matched].sum() / rounded.sum()),
        "median_expressed_genes_per_cell": float(np.median((values_sorted > 0).sum(axis=1))),
    }
    return table, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", type=Path, help="a local celltypist wheel; downloaded with pip when omitted")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "celltypist_sample")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or download_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            gencode_csv = archive.read(GENCODE_MEMBER)
            counts_csv = archive.read(COUNTS_MEMBER)

    gene_metadata = build_gene_metadata(gencode_csv)
    expression_data, summary = build_expression_data(counts_csv, gene_metadata)
    (args.output / "data").mkdir(parents=True, exist_ok=True)
    (args.output / "metadata").mkdir(parents=True, exist_ok=True)
    pq.write_table(expression_data, args.output / "data" / "train-00000-of-00001.parquet", compression="zstd")
    pq.write_table(gene_metadata, args.output / "metadata" / "gene_metadata.parquet", compression="zstd")
    summary["source"] = f"celltypist {CELLTYPIST_VERSION} ({Path(wheel).name})"
    (args.output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
