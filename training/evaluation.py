"""Evaluation of a masked-diffusion denoiser on held-out cells, beside the per-gene marginal baseline."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.nn import functional as F

from metrics import PerGeneMarginal
from metrics.rank_imputation.rank_imputation import position_nll
from pipelines import MaskedRankDiffusionScheduler

from .loss import masked_nelbo


def condition_inputs(batch: dict, device) -> dict:
    """The perturbation conditions of a collated batch as the model's keyword arguments (none without them)."""
    return {name: batch[name].to(device) for name in ("condition_ids", "doses") if name in batch}


@torch.no_grad()
def evaluate_masked_diffusion(
    model: torch.nn.Module,
    scheduler: MaskedRankDiffusionScheduler,
    batches: Iterable[dict[str, torch.Tensor]],
    baseline: PerGeneMarginal,
    *,
    time_grid: int = 8,
    mask_ratio: float = 0.5,
    seed: int = 0,
    device: torch.device | str = "cpu",
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    reference=None,
) -> dict[str, float]:
    """Score held-out batches (from [`RankDiffusionCollator`]) on masked positions only.

    - `nelbo`: MDLM's NELBO in nats per real token, with the time integral taken on `time_grid` fixed midpoints
      of [eps, 1] (one masking draw each) instead of one random time per cell, which is far less noisy.
    - `masked_nll_{r}` and `baseline_masked_nll_{r}`: mean -log p of the true token over exactly a share `r` of
      each cell's positions, for the model and for the per-gene marginal on the same masks.

    The NELBO's masks come from a generator seeded with `seed`, the ratio masks from another: two models are
    scored on identical masks. The ratio masks of panel cells (all of one length, in batches taken in order) are
    those [`compare_on_masks`] draws for its first ratio with the same seed, so both report the same masked NLL
    ([`position_nll`]). With
    several processes, each scores its own batches and `reduce` sums the totals over processes (before the ratios).
    A model with `config.reference_context` reads its nearest cells of `reference` (a [`ReferenceCells`]) on the
    visible positions of every masked input (of its group, `reference_group`, for a grouped reference).
    """
    if not 0.0 < mask_ratio < 1.0 - scheduler.config.eps:
        raise ValueError(f"mask_ratio must be in (0, 1 - eps) = (0, {1.0 - scheduler.config.eps}), got {mask_ratio}")
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    mask_generator = torch.Generator().manual_seed(seed)
    reference_generator = torch.Generator().manual_seed(seed)
    eps = scheduler.config.eps
    grid = [eps + (1.0 - eps) * (k + 0.5) / time_grid for k in range(time_grid)]
    mask_id = scheduler.config.mask_token_id
    ratio_time = scheduler.time_at_alpha(1.0 - mask_ratio)
    totals = dict.fromkeys(("nelbo", "tokens", "model_nll", "baseline_nll", "masked"), 0.0)

    def logits_for(noisy, batch, t):
        timesteps = torch.full((noisy.shape[0],), t)
        extra = {}
        if reference is not None:
            found = reference.context(batch["gene_ids"], noisy, batch["attention_mask"], mask_token_id=mask_id,
                                      groups=batch.get("reference_group"), generator=reference_generator)  # fmt: skip
            extra["reference_tokens"] = found.to(device).long()
        return model(
            gene_ids=batch["gene_ids"].to(device),
            input_ids=noisy.to(device),
            attention_mask=batch["attention_mask"].to(device),
            timesteps=timesteps.to(device),
            **condition_inputs(batch, device),
            **extra,
        ).logits.cpu()

    for batch in batches:
        original, real = batch["input_ids"], batch["attention_mask"].bool()
        for t in grid:
            timesteps = torch.full((original.shape[0],), t)
            noisy = scheduler.add_noise(original, timesteps, generator=generator, maskable=real)
            logits = logits_for(noisy, batch, t)
            totals["nelbo"] += masked_nelbo(logits, original, noisy == mask_id, timesteps, scheduler).item()
        totals["tokens"] += real.sum().item()

        masked = scheduler.random_mask(real, mask_ratio, generator=mask_generator)
        logits = logits_for(original.masked_fill(masked, mask_id), batch, ratio_time)
        truth = original[masked]
        totals["model_nll"] += position_nll(F.softmax(logits.float(), dim=-1)[masked], truth).sum()
        totals["baseline_nll"] += position_nll(baseline.log_probs(batch["gene_ids"]).exp()[masked], truth).sum()
        totals["masked"] += masked.sum().item()

    model.train(was_training)
    if reduce is not None:
        totals = dict(zip(totals, reduce(torch.tensor(list(totals.values()), dtype=torch.float64)).tolist()))
    if not totals["tokens"]:
        raise ValueError("no held-out cells to evaluate")
    return {
        "nelbo": totals["nelbo"] / (time_grid * totals["tokens"]),
        f"masked_nll_{mask_ratio:g}": totals["model_nll"] / totals["masked"],
        f"baseline_masked_nll_{mask_ratio:g}": totals["baseline_nll"] / totals["masked"],
        "tokens": totals["tokens"],
        "masked_tokens": totals["masked"],
    }


def imputation_report(
    pipe,
    data,
    *,
    split: str = "test",
    panels: tuple[str, ...] | list[str] | None = None,
    mask_ratios: tuple[float, ...] | list[float] = (0.2, 0.5, 0.8, 0.95),
    seed: int = 0,
    sample_steps: int = 0,
) -> dict:
    """The model beside every baseline, on identical masks of held-out cells, masked positions only.

    Each baseline family's settings are chosen on validation cells (training panel, half masked); the scores are
    taken on `split` cells, on each of `panels` (all of `data.panels` by default) at each of `mask_ratios`, with
    the scores per detection-rate stratum of the genes.

    Args:
        pipe: the [`MaskedRankDiffusionPipeline`] to score.
        data: the run's [`PreparedData`].
        split: `"test"` (the reported numbers) or `"validation"` (for choices).
        sample_steps: also score one sampled imputation with this many steps on the training panel (0: skip).

    Returns:
        `{"results": {panel: {method: {str(ratio): scores}}}, "baseline_choices": ..., "cells": ..., ...}`.
    """
    from metrics.imputation import compare_on_masks, detection_strata

    from .data import TRAINING_PANEL

    if split not in ("validation", "test"):
        raise ValueError(f"split must be validation or test, got {split!r}")
    panels = list(data.panels) if panels is None else list(panels)
    unknown = set(panels) - set(data.panels)
    if unknown:
        raise ValueError(f"unknown panels {sorted(unknown)}; choose from {list(data.panels)}")
    validation = data.panel_cells(data.validation_rows, data.panel, pipe.processor)
    baselines, choices = data.imputation_baselines(validation)
    strata = detection_strata(data.training_cells.detection_rate)
    results, scored = {}, 0
    for panel in panels:
        cells = data.panel_cells(data.splits[split], data.panels[panel], pipe.processor)
        scored = len(cells)
        steps = sample_steps if panel == TRAINING_PANEL else 0
        results[panel] = compare_on_masks(
            pipe, cells, baselines, list(mask_ratios), seed=seed, sample_steps=steps, strata=strata
        )
    return {
        "data": data.source.name,
        "split": split,
        "cells": {"train": data.baseline.num_cells, "validation": len(validation), split: scored},
        "panel_sizes": {panel: len(genes) for panel, genes in data.panels.items()},
        "baseline_choices": choices,
        "mask_ratios": list(mask_ratios),
        "results": results,
    }
