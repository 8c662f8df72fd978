"""Score predictive distributions on the masked positions of held-out cells, with the `rank_imputation` module."""

from __future__ import annotations

from pathlib import Path

import evaluate
import torch

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
