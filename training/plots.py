"""Figures of a training run for its model card: the data, the training curves and the test scores.

Each function draws one PNG with matplotlib's object API (no pyplot state, no GUI backend) and returns its path.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from metrics import PerGeneMarginal


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return Path(path)


def plot_count_histogram(counts: np.ndarray, num_cells: int, path: str | os.PathLike) -> Path:
    """Histogram of the non-zero raw counts of `num_cells` training cells, on log-log axes (counts span several
    decades and most are 1 or 2)."""
    counts = np.asarray(counts, dtype=np.float64)
    counts = counts[counts > 0]
    if not len(counts):
        raise ValueError("no non-zero counts to plot")
    figure = Figure(figsize=(6.4, 4.2))
    axis = figure.subplots()
    edges = np.unique(np.round(np.logspace(0, np.log10(counts.max() + 1), 40)))
    axis.hist(counts, bins=np.r_[edges, edges[-1] + 1] - 0.5, color="#4c72b0")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("raw count of an expressed gene (UMIs)")
    axis.set_ylabel("number of (cell, gene) pairs")
    share_one = np.mean(counts == 1)
    axis.set_title(
        f"Counts of expressed genes in {num_cells:,} training cells\n"
        f"{len(counts):,} non-zero counts, {share_one:.0%} of them equal to 1, median {np.median(counts):g}",
        fontsize=10,
    )
    axis.grid(alpha=0.3, which="both")
    return _save(figure, path)


def plot_rank_token_distribution(baseline: PerGeneMarginal, panel: np.ndarray, path: str | os.PathLike) -> Path:
    """Share of each rank token among the expressed genes of the training cells, and on the evaluation panel
    (where token 0, not expressed, is most of what a model must predict)."""
    num_bins = baseline.num_rank_bins
    expressed = baseline.nonzero_counts[:, 1:].sum(axis=0)
    on_panel = baseline.nonzero_counts[panel].sum(axis=0)
    on_panel[0] = baseline.num_cells * len(panel) - on_panel[1:].sum()
    figure = Figure(figsize=(11, 4))
    left, right = figure.subplots(1, 2)
    tokens = np.arange(1, num_bins + 1)
    left.bar(tokens, expressed / expressed.sum(), color="#4c72b0", width=0.85)
    left.set_xlabel(f"rank token (1 = lowest count in the cell, {num_bins} = highest)")
    left.set_ylabel("share of expressed genes")
    left.set_title(f"Rank tokens of every expressed gene ({baseline.num_cells:,} training cells)", fontsize=10)
    shares = on_panel / on_panel.sum()
    right.bar(np.arange(num_bins + 1), shares, color=["#c44e52"] + ["#4c72b0"] * num_bins, width=0.85)
    right.set_yscale("log")
    right.set_xlabel("rank token (0 = not expressed, red)")
    right.set_ylabel("share of panel positions (log scale)")
    right.set_title(f"Rank tokens on the {len(panel):,}-gene evaluation panel: {shares[0]:.0%} are 0", fontsize=10)
    for axis in (left, right):
        axis.grid(alpha=0.3, axis="y")
    return _save(figure, path)


def plot_loss_curves(log_history: list[dict], path: str | os.PathLike, baseline_key: str | None = None) -> Path:
    """Training loss (and its NELBO part) against the step, with the validation NELBO and masked NLL of each
    evaluation, and the per-gene marginal's masked NLL (`baseline_key` of the evaluation logs) as a reference."""
    train = [entry for entry in log_history if "loss" in entry and "step" in entry]
    evals = [entry for entry in log_history if "eval_nelbo" in entry and "step" in entry]
    if not train and not evals:
        raise ValueError("the log history holds no training or evaluation losses")
    figure = Figure(figsize=(7, 4.4))
    axis = figure.subplots()

    def curve(entries, key, **style):
        points = [(entry["step"], entry[key]) for entry in entries if key in entry]
        if points:
            axis.plot(*zip(*points), **style)

    curve(train, "loss", label="training loss (NELBO + ordinal term)", color="#4c72b0")
    curve(train, "nelbo", label="training NELBO", color="#4c72b0", linestyle="--")
    curve(evals, "eval_nelbo", label="validation NELBO", color="#dd8452", marker="o", markersize=10, fillstyle="none")
    nll_keys = sorted({key for entry in evals for key in entry if key.startswith("eval_masked_nll_")})
    for key in nll_keys:
        ratio = key.removeprefix("eval_masked_nll_")
        curve(evals, key, label=f"validation masked NLL ({float(ratio):.0%} masked)", color="#55a868", marker="s")
    if baseline_key and evals and baseline_key in evals[-1]:
        axis.axhline(evals[-1][baseline_key], color="grey", linestyle=":", label="per-gene marginal, masked NLL")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("nats per token")
    axis.set_title("Training and validation losses", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return _save(figure, path)


METRIC_PANELS = {
    "nll_all": "NLL, nats per masked gene (lower is better)",
    "mae_level_all": "MAE of the expected level, tie-aware (lower is better)",
    "spearman_level_all": "Spearman of expected vs true level, per cell",
    "accuracy_all": "accuracy of the most likely rank",
    "coverage_90_all": "coverage of the 90% interval (nominal 0.9)",
    "ece_all": "calibration error, ECE (lower is better)",
}


def plot_metrics_vs_mask_ratio(results: dict[str, dict[str, dict]], path: str | os.PathLike) -> Path:
    """Six panels, one metric each, against the share of genes masked, one line per method
    (`results[method][str(ratio)]`, as [`compare_on_masks`] returns)."""
    figure = Figure(figsize=(13, 7))
    axes = figure.subplots(2, 3)
    for axis, (key, title) in zip(axes.ravel(), METRIC_PANELS.items()):
        for method, by_ratio in results.items():
            ratios = [ratio for ratio in by_ratio if key in by_ratio[ratio]]
            if ratios:
                axis.plot([float(r) for r in ratios], [by_ratio[r][key] for r in ratios], marker="o", label=method)
        if key == "coverage_90_all":
            axis.axhline(0.9, color="grey", linestyle=":", label="nominal")
        axis.set_xlabel("share of genes masked")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    handles, labels = axes[1, 1].get_legend_handles_labels()  # the coverage panel also has the nominal line
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    figure.suptitle("Test cells, masked positions only")
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    figure.savefig(path, dpi=110)
    return Path(path)


def plot_reliability(scores: dict[str, dict], mask_ratio: float, path: str | os.PathLike) -> Path:
    """Reliability diagram at one mask ratio: accuracy of the most likely rank against the confidence in it, per
    method (`scores[method]` with the `reliability_*` lists of `rank_imputation`), and how many positions fall in
    each confidence bin."""
    figure = Figure(figsize=(6.4, 6.4))
    top, bottom = figure.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    methods = [method for method in scores if "reliability_confidence" in scores[method]]
    width = 0.1 / max(len(methods), 1)
    for i, method in enumerate(methods):
        confidence = np.asarray(scores[method]["reliability_confidence"], dtype=np.float64)
        accuracy = np.asarray(scores[method]["reliability_accuracy"], dtype=np.float64)
        positions = np.asarray(scores[method]["reliability_positions"], dtype=np.float64)
        filled = positions > 0
        label = f"{method} (ECE {scores[method]['ece_all']:.3f})"
        top.plot(confidence[filled], accuracy[filled], marker="o", label=label)
        bin_left = np.arange(len(positions)) / len(positions)
        bottom.bar(bin_left + i * width, positions / positions.sum(), width=width, align="edge", label=method)
    top.set_ylabel("accuracy of the most likely rank")
    top.set_title(f"Calibration on test cells, {mask_ratio:.0%} of the genes masked", fontsize=10)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.grid(alpha=0.3)
    top.legend(fontsize=8)
    bottom.set_xlabel("confidence in the most likely rank (bins of 0.1)")
    bottom.set_ylabel("share of positions")
    bottom.grid(alpha=0.3, axis="y")
    return _save(figure, path)
