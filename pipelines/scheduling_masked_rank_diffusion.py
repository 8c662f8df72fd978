# Copyright 2026 The RankDiff authors. Licensed under the Apache License, Version 2.0.
"""Absorbing-state (masked) diffusion in continuous time over rank tokens, as in MDLM (Sahoo et al., 2024)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

NOISE_SCHEDULES = ("log-linear", "cosine")
SAMPLERS = ("ancestral", "first-hitting", "confidence")
# splitmix64's constants as int64 (torch integer arithmetic wraps modulo 2^64, as the generator needs).
_GOLDEN, _MIX_1, _MIX_2 = (c - 2**64 for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))
# Independent draws of a step: the reveal draw of each position, the drawn value, the first-hitting time.
_REVEAL, _VALUE, _HITTING = range(3)


def is_real_number(value) -> bool:
    """A Python or numpy real number, not a bool (`np.float32(0.5)` is one, `True` is not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_positive_int(value) -> bool:
    """A Python or numpy integer >= 1, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def splitmix64(x: torch.LongTensor) -> torch.LongTensor:
    """The splitmix64 mix of int64 keys (Steele et al., 2014), elementwise and on any device."""
    x = x + _GOLDEN
    x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * _MIX_1
    x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * _MIX_2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def keyed_uniforms(keys: torch.LongTensor) -> torch.DoubleTensor:
    """Uniform draws in [0, 1), one per int64 key: the top 53 bits of its splitmix64 mix."""
    return ((splitmix64(keys) >> 11) & ((1 << 53) - 1)).double() * 2.0**-53


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

    A sampling run: `set_timesteps`, then `begin(sample, ...)` (per-row seeds and times, the number of steps), then
    `len(scheduler)` calls of `step`, each given the model's logits at `scheduler.row_times`. Every draw is a hash
    of (the row's seed, the step, the position), computed where the sample lives: no host copies and no host syncs
    in a step, and a row draws the same whatever else is in its batch.
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
        self._reset()

    def _reset(self) -> None:
        self._seeds: torch.LongTensor | None = None
        self._step_index = 0
        self._num_steps = 0
        self.row_times: torch.Tensor | None = None

    def __len__(self) -> int:
        """The number of steps of the current run: `num_inference_steps`, or with the first-hitting sampler the
        largest number of masked positions of a row (known after [`~MaskedRankDiffusionScheduler.begin`])."""
        return self._num_steps

    @property
    def step_index(self) -> int:
        """The number of steps taken since the run began."""
        return self._step_index

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
            generator (`torch.Generator`, *optional*): source of the draws (on its own device).

        Returns:
            `torch.Tensor` of booleans, True at the chosen positions.
        """
        if not 0.0 < share <= 1.0:
            raise ValueError(f"the share to mask must be in (0, 1], got {share}")
        maskable = maskable.bool()
        draw_device = generator.device if generator is not None else maskable.device
        scores = torch.rand(maskable.shape, generator=generator, device=draw_device).to(maskable.device)
        scores = scores.masked_fill(~maskable, 2.0)
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
        """Set the reverse-time grid 1 = t_0 > t_1 > ... > t_N = 0 (`timesteps` holds t_0..t_{N-1}) and end any run.

        Args:
            num_inference_steps (`int`): N, the number of denoising steps (the first-hitting sampler takes one step
                per masked token instead and only uses the grid's start).
            device (`torch.device` or `str`, *optional*): where `timesteps` live.
            sampler (`str`, *optional*): one of `SAMPLERS` for this run; the configured `sampler` when None.
        """
        steps = num_inference_steps
        if not is_positive_int(steps):
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        sampler = self.config.sampler if sampler is None else sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        self.sampler = sampler
        self.num_inference_steps = num_inference_steps = int(steps)
        self._grid = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64, device=device)
        self.timesteps = self._grid[:-1]
        self._reset()
        self._num_steps = num_inference_steps

    def begin(
        self,
        sample: torch.LongTensor,
        *,
        seeds: torch.LongTensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Start a run on `sample`: every row at t = 1, step 0, and a seed per row for its draws.

        Args:
            sample (`torch.LongTensor` of shape `(batch_size, sequence_length)`): the tokens, `[MASK]` where they
                are to be drawn; its device is where the run happens.
            seeds (`torch.LongTensor` of shape `(batch_size,)`, *optional*): one int64 seed per row (a row with the
                same seed and tokens draws the same values in any batch); else drawn from `generator`.
            generator (`torch.Generator`, *optional*): the source of the seeds when `seeds` is None.
        """
        if self.timesteps is None:
            raise ValueError("call set_timesteps() before begin()")
        batch_size, device = sample.shape[0], sample.device
        if seeds is None:
            seeds = torch.randint(-(2**63), 2**63 - 1, (batch_size,), generator=generator,
                                  device=generator.device if generator is not None else "cpu")  # fmt: skip
        if seeds.shape != (batch_size,):
            raise ValueError(f"seeds must have shape ({batch_size},), got {tuple(seeds.shape)}")
        self._seeds = seeds.to(device=device, dtype=torch.long)
        self._step_index = 0
        self.row_times = torch.ones(batch_size, dtype=torch.float64, device=device)
        if self.sampler == "first-hitting":  # one step per masked token: the one host sync of a run
            self._num_steps = int((sample == self.config.mask_token_id).sum(dim=1).max()) if batch_size else 0
        else:
            self._num_steps = self.num_inference_steps

    def _uniforms(self, stream: int, shape: tuple[int, ...]) -> torch.DoubleTensor:
        """Draws for this step: `(batch,)` or `(batch, length)`, keyed by (row seed, step, stream, position)."""
        step_key = int(splitmix64(torch.tensor(3 * self._step_index + stream)))  # a host scalar: no copy to wait for
        row_keys = splitmix64(self._seeds ^ step_key)
        if len(shape) == 1:
            return keyed_uniforms(row_keys)
        positions = torch.arange(shape[1], device=self._seeds.device) * _GOLDEN
        return keyed_uniforms(row_keys[:, None] + positions)

    def _next_time(self, timestep: torch.Tensor) -> torch.Tensor:
        """The grid time that follows each of `timestep` (0 after the last)."""
        if self.timesteps is None:
            raise ValueError("call set_timesteps() before step()")
        # The grid is uniform: round to the nearest grid point first, so float noise in `timestep` cannot stall a step.
        index = torch.round((1.0 - timestep.double()) * self.num_inference_steps).long() + 1
        return self._grid.to(timestep.device)[index.clamp(0, self.num_inference_steps)]

    def sampling_distribution(
        self, model_output: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0
    ) -> torch.Tensor:
        """Float64 probabilities over 0..B from the model's logits, with temperature and nucleus (top-p) cut.

        Float64 so that rare values are drawn as often as they should be (float32 draws under-sample them).
        """
        if not (is_real_number(temperature) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if not (is_real_number(top_p) and 0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
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

        Runs where `sample` lives, without host syncs. Advances the run: `row_times` becomes `prev_timestep`.

        Args:
            model_output (`torch.Tensor` of shape `(batch_size, sequence_length, num_rank_bins + 1)`):
                The denoiser's logits over the clean tokens 0..B given `sample`.
            timestep (`float` or `torch.Tensor` of shape `(batch_size,)`): t of each row (`row_times`).
            sample (`torch.LongTensor` of shape `(batch_size, sequence_length)`): the current tokens.
            temperature (`float`, defaults to 1.0): divides the logits before the softmax.
            top_p (`float`, defaults to 1.0): keep the most likely values up to this probability mass.
            generator (`torch.Generator`, *optional*): seeds the rows when no run was begun on this sample
                ([`~MaskedRankDiffusionScheduler.begin`]).
            return_dict (`bool`, defaults to `True`): return a [`MaskedRankDiffusionSchedulerOutput`], else a tuple.
        """
        batch_size, device = sample.shape[0], sample.device
        if self._seeds is None or len(self._seeds) != batch_size:
            self.begin(sample, generator=generator)
        t = torch.as_tensor(timestep, dtype=torch.float64, device=device).expand(batch_size)
        masked = sample == self.config.mask_token_id
        logits = model_output.detach().to(device)
        best = logits.argmax(dim=-1)  # also the most likely value after temperature and top-p
        if self.sampler == "first-hitting":
            # With n masked tokens the next is revealed when all n survive to s: m(s) = m(t) u^(1/n).
            n = masked.sum(dim=1)
            survival = self._uniforms(_HITTING, (batch_size,)) ** (1.0 / n.clamp(min=1))
            prev_t = torch.where(n > 0, self._time_at_mask_probability(self.mask_probability(t) * survival), t)
            scores = self._uniforms(_REVEAL, masked.shape).masked_fill(~masked, -1.0)
            reveal = torch.zeros_like(masked).scatter_(1, scores.argmax(dim=1, keepdim=True), True) & masked
        else:
            prev_t = self._next_time(t)
            share = 1.0 - self.mask_probability(prev_t) / self.mask_probability(t).clamp(min=1e-12)
            if self.sampler == "ancestral":
                reveal = masked & (self._uniforms(_REVEAL, masked.shape) < share[:, None])
            else:  # confidence: the expected number of reveals, the most confident positions first
                count = (masked.sum(dim=1) * share).round().long()
                confidence = self.sampling_distribution(logits, temperature, top_p).amax(dim=-1)
                rank = confidence.masked_fill(~masked, -1.0).argsort(dim=1, descending=True).argsort(dim=1)
                reveal = masked & (rank < count[:, None])
        if self.sampler == "confidence":
            values = best
        else:
            values = self._draw_at(reveal, logits, self._uniforms(_VALUE, masked.shape), temperature, top_p)
        prev_sample = torch.where(reveal, values, sample)
        pred_original_sample = torch.where(masked, best, sample)
        self._step_index += 1
        self.row_times = prev_t
        if not return_dict:
            return prev_sample, pred_original_sample, prev_t
        return MaskedRankDiffusionSchedulerOutput(prev_sample, pred_original_sample, prev_t)

    def _draw_at(self, reveal, logits, uniforms, temperature, top_p) -> torch.LongTensor:
        """Values drawn at the `reveal` positions (elsewhere 0). On the host only those positions are computed;
        on an accelerator every position is, as picking them out would wait for the device. Same draws either way."""
        if reveal.device.type != "cpu":
            return self._draw(self.sampling_distribution(logits, temperature, top_p), uniforms)
        where = reveal.nonzero(as_tuple=True)
        values = torch.zeros(reveal.shape, dtype=torch.long)
        values[where] = self._draw(self.sampling_distribution(logits[where], temperature, top_p), uniforms[where])
        return values

    @staticmethod
    def _draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.LongTensor:
        """One categorical draw per position of float64 `probs` `(..., B + 1)` by inverse CDF at `uniforms`."""
        cdf = probs.cumsum(dim=-1)
        target = (uniforms * cdf[..., -1]).unsqueeze(-1)
        return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)
