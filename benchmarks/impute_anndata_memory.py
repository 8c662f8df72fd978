"""Peak memory of `pipe.impute_anndata` on a large sparse AnnData, taken through the public call.

A synthetic table of raw counts in CSR (default 10,000 cells x 20,000 genes, a few hundred expressed genes per cell,
counts mostly 1 as in Tahoe-100M), a fresh tiny RankDiT whose vocabulary holds every gene, and NaN at a share of the
cells for a panel of requested genes. Prints a table and writes JSON with the process's peak resident memory
before and after the call (the table and the model are in both), the call's time and the dense sizes it avoids.

    python benchmarks/impute_anndata_memory.py --output benchmarks/results/impute_anndata_memory.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import anndata
import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from modeling import GeneVocab, RankDiTConfig, RankDiTModel, RankDiTProcessor  # noqa: E402
from pipelines import MaskedRankDiffusionPipeline, MaskedRankDiffusionScheduler  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def synthetic_counts(cells: int, genes: int, expressed: int, seed: int = 0) -> sp.csr_matrix:
    """Raw counts in CSR: `expressed` genes per cell on average (more often the lower-numbered ones), counts
    1 + a geometric tail."""
    rng = np.random.default_rng(seed)
    per_cell = rng.poisson(expressed, cells)
    weights = 1.0 / np.arange(1, genes + 1) ** 0.5
    weights /= weights.sum()
    indptr = np.r_[0, np.cumsum(per_cell)]
    indices = np.concatenate([np.sort(rng.choice(genes, n, replace=False, p=weights)) for n in per_cell])
    data = (1 + rng.geometric(0.6, len(indices)) - 1).astype(np.float32)
    return sp.csr_matrix((data, indices, indptr), shape=(cells, genes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--expressed", type=int, default=600, help="expressed genes per cell, on average")
    parser.add_argument("--requested", type=int, default=50, help="genes with masked values")
    parser.add_argument("--masked_share", type=float, default=0.2, help="share of cells masked at those genes")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps of the sampled ranks")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/impute_anndata_memory.json"))
    args = parser.parse_args()

    counts = synthetic_counts(args.cells, args.genes, args.expressed)
    rng = np.random.default_rng(1)
    requested = rng.choice(args.genes, args.requested, replace=False)
    rows = np.flatnonzero(rng.random(args.cells) < args.masked_share)
    mask = sp.csr_matrix((np.ones(len(rows) * len(requested), dtype=bool),
                          (np.repeat(rows, len(requested)), np.tile(requested, len(rows)))),
                         shape=counts.shape)  # fmt: skip
    ids = np.arange(3, 3 + args.genes)
    vocab = GeneVocab(ids.tolist(), [f"ENSG{i:011d}" for i in ids], [f"G{i}" for i in ids])
    adata = anndata.AnnData(counts)
    adata.var_names = [f"G{i}" for i in ids]
    config = RankDiTConfig.from_preset("tiny", gene_vocab_size=vocab.size, max_length=1024)
    torch.manual_seed(0)
    pipe = MaskedRankDiffusionPipeline(
        model=RankDiTModel(config).eval(),
        scheduler=MaskedRankDiffusionScheduler(),
        processor=RankDiTProcessor.from_model_config(config, gene_vocab=vocab),
    )
    before = peak_rss_mib()
    start = time.perf_counter()
    result = pipe.impute_anndata(adata, mask=mask, num_inference_steps=args.steps,
                                 generator=torch.Generator().manual_seed(0))  # fmt: skip
    seconds = time.perf_counter() - start
    after = peak_rss_mib()
    imputed = int((result.layers["rankdiff_ranks"] >= 0).sum())
    record = {
        "cells": args.cells,
        "genes": args.genes,
        "stored_counts": int(counts.nnz),
        "requested_genes": args.requested,
        "masked_entries": int(mask.nnz),
        "imputed_entries": imputed,
        "peak_rss_mib_before_call": round(before, 1),
        "peak_rss_mib": round(after, 1),
        "seconds": round(seconds, 1),
        "dense_float64_counts_mib": round(args.cells * args.genes * 8 / 2**20, 1),
        "dense_probs_all_genes_mib": round(args.cells * args.genes * config.num_rank_tokens * 4 / 2**20, 1),
        "machine": f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
    }
    print("| measure | value |\n| --- | --- |")
    for key, value in record.items():
        print(f"| {key} | {value} |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
