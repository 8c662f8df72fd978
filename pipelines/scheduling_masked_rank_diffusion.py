# Copyright 2026 The RankDiff authors. Licensed under the Apache License, Version 2.0.
"""Absorbing-state (masked) diffusion in continuous time over rank tokens, as in MDLM (Sahoo et al., 2024)."""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

NOISE_SCHEDULES = ("log-linear", "cosine")


def mask_random_share(
    maskable: torch.Tensor, share: float, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Choose exactly `round(share * n)` (at least one) of each row's n maskable positions, uniformly.

    Args:
        maskable (`torch.Tensor` of shape `(batch_size, sequence_length)`): True where a position may be masked.
        share (`float`): the share of maskable positions to mask, in (0, 1].
        generator (`torch.Generator`, *optional*): source of the draws (on the device of `maskable`).

    Returns:
        `torch.Tensor` of booleans, True at the chosen positions.
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"the share to mask must be in (0, 1], got {share}")
    maskable = maskable.bool()
    scores = torch.rand(maskable.shape, generator=generator, device=maskable.device).masked_fill(~maskable, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)
    count = (maskable.sum(dim=1) * share).round().clamp(min=1)
    return (rank < count.unsqueeze(1)) & maskable


class MaskedRankDiffusionScheduler(SchedulerMixin, ConfigMixin):
    """Noise schedule, forward process and NELBO weights of RankDiff's masked diffusion.

    Time runs from t = 0 (clean) to t = 1 (all masked); alpha(t) is the probability that a token is still visible.
    A masked token is replaced by `mask_token_id`; visible tokens are carried over unchanged (SUBS), so only masked
    tokens carry loss, each weighted by -alpha'(t) / (1 - alpha(t)).

    Args:
        num_rank_bins (`int`, defaults to 50):
            B: clean tokens are 0..B.
        mask_token_id (`int`, *optional*):
            The `[MASK]` token, B + 1 when unset; must match the model's `config.mask_token_id`.
        noise_schedule (`str`, defaults to `"log-linear"`):
            `"log-linear"`: alpha(t) = 1 - (1 - eps) t (loss weight exactly 1/t); `"cosine"`:
            alpha(t) = eps + (1 - eps) cos(pi t / 2).
        eps (`float`, defaults to 1e-3):
            alpha(1) = eps, and training times are drawn from [eps, 1].
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        num_rank_bins: int = 50,
        mask_token_id: int | None = None,
        noise_schedule: str = "log-linear",
        eps: float = 1e-3,
    ):
        if noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"noise_schedule must be one of {NOISE_SCHEDULES}, got {noise_schedule!r}")
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        if mask_token_id is None:
            self.register_to_config(mask_token_id=num_rank_bins + 1)
        elif mask_token_id != num_rank_bins + 1:
            raise ValueError(f"mask_token_id must be num_rank_bins + 1 = {num_rank_bins + 1}, got {mask_token_id}")

    def check_model_config(self, model_config) -> None:
        """Raise if a model's config disagrees with this scheduler on the token space."""
        for name in ("num_rank_bins", "mask_token_id"):
            if getattr(model_config, name) != getattr(self.config, name):
                raise ValueError(
                    f"scheduler {name}={getattr(self.config, name)} does not match the model's "
                    f"{name}={getattr(model_config, name)}"
                )

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """alpha(t), the probability that a token is still visible at time t."""
        eps = self.config.eps
        if self.config.noise_schedule == "log-linear":
            return 1.0 - (1.0 - eps) * t
        return eps + (1.0 - eps) * torch.cos(0.5 * math.pi * t)

    def mask_probability(self, t: torch.Tensor) -> torch.Tensor:
        """1 - alpha(t), the probability that a token is masked at time t, computed without cancellation."""
        eps = self.config.eps
        if self.config.noise_schedule == "log-linear":
            return (1.0 - eps) * t
        return (1.0 - eps) * 2.0 * torch.sin(0.25 * math.pi * t) ** 2

    def time_at_alpha(self, alpha: float) -> float:
        """The time t at which alpha(t) = `alpha` (so a share 1 - alpha of the tokens is masked)."""
        eps = self.config.eps
        if not eps <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [eps, 1] = [{eps}, 1], got {alpha}")
        if self.config.noise_schedule == "log-linear":
            return (1.0 - alpha) / (1.0 - eps)
        return 2.0 / math.pi * math.acos((alpha - eps) / (1.0 - eps))

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """NELBO weight of a masked token, -alpha'(t) / (1 - alpha(t)) (MDLM eq. 10)."""
        eps = self.config.eps
        if self.config.noise_schedule == "log-linear":
            return 1.0 / t
        d_alpha = -(1.0 - eps) * 0.5 * math.pi * torch.sin(0.5 * math.pi * t)
        return -d_alpha / self.mask_probability(t)

    def sample_timesteps(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Stratified (antithetic) training times over the batch: u_i = (u + i / n) mod 1, t = eps + (1 - eps) u."""
        u0 = torch.rand((), generator=generator, device=device, dtype=torch.float64)
        strata = torch.arange(batch_size, device=device, dtype=torch.float64) / batch_size
        u = torch.remainder(u0 + strata, 1.0)
        return (self.config.eps + (1.0 - self.config.eps) * u).float()

    def add_noise(
        self,
        original_samples: torch.LongTensor,
        timesteps: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        maskable: torch.Tensor | None = None,
    ) -> torch.LongTensor:
        """Forward process: each maskable token becomes `[MASK]` with probability 1 - alpha(t).

        Args:
            original_samples (`torch.LongTensor` of shape `(batch_size, sequence_length)`): clean tokens.
            timesteps (`torch.Tensor` of shape `(batch_size,)`): time of each row, in [0, 1].
            generator (`torch.Generator`, *optional*): source of the masking draws.
            maskable (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): False where a position
                must stay as it is (padding).

        Returns:
            `torch.LongTensor`: the noisy tokens.
        """
        if timesteps.shape != original_samples.shape[:1]:
            raise ValueError(f"timesteps must have shape ({original_samples.shape[0]},), got {tuple(timesteps.shape)}")
        mask_probability = self.mask_probability(timesteps.double()).unsqueeze(1).to(original_samples.device)
        draws = torch.rand(original_samples.shape, generator=generator, device=original_samples.device)
        masked = draws < mask_probability
        if maskable is not None:
            masked &= maskable.bool()
        return original_samples.masked_fill(masked, self.config.mask_token_id)
