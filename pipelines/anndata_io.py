# Copyright 2026 The RankDiff authors. Licensed under the Apache License, Version 2.0.
"""AnnData in, AnnData out for [`MaskedRankDiffusionPipeline`]: imputing a table of raw counts and generating cells
for the rows of an `obs` table.

A table's rows become cells by the rule training reads `.h5ad` files with (the processor's `table_cells`, over the
vocabulary's `columns`): the same cell gets the same tokens on both sides. This file imports only numpy, torch,
tqdm and diffusers' logging (scipy, pandas and anndata on demand), so a saved pipeline folder carries it as remote
code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.utils import logging
from tqdm.auto import tqdm

logger = logging.get_logger(__name__)

# Arguments the AnnData methods set themselves, which a caller may not pass through to the pipeline call.
RESERVED_CALL_ARGUMENTS = frozenset(
    {"gene_ids", "ranks", "counts", "context_counts", "control_counts", "mask", "mask_ratio", "output_type",
     "conditions", "return_dict"}
)  # fmt: skip


def nan_entries(counts, block_size: int = 4096):
    """A sparse boolean matrix of the NaN entries of a dense or sparse count matrix, in memory or backed (on disk,
    read `block_size` cells at a time)."""
    import scipy.sparse as sp

    if not (sp.issparse(counts) or isinstance(counts, np.ndarray)):  # h5py or anndata's backed sparse datasets
        blocks = [nan_entries(counts[start : start + block_size]) for start in range(0, counts.shape[0], block_size)]
        return sp.vstack(blocks, format="csr")
    if sp.issparse(counts):
        counts = sp.csr_matrix(counts)
        # Copies of the index arrays: eliminate_zeros rewrites them in place, and they are the user's matrix's.
        structure = (counts.indices.copy(), counts.indptr.copy())
        nan = sp.csr_matrix((np.isnan(counts.data), *structure), shape=counts.shape, dtype=bool)
        nan.eliminate_zeros()
        return nan
    counts = np.asarray(counts)
    if counts.dtype.kind != "f":  # integer counts hold no NaN
        return sp.csr_matrix(counts.shape, dtype=bool)
    return sp.csr_matrix(np.isnan(counts))  # in the data's own dtype: no float64 copy of the table


def boolean_mask(mask, shape: tuple[int, int]):
    """A user's mask as a sparse boolean matrix: booleans, or numbers that are 0 or 1 (a string, NaN, -1 or 0.3 is
    an error naming its cell and gene, not a truthy True)."""
    import scipy.sparse as sp

    matrix = sp.csr_matrix(mask) if sp.issparse(mask) else np.asarray(mask)
    if tuple(matrix.shape) != tuple(shape):
        raise ValueError(f"mask must have the AnnData's shape {tuple(shape)}, got {tuple(matrix.shape)}")
    values = matrix.data if sp.issparse(matrix) else matrix.ravel()
    if values.dtype != bool:
        if values.dtype.kind not in "iuf":
            raise TypeError(f"mask must hold booleans (True: impute), got values of dtype {values.dtype}")
        bad = np.flatnonzero(~np.isin(values, (0, 1)))
        if len(bad):
            i = int(bad[0])
            if sp.issparse(matrix):
                cell, gene = int(np.searchsorted(matrix.indptr, i, side="right") - 1), int(matrix.indices[i])
            else:
                cell, gene = divmod(i, shape[1])
            value = values[i].item()
            raise ValueError(f"mask must hold booleans or 0 / 1, got {value!r} at (cell {cell}, gene {gene})")
    return sp.csr_matrix(matrix, dtype=bool)


def default_condition_columns(config, obs, method: str) -> list[str]:
    """The `obs` columns named exactly like the model's conditions; a warning names the columns that look like
    conditions but are not the model's ("Drug" for "drug", or a drug column for a model without conditions)."""
    known = [*(config.conditions or {}), *(["dose"] if config.dose_condition else [])]
    columns = [name for name in known if name in obs.columns]
    names = {"cell_line_id", "drug", "dose", *(name.lower() for name in known)}
    untold = sorted(str(c) for c in obs.columns if str(c).lower() in names and c not in columns)
    if untold:
        logger.warning("%s: obs columns %s are not conditions of this model (its conditions: %s, matched by exact "
                       "name; condition_columns= maps others): carried along, not told", method, untold,
                       known or "none")  # fmt: skip
    return columns


