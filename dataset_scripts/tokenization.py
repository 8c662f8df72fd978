"""Rank tokens for a whole Arrow batch of Tahoe-100M rows at once (numpy segment operations, no loop per cell).

Gives the same tokens as [`modeling.rank_tokens`] on each cell, bit for bit: the quantile edges are computed with
the same integer positions and the same float operations, and one `searchsorted` over all cells' edges, offset
by cell, replaces the per-cell bucketize.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from modeling.rank_tokenizer import quantile_edges

# Cells are kept apart in one sorted array by adding cell_index * stride to values and edges. Edges are multiples
# of 1 / (B - 1) away from integers (or integers), so float64 rounding below 2**40 cannot reorder them.
_MAX_OFFSET = 2.0**40

SKIP_REASONS = ("length_mismatch", "bad_counts", "unknown_genes", "repeated_genes", "no_expressed_genes")


@dataclass
class TokenizedBatch:
    """Every listed gene of the kept cells with its rank token, as flat arrays with per-cell offsets.

    Attributes:
        offsets: `(n_kept + 1,)` start of each kept cell in `gene_ids` / `input_ids`.
        gene_ids: gene token ids, marker removed.
        input_ids: rank tokens 0..B (0 where a listed count is 0).
        counts: the raw counts.
        kept: `(n_rows,)` True for the rows of the input batch that were kept.
        skipped: number of skipped rows per reason of `SKIP_REASONS`.
    """

    offsets: np.ndarray
    gene_ids: np.ndarray
    input_ids: np.ndarray
    counts: np.ndarray
    kept: np.ndarray
    skipped: Counter = field(default_factory=Counter)

    def cell(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Gene ids and tokens of the i-th kept cell."""
        start, stop = self.offsets[i], self.offsets[i + 1]
        return self.gene_ids[start:stop], self.input_ids[start:stop]


def _flat(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and values of a list column, without copying the values through Python."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = array.offsets.to_numpy()
    values = array.values.to_numpy(zero_copy_only=False)
    return offsets - offsets[0], values[offsets[0] : offsets[-1]]


def _segments(offsets: np.ndarray) -> np.ndarray:
    """Cell index of every flat position."""
    return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))


def batch_rank_tokens(offsets: np.ndarray, counts: np.ndarray, num_bins: int) -> np.ndarray:
    """Rank tokens of every count of many cells; each cell must have an expressed gene and integer counts."""
    n_cells = len(offsets) - 1
    cell = _segments(offsets)
    expressed = counts > 0
    values, value_cell = counts[expressed], cell[expressed]
    sizes = np.bincount(value_cell, minlength=n_cells)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    stride = float(values.max()) + 1.0 if len(values) else 1.0
    if stride * n_cells >= _MAX_OFFSET:
        raise ValueError(f"batch too large to tokenize at once: {n_cells} cells with counts up to {stride - 1}")
    # Cells are already contiguous, so sorting value + cell * stride sorts each cell's values in place.
    keys = values + value_cell * stride
    edges = quantile_edges(np.sort(keys) - value_cell * stride, num_bins, starts, sizes)
    shift = np.arange(n_cells, dtype=np.float64)[:, None] * stride
    position = np.searchsorted((edges + shift).ravel(), keys, side="left")
    tokens = np.zeros(len(counts), dtype=np.int64)
    tokens[expressed] = position - value_cell * num_bins + 1
    return tokens


def tokenize_arrow_batch(
    table: pa.Table | pa.RecordBatch, num_bins: int, known_genes: np.ndarray | None = None
) -> TokenizedBatch:
    """Strip the `<cls>` marker, check every cell, and rank-tokenize the good ones.

    Rows are skipped (and counted by reason) when `genes` and `expressions` differ in length, a count is negative,
    NaN or not an integer, a gene id is not in `known_genes` (unchecked when None), a gene id repeats,
    or no gene is expressed.
    """
    gene_offsets, genes = _flat(table.column("genes"))
    count_offsets, counts = _flat(table.column("expressions"))
    counts = counts.astype(np.float64)
    n_rows = len(gene_offsets) - 1
    bad = {reason: np.zeros(n_rows, dtype=bool) for reason in SKIP_REASONS}
    bad["length_mismatch"] = np.diff(gene_offsets) != np.diff(count_offsets)
    if bad["length_mismatch"].any():  # realign: keep only rows whose lists agree
        keep_flat = np.repeat(~bad["length_mismatch"], np.diff(gene_offsets))
        genes = genes[keep_flat]
        counts = counts[np.repeat(~bad["length_mismatch"], np.diff(count_offsets))]
        gene_offsets = np.concatenate([[0], np.cumsum(np.where(bad["length_mismatch"], 0, np.diff(gene_offsets)))])

    # The marker: a negative first expression (Tahoe-100M: gene 1, value -2).
    first = gene_offsets[:-1]
    nonempty = np.diff(gene_offsets) > 0
    marker = np.zeros(len(genes), dtype=bool)
    marker[first[nonempty]] = counts[first[nonempty]] < 0
    cell = _segments(gene_offsets)
    keep = ~marker
    genes, counts, cell = genes[keep], counts[keep], cell[keep]

    invalid = ~np.isfinite(counts) | (counts < 0) | (counts != np.round(counts))
    bad["bad_counts"] = np.bincount(cell[invalid], minlength=n_rows) > 0
    if known_genes is not None:
        is_known = np.zeros(int(known_genes.max()) + 1, dtype=bool)
        is_known[known_genes] = True
        unknown = genes >= len(is_known)
        unknown[~unknown] = ~is_known[genes[~unknown]]
        bad["unknown_genes"] = np.bincount(cell[unknown], minlength=n_rows) > 0
    same_cell = np.diff(cell) == 0
    if not (np.diff(genes)[same_cell] > 0).all():  # Tahoe-100M lists genes in increasing order: no sort needed
        keys = np.sort(cell * (int(genes.max()) + 1) + genes)
        repeated = np.diff(keys) == 0
        bad["repeated_genes"] = np.bincount(cell[1:][repeated], minlength=n_rows) > 0
    bad["no_expressed_genes"] = np.bincount(cell[counts > 0], minlength=n_rows) == 0

    skipped, rejected = Counter(), np.zeros(n_rows, dtype=bool)
    for reason in SKIP_REASONS:  # each skipped row is counted under its first reason
        newly = bad[reason] & ~rejected
        if newly.any():
            skipped[reason] = int(newly.sum())
        rejected |= newly
    kept_flat = ~rejected[cell]
    genes, counts, cell = genes[kept_flat], counts[kept_flat], cell[kept_flat]
    sizes = np.bincount(cell, minlength=n_rows)[~rejected]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    return TokenizedBatch(offsets, genes, batch_rank_tokens(offsets, counts, num_bins), counts, ~rejected, skipped)
