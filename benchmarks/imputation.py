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
import torch
from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dataset_scripts import RankDiffusionCollator, full_cell_tokens  # noqa: E402
from metrics import GlobalMarginal, NearestCells  # noqa: E402
from metrics.imputation import keep_point_metrics, load_metric, one_hot, score_masked  # noqa: E402
from modeling import CellInputs, CellTokenizer  # noqa: E402
from pipelines import MaskedRankDiffusionPipeline  # noqa: E402
from train_hf import prepare_data  # noqa: E402
from training import DataArguments  # noqa: E402

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


def held_out_cells(data, num_bins: int, max_length: int) -> dict[str, torch.Tensor]:
    """The held-out cells as panel sequences, padded: `gene_ids`, `input_ids` (true tokens), `attention_mask`."""
    tokenizer = CellTokenizer(num_bins=num_bins, max_length=max_length, panel=data.panel)
    return RankDiffusionCollator(tokenizer, rule="panel")(list(data.eval_rows))


def predict_model(model, cells: CellInputs, batch_size: int = 32) -> torch.Tensor:
    parts = [
        model.predictive_distribution(cells.rows(slice(i, i + batch_size))) for i in range(0, len(cells), batch_size)
    ]
    return torch.cat([torch.nn.functional.pad(p, (0, 0, 0, cells.gene_ids.shape[1] - p.shape[1])) for p in parts])


def plot_metrics(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = {
        "nll_all": "NLL, nats per masked gene (lower is better)",
        "mae_all": "MAE of the expected rank, bins (lower is better)",
        "spearman_all": "Spearman of expected vs true rank, per cell",
        "accuracy_all": "accuracy of the most likely rank",
        "coverage_90_all": "coverage of the 90% interval",
        "ece_all": "calibration error, ECE (lower is better)",
    }
    figure, axes = plt.subplots(2, 3, figsize=(13, 7))
    for axis, key in zip(axes.ravel(), panels):
        for method, by_ratio in results.items():
            ratios = [float(r) for r in by_ratio if key in by_ratio[r]]
            if ratios:
                axis.plot(ratios, [by_ratio[str(r)][key] for r in ratios], marker="o", label=method)
        if key == "coverage_90_all":
            axis.axhline(0.9, color="grey", linestyle=":", label="nominal")
        axis.set_xlabel("share of genes masked")
        axis.set_title(panels[key], fontsize=10)
        axis.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    figure.suptitle("Held-out cells, masked positions only")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def evaluate_checkpoint(bench_args: BenchmarkArguments, data_args: DataArguments) -> tuple[dict, int, str]:
    """Scores per method and mask ratio (`results[method][str(ratio)]`), the number of held-out cells, and the
    data source's name."""
    pipe = MaskedRankDiffusionPipeline.from_pretrained(bench_args.checkpoint, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    model, scheduler = pipe.model.eval(), pipe.scheduler
    num_bins, mask_id = model.config.num_rank_bins, scheduler.config.mask_token_id
    data_args.max_length = model.config.max_length
    data = prepare_data(data_args, num_bins)
    baselines = {
        "per-gene marginal": data.baseline,
        "global marginal": GlobalMarginal(data.baseline, data.panel),
        f"nearest cells (k={bench_args.neighbours})": NearestCells(
            full_cell_tokens(data.train_rows, num_bins, data_args.baseline_cells),
            data.baseline,
            k=bench_args.neighbours,
        ),
    }
    batch = held_out_cells(data, num_bins, data_args.max_length)
    truth, real = batch["input_ids"], batch["attention_mask"].bool()
    metric = load_metric()
    results: dict[str, dict[str, dict]] = {}
    for i, ratio in enumerate(bench_args.mask_ratios):
        generator = torch.Generator().manual_seed(bench_args.seed + i)
        masked = scheduler.random_mask(real, ratio, generator=generator)
        cells = CellInputs(batch["gene_ids"], truth.masked_fill(masked, mask_id), masked, real)
        predictions = {"RankDiT, one pass": predict_model(model, cells)}
        if bench_args.sample_steps:
            sampled = pipe(
                gene_ids=[g[r].tolist() for g, r in zip(cells.gene_ids, real)],
                ranks=[t[r].tolist() for t, r in zip(truth, real)],
                mask=[m[r].tolist() for m, r in zip(masked, real)],
                num_inference_steps=bench_args.sample_steps,
                generator=generator,
            ).ranks
            predictions[f"RankDiT, sampled ({bench_args.sample_steps} steps)"] = one_hot(
                torch.from_numpy(sampled), num_bins + 1
            )
        for name, baseline in baselines.items():
            predictions[name] = baseline.predict(cells.gene_ids, cells.ranks, real, mask_id)
        for name, probs in predictions.items():
            scores = score_masked(metric, probs, truth, masked)
            if "sampled" in name:
                scores = keep_point_metrics(scores)
            results.setdefault(name, {})[str(ratio)] = scores
        print(f"mask ratio {ratio}: {int(masked.sum())} masked positions in {len(truth)} cells", file=sys.stderr)
    return results, len(truth), data.source.name


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
    plot_metrics(results, plot)
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