def check_count_matrix(counts, layer: str | None) -> None:
    """Refuse a missing matrix or one that holds no numbers (strings would be parsed as counts)."""
    source = "X" if layer is None else f"layers[{layer!r}]"
    if counts is None:
        raise ValueError(f"the AnnData has no {source}: put the raw counts there, or name their layer with layer=")
    dtype = getattr(counts, "dtype", None)
    if dtype is None or np.dtype(dtype).kind not in "iufb":
        raise TypeError(f"{source} must hold numbers (raw counts), got dtype {dtype}")


def check_conditions(pipe, conditions: list[dict] | None, obs_names) -> None:
    """Encode every cell's conditions once, before any cell is imputed: an error names the first bad cell by its obs
    name (the encoder names its place in a batch)."""
    if not conditions:
        return
    encoder = pipe.processor.condition_encoder(pipe.model.config)
    try:
        encoder.encode(conditions, len(conditions))
    except (KeyError, ValueError) as error:
        for i, row in enumerate(conditions):
            try:
                encoder.encode([row], 1)
            except (KeyError, ValueError) as first:
                message = str(first.args[0] if first.args else first).removeprefix("cell 0: ")
                raise type(first)(f"cell {str(obs_names[i])!r} (obs): {message}") from None
        raise error


def check_anndata(adata, name: str) -> None:
    """Refuse anything but an AnnData (an array or a path would fail later, naming an attribute)."""
    if not all(hasattr(adata, attribute) for attribute in ("obs", "var", "layers", "n_obs")):
        hint = (
            " (read it with anndata.read_h5ad)"
            if isinstance(adata, (str, bytes)) or hasattr(adata, "__fspath__")
            else ""
        )
        raise TypeError(f"{name} must be an anndata.AnnData, got {type(adata).__name__}{hint}")


def counts_and_genes(adata, layer: str | None, gene_column: str | None, what: str = "AnnData"):
    """An AnnData's count matrix (`X` or `layers[layer]`, checked to be counts) and its gene names (`var_names` or
    `var[gene_column]`), the layer and the column named in an error when missing."""
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"layer {layer!r} is not in the {what}; its layers: {list(adata.layers)} (None: X)")
    if gene_column is not None and gene_column not in adata.var:
        raise KeyError(f"gene_column {gene_column!r} is not in the {what}'s var; its columns: {list(adata.var)}")
    counts = adata.layers[layer] if layer is not None else adata.X
    check_count_matrix(counts, layer)
    return counts, np.array([str(name) for name in (adata.var[gene_column] if gene_column else adata.var_names)])


def _check_call_arguments(method: str, call_kwargs: dict) -> None:
    reserved = sorted(RESERVED_CALL_ARGUMENTS & set(call_kwargs))
    if reserved:
        raise ValueError(f"{method} sets {reserved} itself: not arguments it passes on to the pipeline call")


@dataclass
class CountTable:
    """An AnnData's raw counts as the imputation reads them: the matrix, what is masked, each column's gene id and
    the requested columns (masked in some cell, of a known gene)."""

    counts: object
    mask: object
    source: str
    names: np.ndarray
    column_ids: np.ndarray
    requested: np.ndarray

    @classmethod
    def of(cls, adata, processor, mask, layer: str | None, gene_column: str | None) -> CountTable:

        if adata.n_obs == 0 or adata.n_vars == 0:
            raise ValueError(f"the AnnData holds {adata.n_obs} cells x {adata.n_vars} genes: nothing to impute")
        counts, names = counts_and_genes(adata, layer, gene_column)
        mask = boolean_mask(mask, adata.shape) if mask is not None else nan_entries(counts)
        if processor.gene_vocab is None:
            raise ValueError("impute_anndata needs the checkpoint's gene vocabulary (processor.gene_vocab is None)")
        column_ids = processor.gene_vocab.columns(names)
        if not (column_ids >= 0).any():
            raise ValueError("none of the AnnData's genes is in the checkpoint's vocabulary")
        if not (column_ids >= 0).all():
            logger.warning(
                "%d of %d genes are not in the checkpoint's vocabulary (or name a gene an earlier column names): "
                "they shape each cell's bins but are not imputed", int((column_ids < 0).sum()), len(column_ids)
            )  # fmt: skip
        requested = (np.asarray(mask.sum(axis=0)).ravel() > 0) & (column_ids >= 0)
        if not requested.any():
            raise ValueError("nothing to impute: no entry of a known gene is masked (NaN, or True in mask)")
        source = f"layers[{layer!r}]" if layer is not None else "X"
        return cls(counts, mask, source, names, column_ids, requested)

    def block(self, rows: slice, obs_names, processor) -> tuple[np.ndarray, np.ndarray]:
        """`(counts, hidden)` of a block of cells, dense; a `ValueError` names a visible value that is no count."""
        import scipy.sparse as sp

        block = self.counts[rows]
        block = np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float64)
        hidden = self.mask[rows].toarray()
        bad = ~hidden & processor.invalid_counts(block)
        if bad.any():
            i, j = (int(k[0]) for k in np.nonzero(bad))
            raise ValueError(f"cell {obs_names[i]!r} ({self.source}): counts must be non-negative integers, got "
                             f"{block[i, j]} at gene {str(self.names[j])!r}, which is not masked")  # fmt: skip
        return block, hidden


