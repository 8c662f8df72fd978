"""AnnData / h5ad files as a stream of rows in the Tahoe-100M `expression_data` layout.

The matrix (`X` or a named layer, dense or sparse) is read from disk a block of cells at a time, so large files
stream. Gene names come from `var_names` or a `var` column, as Ensembl ids or symbols, mapped by RankDiff's one rule
for a table's genes ([`GeneVocab.columns`], [`RaggedCells.from_matrix`], which `impute_anndata` uses too): a column
outside the vocabulary, or naming a gene an earlier column names, is not listed, and its counts join the cell's
bins (the row's `context_expressions`). The match rate is logged and returned. Each row holds the cell's listed
expressed genes (`genes`, `expressions`), its `context_expressions`, `BARCODE_SUB_LIB_ID` = the obs name, and the
requested `obs` columns as strings, so the rest of RankDiff (split, collator, baseline) treats it like Tahoe-100M.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import datasets
import h5py
import numpy as np
import pandas as pd
from anndata.io import read_elem, sparse_dataset

from modeling import GeneVocab, RaggedCells
from modeling.rank_tokenizer import invalid_counts

from .schema import CELL_ID_COLUMN, CONTEXT_COLUMN

logger = logging.getLogger(__name__)


@dataclass
class GeneMatch:
    """How the file's genes map to the vocabulary."""

    matched: int
    total: int
    unmatched_examples: list[str]

    @property
    def rate(self) -> float:
        return self.matched / self.total if self.total else 0.0


def _matrix(handle: h5py.File, layer: str | None):
    if layer is None:
        element = handle["X"]
    elif "layers" in handle and layer in handle["layers"]:
        element = handle["layers"][layer]
    else:
        available = sorted(handle["layers"]) if "layers" in handle else []
        raise KeyError(f"no layer {layer!r} in {handle.filename}; layers: {available}")
    return sparse_dataset(element) if isinstance(element, h5py.Group) else element


def _rows(path, layer, column_ids, obs_columns, blocks):
    with h5py.File(path, "r") as handle:
        matrix = _matrix(handle, layer)
        obs = read_elem(handle["obs"])
        for start, stop in blocks:
            block = matrix[start:stop]
            block = np.asarray(block.toarray() if hasattr(block, "toarray") else block)  # its own dtype: no copy
            cells, _ = RaggedCells.from_matrix(block, column_ids)
            for i in range(cells.num_cells):
                context = cells.context[cells.context_offsets[i] : cells.context_offsets[i + 1]]
                row = {
                    "genes": cells.values_of(cells.gene_ids, i).tolist(),
                    "expressions": cells.values_of(cells.counts, i).astype(np.float32).tolist(),
                    CONTEXT_COLUMN: context.astype(np.float32).tolist(),
                    CELL_ID_COLUMN: str(obs.index[start + i]),
                }
                for name in obs_columns:  # a missing value stays missing (a condition's null), not the string "nan"
                    value = obs[name].iloc[start + i]
                    row[name] = None if pd.isna(value) else str(value)
                yield row


def _check_counts(matrix, path, layer, cell_names, gene_names, block_size: int) -> None:
    """Refuse, before any training, a matrix that is not raw counts: finite values that are not non-negative
    integers in its first block of cells (a log-normalised or scaled matrix shows them at once), or no non-zero
    value at all."""
    where = f"{path} ({'X' if layer is None else f'layers[{layer!r}]'})"
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"{where} holds {matrix.shape[0]} cells x {matrix.shape[1]} genes: nothing to train on")
    for start in range(0, matrix.shape[0], block_size):
        block = matrix[start : start + block_size]
        block = np.asarray(block.toarray() if hasattr(block, "toarray") else block, dtype=np.float64)
        if start == 0:
            bad = np.isfinite(block) & invalid_counts(block)  # NaN: a missing value, a row skipped later
            if bad.any():
                i, j = (int(k[0]) for k in np.nonzero(bad))
                raise ValueError(f"{where} does not hold raw counts: {block[i, j]:g} at cell {str(cell_names[i])!r}, "
                                 f"gene {str(gene_names[j])!r} is not a non-negative integer (log-normalised or "
                                 "scaled values?); give the layer of raw UMI counts with --layer")  # fmt: skip
        if (block > 0).any():
            return
    raise ValueError(f"{where} holds no non-zero count in any of its {matrix.shape[0]} cells: nothing to train on")


def load_anndata(
    path: str | os.PathLike,
    vocab: GeneVocab,
    *,
    layer: str | None = None,
    gene_column: str | None = None,
    obs_columns: tuple[str, ...] = (),
    block_size: int = 256,
) -> tuple[datasets.IterableDataset, GeneMatch]:
    """Stream an h5ad file of raw counts as Tahoe-schema rows.

    Args:
        path: the `.h5ad` file.
        vocab: the gene vocabulary to map gene names to.
        layer: the layer holding raw counts (`X` when None).
        gene_column: a `var` column with the gene names (the `var` index when None).
        obs_columns: `obs` columns to carry along (as strings).
        block_size: cells read from disk at a time; blocks are the shards split across workers and ranks.

    Returns:
        `(rows, match)`: a streaming dataset and the gene match report.
    """
    with h5py.File(path, "r") as handle:
        var = read_elem(handle["var"])
        obs = read_elem(handle["obs"])
        matrix = _matrix(handle, layer)
        n_cells = matrix.shape[0]
        _check_counts(matrix, path, layer, obs.index, var.index, block_size)
    missing = [c for c in obs_columns if c not in obs.columns]
    if missing:
        raise KeyError(f"obs columns {missing} not in {path}; obs has {list(obs.columns)}")
    if gene_column is not None and gene_column not in var.columns:
        raise KeyError(f"var column {gene_column!r} not in {path}; var has {list(var.columns)}")
    names = [str(n) for n in (var[gene_column] if gene_column else var.index)]
    column_ids = vocab.columns(names)
    known = vocab.lookup(names) >= 0
    match = GeneMatch(int(known.sum()), len(names), [n for n, k in zip(names, known) if not k][:10])
    repeated = known & (column_ids < 0)
    if repeated.any():
        shown = [names[j] for j in np.flatnonzero(repeated)[:5]]
        logger.warning("%s: %d columns name a gene an earlier column names (e.g. %s): only the first is listed, "
                       "the others' counts shape the bins", path, int(repeated.sum()), shown)  # fmt: skip
    if not match.matched:
        raise ValueError(f"none of the {len(names)} genes of {path} are in the vocabulary (e.g. {names[:5]})")
    logger.info(
        "%s: %d of %d genes (%.1f%%) matched the vocabulary; left out of the model's input (their counts still "
        "shape each cell's bins) e.g. %s",
        path, match.matched, match.total, 100 * match.rate, match.unmatched_examples,
    )  # fmt: skip
    blocks = [(start, min(start + block_size, n_cells)) for start in range(0, n_cells, block_size)]
    features = datasets.Features(
        {
            "genes": datasets.List(datasets.Value("int64")),
            "expressions": datasets.List(datasets.Value("float32")),
            CONTEXT_COLUMN: datasets.List(datasets.Value("float32")),
            CELL_ID_COLUMN: datasets.Value("string"),
            **{name: datasets.Value("string") for name in obs_columns},
        }
    )
    rows = datasets.IterableDataset.from_generator(
        _rows,
        features=features,
        gen_kwargs={
            "path": str(path),
            "layer": layer,
            "column_ids": column_ids,
            "obs_columns": tuple(obs_columns),
            "blocks": blocks,
        },
    )
    return rows, match
