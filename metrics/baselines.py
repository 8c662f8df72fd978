"""Baselines scored on the same masks as the model."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch


class PerGeneMarginal:
    """Each gene's marginal distribution over rank tokens 0..B, estimated on training cells.

    It predicts every masked position from its gene alone, ignoring the rest of the cell: the bar a model must
    clear to show it learned anything about cells. Counts get a pseudocount of `pseudocount` spread evenly over the
    B + 1 classes, so unseen genes are uniform and no probability is zero.

    Args:
        num_rank_bins (`int`): B.
        gene_vocab_size (`int`): number of gene ids.
        pseudocount (`float`, *optional*, defaults to 1.0): total added count per gene.
    """

    def __init__(self, num_rank_bins: int, gene_vocab_size: int, pseudocount: float = 1.0):
        self.num_rank_bins = num_rank_bins
        self.pseudocount = pseudocount
        self.nonzero_counts = np.zeros((gene_vocab_size, num_rank_bins + 1), dtype=np.float64)
        self.num_cells = 0
        self._log_table: torch.Tensor | None = None

    def update(self, genes: np.ndarray, tokens: np.ndarray) -> None:
        """Add one cell: its expressed genes and their rank tokens (unlisted genes count as token 0)."""
        outside = (genes < 0) | (genes >= len(self.nonzero_counts))
        if outside.any():
            raise ValueError(
                f"gene ids must be in 0..{len(self.nonzero_counts) - 1}, got {genes[outside][:10].tolist()}"
            )
        expressed = tokens > 0
        np.add.at(self.nonzero_counts, (genes[expressed], tokens[expressed]), 1.0)
        self.num_cells += 1
        self._log_table = None

    def fit(self, cells: Iterable[tuple[np.ndarray, np.ndarray]]) -> PerGeneMarginal:
        """Add every (genes, tokens) cell of `cells` and return self."""
        for genes, tokens in cells:
            self.update(genes, tokens)
        return self

    @property
    def detection_counts(self) -> np.ndarray:
        """Number of fitted cells in which each gene is expressed."""
        return self.nonzero_counts.sum(axis=1)

    def probabilities(self) -> np.ndarray:
        """`(gene_vocab_size, B + 1)` table of smoothed per-gene token probabilities."""
        counts = self.nonzero_counts.copy()
        counts[:, 0] = self.num_cells - self.detection_counts
        counts += self.pseudocount / counts.shape[1]
        return counts / counts.sum(axis=1, keepdims=True)

    def log_probs(self, gene_ids: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of shape `gene_ids.shape + (B + 1,)`."""
        if self._log_table is None:
            self._log_table = torch.from_numpy(np.log(self.probabilities())).float()
        return self._log_table.to(gene_ids.device)[gene_ids]
