"""Tahoe-layout rows -> checked cells with rank tokens, a whole Arrow batch at once: RankDiff's one bad-row policy.

The tokens come from [`modeling.rank_tokens`], the rank rule of the processor and of every other reader. Rows made
from an AnnData file may carry `context_expressions`, the counts of the cell's genes outside the vocabulary: they
join the cell's bins and are not listed, as the processor's `context_counts` do.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from modeling import RaggedCells
from modeling.rank_tokenizer import invalid_counts, rank_tokens, repeated_genes, segment_ids

from .schema import CONTEXT_COLUMN, FIRST_GENE_TOKEN_ID, marker_positions

SKIP_REASONS = ("length_mismatch", "bad_counts", "unknown_genes", "repeated_genes", "no_expressed_genes")


@dataclass
class TokenizedBatch(RaggedCells):
    """The kept cells of a batch of rows: their expressed genes (count > 0, in input order, marker removed) with
    their raw `counts` and rank tokens (`ranks`, 1..B), their `context` counts, and what was skipped.

    Attributes (besides those of [`RaggedCells`]):
        kept: `(n_rows,)` True for the rows of the input batch that were kept.
        skipped: number of skipped rows per reason of `SKIP_REASONS`.
        reasons: `(n_rows,)` index in `SKIP_REASONS` of each skipped row's reason, -1 for kept rows.
    """

    kept: np.ndarray | None = None
    skipped: Counter = field(default_factory=Counter)
    reasons: np.ndarray | None = None

    def on_genes(self, genes: np.ndarray) -> RaggedCells:
        """The cells on a gene list (sorted ids), as the processor bins them: every cell lists `genes`, with its
        count of each (0 where not expressed), and its other counts are its context. Tokens then come from the
        whole cell, as for the stream."""
        n_cells = self.num_cells
        cell = segment_ids(self.offsets)
        on = np.isin(self.gene_ids, genes)
        counts = np.zeros((n_cells, len(genes)))
        counts[cell[on], np.searchsorted(genes, self.gene_ids[on])] = self.counts[on]
        # Each cell's context: its expressed counts off the list, then its own context counts.
        context_cell = np.concatenate([cell[~on], segment_ids(self.context_offsets)])
        context = np.concatenate([self.counts[~on], self.context])[np.argsort(context_cell, kind="stable")]
        sizes = np.bincount(context_cell, minlength=n_cells)
        return RaggedCells(
            np.arange(n_cells + 1) * len(genes),
            np.tile(genes.astype(np.int64), n_cells),
            counts=counts.ravel(),
            context=context,
            context_offsets=np.concatenate([[0], np.cumsum(sizes)]),
        )


def _flat(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and values of a list column, without copying the values through Python."""
    if isinstance(column, pa.ChunkedArray):
        column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    array = column
    offsets = array.offsets.to_numpy()
    if pa.types.is_null(array.values.type):  # lists that are all empty: no type was inferred
        return offsets - offsets[0], np.zeros(0)
    values = array.values.to_numpy(zero_copy_only=False)
    return offsets - offsets[0], values[offsets[0] : offsets[-1]]


def _rows_with(positions: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """True for each row that holds one of the flat `positions`."""
    rows = np.zeros(len(offsets) - 1, dtype=bool)
    rows[np.searchsorted(offsets, positions, side="right") - 1] = True
    return rows


def tokenize_arrow_batch(
    table: pa.Table | pa.RecordBatch, num_bins: int, known_genes: np.ndarray | None = None
) -> TokenizedBatch:
    """Strip the `<cls>` marker, check every cell, and rank-tokenize the expressed genes of the good ones.

    Rows are skipped (and counted by reason) when `genes` and `expressions` differ in length, a count (or a context
    count) is negative, NaN or not an integer, a gene id is not in `known_genes` (when None: is a special token's
    id), a gene id repeats, or no gene is expressed.
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
    invalid = invalid_counts(counts)
    invalid[marker] = False
    bad["bad_counts"] = _rows_with(np.flatnonzero(invalid), gene_offsets)
    context_offsets, context = _context(table, len(gene_offsets) - 1)
    bad["bad_counts"] |= _rows_with(np.flatnonzero(invalid_counts(context)), context_offsets)
    if len(genes):
        if known_genes is None:  # no vocabulary to check against: at least no special token (<pad>, <eoc>) is a gene
            known = genes >= FIRST_GENE_TOKEN_ID
        else:
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
        bad["repeated_genes"][repeated_genes(gene_offsets, genes, listed)[0]] = True
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
    kept_context = np.repeat(~rejected, np.diff(context_offsets))
    context_sizes = np.diff(context_offsets)[~rejected]
    context_offsets = np.concatenate([[0], np.cumsum(context_sizes)])
    context = context[kept_context]
    tokens = rank_tokens(values, num_bins, offsets, context=context, context_offsets=context_offsets, checked=True)
    return TokenizedBatch(
        offsets, genes.take(expressed), values, tokens, None, context, context_offsets, ~rejected, skipped, reasons
    )


def _context(table: pa.Table | pa.RecordBatch, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and values of the `context_expressions` column (none for Tahoe-100M's own rows)."""
    if CONTEXT_COLUMN not in table.schema.names:
        return np.zeros(n_rows + 1, dtype=np.int64), np.zeros(0, dtype=np.float32)
    return _flat(table.column(CONTEXT_COLUMN).cast(pa.list_(pa.float32())))  # all-empty lists read as list<null>
