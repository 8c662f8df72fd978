"""Diffusion scheduler and the diffusers-style pipeline of RankDiff."""

from .pipeline_masked_rank_diffusion import MaskedRankDiffusionPipeline, MaskedRankDiffusionPipelineOutput
from .reference_cells import ReferenceCells
from .scheduling_masked_rank_diffusion import (
    NOISE_SCHEDULES,
    SAMPLERS,
    MaskedRankDiffusionScheduler,
    MaskedRankDiffusionSchedulerOutput,
)

__all__ = [
    "NOISE_SCHEDULES",
    "SAMPLERS",
    "MaskedRankDiffusionPipeline",
    "MaskedRankDiffusionPipelineOutput",
    "MaskedRankDiffusionScheduler",
    "MaskedRankDiffusionSchedulerOutput",
    "ReferenceCells",
]
