"""Cells on their way to RankDiT: [`RaggedCells`] (any lengths, back to back, what the processor's batch tokenizer
takes), [`CellBatch`] (padded tensors, what it gives: `model(**batch)`), and [`CellWindows`], which show a cell
longer than the model's training length to the model a part at a time."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.feature_extraction_utils import BatchFeature

from .rank_tokenizer import cell_salts, hash_keys


@dataclass
class RaggedCells:
    """Cells of any lengths back to back: cell i holds positions `offsets[i]:offsets[i + 1]` of every array.

    Attributes:
        offsets (`np.ndarray`): `(n_cells + 1,)` start of each cell.
        gene_ids (`np.ndarray`): int64 gene token ids (-1: a gene outside the vocabulary, left out of the model).
        counts (`np.ndarray`, *optional*): raw counts (NaN allowed where masked); the processor bins them.
        ranks (`np.ndarray`, *optional*): rank tokens 0..B instead of counts.
        mask (`np.ndarray`, *optional*): True at the positions to predict.
        context (`np.ndarray`, *optional*): counts of each cell's genes that are not listed (laid out by
            `context_offsets`): they join the cell's bins, so a part of a cell is binned as the whole cell.
        context_offsets (`np.ndarray`, *optional*): `(n_cells + 1,)` start of each cell in `context`.
    """

    offsets: np.ndarray
    gene_ids: np.ndarray
    counts: np.ndarray | None = None
    ranks: np.ndarray | None = None
    mask: np.ndarray | None = None
    context: np.ndarray | None = None
    context_offsets: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def from_matrix(
        cls,
        counts: np.ndarray,
        column_ids: np.ndarray,
        hidden: np.ndarray | None = None,
        requested: np.ndarray | None = None,
    ) -> tuple[RaggedCells, np.ndarray]:
        """Rows of a count table (cells x genes, dense; AnnData's layout) as cells, by RankDiff's one rule for a
        table's genes, in training and in inference alike.

        A cell lists the columns with a gene id ([`GeneVocab.columns`]) where it has a visible non-zero value, is
        `hidden` (count NaN, masked) or is `requested` (a gene asked for in every cell, listed even where zero).
        Its visible non-zero values in columns without a gene id (outside the vocabulary, or naming a gene an
        earlier column names) are its `context`: they shape its bins and are not listed. Values are taken as they
        are (a NaN or a negative count is still listed): the caller's count check names or skips them.

        Args:
            counts (`np.ndarray`): `(n_cells, n_columns)` raw counts.
            column_ids (`np.ndarray`): `(n_columns,)` gene token id of each column, -1 for none.
            hidden (`np.ndarray`, *optional*): `(n_cells, n_columns)` True at the values to predict.
            requested (`np.ndarray`, *optional*): `(n_columns,)` True at the columns listed in every cell.

        Returns:
            `(cells, columns)`: the cells, and the column of each listed position.
        """
        hidden = np.zeros(counts.shape, dtype=bool) if hidden is None else hidden
        present = ~hidden & (counts != 0)  # NaN != 0: a visible NaN is present, for the count check to see
        listed = (column_ids >= 0) & (present | hidden | (False if requested is None else requested))
        context = present & ~listed
        rows, columns = np.nonzero(listed)
        context_rows, context_columns = np.nonzero(context)

        def offsets(per_row: np.ndarray) -> np.ndarray:
            return np.concatenate([[0], np.cumsum(per_row.sum(axis=1))])

        cells = cls(
            offsets(listed),
            column_ids[columns].astype(np.int64),
            counts=np.where(hidden[rows, columns], np.nan, counts[rows, columns]).astype(np.float64),
            mask=hidden[rows, columns],
            context=counts[context_rows, context_columns].astype(np.float64),
            context_offsets=offsets(context),
        )
        return cells, columns

    @property
    def num_cells(self) -> int:
        return len(self.offsets) - 1

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def values_of(self, values: np.ndarray, i: int) -> np.ndarray:
        """The i-th cell's part of a per-position array."""
        return values[self.offsets[i] : self.offsets[i + 1]]

    def cell(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Gene ids and rank tokens (counts when there are no tokens) of the i-th cell."""
        where = slice(self.offsets[i], self.offsets[i + 1])
        values = self.ranks if self.ranks is not None else self.counts
        return self.gene_ids[where], None if values is None else values[where]


class CellBatch(BatchFeature):
    """A padded batch of cells as RankDiT takes them: `model(**batch)` (a training batch also holds `labels`, which
    the loss takes and the model does not: `model(**batch.model_inputs(device))`).

    Keys (all `torch` tensors of `n_cells` rows):

    - `gene_ids` `(n_cells, length)`: gene token ids; 0 at padding, -1 at genes left out of the model's input;
    - `input_ids` `(n_cells, length)`: rank tokens 0..B, `[MASK]` (B + 1) at the positions to predict, 0 at padding;
    - `attention_mask` `(n_cells, length)`: True at the positions the model sees;
    - `condition_ids` `(n_cells, n_conditions)` and `doses` `(n_cells,)`: the cells' conditions, when they have some;
    - `reference_tokens` `(n_cells, length, k)`: the tokens of each cell's nearest reference cells at its positions,
      when it has some (`ReferenceCells.context`);
    - `labels` `(n_cells, length)`: a training batch's clean tokens, -100 at padding (what the Trainer counts).

    Args:
        data (`dict`): the tensors.
        mask_token_id (`int`, *optional*): `[MASK]`, so that [`~CellBatch.mask`] can tell the predicted positions.
    """

    def __init__(self, data: dict | None = None, mask_token_id: int | None = None):
        super().__init__(data)
        self.mask_token_id = mask_token_id

    def __getstate__(self):
        return {"data": self.data, "mask_token_id": self.mask_token_id}

    def __setstate__(self, state):
        self.data, self.mask_token_id = state["data"], state.get("mask_token_id")

    @classmethod
    def from_ragged(
        cls,
        offsets: np.ndarray,
        gene_ids: np.ndarray,
        input_ids: np.ndarray,
        attended: np.ndarray | None = None,
        mask_token_id: int | None = None,
    ) -> CellBatch:
        """Pad cells laid back to back by `offsets` to the longest (at least one position); `attended` (default: every
        position) is False at the genes the model must not see."""
        sizes = np.diff(offsets)
        real = np.arange(max(int(sizes.max(initial=0)), 1)) < sizes[:, None]
        padded = {}
        for name, values in (("gene_ids", gene_ids), ("input_ids", input_ids)):
            padded[name] = np.zeros(real.shape, dtype=np.int64)
            padded[name][real] = values
        attention_mask = real.copy()
        if attended is not None:
            attention_mask[real] = attended
        data = {name: torch.from_numpy(values) for name, values in padded.items()}
        data["attention_mask"] = torch.from_numpy(attention_mask)
        return cls(data, mask_token_id)

    @property
    def num_cells(self) -> int:
        return self["gene_ids"].shape[0]

    @property
    def mask(self) -> torch.BoolTensor:
        """True at the positions to predict (`[MASK]` among the attended positions)."""
        if self.mask_token_id is None:
            raise ValueError("this CellBatch was made without its mask_token_id")
        return (self["input_ids"] == self.mask_token_id) & self["attention_mask"].bool()

    def replace(self, **tensors) -> CellBatch:
        """A new batch with some tensors replaced or added (None removes one)."""
        data = {**self.data, **tensors}
        return CellBatch({k: v for k, v in data.items() if v is not None}, self.mask_token_id)

    def model_inputs(self, device: torch.device | str, timesteps: torch.Tensor | None = None) -> dict:
        """The model's keyword arguments on `device`; no attention mask when no position is padding (known here, on
        the host: the model then need not look)."""
        attention_mask = self["attention_mask"]
        inputs = {name: self[name].to(device) for name in ("gene_ids", "input_ids") + self.condition_names}
        if "reference_tokens" in self.data:  # stored small (int16), read as ids
            inputs["reference_tokens"] = self["reference_tokens"].to(device).long()
        inputs["attention_mask"] = None if bool(attention_mask.all()) else attention_mask.to(device)
        inputs["timesteps"] = None if timesteps is None else timesteps.to(device)
        return inputs

    @property
    def position_names(self) -> tuple[str, ...]:
        """The tensors with a value (or several) per position."""
        names = ("gene_ids", "input_ids", "attention_mask", "reference_tokens")
        return tuple(name for name in names if name in self.data)

    @property
    def condition_names(self) -> tuple[str, ...]:
        return tuple(name for name in ("condition_ids", "doses") if name in self.data)

    def rows(self, index: slice | torch.Tensor) -> CellBatch:
        """The cells at `index`, trimmed after their last real position."""
        attention_mask = self["attention_mask"][index]
        real = attention_mask.any(dim=0)
        length = int(real.nonzero().max()) + 1 if real.any() else 0
        data = {name: self[name][index][:, :length] for name in self.position_names}
        data.update({name: self[name][index] for name in self.condition_names})
        return CellBatch(data, self.mask_token_id)

    def windows(self, max_length: int, seed: int = 0) -> CellWindows:
        """The cells cut into windows of at most `max_length` positions, for a model trained on sequences that long.

        A cell that fits is one window. A longer one is cut into `ceil(n / max_length)` windows of nearly equal
        size, each a random share of its masked genes and the same share of its visible ones (drawn by a hash of
        `seed`, the cell's index and the gene id, never by the counts), so every window has visible genes to go
        on and, as with the random gene lists of training, each masked gene is predicted from those of its window.
        The same genes and mask give the same windows at every call.
        """
        gene_ids, attention_mask, mask = self["gene_ids"], self["attention_mask"].bool(), self.mask
        cells, positions = [], []
        for cell in range(self.num_cells):
            real = np.flatnonzero(attention_mask[cell].numpy())
            count = math.ceil(len(real) / max_length) if len(real) else 1
            if count > 1:
                salt = cell_salts(seed, cell, ["windows"])[0, 0]
                keys = hash_keys(salt, gene_ids[cell, real].numpy())
                order = np.lexsort((keys, ~mask[cell, real].numpy()))  # masked genes first, each group in hash order
                parts = [np.sort(real[order[start::count]]) for start in range(count)]  # dealt round-robin
            else:
                parts = [real]
            cells += [cell] * len(parts)
            positions += parts
        width = max(len(part) for part in positions) if positions else 0
        index = torch.zeros(len(positions), width, dtype=torch.long)
        window_mask = torch.zeros(len(positions), width, dtype=torch.bool)
        for row, part in enumerate(positions):
            index[row, : len(part)] = torch.from_numpy(part)
            window_mask[row, : len(part)] = True
        cell = torch.tensor(cells, dtype=torch.long)

        def take(values: torch.Tensor) -> torch.Tensor:
            taken = values[cell[:, None], index]
            return taken.masked_fill(~window_mask.view(*window_mask.shape, *[1] * (taken.dim() - 2)), 0)

        data = {name: take(self[name]) for name in self.position_names if name != "attention_mask"}
        data["attention_mask"] = window_mask
        data.update({name: self[name][cell] for name in self.condition_names})
        return CellWindows(CellBatch(data, self.mask_token_id), cell, index, gene_ids.shape)


@dataclass
class CellWindows:
    """Windows of cells ([`CellBatch.windows`]) and where each of their positions comes from.

    Attributes:
        inputs ([`CellBatch`]): the windows, `(n_windows, length)`.
        cell (`torch.LongTensor` of shape `(n_windows,)`): the cell of each window.
        position (`torch.LongTensor` of shape `(n_windows, length)`): the cell position of each window position.
        shape (`torch.Size`): `(n_cells, width)` of the cells.
    """

    inputs: CellBatch
    cell: torch.LongTensor
    position: torch.LongTensor
    shape: torch.Size

    def to_cells(self, values: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """Per-window values `(n_windows, length, ...)` back at their cells' positions: `(n_cells, width, ...)`;
        `fill` where no window holds a position (padding)."""
        out = values.new_full((*self.shape, *values.shape[2:]), fill)
        real = self.inputs["attention_mask"]
        out[self.cell[:, None].expand_as(real)[real], self.position[real]] = values[:, : real.shape[1]][real]
        return out
