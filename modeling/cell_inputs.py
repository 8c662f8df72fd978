"""User input of the pipelines -> padded tensors: gene names or ids, rank tokens or raw counts, and a mask; and the
windows that show a cell longer than the model's training length to the model a part at a time."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .gene_vocab import GeneVocab
from .rank_tokenizer import cell_salts, checked_counts, hash_keys, rank_tokens

logger = logging.getLogger(__name__)

# A cell given by counts at fewer genes than this, some of them zero, looks like a panel of a cell, not all of it.
WHOLE_CELL_GENES = 5000


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

    def windows(self, max_length: int, seed: int = 0) -> CellWindows:
        """The cells cut into windows of at most `max_length` positions, for a model trained on sequences that long.

        A cell that fits is one window. A longer one is cut into `ceil(n / max_length)` windows of nearly equal
        size, each a random share of its masked genes and the same share of its visible ones (drawn by a hash of
        `seed`, the cell's index and the gene id, never by the counts), so every window has visible genes to go
        on and, as with the random gene lists of training, each masked gene is predicted from those of its window.
        The same genes and mask give the same windows at every call.
        """
        cells, positions = [], []
        for cell in range(len(self)):
            real = np.flatnonzero(self.attention_mask[cell].numpy())
            count = math.ceil(len(real) / max_length) if len(real) else 1
            if count > 1:
                salt = cell_salts(seed, cell, ["windows"])[0, 0]
                keys = hash_keys(salt, self.gene_ids[cell, real].numpy())
                masked = self.mask[cell, real].numpy()
                order = np.lexsort((keys, ~masked))  # masked genes first, each group in hash order
                parts = [np.sort(real[order[start::count]]) for start in range(count)]  # dealt round-robin
            else:
                parts = [real]
            cells += [cell] * len(parts)
            positions += parts
        width = max(len(part) for part in positions) if positions else 0
        index = torch.zeros(len(positions), width, dtype=torch.long)
        attention_mask = torch.zeros(len(positions), width, dtype=torch.bool)
        for row, part in enumerate(positions):
            index[row, : len(part)] = torch.from_numpy(part)
            attention_mask[row, : len(part)] = True
        cell = torch.tensor(cells, dtype=torch.long)

        def take(values: torch.Tensor) -> torch.Tensor:
            return values[cell[:, None], index].masked_fill(~attention_mask, 0)

        inputs = CellInputs(take(self.gene_ids), take(self.ranks), take(self.mask).bool(), attention_mask)
        return CellWindows(inputs, cell, index, self.gene_ids.shape)

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


@dataclass
class CellWindows:
    """Windows of cells ([`CellInputs.windows`]) and where each of their positions comes from.

    Attributes:
        inputs ([`CellInputs`]): the windows, `(n_windows, length)`.
        cell (`torch.LongTensor` of shape `(n_windows,)`): the cell of each window.
        position (`torch.LongTensor` of shape `(n_windows, length)`): the cell position of each window position.
        shape (`torch.Size`): `(n_cells, width)` of the cells.
    """

    inputs: CellInputs
    cell: torch.LongTensor
    position: torch.LongTensor
    shape: torch.Size

    def to_cells(self, values: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """Per-window values `(n_windows, length, ...)` back at their cells' positions: `(n_cells, width, ...)`;
        `fill` where no window holds a position (padding)."""
        out = values.new_full((*self.shape, *values.shape[2:]), fill)
        real = self.inputs.attention_mask
        out[self.cell[:, None].expand_as(real)[real], self.position[real]] = values[:, : real.shape[1]][real]
        return out


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
    context_counts=None,
    gene_vocab: GeneVocab | None = None,
    gene_vocab_size: int | None = None,
) -> CellInputs:
    """Check the pipelines' input and pad it. Cells may hold any number of genes (see [`CellInputs.windows`]).

    Args:
        gene_ids: the genes of one cell (a flat sequence) or of several (a sequence of sequences or a 2-D array):
            token ids, or Ensembl ids / symbols looked up in `gene_vocab`.
        ranks: rank tokens 0..B at the same positions (values at masked positions are ignored).
        counts: raw counts at the same positions, tokenized by the training rule ([`rank_tokens`]: per-cell
            quantile bins of the non-zero counts) over each cell's *visible* counts, so masked values (ignored, may
            be NaN) never shape the visible tokens. The bins are quantiles of the whole cell: give all of a cell's
            measured genes, or its other genes' counts as `context_counts`.
        mask: True at the positions to predict. Without `ranks` or `counts` every position is predicted.
        num_rank_bins: B of the model.
        context_counts: with `counts`, per cell the raw counts of its genes that are not in `gene_ids` (zeros may be
            left out): they join the visible counts in the quantile bins, as in training, and are not predicted.
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
    if context_counts is not None and counts is None:
        raise ValueError("context_counts go with counts: they join the counts in each cell's quantile bins")
    contexts = _as_cells(context_counts, "context_counts")
    if contexts is not None and len(contexts) != n_cells:
        raise ValueError(f"context_counts must hold one list per cell ({n_cells}), got {len(contexts)}")
    width, partial = max(lengths), []
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
            context = np.asarray(contexts[i] if contexts is not None else [], dtype=np.float64)
            if contexts is None and n < WHOLE_CELL_GENES and (visible == 0).any():
                partial.append(i)
            # Checked here, so an error names the position and gene in the cell as given.
            checked_counts(visible, f"cell {i}", genes[~cell_mask], np.flatnonzero(~cell_mask))
            checked_counts(context, f"cell {i}, context_counts")
            tokens = np.zeros(n, dtype=np.int64)
            if visible.any() or context.any():  # with no visible expressed gene there is nothing to bin
                tokens[~cell_mask] = rank_tokens(visible, num_rank_bins, reference=np.r_[visible, context])
        else:
            tokens = np.nan_to_num(np.asarray(values[i], dtype=np.float64), nan=-1).astype(np.int64)
        bad = ~cell_mask & ((tokens < 0) | (tokens > num_rank_bins))
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise ValueError(f"cell {i}: ranks must be in 0..{num_rank_bins}, got {int(tokens[j])} at position {j}")
        out_ranks[i, :n] = torch.from_numpy(np.where(cell_mask, 0, tokens))
        out_mask[i, :n] = torch.from_numpy(cell_mask)
    if partial:
        logger.warning(
            "%d cells (e.g. cell %d, %d genes) are given by the counts of fewer than %d genes, some of them zero: "
            "their tokens come from these counts by the training rule (quantile bins of the cell's non-zero "
            "counts). If they are only part of their cells, pass the other genes' counts as context_counts (or "
            "ranks computed from the whole cells), so the bins are those of the whole cells, as in training; "
            "context_counts=[[]] * n_cells says they are whole.",
            len(partial),
            partial[0],
            lengths[partial[0]],
            WHOLE_CELL_GENES,
        )
    out_ranks[out_mask] = num_rank_bins + 1
    return CellInputs(out_genes, out_ranks, out_mask, attention_mask)
