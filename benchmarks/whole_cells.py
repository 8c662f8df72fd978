"""Whole cells through the pipeline: raw counts in, tokens made by the pipeline, against the training rule's tokens.

A user passes whole cells (every expressed gene, any number of them) with their raw counts and a mask; the pipeline
bins each cell's *visible* counts (the masked ones must not shape them) and shows cells longer than the model's
length in windows of random genes. The training rule bins the whole cell, masked genes included. This benchmark
scores both on the same test cells, masks and windows through the public `pipe(...)` call (one denoiser pass,
masked positions only), each against the true tokens on its own scale: the training rule's tokens for the ranks
path, the masked counts binned by the visible counts' edges (`rank_tokens(..., reference=visible)`) for the counts
path, which is what the pipeline's visible tokens mean:

    python benchmarks/whole_cells.py --checkpoint outputs/demo --output benchmarks/results/whole_cells.json

The data is the checkpoint's own, rebuilt from its `run_config.json` (`--data` if it has moved).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dataset_scripts import cell_counts  # noqa: E402
from dataset_scripts.schema import CONTEXT_COLUMN  # noqa: E402
from metrics.imputation import masked_nll  # noqa: E402
from modeling import rank_tokens  # noqa: E402
from pipelines import MaskedRankDiffusionPipeline  # noqa: E402
from training.data import prepare_run_data  # noqa: E402


@dataclass
class WholeCellArguments:
    checkpoint: str = field(default="outputs/demo", metadata={"help": "a train_hf.py output folder"})
    data: str | None = field(default=None, metadata={"help": "the run's data, where it lies now (if it moved)"})
    mask_ratio: float = field(default=0.5, metadata={"help": "share of each cell's genes masked"})
    min_genes: int = field(
        default=1500, metadata={"help": "cells with at least this many genes are also scored apart"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the masks"})
    output: str = field(default="benchmarks/results/whole_cells.json")


def nll_over(probs: np.ndarray, tokens: list[np.ndarray], masks: list[np.ndarray], cells: list[int]) -> float:
    """Masked NLL ([`masked_nll`]) of the true `tokens` over the masked positions of `cells`."""
    width = probs.shape[1]
    truth = torch.tensor(np.stack([np.pad(tokens[i], (0, width - len(tokens[i]))) for i in cells]))
    masked = torch.tensor(np.stack([np.pad(masks[i], (0, width - len(masks[i]))) for i in cells]))
    return masked_nll(torch.from_numpy(probs[cells]), truth, masked)


@dataclass
class MaskedCells:
    """Whole test cells with a mask each, and the true tokens on each path's scale."""

    genes: list[np.ndarray] = field(default_factory=list)
    counts: list[np.ndarray] = field(default_factory=list)
    contexts: list[np.ndarray] = field(default_factory=list)  # counts of genes the model lacks
    masks: list[np.ndarray] = field(default_factory=list)
    tokens: list[np.ndarray] = field(default_factory=list)  # the training rule: the whole cell, masked genes too
    visible_scale: list[np.ndarray] = field(default_factory=list)  # binned by the visible counts' edges


def masked_cells(rows, num_bins: int, mask_ratio: float, seed: int) -> MaskedCells:
    """Every cell of `rows` with `mask_ratio` of its genes masked at random (seeded), and its true tokens."""
    rng = np.random.default_rng(seed)
    cells = MaskedCells()
    for row in rows:
        genes, counts = cell_counts(row)
        context = np.asarray(row.get(CONTEXT_COLUMN) or [], dtype=np.float64)
        mask = np.zeros(len(genes), dtype=bool)
        mask[rng.choice(len(genes), round(mask_ratio * len(genes)), replace=False)] = True
        cells.genes.append(genes)
        cells.counts.append(counts)
        cells.contexts.append(context)
        cells.masks.append(mask)
        cells.tokens.append(rank_tokens(counts, num_bins, context=context))
        visible = np.concatenate([counts[~mask], context])
        cells.visible_scale.append(rank_tokens(counts, num_bins, reference=visible))
    return cells


def print_table(rows: dict, mask_ratio: float, max_length: int, checkpoint: str) -> None:
    print(f"\nWhole test cells, {mask_ratio:.0%} of each cell's genes masked, model length {max_length} "
          f"({checkpoint})\n")  # fmt: skip
    print("| cells | n | median genes | max genes | NLL through counts | NLL through the training rule | gap |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        print(f"| {name} | {row['cells']} | {row['median_genes']:.0f} | {row['max_genes']} | "
              f"{row['nll_through_counts']:.3f} | {row['nll_through_training_ranks']:.3f} | "
              f"{100 * row['relative_gap']:+.1f}% |")  # fmt: skip


def main() -> None:
    (args,) = HfArgumentParser(WholeCellArguments).parse_args_into_dataclasses()
    pipe = MaskedRankDiffusionPipeline.from_pretrained(args.checkpoint, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    data = prepare_run_data(args.checkpoint, args.data)
    cells = masked_cells(data.test_rows, pipe.model.config.num_rank_bins, args.mask_ratio, args.seed)
    start = time.time()
    through_counts = pipe(
        gene_ids=cells.genes,
        counts=[np.where(m, np.nan, c) for c, m in zip(cells.counts, cells.masks)],
        mask=cells.masks,
        context_counts=cells.contexts,
        output_type="probs",
    ).probs
    counts_seconds = time.time() - start
    through_ranks = pipe(gene_ids=cells.genes, ranks=cells.tokens, mask=cells.masks, output_type="probs").probs
    sizes = np.array([len(g) for g in cells.genes])
    groups = {
        "all test cells": list(range(len(sizes))),
        f">= {args.min_genes} genes": np.flatnonzero(sizes >= args.min_genes).tolist(),
    }
    rows = {}
    for name, group in groups.items():
        if not group:
            continue
        counts_nll = nll_over(through_counts, cells.visible_scale, cells.masks, group)
        ranks_nll = nll_over(through_ranks, cells.tokens, cells.masks, group)
        rows[name] = {
            "cells": len(group),
            "median_genes": float(np.median(sizes[group])),
            "max_genes": int(sizes[group].max()),
            "masked_positions": int(sum(cells.masks[i].sum() for i in group)),
            "nll_through_counts": counts_nll,
            "nll_through_training_ranks": ranks_nll,
            "relative_gap": counts_nll / ranks_nll - 1,
        }
    print_table(rows, args.mask_ratio, pipe.model.config.max_length, args.checkpoint)
    record = {
        "checkpoint": args.checkpoint,
        "mask_ratio": args.mask_ratio,
        "results": rows,
        "seconds_through_counts": round(counts_seconds, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