def _call_inputs(cells) -> dict:
    """[`RaggedCells`] as the pipeline's call takes them: one list per cell."""
    split = cells.offsets[1:-1]
    return {
        "gene_ids": np.split(cells.gene_ids, split),
        "counts": np.split(cells.counts, split),
        "mask": np.split(cells.mask, split),
        "context_counts": np.split(cells.context, cells.context_offsets[1:-1]),
    }


class ImputedLayers:
    """The imputation's outputs over a whole table: sampled ranks, expected ranks and, on request, distributions."""

    def __init__(self, shape: tuple[int, int], requested: np.ndarray, num_tokens: int, return_probs: bool):
        self.ranks = np.full(shape, -1, dtype=np.int16)
        self.expected = np.full(shape, np.nan, dtype=np.float32)
        self.requested = np.flatnonzero(requested)
        self.probs = np.zeros((shape[0], len(self.requested), num_tokens), np.float32) if return_probs else None

    def write(self, rows: np.ndarray, cells, columns: np.ndarray, sampled: np.ndarray, scored) -> None:
        """Put each cell's results at its masked entries (`rows`: the table row of each cell)."""
        for k, row in enumerate(rows):
            hidden, cols = cells.values_of(cells.mask, k), cells.values_of(columns, k)
            n = len(cols)
            self.ranks[row, cols[hidden]] = sampled[k, :n][hidden]
            self.expected[row, cols[hidden]] = scored.expected[k, :n][hidden]
            if self.probs is not None:
                self.probs[row, np.searchsorted(self.requested, cols[hidden])] = scored.probs[k, :n][hidden]

    def into(self, adata, key_added: str, names: np.ndarray):
        result = adata.to_memory() if adata.isbacked else adata.copy()  # a backed AnnData is read, never written
        result.layers[f"{key_added}_ranks"] = self.ranks
        result.layers[f"{key_added}_expected"] = self.expected
        result.uns[key_added] = {"genes": names[self.requested].tolist()}
        if self.probs is not None:
            result.obsm[f"{key_added}_probs"] = self.probs
        return result


