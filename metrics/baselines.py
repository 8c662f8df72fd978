"""Baselines scored on the same masks as the model.

Each has `predict(gene_ids, input_ids, attention_mask, mask_token_id)` -> `(batch, length, B + 1)` probabilities
at every position, computed only from the visible positions (input tokens other than `[MASK]`) and the training
cells it was fitted on.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from scipy import sparse


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

    def predict(self, gene_ids: torch.Tensor, input_ids=None, attention_mask=None, mask_token_id=None) -> torch.Tensor:
        """Each position's gene marginal, whatever the rest of the cell says."""
        return self.log_probs(gene_ids).exp()


class GlobalMarginal:
    """One distribution over rank tokens for every gene: the mean of the per-gene marginals over a gene set (the
    evaluation panel), so it knows how ranks are spread but not which gene is which.

    Args:
        per_gene (`PerGeneMarginal`): fitted on the training cells.
        genes (`np.ndarray`): the genes to average over.
    """

    def __init__(self, per_gene: PerGeneMarginal, genes: np.ndarray):
        self.probs = torch.from_numpy(per_gene.probabilities()[np.asarray(genes)].mean(axis=0)).float()

    def predict(self, gene_ids: torch.Tensor, input_ids=None, attention_mask=None, mask_token_id=None) -> torch.Tensor:
        return self.probs.expand(*gene_ids.shape, -1).clone()


class NearestCells:
    """k-nearest-neighbour imputation: the training cells closest to a cell on its visible genes vote.

    The distance is Euclidean between rank tokens at the cell's visible genes (a training cell's token is 0 where
    it does not express the gene). At a masked gene, the predictive distribution is the histogram of the `k`
    neighbours' tokens there, smoothed towards the gene's marginal with weight `prior_weight` (in cells).

    Args:
        cells (iterable of `(genes, tokens)`): the training cells (expressed genes and their tokens).
        prior (`PerGeneMarginal`): fitted on the same cells, for the smoothing.
        k (`int`, defaults to 15): neighbours.
        prior_weight (`float`, defaults to 1.0): pseudo-cells of the prior.
    """

    def __init__(self, cells: Iterable[tuple[np.ndarray, np.ndarray]], prior: PerGeneMarginal, k: int = 15,
                 prior_weight: float = 1.0):  # fmt: skip
        rows, columns, values = [], [], []
        for i, (genes, tokens) in enumerate(cells):
            expressed = tokens > 0
            rows.append(np.full(int(expressed.sum()), i))
            columns.append(genes[expressed])
            values.append(tokens[expressed])
        if not rows:
            raise ValueError("NearestCells needs training cells")
        shape = (len(rows), len(prior.nonzero_counts))
        self.tokens = sparse.csc_matrix(
            (np.concatenate(values), (np.concatenate(rows), np.concatenate(columns))), shape=shape, dtype=np.float32
        )
        self.prior = prior.probabilities()
        self.k = min(k, len(rows))
        self.prior_weight = prior_weight

    def predict(self, gene_ids, input_ids, attention_mask, mask_token_id) -> torch.Tensor:
        num_classes = self.prior.shape[1]
        out = torch.from_numpy(self.prior[gene_ids.numpy()]).float()
        for row in range(gene_ids.shape[0]):
            real = attention_mask[row].bool().numpy()
            masked = real & (input_ids[row] == mask_token_id).numpy()
            visible = real & ~masked
            if not masked.any():
                continue
            genes, query = gene_ids[row].numpy(), input_ids[row].numpy()
            reference = self.tokens[:, genes[visible]].toarray()
            distance = ((reference - query[visible]) ** 2).sum(axis=1)
            neighbours = np.argpartition(distance, self.k - 1)[: self.k]
            votes = self.tokens[:, genes[masked]][neighbours].toarray().astype(np.int64)  # (k, masked)
            counts = np.stack([(votes == c).sum(axis=0) for c in range(num_classes)], axis=1)
            probs = (counts + self.prior_weight * self.prior[genes[masked]]) / (self.k + self.prior_weight)
            out[row, torch.from_numpy(np.flatnonzero(masked))] = torch.from_numpy(probs).float()
        return out
