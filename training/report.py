"""Write the model card of a finished run, with its plots, into the pipeline folder."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from huggingface_hub import ModelCard

from pipelines.denoising_animation import record_denoising, write_denoising_gif

from .data import TRAINING_PANEL
from .evaluation import imputation_report
from .model_card import CardContents, TrainingSummary, model_card, widget_examples
from .plots import (
    plot_count_histogram,
    plot_loss_curves,
    plot_metrics_vs_mask_ratio,
    plot_rank_token_distribution,
    plot_reliability,
)

logger = logging.getLogger(__name__)

PLOTS_DIR = "plots"
IMPUTATION_RESULTS = "imputation_results.json"
EVAL_RESULTS = "eval_results.json"


def add_card_section(card_path: str | Path, title: str, body: str) -> None:
    """Put a `## title` section into a model card, replacing one of that title, before `## Limitations`."""
    card_path = Path(card_path)
    if not card_path.exists():
        logger.warning("no model card at %s: the %s section is not written", card_path, title)
        return
    text = card_path.read_text()
    heading = f"## {title}\n"
    if heading in text:  # drop the old section, up to the next heading of its level
        start = text.index(heading)
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + (text[end + 1 :] if end >= 0 else "")
    section = f"{heading}\n{body.strip()}\n\n"
    at = text.find("## Limitations")
    text = text[:at] + section + text[at:] if at >= 0 else text.rstrip() + "\n\n" + section
    card_path.write_text(text)


def write_model_card(
    output_dir: str | Path,
    *,
    pipe,
    data,
    trainer,
    summary: TrainingSummary,
    mask_ratios: list[float],
    count_cells: int = 500,
    gif_steps: int = 32,
    seed: int = 0,
) -> ModelCard:
    """Score the trained model beside the baselines on test cells, for each panel and mask ratio, draw the plots
    and the denoising GIFs into `output_dir/plots/`, and write `output_dir/README.md` (the model card) and
    `imputation_results.json`.

    Args:
        pipe: the trained [`MaskedRankDiffusionPipeline`].
        data: the run's [`PreparedData`] (rows, splits, baseline, panels).
        trainer: the finished [`RankDiffusionTrainer`] (its log history and final metrics).
        summary: the run's [`TrainingSummary`].
        mask_ratios: shares masked for the evaluation tables and plots.
        count_cells: training cells read for the count histogram.
        gif_steps: denoising steps of the two GIFs (one cell with 90% and with 20% of its genes masked).
        seed: seed of the masks (per ratio, as `benchmarks/imputation.py` draws them: the same tables for the same
            checkpoint), the widget masks and the GIF draws.
    """
    output_dir = Path(output_dir)
    plots_dir = output_dir / PLOTS_DIR
    plots_dir.mkdir(parents=True, exist_ok=True)
    model = pipe.model.eval()
    plots = data_and_training_plots(data, trainer.state.log_history, summary.metrics, plots_dir, count_cells)
    report = imputation_report(pipe, data, split="test", mask_ratios=mask_ratios, seed=seed)
    (output_dir / IMPUTATION_RESULTS).write_text(json.dumps(report, indent=2) + "\n")
    plots.update(imputation_plots(report["results"][TRAINING_PANEL], mask_ratios, plots_dir))
    plots.update(denoising_gifs(pipe, data, plots_dir, gif_steps, seed))
    examples = data.panel_cells(data.training_rows.take(2), data.panel, pipe.processor)
    example_cells = [(examples.cells["gene_ids"][i].numpy(), examples.tokens[i].numpy()) for i in range(len(examples))]
    widgets = widget_examples(example_cells, pipe.processor.gene_vocab, seed=seed)
    card = model_card(
        CardContents(
            config=model.config,
            num_parameters=model.num_parameters(),
            training_cells=data.baseline.num_cells,
            test_cells=report["cells"]["test"],
            panel_sizes=report["panel_sizes"],
            imputation=report["results"],
            baseline_choices={family: choice["chosen"] for family, choice in report["baseline_choices"].items()},
            widgets=widgets,
            plots={caption: path.relative_to(output_dir).as_posix() for caption, path in plots.items()},
            conditions=data.conditions.to_dict() if data.conditions is not None else None,
            **dataclasses.asdict(summary),
        )
    )
    card.save(output_dir / "README.md")
    logger.info("model card with %d plots written", len(plots))
    return card


def data_and_training_plots(data, log_history, metrics, plots_dir: Path, count_cells: int) -> dict[str, Path]:
    """The training data's counts and rank tokens, and the training and validation losses: caption -> path."""
    counts = data.training_cells.counts[:count_cells]
    baseline_key = next((k for k in metrics if k.startswith("eval_baseline_masked_nll_")), None)
    return {
        "Counts of expressed genes in the training data": plot_count_histogram(
            counts.data, counts.shape[0], plots_dir / "count_histogram.png"
        ),
        "Rank tokens of the training data": plot_rank_token_distribution(
            data.baseline, data.panel, plots_dir / "rank_tokens.png"
        ),
        "Training and validation losses": plot_loss_curves(log_history, plots_dir / "loss_curves.png", baseline_key),
    }


def imputation_plots(imputation: dict, mask_ratios: list[float], plots_dir: Path) -> dict[str, Path]:
    """Test metrics against the share masked, and the calibration at the ratio nearest one half."""
    ratio = min(mask_ratios, key=lambda r: abs(r - 0.5))
    at_ratio = {method: by_ratio[str(ratio)] for method, by_ratio in imputation.items()}
    return {
        "Test metrics against the share of genes masked, training panel": plot_metrics_vs_mask_ratio(
            imputation, plots_dir / "metrics_vs_mask_ratio.png"
        ),
        f"Calibration, {ratio:.0%} masked": plot_reliability(at_ratio, ratio, plots_dir / "reliability.png"),
    }


def denoising_gifs(pipe, data, plots_dir: Path, steps: int, seed: int) -> dict[str, Path]:
    """The denoising of one test cell on the training panel, with 90% and with 20% of its genes masked."""
    cells = data.panel_cells(data.test_rows.take(1), data.panel, pipe.processor)
    genes, ranks = cells.cells["gene_ids"][0].tolist(), cells.tokens[0].tolist()
    gifs = {}
    for share, name in ((0.9, "high"), (0.2, "low")):
        states = record_denoising(pipe, genes, ranks=[ranks], mask_ratio=share, num_inference_steps=steps,
                                  generator=torch.Generator().manual_seed(seed))  # fmt: skip
        path = plots_dir / f"denoising_{name}_corruption.gif"
        write_denoising_gif(states, path, num_rank_bins=pipe.model.config.num_rank_bins,
                            title=f"Denoising a test cell ({share:.0%} masked)")  # fmt: skip
        gifs[f"Denoising a test cell, {share:.0%} of its {len(genes)} panel genes masked"] = path
    return gifs
