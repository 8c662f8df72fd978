"""Diffusion scheduler (and, later, the diffusers-style pipeline) of RankDiff."""

from .scheduling_masked_rank_diffusion import NOISE_SCHEDULES, MaskedRankDiffusionScheduler, mask_random_share

__all__ = ["NOISE_SCHEDULES", "MaskedRankDiffusionScheduler", "mask_random_share"]
