"""Scoring of RankDiff models and the baselines they are compared with.

The metrics are a local `evaluate` module: `evaluate.load("metrics/rank_imputation")` (see `rank_imputation/`).
"""

from .baselines import CellAwareMarginal, MagicImputation, NearestCellRates, NearestCells, PerGeneMarginal

__all__ = ["CellAwareMarginal", "MagicImputation", "NearestCellRates", "NearestCells", "PerGeneMarginal"]
