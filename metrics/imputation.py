"""Score predictive distributions on the masked positions of held-out cells, with the `rank_imputation` module."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from modeling import CellBatch
from pipelines import MaskedRankDiffusionScheduler

from .rank_imputation.rank_imputation import position_nll, score

logger = logging.getLogger(__name__)
MODEL_METHOD = "RankDiT, one pass"
# The ablation of a model that reads reference cells: the same model and call without them.
NO_REFERENCE_METHOD = "RankDiT, one pass, no reference cells"


def one_pass_methods(config) -> list[tuple[str, bool | None]]:
    """`(name, reference=)` of the pipeline's one-pass rows: the model as users call it (with its reference cells
    when it reads some) and, for such a model, the same call without them."""
    return [(MODEL_METHOD, None), *([(NO_REFERENCE_METHOD, False)] if config.reference_context else [])]


# Strata of a gene's detection rate in training cells, reported apart: (label, lower bound).
DETECTION_STRATA = (("detected_lt10", 0.0), ("detected_10_50", 0.1), ("detected_50_90", 0.5), ("detected_ge90", 0.9))


def token_levels(tokens: np.ndarray, num_bins: int) -> np.ndarray:
    """The tie-aware scale of one cell: `(B + 1,)` level of each token, from the tokens of all its expressed genes.

    Level j is the cell's j-th smallest distinct token. Tied counts share a token, and low counts (where ties are)
    each have a token of their own, so count 1 is level 1, count 2 level 2, whatever their tokens; at the top,
    where bins are wide, a few distinct counts can share a level. 0 stays 0; a token the cell does not use lies
    between the levels of its neighbours (linear interpolation), above the largest at the largest.
    """
    distinct = np.unique(np.asarray(tokens)[np.asarray(tokens) > 0])
    return np.interp(np.arange(num_bins + 1), np.r_[0, distinct], np.arange(len(distinct) + 1, dtype=np.float64))


def detection_strata(detection_rate: np.ndarray) -> np.ndarray:
    """The [`DETECTION_STRATA`] label of each gene id, from its detection rate in training cells."""
    bounds = np.array([bound for _, bound in DETECTION_STRATA[1:]])
    return np.array([label for label, _ in DETECTION_STRATA])[np.searchsorted(bounds, detection_rate, side="right")]


@dataclass
class PanelCells:
    """Held-out cells on a gene panel, with what scoring needs beyond the model's input.

    Attributes:
        cells ([`CellBatch`]): the processor's batch of the cells with every position visible: the panel's genes
            and their true rank tokens from the whole cells.
        counts (`torch.FloatTensor` of shape `(n_cells, length)`): their raw counts.
        levels (`np.ndarray` of shape `(n_cells, B + 1)`): each cell's [`token_levels`].
    """

    cells: CellBatch
    counts: torch.FloatTensor
    levels: np.ndarray

    def __len__(self) -> int:
        return self.cells.num_cells

    @property
    def tokens(self) -> torch.LongTensor:
        return self.cells["input_ids"]

    @property
    def attention_mask(self) -> torch.BoolTensor:
        return self.cells["attention_mask"].bool()

    def masked(self, mask: torch.Tensor) -> tuple[CellBatch, torch.Tensor]:
        """The model's input with `mask` hidden, and the counts a user would have (NaN where masked)."""
        masked = self.cells.replace(input_ids=self.tokens.masked_fill(mask, self.cells.mask_token_id))
        return masked, self.counts.masked_fill(mask, float("nan"))


def score_masked(
    probs: torch.Tensor,
    truth: torch.Tensor,
    masked: torch.Tensor,
    levels: np.ndarray | None = None,
    strata: np.ndarray | None = None,
) -> dict[str, float]:
    """Score `(cells, length, B + 1)` predictions at the `masked` positions only, against the true tokens.

    Visible and padding positions are never scored: a model that copies its input would otherwise look good.
    `levels` (`(cells, B + 1)`, [`token_levels`]) adds the tie-aware ordinal metrics; `strata` (`(cells, length)`
    labels) adds every metric per label.

    The scores are the `rank_imputation` module's own (`evaluate.load("metrics/rank_imputation").compute` runs the
    same function); called directly, without `evaluate`'s round trip of every position through an Arrow table,
    which took a second per call (most of a model card's scoring time).
    """
    masked = masked.bool()
    cells = torch.arange(masked.shape[0]).unsqueeze(1).expand_as(masked)[masked].numpy()
    extra = {}
    if levels is not None:
        extra["levels"] = np.asarray(levels)[cells]
    if strata is not None:
        extra["strata"] = np.asarray(strata)[masked.numpy()]
    return score(probs[masked].double().numpy(), truth[masked].numpy(), cells, **extra)


