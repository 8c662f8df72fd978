"""Padded batches of cells for the denoiser ([`CellInputs`], made by the [`RankDiTProcessor`]), and the windows that
show a cell longer than the model's training length to the model a part at a time."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .rank_tokenizer import cell_salts, hash_keys


@dataclass
class CellInputs:
    """A padded batch of cells for the denoiser.

    Attributes:
        gene_ids (`torch.LongTensor` of shape `(n_cells, length)`): gene token ids (0 at padding, -1 at genes left
            out of the model's input, see the processor's `unknown_genes`).
        ranks (`torch.LongTensor` of shape `(n_cells, length)`): rank tokens, `[MASK]` where `mask` (0 at padding).
        mask (`torch.BoolTensor` of shape `(n_cells, length)`): True at the positions to predict.
        attention_mask (`torch.BoolTensor` of shape `(n_cells, length)`): True at the positions the model sees.
        condition_ids (`torch.LongTensor` of shape `(n_cells, n_conditions)`, *optional*): each cell's condition
            ids (see [`ConditionEncoder`]); None: every condition null.
        doses (`torch.Tensor` of shape `(n_cells,)`, *optional*): each cell's dose in uM (NaN: null).
    """

    gene_ids: torch.LongTensor
    ranks: torch.LongTensor
    mask: torch.BoolTensor
    attention_mask: torch.BoolTensor
    condition_ids: torch.LongTensor | None = None
    doses: torch.Tensor | None = None

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

        inputs = CellInputs(
            take(self.gene_ids),
            take(self.ranks),
            take(self.mask).bool(),
            attention_mask,
            *(None if values is None else values[cell] for values in (self.condition_ids, self.doses)),
        )
        return CellWindows(inputs, cell, index, self.gene_ids.shape)

    def rows(self, index: slice | torch.Tensor) -> CellInputs:
        """The cells at `index`, trimmed after their last real position."""
        attention_mask = self.attention_mask[index]
        real = attention_mask.any(dim=0)
        length = int(real.nonzero().max()) + 1 if real.any() else 0
        return CellInputs(
            self.gene_ids[index][:, :length],
            self.ranks[index][:, :length],
            self.mask[index][:, :length],
            attention_mask[:, :length],
            *(None if values is None else values[index] for values in (self.condition_ids, self.doses)),
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
