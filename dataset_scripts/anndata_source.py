"""AnnData / h5ad files as a stream of rows in the Tahoe-100M `expression_data` layout.

The matrix (`X` or a named layer, dense or sparse) is read from disk a block of cells at a time, so large files
stream. Gene names come from `var_names` or a `var` column, as Ensembl ids or symbols (recognised per name by
[`GeneVocab.lookup`]); genes the vocabulary does not know are left out and the match rate is logged and returned.
Each row holds the cell's expressed genes (`genes`, `expressions`), `BARCODE_SUB_LIB_ID` = the obs name, and the
requested `obs` columns as strings, so the rest of RankDiff (split, collator, baseline) treats it like Tahoe-100M.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import datasets
import h5py
import numpy as np
from anndata.io import read_elem, sparse_dataset

from modeling import GeneVocab

from .schema import CELL_ID_COLUMN

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


def _rows(path, layer, gene_ids, columns, obs_columns, blocks):
    with h5py.File(path, "r") as handle:
        matrix = _matrix(handle, layer)
        obs = read_elem(handle["obs"])
        for start, stop in blocks:
            block = matrix[start:stop]
            if hasattr(block, "tocsr"):
                block = block.tocsr()[:, columns]
                pieces = ((block.indices[a:b], block.data[a:b]) for a, b in zip(block.indptr[:-1], block.indptr[1:]))
            else:
                dense = np.asarray(block)[:, columns]
                pieces = ((np.flatnonzero(values), values[values != 0]) for values in dense)
            for i, (positions, values) in enumerate(pieces):
                nonzero = values != 0
                row = {
                    "genes": gene_ids[positions[nonzero]].tolist(),
                    "expressions": values[nonzero].astype(np.float32).tolist(),
                    CELL_ID_COLUMN: str(obs.index[start + i]),
                }
                for name in obs_columns:
                    row[name] = str(obs[name].iloc[start + i])
                yield row


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
        n_cells = _matrix(handle, layer).shape[0]
    missing = [c for c in obs_columns if c not in obs.columns]
    if missing:
        raise KeyError(f"obs columns {missing} not in {path}; obs has {list(obs.columns)}")
    if gene_column is not None and gene_column not in var.columns:
        raise KeyError(f"var column {gene_column!r} not in {path}; var has {list(var.columns)}")
    names = [str(n) for n in (var[gene_column] if gene_column else var.index)]
    token_ids = vocab.lookup(names)
    matched = token_ids >= 0
    match = GeneMatch(int(matched.sum()), len(names), [n for n, m in zip(names, matched) if not m][:10])
    # Two names for one gene (a symbol and its Ensembl id, or a symbol listed twice): the first column wins.
    _, first = np.unique(token_ids, return_index=True)
    repeated = matched & ~np.isin(np.arange(len(names)), first)
    if repeated.any():
        logger.warning(
            "%s: %d columns name a gene already listed; only its first column is used", path, repeated.sum()
        )
    matched &= ~repeated
    if not match.matched:
        raise ValueError(f"none of the {len(names)} genes of {path} are in the vocabulary (e.g. {names[:5]})")
    logger.info(
        "%s: %d of %d genes (%.1f%%) matched the vocabulary; left out e.g. %s",
        path, match.matched, match.total, 100 * match.rate, match.unmatched_examples,
    )  # fmt: skip
    blocks = [(start, min(start + block_size, n_cells)) for start in range(0, n_cells, block_size)]
    features = datasets.Features(
        {
            "genes": datasets.List(datasets.Value("int64")),
            "expressions": datasets.List(datasets.Value("float32")),
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
            "gene_ids": token_ids[matched],
            "columns": np.flatnonzero(matched),
            "obs_columns": tuple(obs_columns),
            "blocks": blocks,
        },
    )
    return rows, match