def one_hot(tokens: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Point predictions (sampled tokens) as degenerate distributions."""
    return torch.nn.functional.one_hot(tokens.clamp(min=0), num_classes).double()


POINT_METRICS = ("accuracy", "within_one", "mae", "spearman")  # the ones a single draw has


def keep_point_metrics(scores: dict[str, float]) -> dict[str, float]:
    """Drop the scores a single draw cannot have (NLL, coverage, calibration of a one-hot 'distribution')."""
    return {k: v for k, v in scores.items() if k.startswith((*POINT_METRICS, "positions", "spearman_cells"))}


def masked_nll(probs: torch.Tensor, truth: torch.Tensor, masked: torch.Tensor) -> float:
    """Mean -log p of the true token over the masked positions ([`position_nll`], as every score here)."""
    return float(position_nll(probs[masked], truth[masked]).mean())


def strongest_baseline(by_method: dict[str, dict[str, dict]], ratio: str) -> tuple[str, float]:
    """The baseline (not a RankDiT row) with the lowest masked NLL at one mask ratio (`by_method[method][ratio]`),
    and that NLL."""
    nll = {
        m: r[ratio]["nll_all"]
        for m, r in by_method.items()
        if not m.startswith("RankDiT") and "nll_all" in r.get(ratio, {})
    }
    best = min(nll, key=nll.get)
    return best, nll[best]


def choose_on_validation(
    candidates: dict[str, object], cells: PanelCells, *, mask_ratio: float = 0.5, seed: int = 0
) -> tuple[str, dict[str, float]]:
    """The candidate baseline with the lowest masked NLL on validation cells (one mask at `mask_ratio`), and the
    NLL of every candidate."""
    generator = torch.Generator().manual_seed(seed)
    masked = MaskedRankDiffusionScheduler.random_mask(cells.attention_mask, mask_ratio, generator=generator)
    inputs, counts = cells.masked(masked)
    nll = {
        name: masked_nll(method.predict(inputs, counts), cells.tokens, masked) for name, method in candidates.items()
    }
    return min(nll, key=nll.get), nll


def compare_on_masks(
    pipe,
    cells: PanelCells,
    baselines: dict,
    mask_ratios: list[float],
    *,
    seed: int = 0,
    sample_steps: int = 0,
    strata: np.ndarray | None = None,
) -> dict[str, dict[str, dict]]:
    """Score the pipeline's model and each baseline on identical masks of held-out cells, masked positions only.

    Args:
        pipe: a [`MaskedRankDiffusionPipeline`]; its call with `output_type="probs"` gives the one-pass
            distribution ("RankDiT, one pass"; with reference cells, also without them), with its time per cell.
        cells: held-out cells on genes chosen without looking at their counts (an evaluation panel).
        baselines: name -> object with `predict(cells, counts)` (see `metrics.baselines`).
        mask_ratios: share of each cell's positions masked; one mask per ratio, drawn from `seed + its index`.
        sample_steps: also score one sampled imputation with this many steps (point metrics only); 0: skip.
        strata: `(gene_vocab_size,)` label of every gene (e.g. [`detection_strata`]): scores per label too.

    Returns:
        `results[method][str(ratio)]`: the `rank_imputation` scores.
    """
    model, scheduler = pipe.model, pipe.scheduler
    num_bins = model.config.num_rank_bins
    real, gene_ids = cells.attention_mask, cells.cells["gene_ids"]
    position_strata = strata[gene_ids.numpy()] if strata is not None else None
    results: dict[str, dict[str, dict]] = {}
    seconds: dict[str, float] = {}  # each one-pass method's call at the ratio
    for i, ratio in enumerate(mask_ratios):
        generator = torch.Generator().manual_seed(seed + i)
        masked = scheduler.random_mask(real, ratio, generator=generator)
        inputs, counts = cells.masked(masked)
        call = {  # the cells as a user gives them to the pipeline
            "gene_ids": [g[r].tolist() for g, r in zip(gene_ids, real)],
            "ranks": [t[r].tolist() for t, r in zip(cells.tokens, real)],
            "mask": [m[r].tolist() for m, r in zip(masked, real)],
        }
        predictions = {}
        for name, reference in one_pass_methods(model.config):
            start = time.perf_counter()
            probs = pipe(**call, output_type="probs", batch_size=32, reference=reference).probs
            seconds[name] = time.perf_counter() - start
            predictions[name] = F.pad(torch.from_numpy(probs), (0, 0, 0, real.shape[1] - probs.shape[1]))
        if sample_steps:
            sampled = pipe(**call, num_inference_steps=sample_steps, generator=generator).ranks
            predictions[f"RankDiT, sampled ({sample_steps} steps)"] = one_hot(torch.from_numpy(sampled), num_bins + 1)
        for name, baseline in baselines.items():
            predictions[name] = baseline.predict(inputs, counts)
        for name, probs in predictions.items():
            scores = score_masked(probs, cells.tokens, masked, cells.levels, position_strata)
            results.setdefault(name, {})[str(ratio)] = keep_point_metrics(scores) if "sampled" in name else scores
        for name, total in seconds.items():  # the one-pass call's time, its retrieval included
            results[name][str(ratio)]["seconds_per_cell"] = total / len(cells)
        logger.info("mask ratio %g: %d masked positions in %d cells scored", ratio, int(masked.sum()), len(cells))
    return results
