# Copyright 2026 The RankDiff authors. Licensed under the Apache License, Version 2.0.
"""Absorbing-state (masked) diffusion in continuous time over rank tokens, as in MDLM (Sahoo et al., 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

NOISE_SCHEDULES = ("log-linear", "cosine")
SAMPLERS = ("ancestral", "first-hitting", "confidence")


@dataclass
class MaskedRankDiffusionSchedulerOutput(BaseOutput):
    """Output of [`MaskedRankDiffusionScheduler.step`].

    Args:
        prev_sample (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            The tokens at the earlier time: some `[MASK]` positions filled, every other position unchanged.
        pred_original_sample (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            The model's most likely clean token at every masked position (visible tokens carried over).
        prev_timestep (`torch.Tensor` of shape `(batch_size,)`):
            The time of each row after the step (per row with the first-hitting sampler).
    """

    prev_sample: torch.LongTensor
    pred_original_sample: torch.LongTensor
    prev_timestep: torch.Tensor


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
        sampler (`str`, defaults to `"ancestral"`):
            How [`~MaskedRankDiffusionScheduler.step`] unmasks: `"ancestral"` (MDLM: between t and s < t a masked
            token is revealed with probability (alpha(s) - alpha(t)) / (1 - alpha(t)), its value drawn from the
            model), `"first-hitting"` (exact: one token per step at the time the next one would be revealed, so as
            many steps as masked tokens) or `"confidence"` (as many tokens per step as the schedule reveals on
            average, the most confident ones, each set to its most likely value: MAP-style imputation that does
            not sample the distribution).
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        num_rank_bins: int = 50,
        mask_token_id: int | None = None,
        noise_schedule: str = "log-linear",
        eps: float = 1e-3,
        sampler: str = "ancestral",
    ):
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"noise_schedule must be one of {NOISE_SCHEDULES}, got {noise_schedule!r}")
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        if mask_token_id is None:
            self.register_to_config(mask_token_id=num_rank_bins + 1)
        elif mask_token_id != num_rank_bins + 1:
            raise ValueError(f"mask_token_id must be num_rank_bins + 1 = {num_rank_bins + 1}, got {mask_token_id}")
        self.sampler = sampler
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None

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
        return float(self._time_at_mask_probability(torch.tensor(1.0 - alpha, dtype=torch.float64)))

    def _time_at_mask_probability(self, mask_probability: torch.Tensor) -> torch.Tensor:
        """The inverse of `mask_probability`."""
        share = (mask_probability / (1.0 - self.config.eps)).clamp(0.0, 1.0)
        if self.config.noise_schedule == "log-linear":
            return share
        return 4.0 / math.pi * torch.asin((share / 2.0).sqrt())

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
        first_stratum: int = 0,
        num_strata: int | None = None,
    ) -> torch.Tensor:
        """Stratified (antithetic) training times: u_i = (u + (first_stratum + i) / num_strata) mod 1,
        t = eps + (1 - eps) u, with one uniform u from `generator` (on the CPU).

        Over a global batch split across processes and accumulation steps, each part passes its offset
        `first_stratum` and the global size `num_strata` (default `batch_size`), and the same generator state: the
        whole global batch then covers [eps, 1] evenly, whatever each part holds.
        """
        num_strata = batch_size if num_strata is None else num_strata
        if not (0 <= first_stratum and first_stratum + batch_size <= num_strata):
            last = first_stratum + batch_size - 1
            raise ValueError(f"strata {first_stratum}..{last} lie outside 0..{num_strata - 1} of num_strata")
        u0 = torch.rand((), generator=generator, dtype=torch.float64)
        strata = (first_stratum + torch.arange(batch_size, dtype=torch.float64)) / num_strata
        u = torch.remainder(u0 + strata, 1.0)
        return (self.config.eps + (1.0 - self.config.eps) * u).float().to(device)

    @staticmethod
    def random_mask(maskable: torch.Tensor, share: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
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

    def set_timesteps(
        self, num_inference_steps: int, device: torch.device | str | None = None, sampler: str | None = None
    ) -> None:
        """Set the reverse-time grid 1 = t_0 > t_1 > ... > t_N = 0 (`timesteps` holds t_0..t_{N-1}).

        Args:
            num_inference_steps (`int`): N, the number of denoising steps (the first-hitting sampler takes one step
                per masked token instead and only uses the grid's start).
            device (`torch.device` or `str`, *optional*): where `timesteps` live.
            sampler (`str`, *optional*): one of `SAMPLERS` for this run; the configured `sampler` when None.
        """
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        sampler = sampler or self.config.sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        self.sampler = sampler
        self.num_inference_steps = num_inference_steps
        self._grid = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64, device=device)
        self.timesteps = self._grid[:-1]

    def _next_time(self, timestep: torch.Tensor) -> torch.Tensor:
        """The grid time that follows each of `timestep` (0 after the last)."""
        if self.timesteps is None:
            raise ValueError("call set_timesteps() before step()")
        # The grid is uniform: round to the nearest grid point first, so float noise in `timestep` cannot stall a step.
        index = torch.round((1.0 - timestep.double().cpu()) * self.num_inference_steps).long() + 1
        return self._grid.cpu()[index.clamp(0, self.num_inference_steps)].to(timestep.device)

    def predictive_distribution(
        self, model_output: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0
    ) -> torch.Tensor:
        """Float64 probabilities over 0..B from the model's logits, with temperature and nucleus (top-p) cut.

        Float64 so that rare values are drawn as often as they should be (float32 draws under-sample them).
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        probs = torch.softmax(model_output.double() / temperature, dim=-1)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # keep the smallest set reaching top_p
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.LongTensor,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> MaskedRankDiffusionSchedulerOutput | tuple:
        """One reverse step from time t: fill some `[MASK]` positions of `sample`, never touch the others.

        Args:
            model_output (`torch.Tensor` of shape `(batch_size, sequence_length, num_rank_bins + 1)`):
                The denoiser's logits over the clean tokens 0..B given `sample`.
            timestep (`float` or `torch.Tensor` of shape `(batch_size,)`): t of each row, from `timesteps` (or
                the `prev_timestep` of the last step with the first-hitting sampler).
            sample (`torch.LongTensor` of shape `(batch_size, sequence_length)`): the current tokens.
            temperature (`float`, defaults to 1.0): divides the logits before the softmax.
            top_p (`float`, defaults to 1.0): keep the most likely values up to this probability mass.
            generator (`torch.Generator`, *optional*): source of every draw (on the CPU).
            return_dict (`bool`, defaults to `True`): return a [`MaskedRankDiffusionSchedulerOutput`], else a tuple.
        """
        batch_size = sample.shape[0]
        t = torch.as_tensor(timestep, dtype=torch.float64).expand(batch_size).cpu()
        masked = (sample == self.config.mask_token_id).cpu()
        logits = model_output.detach().cpu()
        best = logits.argmax(dim=-1)  # also the most likely value after temperature and top-p
        if self.sampler == "first-hitting":
            # With n masked tokens the next is revealed when all n survive to s: m(s) = m(t) u^(1/n).
            n = masked.sum(dim=1)
            u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
            survival = u ** (1.0 / n.clamp(min=1))
            prev_t = torch.where(n > 0, self._time_at_mask_probability(self.mask_probability(t) * survival), t)
            scores = torch.rand(masked.shape, generator=generator, dtype=torch.float64).masked_fill(~masked, -1.0)
            reveal = torch.zeros_like(masked)
            reveal[torch.arange(batch_size), scores.argmax(dim=1)] = True
            reveal &= masked
        else:
            prev_t = self._next_time(t)
            share = 1.0 - self.mask_probability(prev_t) / self.mask_probability(t).clamp(min=1e-12)
            if self.sampler == "ancestral":
                reveal = masked & (torch.rand(masked.shape, generator=generator, dtype=torch.float64) < share[:, None])
            else:  # confidence: the expected number of reveals, the most confident positions first
                count = (masked.sum(dim=1) * share).round().long()
                confidence = torch.full(masked.shape, -1.0, dtype=torch.float64)
                confidence[masked] = self.predictive_distribution(logits[masked], temperature, top_p).max(-1).values
                rank = confidence.argsort(dim=1, descending=True).argsort(dim=1)
                reveal = masked & (rank < count[:, None])
        prev_sample = sample.cpu().clone()
        if self.sampler == "confidence":
            prev_sample[reveal] = best[reveal]
        else:  # the distribution only where a value is drawn
            prev_sample[reveal] = self._draw(
                self.predictive_distribution(logits[reveal], temperature, top_p), generator
            )
        pred_original_sample = torch.where(masked, best, sample.cpu())
        prev_sample, pred_original_sample = prev_sample.to(sample.device), pred_original_sample.to(sample.device)
        if not return_dict:
            return prev_sample, pred_original_sample, prev_t
        return MaskedRankDiffusionSchedulerOutput(prev_sample, pred_original_sample, prev_t)

    @staticmethod
    def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.LongTensor:
        """One categorical draw per row of float64 `probs` (inverse CDF)."""
        cdf = probs.cumsum(dim=-1)
        u = torch.rand(probs.shape[0], generator=generator, dtype=torch.float64) * cdf[:, -1]
        return torch.searchsorted(cdf, u[:, None], right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)
