"""Evaluation of a masked-diffusion denoiser on held-out cells, beside the per-gene marginal baseline."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.nn import functional as F

from metrics import PerGeneMarginal
from pipelines import MaskedRankDiffusionScheduler

from .loss import masked_nelbo


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
) -> dict[str, float]:
    """Score held-out batches (from [`RankDiffusionCollator`]) on masked positions only.

    - `nelbo`: MDLM's NELBO in nats per real token, with the time integral taken on `time_grid` fixed midpoints
      of [eps, 1] (one masking draw each) instead of one random time per cell, which is far less noisy.
    - `masked_nll_{r}` and `baseline_masked_nll_{r}`: mean -log p of the true token over exactly a share `r` of
      each cell's positions, for the model and for the per-gene marginal on the same masks.

    All masks come from a generator seeded with `seed`, so two models are scored on identical masks (with the same
    batches: the same batch size and number of processes). With several processes, each scores its own batches
    and `reduce` sums the totals over processes (before the ratios).
    """
    if not 0.0 < mask_ratio < 1.0 - scheduler.config.eps:
        raise ValueError(f"mask_ratio must be in (0, 1 - eps) = (0, {1.0 - scheduler.config.eps}), got {mask_ratio}")
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    eps = scheduler.config.eps
    grid = [eps + (1.0 - eps) * (k + 0.5) / time_grid for k in range(time_grid)]
    mask_id = scheduler.config.mask_token_id
    ratio_time = scheduler.time_at_alpha(1.0 - mask_ratio)
    totals = dict.fromkeys(("nelbo", "tokens", "model_nll", "baseline_nll", "masked"), 0.0)

    def logits_for(noisy, batch, t):
        timesteps = torch.full((noisy.shape[0],), t)
        return model(
            gene_ids=batch["gene_ids"].to(device),
            input_ids=noisy.to(device),
            attention_mask=batch["attention_mask"].to(device),
            timesteps=timesteps.to(device),
        ).logits.cpu()

    for batch in batches:
        original, real = batch["input_ids"], batch["attention_mask"].bool()
        for t in grid:
            timesteps = torch.full((original.shape[0],), t)
            noisy = scheduler.add_noise(original, timesteps, generator=generator, maskable=real)
            logits = logits_for(noisy, batch, t)
            totals["nelbo"] += masked_nelbo(logits, original, noisy == mask_id, timesteps, scheduler).item()
        totals["tokens"] += real.sum().item()

        masked = scheduler.random_mask(real, mask_ratio, generator=generator)
        logits = logits_for(original.masked_fill(masked, mask_id), batch, ratio_time)
        target = original.unsqueeze(-1)
        model_nll = -F.log_softmax(logits, dim=-1).gather(-1, target).squeeze(-1)
        baseline_nll = -baseline.log_probs(batch["gene_ids"]).gather(-1, target).squeeze(-1)
        totals["model_nll"] += model_nll[masked].sum().item()
        totals["baseline_nll"] += baseline_nll[masked].sum().item()
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
