"""The MDLM negative ELBO over masked rank tokens."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from pipelines import MaskedRankDiffusionScheduler


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
