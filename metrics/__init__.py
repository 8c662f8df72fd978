"""Scoring of RankDiff models and the baselines they are compared with."""

from .baselines import PerGeneMarginal

__all__ = ["PerGeneMarginal"]
