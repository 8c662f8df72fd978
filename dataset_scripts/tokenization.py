"""Rank tokens for a whole Arrow batch of Tahoe-100M rows at once (numpy segment operations, no loop per cell).

Gives the same tokens as [`modeling.rank_tokens`] on each cell, bit for bit, without sorting: counts are small
integers, so a per-cell histogram gives the sorted values at the quantile positions (the same integer positions
and float operations as the per-cell rule), and a per-cell table maps each small count to its token. The few
counts at or above `TABLE_COUNTS` take the per-cell route: a sort of those values and a comparison with the edges.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from modeling.rank_tokenizer import interpolate_edges, quantile_positions, segment_ids

from .schema import marker_positions

SKIP_REASONS = ("length_mismatch", "bad_counts", "unknown_genes", "repeated_genes", "no_expressed_genes")
TABLE_COUNTS = 64  # counts below this get their token from a per-cell table


@dataclass
class TokenizedBatch:
    """The expressed genes of the kept cells with their rank tokens, as flat arrays with per-cell offsets.

    Attributes:
        offsets: `(n_kept + 1,)` start of each kept cell in `gene_ids` / `input_ids` / `counts`.
        gene_ids: gene token ids of the expressed genes (count > 0), in input order, marker removed.
        input_ids: their rank tokens 1..B.
        counts: their raw counts.
        kept: `(n_rows,)` True for the rows of the input batch that were kept.
        skipped: number of skipped rows per reason of `SKIP_REASONS`.
        reasons: `(n_rows,)` index in `SKIP_REASONS` of each skipped row's reason, -1 for kept rows.
    """

    offsets: np.ndarray
    gene_ids: np.ndarray
    input_ids: np.ndarray
    counts: np.ndarray
    kept: np.ndarray
    skipped: Counter = field(default_factory=Counter)
    reasons: np.ndarray | None = None

    def cell(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Gene ids and tokens of the i-th kept cell."""
        start, stop = self.offsets[i], self.offsets[i + 1]
        return self.gene_ids[start:stop], self.input_ids[start:stop]


