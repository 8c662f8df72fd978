"""The MDLM negative ELBO over masked rank tokens, and the ordinal terms that tie the prediction to the true rank."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from pipelines import MaskedRankDiffusionScheduler

ORDINAL_TERMS = ("none", "mean_matching", "rps")
ORDINAL_TIME_WEIGHTINGS = ("nelbo", "none")


def masked_nelbo(
    logits: torch.Tensor,
    original_samples: torch.LongTensor,
    masked: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: MaskedRankDiffusionScheduler,
) -> torch.Tensor:
    """Sum over masked tokens of -log p(x0 | x_t) * (-alpha'(t) / (1 - alpha(t))).

    Visible and padding positions contribute nothing (SUBS: visible tokens are carried over exactly). Divide by
    the number of real tokens for MDLM's NELBO in nats per token.

    Args:
        logits: `(batch, length, B + 1)` model scores.
        original_samples: `(batch, length)` clean tokens in 0..B.
        masked: `(batch, length)` True where the token was masked.
        timesteps: `(batch,)` diffusion time of each row.
        scheduler: gives the loss weight of the noise schedule.
    """
    nll = F.cross_entropy(logits.float().transpose(1, 2), original_samples, reduction="none")
    weights = scheduler.loss_weight(timesteps.float()).unsqueeze(1)
    return (nll * weights * masked).sum()


def ordinal_term(probs: torch.Tensor, target: torch.LongTensor, kind: str) -> torch.Tensor:
    """Per-position distance, in [0, 1], between a distribution over ranks 0..B and the true rank's value.

    - `"mean_matching"`: |E_p[k] - k_true| / B, the gap between the expected and the true rank;
    - `"rps"`: the ranked probability score sum_k (F_p(k) - 1[k >= k_true])^2 / B over the cumulative
      distribution, a proper scoring rule that charges a near miss less than a far one.

    Args:
        probs: `(..., B + 1)` probabilities.
        target: `(...)` true ranks in 0..B.
        kind: one of `"mean_matching"`, `"rps"`.
    """
    num_bins = probs.shape[-1] - 1
    ranks = torch.arange(num_bins + 1, device=probs.device, dtype=probs.dtype)
    if kind == "mean_matching":
        return ((probs * ranks).sum(dim=-1) - target.to(probs.dtype)).abs() / num_bins
    if kind == "rps":
        cdf = probs.cumsum(dim=-1)[..., :-1]
        observed = (ranks[:-1] >= target.unsqueeze(-1)).to(probs.dtype)
        return ((cdf - observed) ** 2).sum(dim=-1) / num_bins
    raise ValueError(f"ordinal term must be one of {ORDINAL_TERMS[1:]}, got {kind!r}")


def masked_ordinal(
    logits: torch.Tensor,
    original_samples: torch.LongTensor,
    masked: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: MaskedRankDiffusionScheduler,
    kind: str,
    time_weighting: str = "nelbo",
) -> torch.Tensor:
    """Sum over masked tokens of the [`ordinal_term`], weighted like the NELBO (`"nelbo"`) or not (`"none"`)."""
    if time_weighting not in ORDINAL_TIME_WEIGHTINGS:
        raise ValueError(f"time_weighting must be one of {ORDINAL_TIME_WEIGHTINGS}, got {time_weighting!r}")
    values = ordinal_term(torch.softmax(logits.float(), dim=-1), original_samples, kind) * masked
    if time_weighting == "nelbo":
        values = values * scheduler.loss_weight(timesteps.float()).unsqueeze(1)
    return values.sum()
