"""Score predictive distributions on the masked positions of held-out cells, with the `rank_imputation` module."""

from __future__ import annotations

import logging
from pathlib import Path

import evaluate
import torch

from modeling import CellInputs

logger = logging.getLogger(__name__)
METRIC_PATH = Path(__file__).resolve().parent / "rank_imputation"


def load_metric() -> evaluate.EvaluationModule:
    """The local `evaluate` module `metrics/rank_imputation` (no network needed)."""
    return evaluate.load(str(METRIC_PATH))


def score_masked(
    metric: evaluate.EvaluationModule, probs: torch.Tensor, truth: torch.Tensor, masked: torch.Tensor
) -> dict[str, float]:
    """Score `(cells, length, B + 1)` predictions at the `masked` positions only, against the true tokens.

    Visible and padding positions are never scored: a model that copies its input would otherwise look good.
    """
    masked = masked.bool()
    cells = torch.arange(masked.shape[0]).unsqueeze(1).expand_as(masked)
    return metric.compute(
        predictions=probs[masked].double().numpy(),
        references=truth[masked].numpy(),
        cell_ids=cells[masked].numpy(),
    )


def one_hot(tokens: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Point predictions (sampled tokens) as degenerate distributions."""
    return torch.nn.functional.one_hot(tokens.clamp(min=0), num_classes).double()


POINT_METRICS = ("accuracy", "within_one", "mae", "spearman")  # the ones a single draw has


def keep_point_metrics(scores: dict[str, float]) -> dict[str, float]:
    """Drop the scores a single draw cannot have (NLL, coverage, calibration of a one-hot 'distribution')."""
    return {k: v for k, v in scores.items() if k.startswith((*POINT_METRICS, "positions", "spearman_cells"))}


def predict_model(model, cells: CellInputs, batch_size: int = 32) -> torch.Tensor:
    """The model's one-pass predictive distribution at every position, `(cells, length, B + 1)`."""
    parts = [
        model.predictive_distribution(cells.rows(slice(i, i + batch_size))) for i in range(0, len(cells), batch_size)
    ]
    return torch.cat([torch.nn.functional.pad(p, (0, 0, 0, cells.gene_ids.shape[1] - p.shape[1])) for p in parts])


def compare_on_masks(
    pipe,
    cells: dict[str, torch.Tensor],
    baselines: dict,
    mask_ratios: list[float],
    *,
    seed: int = 0,
    sample_steps: int = 0,
) -> dict[str, dict[str, dict]]:
    """Score the pipeline's model and each baseline on identical masks of held-out cells, masked positions only.

    Args:
        pipe: a [`MaskedRankDiffusionPipeline`]; its model gives the one-pass distribution ("RankDiT, one pass").
        cells: padded held-out cells (`gene_ids`, `input_ids` = true tokens, `attention_mask`) on genes chosen
            without looking at their counts (the evaluation panel).
        baselines: name -> object with `predict(gene_ids, input_ids, attention_mask, mask_token_id)`.
        mask_ratios: share of each cell's positions masked; one mask per ratio, drawn from `seed + its index`.
        sample_steps: also score one sampled imputation with this many steps (point metrics only); 0: skip.

    Returns:
        `results[method][str(ratio)]`: the `rank_imputation` scores.
    """
    model, scheduler = pipe.model, pipe.scheduler
    mask_id, num_bins = scheduler.config.mask_token_id, model.config.num_rank_bins
    truth, real = cells["input_ids"], cells["attention_mask"].bool()
    metric = load_metric()
    results: dict[str, dict[str, dict]] = {}
    for i, ratio in enumerate(mask_ratios):
        generator = torch.Generator().manual_seed(seed + i)
        masked = scheduler.random_mask(real, ratio, generator=generator)
        inputs = CellInputs(cells["gene_ids"], truth.masked_fill(masked, mask_id), masked, real)
        predictions = {"RankDiT, one pass": predict_model(model, inputs)}
        if sample_steps:
            sampled = pipe(
                gene_ids=[g[r].tolist() for g, r in zip(inputs.gene_ids, real)],
                ranks=[t[r].tolist() for t, r in zip(truth, real)],
                mask=[m[r].tolist() for m, r in zip(masked, real)],
                num_inference_steps=sample_steps,
                generator=generator,
            ).ranks
            predictions[f"RankDiT, sampled ({sample_steps} steps)"] = one_hot(torch.from_numpy(sampled), num_bins + 1)
        for name, baseline in baselines.items():
            predictions[name] = baseline.predict(inputs.gene_ids, inputs.ranks, real, mask_id)
        for name, probs in predictions.items():
            scores = score_masked(metric, probs, truth, masked)
            results.setdefault(name, {})[str(ratio)] = keep_point_metrics(scores) if "sampled" in name else scores
        logger.info("mask ratio %g: %d masked positions in %d cells scored", ratio, int(masked.sum()), len(truth))
    return results
