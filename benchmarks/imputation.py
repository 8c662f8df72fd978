"""Imputation on held-out cells: a trained RankDiT beside the baselines, on identical masks.

For mask ratios 0.2 / 0.5 / 0.8 / 0.95 of each held-out cell's panel genes (the evaluation panel is chosen on the
training split, so being in a sequence leaks nothing), it scores, on masked positions only:

- RankDiT, one pass: the model's predictive distribution given the visible genes;
- RankDiT, sampled: one draw per masked gene from the pipeline (point metrics only);
- per-gene marginal, global marginal and k nearest training cells (on the visible genes).

The data flags are train_hf.py's (`--data`, `--validation_share`, `--split_seed`, ...): give the ones the
checkpoint was trained with, so the held-out cells, the panel and the baselines' training cells are the same.
Prints markdown tables, writes JSON and a plot of each metric against the mask ratio.

    python benchmarks/imputation.py --checkpoint outputs/demo --output benchmarks/results/imputation.json
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
from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from metrics.imputation import compare_on_masks  # noqa: E402
from pipelines import MaskedRankDiffusionPipeline  # noqa: E402
from train_hf import prepare_data  # noqa: E402
from training import DataArguments  # noqa: E402
from training.plots import plot_metrics_vs_mask_ratio  # noqa: E402

COLUMNS = {  # metric key -> table header
    "nll_all": "NLL",
    "nll_nonzero": "NLL (expressed)",
    "accuracy_all": "accuracy",
    "within_one_all": "within 1 bin",
    "mae_all": "MAE (bins)",
    "spearman_all": "Spearman / cell",
    "coverage_50_all": "50% cover",
    "coverage_90_all": "90% cover",
    "ece_all": "ECE",
}


@dataclass
class BenchmarkArguments:
    checkpoint: str = field(default="outputs/demo", metadata={"help": "a train_hf.py output folder"})
    mask_ratios: list[float] = field(default_factory=lambda: [0.2, 0.5, 0.8, 0.95])
    sample_steps: int = field(default=16, metadata={"help": "denoising steps of the sampled imputation (0: skip)"})
    neighbours: int = field(default=15, metadata={"help": "k of the nearest-cells baseline"})
    seed: int = field(default=0, metadata={"help": "seed of the masks and the draws"})
    output: str = field(default="benchmarks/results/imputation.json")
    plot: str | None = field(default=None, metadata={"help": "PNG of metrics vs mask ratio (default: beside output)"})


def evaluate_checkpoint(bench_args: BenchmarkArguments, data_args: DataArguments) -> tuple[dict, int, str]:
    """Scores per method and mask ratio (`results[method][str(ratio)]`), the number of held-out cells, and the
    data source's name."""
    pipe = MaskedRankDiffusionPipeline.from_pretrained(bench_args.checkpoint, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.model.eval()
    data_args.max_length = pipe.model.config.max_length
    data = prepare_data(data_args, pipe.model.config.num_rank_bins)
    cells = data.panel_cells(pipe.model.config.num_rank_bins, data_args.max_length)
    baselines = data.imputation_baselines(data_args.baseline_cells, bench_args.neighbours)
    results = compare_on_masks(
        pipe, cells, baselines, bench_args.mask_ratios, seed=bench_args.seed, sample_steps=bench_args.sample_steps
    )
    return results, len(cells["input_ids"]), data.source.name


def print_table(rows: dict[str, dict], title: str) -> None:
    """One markdown table: a row of `COLUMNS` scores per name."""
    print(f"\n{title}\n")
    print("| | " + " | ".join(COLUMNS.values()) + " |")
    print("| --- " * (len(COLUMNS) + 1) + "|")
    for name, scores in rows.items():
        cells_text = [f"{scores[k]:.3f}" if k in scores and np.isfinite(scores[k]) else "-" for k in COLUMNS]
        print(f"| {name} | " + " | ".join(cells_text) + " |")


def main() -> None:
    bench_args, data_args = HfArgumentParser((BenchmarkArguments, DataArguments)).parse_args_into_dataclasses()
    results, n_cells, data_name = evaluate_checkpoint(bench_args, data_args)
    for ratio in bench_args.mask_ratios:
        positions = next(iter(results.values()))[str(ratio)]["positions_all"]
        rows = {name: by_ratio[str(ratio)] for name, by_ratio in results.items()}
        print_table(rows, f"Mask ratio {ratio} ({positions} masked positions of {n_cells} held-out cells)")

    output = Path(bench_args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    plot = Path(bench_args.plot) if bench_args.plot else output.with_suffix(".png")
    plot_metrics_vs_mask_ratio(results, plot)
    record = {
        "checkpoint": bench_args.checkpoint,
        "data": data_name,
        "held_out_cells": n_cells,
        "mask_ratios": bench_args.mask_ratios,
        "results": results,
        "plot": str(plot),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