def run_imputation(
    pipe,
    adata,
    *,
    mask=None,
    layer: str | None = None,
    gene_column: str | None = None,
    return_probs: bool = False,
    key_added: str = "rankdiff",
    cell_batch_size: int = 256,
    condition_columns: Sequence[str] | dict[str, str] | None = None,
    **call_kwargs,
):
    """[`MaskedRankDiffusionPipeline.impute_anndata`]: see there."""
    _check_call_arguments("impute_anndata", call_kwargs)
    check_anndata(adata, "adata")
    if not isinstance(return_probs, (bool, np.bool_)):
        raise TypeError(f"return_probs must be True or False, got {return_probs!r}")
    if not isinstance(key_added, str) or not key_added:
        raise ValueError(f"key_added must be a non-empty string (the prefix of the new layers), got {key_added!r}")
    taken = [key for key in (f"{key_added}_ranks", f"{key_added}_expected") if key in adata.layers]
    taken += [f"uns[{key_added!r}]"] * (key_added in adata.uns)
    if taken:
        raise ValueError(f"key_added={key_added!r} would overwrite {taken} of the AnnData: choose another key_added")
    if not isinstance(cell_batch_size, (int, np.integer)) or isinstance(cell_batch_size, bool) or cell_batch_size < 1:
        raise ValueError(f"cell_batch_size must be a positive integer, got {cell_batch_size!r}")
    if condition_columns is None:
        condition_columns = default_condition_columns(pipe.model.config, adata.obs, "impute_anndata")
    conditions = pipe.processor.table_conditions(adata.obs, condition_columns)
    check_conditions(pipe, conditions, adata.obs_names)
    table = CountTable.of(adata, pipe.processor, mask, layer, gene_column)
    outputs = ImputedLayers(adata.shape, table.requested, pipe.processor.num_rank_bins + 1, return_probs)
    if call_kwargs.get("generator") is None:
        call_kwargs["generator"] = torch.Generator().manual_seed(0)
    call_kwargs["reference"] = pipe.resolve_reference(call_kwargs.get("reference"))  # a user's AnnData read once
    scoring = {k: call_kwargs[k] for k in ("batch_size", "guidance_scale", "reference") if k in call_kwargs}
    bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
    cells_bar = tqdm(total=adata.n_obs, desc="imputing cells", unit="cell", disable=bar_config.get("disable"))
    pipe.set_progress_bar_config(**{**bar_config, "disable": True})  # one bar, over cells
    try:
        for start in range(0, adata.n_obs, cell_batch_size):
            rows = slice(start, start + cell_batch_size)
            counts, hidden = table.block(rows, adata.obs_names[rows], pipe.processor)
            # Masked entries of genes outside the vocabulary stay masked and are not imputed.
            active = np.flatnonzero((hidden & (table.column_ids >= 0)).any(axis=1))
            cells_bar.update(len(counts))
            if not len(active):
                continue
            cells, columns = pipe.processor.table_cells(counts[active], table.column_ids, hidden[active],
                                                        table.requested)  # fmt: skip
            inputs = _call_inputs(cells)
            inputs["conditions"] = [conditions[start + i] for i in active] if conditions else None
            sampled = pipe(**inputs, **call_kwargs, output_type="ranks").ranks
            scored = pipe(**inputs, **scoring, output_type="probs")
            outputs.write(start + active, cells, columns, sampled, scored)
    finally:
        pipe.set_progress_bar_config(**bar_config)
        cells_bar.close()
    return outputs.into(adata, key_added, table.names)


def read_reference(pipe, adata, *, layer: str | None = None, gene_column: str | None = None,
                   max_cells: int | None = 2048, seed: int = 0, cell_batch_size: int = 256):  # fmt: skip
    """[`MaskedRankDiffusionPipeline.make_reference`] from an AnnData of raw counts: up to `max_cells` of its cells
    (a seeded draw), each tokenized whole by the checkpoint's rule, as a [`ReferenceCells`]."""
    import scipy.sparse as sp

    from .reference_cells import ReferenceCells

    check_anndata(adata, "reference")
    if max_cells is not None and not (isinstance(max_cells, (int, np.integer)) and not isinstance(max_cells, bool)
                                      and max_cells >= 2):  # fmt: skip
        raise ValueError(f"max_cells must be an integer >= 2 (or None: every cell), got {max_cells!r}")
    if not (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0):
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if adata.n_obs < 2 or adata.n_vars == 0:
        raise ValueError(f"a reference needs at least 2 cells and a gene; the AnnData holds {adata.shape}")
    matrix, names = counts_and_genes(adata, layer, gene_column, "reference AnnData")
    column_ids = pipe.processor.gene_vocab.columns(names)
    if not (column_ids >= 0).any():
        raise ValueError("none of the reference AnnData's genes is in the checkpoint's vocabulary")
    rows = np.arange(adata.n_obs)
    if max_cells is not None and adata.n_obs > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(adata.n_obs, max_cells, replace=False))
    blocks = []
    for start in range(0, len(rows), cell_batch_size):
        block = matrix[rows[start : start + cell_batch_size]]
        block = np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float64)
        bad = pipe.processor.invalid_counts(block)
        if bad.any():
            i, j = (int(k[0]) for k in np.nonzero(bad))
            raise ValueError(f"reference cell {adata.obs_names[rows[start + i]]!r}: counts must be non-negative "
                             f"integers, got {block[i, j]} at gene {str(names[j])!r}")  # fmt: skip
        cells, _ = pipe.processor.table_cells(block, column_ids)
        batch = pipe.processor.encode(cells)
        real = batch["attention_mask"].bool() & (batch["input_ids"] > 0)
        row, _ = real.nonzero(as_tuple=True)
        blocks.append(sp.csr_matrix((batch["input_ids"][real].numpy(), (row.numpy(), batch["gene_ids"][real].numpy())),
                                    shape=(batch.num_cells, pipe.model.config.gene_vocab_size)))  # fmt: skip
    tokens = sp.vstack(blocks)
    if tokens.nnz == 0:
        raise ValueError("the reference AnnData holds no count above 0 at the checkpoint's genes: no cells to read")
    reference, _ = ReferenceCells.from_tokens(
        tokens, pipe.processor.num_rank_bins, max_cells=None, seed=seed,
        num_neighbours=pipe.reference.config.num_neighbours if pipe.reference is not None else 32,
    )  # fmt: skip
    return reference


