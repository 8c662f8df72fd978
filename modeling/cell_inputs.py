"""User input of the pipelines -> padded tensors: gene names or ids, rank tokens or raw counts, and a mask."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .gene_vocab import GeneVocab
from .rank_tokenizer import rank_tokens


@dataclass
class CellInputs:
    """A padded batch of cells for the denoiser.

    Attributes:
        gene_ids (`torch.LongTensor` of shape `(n_cells, length)`): gene token ids (0 at padding).
        ranks (`torch.LongTensor` of shape `(n_cells, length)`): rank tokens, `[MASK]` where `mask` (0 at padding).
        mask (`torch.BoolTensor` of shape `(n_cells, length)`): True at the positions to predict.
        attention_mask (`torch.BoolTensor` of shape `(n_cells, length)`): True at real positions.
    """

    gene_ids: torch.LongTensor
    ranks: torch.LongTensor
    mask: torch.BoolTensor
    attention_mask: torch.BoolTensor

    def __len__(self) -> int:
        return self.gene_ids.shape[0]

    def rows(self, index: slice | torch.Tensor) -> CellInputs:
        """The cells at `index`, trimmed to their longest one."""
        attention_mask = self.attention_mask[index]
        length = int(attention_mask.sum(dim=1).max()) if len(attention_mask) else 0
        return CellInputs(
            self.gene_ids[index][:, :length],
            self.ranks[index][:, :length],
            self.mask[index][:, :length],
            attention_mask[:, :length],
        )


def _as_cells(values, name: str) -> list[list] | None:
    """One cell (a flat sequence) or many (a sequence of sequences, or a 2-D array) as a list of lists."""
    if values is None:
        return None
    if isinstance(values, torch.Tensor):
        values = values.cpu().numpy()
    if isinstance(values, np.ndarray):
        if values.ndim not in (1, 2):
            raise ValueError(f"{name} must be 1-D (one cell) or 2-D (cells x genes), got shape {values.shape}")
        return [values.tolist()] if values.ndim == 1 else values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence, an array or a tensor, got {type(values).__name__}")
    if len(values) and all(isinstance(v, (Sequence, np.ndarray, torch.Tensor)) and not isinstance(v, str)
                           for v in values):  # fmt: skip
        return [np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v).tolist() for v in values]
    return [list(values)]


def prepare_cell_inputs(
    gene_ids,
    ranks=None,
    counts=None,
    mask=None,
    *,
    num_rank_bins: int,
    max_length: int,
    gene_vocab: GeneVocab | None = None,
    gene_vocab_size: int | None = None,
) -> CellInputs:
    """Check the pipelines' input and pad it.

    Args:
        gene_ids: the genes of one cell (a flat sequence) or of several (a sequence of sequences or a 2-D array):
            token ids, or Ensembl ids / symbols looked up in `gene_vocab`.
        ranks: rank tokens 0..B at the same positions (values at masked positions are ignored).
        counts: raw counts at the same positions, tokenized with [`rank_tokens`] over each cell's *visible* genes
            (give all of a cell's measured genes, as its bins are quantiles of its own counts; masked values are
            ignored and may be NaN).
        mask: True at the positions to predict. Without `ranks` or `counts` every position is predicted.
        num_rank_bins, max_length: B and L of the model.
        gene_vocab: to map gene names; gene_vocab_size: the number of gene ids of the model, to check ids.
    """
    if ranks is not None and counts is not None:
        raise ValueError("give ranks or counts, not both")
    if mask is not None and ranks is None and counts is None:
        raise ValueError("a mask needs the ranks (or counts) of the positions it keeps")
    cells = _as_cells(gene_ids, "gene_ids")
    values = _as_cells(ranks if ranks is not None else counts, "ranks" if ranks is not None else "counts")
    masks = _as_cells(mask, "mask")
    for name, other in (("ranks" if ranks is not None else "counts", values), ("mask", masks)):
        if other is not None and [len(c) for c in other] != [len(c) for c in cells]:
            raise ValueError(f"{name} must have one value per gene of each cell, like gene_ids")
    n_cells, lengths = len(cells), [len(c) for c in cells]
    if not n_cells or min(lengths) == 0:
        raise ValueError("gene_ids must hold at least one gene per cell")
    if max(lengths) > max_length:
        cell = int(np.argmax(lengths))
        raise ValueError(f"cell {cell} has {lengths[cell]} genes; this model takes at most {max_length} per cell")
    width = max(lengths)
    out_genes = torch.zeros(n_cells, width, dtype=torch.long)
    out_ranks = torch.zeros(n_cells, width, dtype=torch.long)
    out_mask = torch.zeros(n_cells, width, dtype=torch.bool)
    attention_mask = torch.zeros(n_cells, width, dtype=torch.bool)
    for i, genes in enumerate(cells):
        if any(isinstance(g, str) for g in genes):
            if gene_vocab is None:
                raise ValueError("gene names need the checkpoint's gene vocabulary (model.gene_vocab is None)")
            try:
                genes = gene_vocab.encode(genes)
            except KeyError as error:
                raise KeyError(f"cell {i}: {error.args[0]}") from None
        genes = np.asarray(genes, dtype=np.int64)
        unique, seen = np.unique(genes, return_counts=True)
        if (seen > 1).any():
            raise ValueError(f"cell {i}: gene ids are repeated: {unique[seen > 1][:10].tolist()}")
        bad = (genes < 0) | (genes >= gene_vocab_size) if gene_vocab_size else genes < 0
        if bad.any():
            raise ValueError(f"cell {i}: gene id {int(genes[bad][0])} is outside the model's 0..{gene_vocab_size - 1}")
        n = len(genes)
        out_genes[i, :n] = torch.from_numpy(genes)
        attention_mask[i, :n] = True
        if values is None:
            out_mask[i, :n] = True
            continue
        cell_mask = np.asarray(masks[i], dtype=bool) if masks is not None else np.zeros(n, dtype=bool)
        if counts is not None:  # bins from the visible counts only: hidden values must not shape them (NaN allowed)
            visible = np.asarray(values[i], dtype=np.float64)[~cell_mask]
            tokens = np.zeros(n, dtype=np.int64)
            if visible.any():  # a cell with no visible expressed gene has nothing to bin (bad values still raise)
                where = f"cell {i}"
                tokens[~cell_mask] = rank_tokens(visible, num_rank_bins, where=where, genes=genes[~cell_mask])
        else:
            tokens = np.nan_to_num(np.asarray(values[i], dtype=np.float64), nan=-1).astype(np.int64)
        bad = ~cell_mask & ((tokens < 0) | (tokens > num_rank_bins))
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise ValueError(f"cell {i}: ranks must be in 0..{num_rank_bins}, got {int(tokens[j])} at position {j}")
        out_ranks[i, :n] = torch.from_numpy(np.where(cell_mask, 0, tokens))
        out_mask[i, :n] = torch.from_numpy(cell_mask)
    out_ranks[out_mask] = num_rank_bins + 1
    return CellInputs(out_genes, out_ranks, out_mask, attention_mask)