def _flat(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and values of a list column, without copying the values through Python."""
    if isinstance(column, pa.ChunkedArray):
        column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    array = column
    offsets = array.offsets.to_numpy()
    values = array.values.to_numpy(zero_copy_only=False)
    return offsets - offsets[0], values[offsets[0] : offsets[-1]]


def _rows_with(positions: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """True for each row that holds one of the flat `positions`."""
    rows = np.zeros(len(offsets) - 1, dtype=bool)
    rows[np.searchsorted(offsets, positions, side="right") - 1] = True
    return rows


def batch_rank_tokens(offsets: np.ndarray, counts: np.ndarray, num_bins: int) -> np.ndarray:
    """Rank tokens of the expressed counts (positive integers) of many cells, back to back with `offsets`."""
    n_cells, sizes = len(offsets) - 1, np.diff(offsets)
    if not n_cells:
        return np.zeros(0, dtype=np.int64)
    # Column v of a cell's table row counts its counts equal to v; the last column holds all larger counts.
    table_index = np.minimum(counts, TABLE_COUNTS - 1).astype(np.int32)
    table_index += np.repeat(np.arange(n_cells, dtype=np.int32) * TABLE_COUNTS, sizes)
    histogram = np.bincount(table_index, minlength=n_cells * TABLE_COUNTS).reshape(n_cells, TABLE_COUNTS)
    at_most = histogram[:, :-1].cumsum(axis=1)  # at_most[c, v]: the cell's counts <= v
    n_small = at_most[:, -1]
    large = np.flatnonzero(counts >= TABLE_COUNTS - 1)
    large_cell = np.searchsorted(offsets, large, side="right") - 1
    large_counts = counts[large].astype(np.float64)
    large_sorted = large_counts[np.lexsort((large_counts, large_cell))]
    large_start = np.cumsum(sizes - n_small) - (sizes - n_small)
    # Cell-major, each row shifted past the last, so one searchsorted finds the smallest v with at_most > rank.
    shift = np.arange(n_cells)[:, None] * (int(sizes.max()) + 1)
    flat_at_most = (at_most + shift).ravel()

    def sorted_value(rank: np.ndarray) -> np.ndarray:
        """The value at each (cell, rank) of the cells' sorted counts."""
        small = np.searchsorted(flat_at_most, rank + shift, side="right") - np.arange(n_cells)[:, None] * (
            TABLE_COUNTS - 1
        )
        if not len(large):
            return small
        large_rank = np.clip(large_start[:, None] + rank - n_small[:, None], 0, len(large) - 1)
        return np.where(rank < n_small[:, None], small, large_sorted[large_rank])

    low, high, remainder = quantile_positions(sizes, num_bins)
    edges = interpolate_edges(sorted_value(low), sorted_value(high), remainder)
    # token = 1 + (edges below the count), as `searchsorted(edges, count, side="left") + 1` in the per-cell rule.
    # An edge e is below the integer counts from floor(e) + 1 on: a cumulative histogram of those gives the table.
    first_above = np.minimum(np.floor(edges) + 1, TABLE_COUNTS).astype(np.int64)
    first_above += np.arange(n_cells)[:, None] * (TABLE_COUNTS + 1)
    below = np.bincount(first_above.ravel(), minlength=n_cells * (TABLE_COUNTS + 1)).reshape(n_cells, -1)
    table = 1 + below.cumsum(axis=1)[:, :TABLE_COUNTS]
    tokens = table.ravel()[table_index]
    tokens[large] = 1 + (edges[large_cell] < large_counts[:, None]).sum(axis=1)
    return tokens


def tokenize_arrow_batch(
    table: pa.Table | pa.RecordBatch, num_bins: int, known_genes: np.ndarray | None = None
) -> TokenizedBatch:
    """Strip the `<cls>` marker, check every cell, and rank-tokenize the expressed genes of the good ones.

    Rows are skipped (and counted by reason) when `genes` and `expressions` differ in length, a count is negative,
    NaN or not an integer, a gene id is not in `known_genes` (unchecked when None), a gene id repeats,
    or no gene is expressed.
    """
    gene_offsets, genes = _flat(table.column("genes"))
    count_offsets, counts = _flat(table.column("expressions"))
    bad = {"length_mismatch": np.diff(gene_offsets) != np.diff(count_offsets)}
    if bad["length_mismatch"].any():  # realign: keep only rows whose lists agree
        agree = ~bad["length_mismatch"]
        genes = genes[np.repeat(agree, np.diff(gene_offsets))]
        counts = counts[np.repeat(agree, np.diff(count_offsets))]
        gene_offsets = np.concatenate([[0], np.cumsum(np.where(agree, np.diff(gene_offsets), 0))])

    first = gene_offsets[:-1][np.diff(gene_offsets) > 0]
    marker = marker_positions(gene_offsets, genes, counts)
    with np.errstate(invalid="ignore"):
        valid = (counts >= 0) & (counts == np.rint(counts)) & np.isfinite(counts)
    valid[marker] = True
    bad["bad_counts"] = _rows_with(np.flatnonzero(~valid), gene_offsets)
    if known_genes is not None and len(genes):
        is_known = np.zeros(max(int(known_genes.max()), int(genes.max())) + 1, dtype=bool)
        is_known[known_genes] = True
        known = is_known[genes] if genes.min() >= 0 else (genes >= 0) & is_known[genes.clip(min=0)]
        known[marker] = True
        bad["unknown_genes"] = _rows_with(np.flatnonzero(~known), gene_offsets)
    # Tahoe-100M lists each cell's genes in increasing order: only a non-increase inside a cell needs a closer look.
    not_increasing = np.setdiff1d(np.flatnonzero(genes[1:] <= genes[:-1]) + 1, np.concatenate([first, marker + 1]))
    bad["repeated_genes"] = np.zeros(len(gene_offsets) - 1, dtype=bool)
    if len(not_increasing):
        listed = np.ones(len(genes), dtype=bool)
        listed[marker] = False
        stride = int(genes.max()) + 1
        keys = np.sort(segment_ids(gene_offsets)[listed] * stride + genes[listed])
        bad["repeated_genes"][keys[1:][np.diff(keys) == 0] // stride] = True
    expressed = np.flatnonzero(counts > 0)
    n_expressed = np.diff(np.searchsorted(expressed, gene_offsets))
    bad["no_expressed_genes"] = n_expressed == 0

    skipped, rejected = Counter(), np.zeros(len(gene_offsets) - 1, dtype=bool)
    reasons = np.full(len(rejected), -1, dtype=np.int8)
    for reason in (r for r in SKIP_REASONS if r in bad):  # each skipped row is counted under its first reason
        newly = bad[reason] & ~rejected
        if newly.any():
            skipped[reason] = int(newly.sum())
            reasons[newly] = SKIP_REASONS.index(reason)
        rejected |= newly
    if rejected.any():
        expressed = expressed[np.repeat(~rejected, n_expressed)]
    offsets = np.concatenate([[0], np.cumsum(n_expressed[~rejected])])
    values = counts.take(expressed)
    tokens = batch_rank_tokens(offsets, values, num_bins)
    return TokenizedBatch(offsets, genes.take(expressed), tokens, values, ~rejected, skipped, reasons)