def control_inputs(processor, control, genes: np.ndarray, n_cells: int, layer: str | None,
                   gene_column: str | None) -> dict:  # fmt: skip
    """The pipeline's `control_counts` and `context_counts` from an AnnData of control cells (raw counts, one per
    cell to generate): their counts at `genes` (matched through the vocabulary, so ids, Ensembl ids and symbols
    meet; 0 where the AnnData lacks a gene, with a warning) and their other genes' counts."""
    import scipy.sparse as sp

    check_anndata(control, "control")
    if control.n_obs != n_cells:
        raise ValueError(f"control holds {control.n_obs} cells; give one control cell per row of obs ({n_cells})")
    matrix, names = counts_and_genes(control, layer, gene_column, "control AnnData")
    matrix = sp.csr_matrix(matrix.to_memory() if hasattr(matrix, "to_memory") else matrix, dtype=np.float64)
    column_of = {int(token): j for j, token in enumerate(processor.gene_vocab.columns(names)) if token >= 0}
    columns = np.array([column_of.get(int(token), -1) for token in processor.gene_token_ids(genes)])
    if not (columns >= 0).any():
        raise ValueError("none of genes is a gene of the control AnnData (var_names, or var[gene_column])")
    if (columns < 0).any():
        logger.warning("%d of the genes are not in the control AnnData: read as count 0 in every control cell",
                       int((columns < 0).sum()))  # fmt: skip
    shown = matrix[:, columns.clip(min=0)].toarray() * (columns >= 0)
    other = matrix.copy()
    other.data[np.isin(other.indices, columns[columns >= 0])] = 0
    other.eliminate_zeros()
    context = [other.data[other.indptr[i] : other.indptr[i + 1]] for i in range(n_cells)]
    return {"control_counts": shown, "context_counts": context}


def run_generation(pipe, obs, genes, *, condition_columns=None, control=None, layer=None, gene_column=None,
                   **call_kwargs):  # fmt: skip
    """[`MaskedRankDiffusionPipeline.generate_anndata`]: see there."""
    import anndata
    import pandas as pd

    _check_call_arguments("generate_anndata", call_kwargs)
    if not isinstance(obs, pd.DataFrame):
        raise TypeError(f"obs must be a pandas DataFrame (one row per cell to generate), got {type(obs).__name__}")
    if len(obs) == 0:
        raise ValueError("obs holds no rows: one row per cell to generate")
    if condition_columns is None:
        condition_columns = default_condition_columns(pipe.model.config, obs, "generate_anndata")
    if "unknown_genes" in call_kwargs:
        raise ValueError("generate_anndata generates known genes only: unknown_genes is not an argument of it")
    if genes is None or isinstance(genes, (str, bytes)):
        raise TypeError(f"genes must be a list of genes (ids, Ensembl ids or symbols), got {genes!r}")
    (genes,) = pipe.processor.as_cells([genes], "genes")
    unknown = [str(genes[j]) for j in np.flatnonzero(pipe.processor.gene_token_ids(genes) < 0)]
    if unknown:  # before any cell is generated
        raise KeyError(f"genes outside the checkpoint's vocabulary: {unknown[:10]}; generate on known genes only")
    conditions = pipe.processor.table_conditions(obs, condition_columns)
    check_conditions(pipe, conditions, obs.index)
    if control is not None:
        call_kwargs.update(control_inputs(pipe.processor, control, genes, len(obs), layer, gene_column))
    elif layer is not None or gene_column is not None:
        raise ValueError("layer and gene_column name the control AnnData's counts and genes: pass control= too")
    out = pipe(gene_ids=[genes] * len(obs), conditions=conditions, **call_kwargs)
    obs = obs.copy()
    obs.index = obs.index.astype(str)
    var = pd.DataFrame(index=pd.Index([str(g) for g in genes]))
    layers = {} if out.counts is None else {"counts": out.counts.astype(np.float32)}
    return anndata.AnnData(out.ranks.astype(np.int16), obs=obs, var=var, layers=layers)
