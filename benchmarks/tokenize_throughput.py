"""Tokenization throughput of the streaming builder vs a per-cell reference, and its peak memory.

Both read the same fixture shards in the Tahoe-100M schema (Tahoe-like cells, ~2,000 expressed genes each) and
produce the same sequences (checked on the first cells):

- builder: `Tahoe100MTokenized(...).as_streaming_dataset("train")`, iterated as Arrow batches;
- per-cell: parquet batches -> Python rows -> `CellTokenizer` on each cell (a sort and a bucketize per cell).

Peak memory (resident memory of a fresh process, sampled after every batch) is measured streaming N and 10 N
cells through the builder: it must stay flat. Prints a markdown table and writes JSON.

    python benchmarks/tokenize_throughput.py --cells 2000 --output benchmarks/results/tokenize_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dataset_scripts import cell_counts  # noqa: E402
from dataset_scripts.fixtures import write_tahoe_fixture  # noqa: E402
from dataset_scripts.tahoe_100m_tokenized import Tahoe100MTokenized  # noqa: E402
from modeling import CellTokenizer  # noqa: E402

NUM_GENES = 20_000
EXPRESSED = (1500, 2700)  # log-uniform: ~2,000 expressed genes per cell


def make_fixture(root: Path, cells: int, cells_per_shard: int = 500) -> None:
    write_tahoe_fixture(
        root,
        num_shards=max(cells // cells_per_shard, 1),
        cells_per_shard=min(cells, cells_per_shard),
        num_genes=NUM_GENES,
        expressed_range=EXPRESSED,
        row_group_size=250,
    )


def builder_stream(root: Path, cache: Path, max_length: int):
    builder = Tahoe100MTokenized(
        data_dir=str(root), cache_dir=str(cache), max_length=max_length, validation_share=0.0, test_share=0.0
    )
    return builder.as_streaming_dataset(split="train").with_format("arrow")


def rss_mib() -> float:
    """Resident memory of this process now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_builder(root: Path, cache: Path, max_length: int) -> tuple[int, float, float]:
    """Stream every cell; returns (cells, seconds, peak resident MiB sampled after each batch)."""
    start, cells, peak = time.perf_counter(), 0, rss_mib()
    for table in builder_stream(root, cache, max_length).iter(batch_size=256):
        cells += table.num_rows
        peak = max(peak, rss_mib())
    return cells, time.perf_counter() - start, peak


def run_per_cell(root: Path, max_length: int) -> tuple[int, float]:
    tokenizer = CellTokenizer(max_length=max_length)
    start, cells = time.perf_counter(), 0
    for path in sorted((root / "data").glob("*.parquet")):
        for batch in pq.ParquetFile(path).iter_batches(256):
            for row in batch.to_pylist():
                genes, counts = cell_counts(row)
                tokenizer(genes, counts, cell_id=row["BARCODE_SUB_LIB_ID"], rule="expressed")
                cells += 1
    return cells, time.perf_counter() - start


def check_same_output(root: Path, cache: Path, max_length: int, n: int = 20) -> None:
    tokenizer = CellTokenizer(max_length=max_length)
    files = sorted((root / "data").glob("*.parquet"))  # a shard reads several files side by side, shuffled
    raw = {r["BARCODE_SUB_LIB_ID"]: r for file in files for r in pq.read_table(file).to_pylist()}
    table = next(builder_stream(root, cache, max_length).iter(batch_size=n))
    for row in table.to_pylist():
        source = raw[row["BARCODE_SUB_LIB_ID"]]
        genes, tokens = tokenizer(*cell_counts(source), cell_id=row["BARCODE_SUB_LIB_ID"], rule="expressed")
        assert row["gene_ids"] == genes.tolist() and row["input_ids"] == tokens.tolist(), "outputs differ"


def peak_rss_mib(root: Path, cache: Path, max_length: int) -> float:
    """Peak resident memory while a fresh process streams every cell of `root` through the builder."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path;"
        "from benchmarks.tokenize_throughput import run_builder;"
        "print(run_builder(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))[2])"
    )
    repo = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run(
        [sys.executable, "-c", code, repo, str(root), str(cache), str(max_length)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=2000, help="cells in the throughput run (10x for memory)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/tokenize_throughput.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        small, large, cache = Path(tmp, "small"), Path(tmp, "large"), Path(tmp, "cache")
        make_fixture(small, args.cells)
        check_same_output(small, cache, args.max_length)
        genes = np.mean([len(g) - 1 for g in pq.read_table(small / "data", columns=["genes"])["genes"].to_pylist()])
        builder_cells, builder_seconds, _ = run_builder(small, cache, args.max_length)
        reference_cells, reference_seconds = run_per_cell(small, args.max_length)
        make_fixture(large, 10 * args.cells)
        memory = {
            "1x": peak_rss_mib(small, cache, args.max_length),
            "10x": peak_rss_mib(large, cache, args.max_length),
        }

    rows = {
        "builder (vectorised)": builder_cells / builder_seconds,
        "per-cell reference": reference_cells / reference_seconds,
    }
    print(f"{args.cells} cells, {genes:.0f} expressed genes per cell on average, L = {args.max_length}, 1 process\n")
    print("| implementation | cells / s | speed-up |\n| --- | --- | --- |")
    for name, rate in rows.items():
        print(f"| {name} | {rate:,.0f} | {rate / rows['per-cell reference']:.2f}x |")
    large = 10 * args.cells
    print(f"\npeak RSS streaming {args.cells} cells: {memory['1x']:.0f} MiB; {large} cells: {memory['10x']:.0f} MiB")
    result = {
        "cells": args.cells,
        "mean_expressed_genes": float(genes),
        "max_length": args.max_length,
        "cells_per_second": rows,
        "speedup": rows["builder (vectorised)"] / rows["per-cell reference"],
        "peak_rss_mib": memory,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
