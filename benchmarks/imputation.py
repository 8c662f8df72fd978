"""Imputation on held-out cells: a trained RankDiT beside the baselines, on identical masks, masked positions only.

For each evaluation panel (the training panel, highly variable genes, a random panel of detected genes; all chosen on
training cells) and mask ratio (0.2 / 0.5 / 0.8 / 0.95 of each cell's panel genes), it scores:

- RankDiT, one pass: the model's predictive distribution given the visible genes;
- RankDiT, sampled: one draw per masked gene from the pipeline (point metrics only);
- the per-gene marginal; the cell-aware marginal (the per-gene marginal told which tokens the cell's visible genes
  use and how deep the cell is); nearest training cells on the visible genes; MAGIC (`magic-impute`); the nearest
  training cells' counts as Poisson rates on the cell's depth, read as its tokens (`NearestCellRates`).

Each baseline family's settings are chosen on validation cells; the numbers are reported on test cells
(`--split test`, the default). The data is the checkpoint's own, rebuilt from the recipe the run saved
(`run_config.json`): the same splits, panels and baselines' training cells (`--data` if the data has moved). Prints
markdown tables, writes JSON and a plot of each metric against the mask ratio.

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
from metrics.imputation import MODEL_METHOD, strongest_baseline  # noqa: E402
from pipelines import MaskedRankDiffusionPipeline  # noqa: E402
from training.data import PANELS, prepare_run_data  # noqa: E402
from training.evaluation import imputation_report  # noqa: E402
from training.plots import plot_metrics_vs_mask_ratio  # noqa: E402

COLUMNS = {  # metric key -> table header
    "nll_all": "NLL",
    "nll_nonzero": "NLL (expressed)",
    "accuracy_all": "accuracy",
    "mae_level_all": "MAE (levels)",
    "within_one_level_all": "within 1 level",
    "spearman_level_all": "Spearman / cell (levels)",
    "spearman_all": "Spearman / cell (tokens)",
    "coverage_90_all": "90% cover",
    "ece_all": "ECE",
}


@dataclass
class BenchmarkArguments:
    checkpoint: str = field(default="outputs/demo", metadata={"help": "a train_hf.py output folder"})
    data: str | None = field(default=None, metadata={"help": "the run's data, where it lies now (if it moved)"})
    split: str = field(default="test", metadata={"help": "held-out cells to score: test (reported) or validation"})
    panels: list[str] = field(default_factory=lambda: list(PANELS), metadata={"help": f"some of {PANELS}"})
    mask_ratios: list[float] = field(default_factory=lambda: [0.2, 0.5, 0.8, 0.95])
    sample_steps: int = field(default=16, metadata={"help": "denoising steps of the sampled imputation (0: skip)"})
    seed: int = field(default=0, metadata={"help": "seed of the masks and the draws"})
    output: str = field(default="benchmarks/results/imputation.json")
    plot: str | None = field(default=None, metadata={"help": "PNG of metrics vs mask ratio (default: beside output)"})


def evaluate_checkpoint(bench_args: BenchmarkArguments) -> dict:
    """Score a checkpoint and the baselines ([`imputation_report`]), with the checkpoint's own data split."""
    pipe = MaskedRankDiffusionPipeline.from_pretrained(bench_args.checkpoint, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.model.eval()
    data = prepare_run_data(bench_args.checkpoint, bench_args.data)
    record = imputation_report(
        pipe,
        data,
        split=bench_args.split,
        panels=bench_args.panels,
        mask_ratios=bench_args.mask_ratios,
        seed=bench_args.seed,
        sample_steps=bench_args.sample_steps,
    )
    return {"checkpoint": bench_args.checkpoint, **record}


def print_table(rows: dict[str, dict], title: str, columns: dict[str, str] = COLUMNS) -> None:
    """One markdown table: a row of `columns` scores per name; the best of each column in bold."""
    print(f"\n{title}\n")
    print("| | " + " | ".join(columns.values()) + " |")
    print("| --- " * (len(columns) + 1) + "|")
    for name, scores in rows.items():
        cells_text = [f"{scores[k]:.3f}" if k in scores and np.isfinite(scores[k]) else "-" for k in columns]
        print(f"| {name} | " + " | ".join(cells_text) + " |")


def headline(results: dict[str, dict], ratio: float) -> str:
    """Model NLL against the strongest baseline's at one ratio, per panel."""
    parts = []
    for panel, by_method in results.items():
        name, nll = strongest_baseline(by_method, str(ratio))
        parts.append(f"{panel}: {by_method[MODEL_METHOD][str(ratio)]['nll_all']:.3f} vs {nll:.3f} ({name})")
    return "; ".join(parts)


def main() -> None:
    (bench_args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    start = time.time()
    record = evaluate_checkpoint(bench_args)
    for family, choice in record["baseline_choices"].items():
        print(f"{family}: chose {choice['chosen']} on validation cells")
    for panel, by_method in record["results"].items():
        for ratio in bench_args.mask_ratios:
            positions = by_method[MODEL_METHOD][str(ratio)]["positions_all"]
            rows = {name: by_ratio[str(ratio)] for name, by_ratio in by_method.items()}
            title = f"{panel}, mask ratio {ratio} ({positions} masked positions, {bench_args.split} cells)"
            print_table(rows, title)
    if 0.5 in bench_args.mask_ratios:
        print(f"\nMasked NLL at ratio 0.5, model vs best baseline: {headline(record['results'], 0.5)}")
    for panel, by_method in record["results"].items():
        times = {name: by_ratio[str(r)]["seconds_per_cell"] for name, by_ratio in by_method.items()
                 for r in bench_args.mask_ratios[:1] if "seconds_per_cell" in by_ratio.get(str(r), {})}  # fmt: skip
        print(f"{panel}, one pass at ratio {bench_args.mask_ratios[0]}, ms per cell: "
              + ", ".join(f"{name} {1000 * seconds:.1f}" for name, seconds in times.items()))  # fmt: skip

    output = Path(bench_args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    plot = Path(bench_args.plot) if bench_args.plot else output.with_suffix(".png")
    first_panel = next(iter(record["results"]))
    plot_metrics_vs_mask_ratio(record["results"][first_panel], plot)
    record.update(
        plot=str(plot),
        seconds=round(time.time() - start, 1),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        date=time.strftime("%Y-%m-%d"),
    )
    output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
