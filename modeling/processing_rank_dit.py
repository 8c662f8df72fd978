"""`RankDiTProcessor`: everything between a user's cells and RankDiT's tensors, and back.

Gene names -> token ids (the checkpoint's gene vocabulary), raw counts -> rank tokens (the training rule, from the
whole cell), checks that name the cell, position and value of any bad input, padding and masks, windows for cells
longer than the model's training length, and the model's logits -> per-position distributions. The model holds
none of it. A processor is saved beside the model (`preprocessor_config.json`, which holds the gene vocabulary, and
its code) and as the `processor` component of a diffusers pipeline folder; both load with `trust_remote_code=True`.

This file imports the transformers task (`imputation_task.py`) so that a saved processor carries its code: the
task drives the processor loaded beside a model. Every file a module here needs is imported by it directly
(diffusers copies only direct relative imports of remote code).
"""

from __future__ import annotations

import copy
import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.nn import functional as F
from transformers.feature_extraction_utils import FeatureExtractionMixin

from .cell_batch import CellBatch, CellWindows, RaggedCells
from .conditions import (
    ConditionEncoder,
    check_guidance_scale,
    guided_logits,
    table_conditions,
    warn_if_guidance_unused,
)
from .configuration_rank_dit import RankDiTConfig
from .gene_vocab import FIRST_GENE_ID, SPECIAL_TOKENS, GeneVocab
from .imputation_task import RankDiTImputationPipeline  # noqa: F401  (its code travels with the processor)
from .rank_tokenizer import check_counts, counts_at_tokens, invalid_counts, rank_tokens, repeated_genes

logger = logging.getLogger(__name__)

UNKNOWN_GENE_POLICIES = ("raise", "ignore")


def _listed(values, name: str) -> list:
    """A user's sequence (list, tuple, array, tensor, pandas Index or Series) as a list; a clear error otherwise."""
    if isinstance(values, torch.Tensor):
        if values.is_meta:
            raise TypeError(f"{name} is a tensor on the meta device: it holds no values")
        values = values.detach().cpu().numpy()
    if hasattr(values, "to_numpy") and not isinstance(values, np.ndarray):  # pandas Index, Series
        values = values.to_numpy()
    if isinstance(values, np.ndarray):
        if values.ndim not in (1, 2):
            raise ValueError(f"{name} must be 1-D (one cell) or 2-D (cells x genes), got shape {values.shape}")
        return list(values) if values.ndim == 2 else values
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence, an array or a tensor, got {type(values).__name__}")
    return list(values)


def _is_cell(value) -> bool:
    return not isinstance(value, (str, bytes)) and (
        isinstance(value, (Sequence, np.ndarray, torch.Tensor)) or hasattr(value, "to_numpy")
    )


def as_cells(values, name: str) -> list[np.ndarray] | None:
    """One cell (a flat sequence) or several (a sequence of sequences, or a 2-D array) as a list of 1-D arrays."""
    if values is None:
        return None
    if isinstance(values, np.ndarray) and values.ndim == 2 and values.dtype.kind in "iufb":  # cells x genes
        return [_cell_array(row) for row in values]
    items = _listed(values, name)
    nested = [_is_cell(item) for item in items]
    if len(items) and all(nested):
        cells = [_cell_array(_listed(item, f"{name}[{i}]")) for i, item in enumerate(items)]
        for i, cell in enumerate(cells):  # only an array of objects can hold sequences: numbers are not looked at
            if cell.ndim != 1 or (cell.dtype == object and any(_is_cell(value) for value in cell)):
                raise ValueError(f"{name}[{i}] must be a flat sequence of one cell's values, not of sequences")
        return cells
    if any(nested):
        raise ValueError(f"{name} mixes cells (sequences) and single values: give one cell or a list of cells")
    return [_cell_array(items)]


def _cell_array(items: list | np.ndarray) -> np.ndarray:
    """One cell's values as an array: of their numeric (or bool) type when they all share it, else of objects, so
    that a bool among numbers or a number among names is still seen for what it is."""
    int64_max = np.iinfo(np.int64).max
    if isinstance(items, np.ndarray) and items.ndim == 1 and items.dtype.kind in "iufb":  # as it is, no Python loop
        if items.dtype.kind != "u" or not len(items) or items.max() <= int64_max:
            return items.astype({"i": np.int64, "u": np.int64, "f": np.float64, "b": bool}[items.dtype.kind],
                                copy=False)  # fmt: skip
    kinds = set(map(type, items))
    for dtype, allowed in ((np.int64, (int, np.int64, np.int32)), (np.float64, (float, np.float64, np.float32)),
                           (bool, (bool, np.bool_))):  # fmt: skip
        if len(items) and kinds <= set(allowed):
            try:
                return np.array(items, dtype=dtype)
            except OverflowError:  # an integer beyond int64: kept as it is, refused by name where it is read
                break
    return np.array(items, dtype=object)


def _first_bad(bad: np.ndarray) -> int:
    return int(np.flatnonzero(bad)[0])


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _number(value: float) -> str:
    """A number as a user wrote it: 11 for 11.0, 12.7, nan."""
    return str(int(value)) if np.isfinite(value) and value == int(value) else str(float(value))


def _shown(value) -> str:
    return f"{_plain(value)!r} ({type(_plain(value)).__name__})"


def _mask(values: np.ndarray | None, n: int, where: str) -> np.ndarray:
    """One cell's mask as booleans (0 / 1 taken too); a `TypeError` naming the first value that is neither."""
    if values is None:
        return np.zeros(n, dtype=bool)
    if values.dtype.kind == "b":
        return values
    if values.dtype.kind in "iu" and np.isin(values, (0, 1)).all():
        return values.astype(bool)
    flags = np.array([isinstance(v, (bool, np.bool_)) or (isinstance(v, (int, np.integer)) and v in (0, 1))
                      for v in values], dtype=bool)  # fmt: skip
    if not flags.all():
        j = _first_bad(~flags)
        raise TypeError(f"{where}: mask must be booleans (True = predict) or 0 / 1, got {_shown(values[j])} at "
                        f"position {j}")  # fmt: skip
    return values.astype(bool)


def _numbers(values: np.ndarray, what: str, where: str) -> np.ndarray:
    """`values` as float64, None as NaN (allowed where a value is masked); a `TypeError` naming the first value that
    is not a number (a string, a bool)."""
    if values.dtype.kind in "iuf":
        return values.astype(np.float64)
    bad = np.array(
        [isinstance(v, (str, bytes, bool, np.bool_, complex, np.complexfloating)) for v in values], dtype=bool
    )
    if bad.any():
        j = _first_bad(bad)
        raise TypeError(f"{where}: {what} must be numbers, got {_shown(values[j])} at position {j}")
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


class RankDiTProcessor(FeatureExtractionMixin):
    r"""Turns cells as users have them into a [`CellBatch`] for a RankDiT model, and its logits into distributions.

    Args:
        num_rank_bins (`int`, defaults to 50): B of the model: rank tokens are 0..B, `[MASK]` is B + 1.
        max_length (`int`, defaults to 1024): the model's training length; longer cells are seen in windows.
        gene_vocab_size (`int`, *optional*): the number of gene ids of the model, to check ids given as numbers when
            there is no vocabulary.
        whole_cell_genes (`int`, defaults to 5000): a cell given by counts at fewer genes, some of them zero, looks
            like a panel cut from a cell: a warning says how to pass the rest of the cell.
        gene_vocab ([`GeneVocab`], *optional*): gene names -> token ids; saved in `preprocessor_config.json`.

    Examples:

    ```python
    >>> from modeling import GeneVocab, RankDiTProcessor

    >>> vocab = GeneVocab([3, 4, 5], ["ENSG01", "ENSG02", "ENSG03"], ["CD3E", "MS4A1", "LYZ"])
    >>> processor = RankDiTProcessor(num_rank_bins=50, gene_vocab=vocab)
    >>> cells = processor(gene_ids=["CD3E", "MS4A1", "LYZ"], counts=[3, 0, 12], mask=[False, True, False])
    >>> cells.input_ids  # 51 = [MASK]
    tensor([[ 1, 51, 50]])
    ```
    """

    model_input_names = ["gene_ids", "input_ids", "attention_mask"]

    def __init__(
        self,
        num_rank_bins: int = 50,
        max_length: int = 1024,
        gene_vocab_size: int | None = None,
        whole_cell_genes: int = 5000,
        gene_vocab: GeneVocab | dict | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(gene_vocab, dict):  # as saved in the config
            gene_vocab = GeneVocab.from_dict(gene_vocab)
        if num_rank_bins < 1 or max_length < 1:
            raise ValueError(f"num_rank_bins and max_length must be positive, got {num_rank_bins}, {max_length}")
        self.num_rank_bins = num_rank_bins
        self.max_length = max_length
        self.gene_vocab_size = gene_vocab_size if gene_vocab_size is not None else getattr(gene_vocab, "size", None)
        self.whole_cell_genes = whole_cell_genes
        self.gene_vocab = gene_vocab

    @classmethod
    def from_model_config(
        cls, config: RankDiTConfig, gene_vocab: GeneVocab | None = None, **kwargs
    ) -> RankDiTProcessor:
        """The processor of a model with this [`RankDiTConfig`]."""
        return cls(
            num_rank_bins=config.num_rank_bins,
            max_length=config.max_length,
            gene_vocab_size=config.gene_vocab_size,
            gene_vocab=gene_vocab,
            **kwargs,
        )

    @property
    def mask_token_id(self) -> int:
        return self.num_rank_bins + 1

    def check_model_config(self, config: RankDiTConfig) -> None:
        """Raise if a model's config disagrees with this processor on the token space or the gene ids."""
        if config.num_rank_bins != self.num_rank_bins:
            raise ValueError(f"processor num_rank_bins={self.num_rank_bins} does not match the model's "
                             f"{config.num_rank_bins}")  # fmt: skip
        if self.gene_vocab_size is not None and self.gene_vocab_size > config.gene_vocab_size:
            raise ValueError(f"the processor's gene ids (0..{self.gene_vocab_size - 1}) do not fit the model's "
                             f"{config.gene_vocab_size} gene embeddings")  # fmt: skip

    # Saving and loading, as a transformers feature extractor. The vocabulary is part of the config: transformers
    # builds a feature extractor from its config alone (`from_dict`), whichever way it is loaded.

    def to_dict(self) -> dict:
        output = {key: copy.deepcopy(value) for key, value in self.__dict__.items() if key != "gene_vocab"}
        output["feature_extractor_type"] = type(self).__name__
        if self.gene_vocab is not None:
            output["gene_vocab"] = self.gene_vocab.to_dict()
        return output

    def to_json_string(self) -> str:
        """The config as JSON, each column of the vocabulary on one line (a few MB, not 200,000 lines)."""
        config = self.to_dict()
        vocab = config.pop("gene_vocab", None)
        text = json.dumps(config, indent=2, sort_keys=True)
        if vocab is None:
            return text + "\n"
        columns = ",\n".join(f"    {json.dumps(name)}: {json.dumps(values)}" for name, values in vocab.items())
        return f'{text[:-2]},\n  "gene_vocab": {{\n{columns}\n  }}\n}}\n'

    def __repr__(self) -> str:
        shown = {key: value for key, value in self.to_dict().items() if key != "gene_vocab"}
        genes = f"{len(self.gene_vocab)} genes" if self.gene_vocab is not None else "None"
        return f"{type(self).__name__}({shown}, gene_vocab={genes})"

    # Input: cells as users have them -> RaggedCells -> CellBatch.

    def gene_token_ids(self, genes, cell: int = 0) -> np.ndarray:
        """Token ids of one cell's genes (token ids, Ensembl ids or symbols); -1 for genes outside the vocabulary.

        Raises a `TypeError` / `ValueError` naming the position of a value that is no gene: a float, a bool, a
        special id (`<pad>`, `<cls>`, `<eoc>`) or an id outside the model's range.
        """
        genes = genes if isinstance(genes, np.ndarray) else _cell_array(list(genes))
        where = f"cell {cell}"
        ids = np.full(len(genes), -1, dtype=np.int64)
        if genes.dtype.kind in "iu":
            named, numbered = np.zeros(len(genes), dtype=bool), np.ones(len(genes), dtype=bool)
        else:
            named = np.array([isinstance(g, str) for g in genes], dtype=bool)
            numbered = np.array(
                [isinstance(g, (int, np.integer)) and not isinstance(g, (bool, np.bool_)) for g in genes], dtype=bool
            )
        if not (named | numbered).all():
            j = _first_bad(~(named | numbered))
            raise TypeError(f"{where}: gene ids must be integer token ids or gene names (Ensembl ids or symbols), "
                            f"got {_shown(genes[j])} at position {j}")  # fmt: skip
        if numbered.any():
            positions = np.flatnonzero(numbered)
            fits = genes.dtype == np.int64 or (genes.dtype.kind == "u" and genes.max() < 2**63)
            huge = [] if fits else [j for j in positions if not -(2**63) <= int(genes[j]) < 2**63]
            if huge:
                raise ValueError(f"{where}: gene id {int(genes[huge[0]])} at position {huge[0]} is no token id "
                                 "(far beyond the vocabulary)")  # fmt: skip
            numbers = genes[numbered].astype(np.int64)
            special = numbers < FIRST_GENE_ID
            if special.any():
                j = _first_bad(special)
                name = SPECIAL_TOKENS.get(int(numbers[j]), "negative")
                raise ValueError(f"{where}: gene id {int(numbers[j])} at position {positions[j]} is {name}, not a "
                                 f"gene (gene ids start at {FIRST_GENE_ID})")  # fmt: skip
            high = self.gene_vocab_size
            if high is not None and (numbers >= high).any():
                j = _first_bad(numbers >= high)
                raise ValueError(f"{where}: gene id {int(numbers[j])} at position {positions[j]} is outside the "
                                 f"model's {FIRST_GENE_ID}..{high - 1}")  # fmt: skip
            ids[numbered] = self.gene_vocab.lookup(numbers) if self.gene_vocab is not None else numbers
        if named.any():
            if self.gene_vocab is None:
                raise ValueError("gene names need the checkpoint's gene vocabulary (processor.gene_vocab is None)")
            ids[named] = self.gene_vocab.lookup(genes[named].tolist())
        return ids

    def __call__(
        self,
        gene_ids,
        ranks=None,
        counts=None,
        mask=None,
        *,
        context_counts=None,
        unknown_genes: str = "raise",
    ) -> CellBatch:
        """Check cells and turn them into a padded [`CellBatch`] (`model(**batch)`); cells may hold any number of
        genes. The cells are read into [`RaggedCells`] and go through [`~RankDiTProcessor.encode`], the batch
        tokenizer of training and evaluation too.

        Args:
            gene_ids: the genes of one cell (a flat sequence) or of several (a sequence of sequences, a 2-D array):
                token ids (integers), or Ensembl ids / symbols of the vocabulary; pandas `Index` / `Series` too.
            ranks: rank tokens, integers in 0..B, at the same positions (values at masked positions are ignored).
            counts: raw counts instead (non-negative integers; masked ones are ignored and may be NaN), tokenized
                by the training rule over each cell's *visible* counts, so masked values never shape the visible
                tokens. The bins are quantiles of the whole cell: give all its measured genes, or its other genes'
                counts as `context_counts`.
            mask: booleans (or 0 / 1), True at the positions to predict. Without ranks or counts every position is.
            context_counts: with `counts`, per cell the raw counts of its genes not in `gene_ids` (zeros may be
                left out): they join the visible counts in the bins and are not predicted.
            unknown_genes (`str`, defaults to `"raise"`): what to do with genes outside the vocabulary: `"raise"`
                names them; `"ignore"` leaves them out of the model's input (their visible counts still shape the
                cell's bins), marks them with gene id -1 in the returned cells and logs how many there were.

        Returns:
            [`CellBatch`]: `(n_cells, longest cell)`, in the positions given (ignored genes are not attended).
        """
        if unknown_genes not in UNKNOWN_GENE_POLICIES:
            raise ValueError(f"unknown_genes must be one of {UNKNOWN_GENE_POLICIES}, got {unknown_genes!r}")
        if ranks is not None and counts is not None:
            raise ValueError("give ranks or counts, not both")
        if mask is not None and ranks is None and counts is None:
            raise ValueError("a mask needs the ranks (or counts) of the positions it keeps")
        if context_counts is not None and counts is None:
            raise ValueError("context_counts go with counts: they join the counts in each cell's quantile bins")
        cells = self._read_cells(gene_ids, ranks, counts, mask, context_counts, unknown_genes)
        if counts is not None and context_counts is None:
            self._warn_if_partial(cells)
        return self.encode(cells)

    def _read_cells(self, gene_ids, ranks, counts, mask, context_counts, unknown_genes) -> RaggedCells:
        """A user's cells (Python sequences, arrays, tensors, pandas objects) as flat arrays, checked cell by cell
        for what only the user's own values can name: gene names, types, lengths and genes outside the vocabulary."""
        value_name = "ranks" if ranks is not None else "counts"
        genes = as_cells(gene_ids, "gene_ids")
        values = as_cells(ranks if ranks is not None else counts, value_name)
        masks = as_cells(mask, "mask")
        contexts = as_cells(context_counts, "context_counts")
        if not genes or min(len(g) for g in genes) == 0:
            raise ValueError("gene_ids must hold at least one gene per cell")
        for name, other in ((value_name, values), ("mask", masks), ("context_counts", contexts)):
            if other is not None and len(other) != len(genes):
                raise ValueError(f"{name} must hold one cell per cell of gene_ids ({len(genes)}), got {len(other)}")
            if other is not None and name != "context_counts":
                for i, (cell, given) in enumerate(zip(genes, other)):
                    if len(given) != len(cell):
                        raise ValueError(f"cell {i}: {name} has {len(given)} values for {len(cell)} genes")
        ids = [self.gene_token_ids(cell, i) for i, cell in enumerate(genes)]
        unknown = np.concatenate(ids) < 0
        if unknown.any():
            if unknown_genes == "raise":
                i = next(i for i, cell_ids in enumerate(ids) if (cell_ids < 0).any())
                missing = np.flatnonzero(ids[i] < 0)
                shown = ", ".join(f"{genes[i][j]!r} (position {j})" for j in missing[:10])
                raise KeyError(f"cell {i}: {len(missing)} of {len(ids[i])} genes are not in the checkpoint's "
                               f"vocabulary: {shown}; pass unknown_genes='ignore' to leave them out")  # fmt: skip
            for i, cell_ids in enumerate(ids):  # a repeat of a known gene is refused later; of an unknown one, here
                counted = Counter(str(genes[i][j]) for j in np.flatnonzero(cell_ids < 0))
                repeated = sorted(name for name, count in counted.items() if count > 1)
                if repeated:
                    raise ValueError(f"cell {i}: genes are repeated: {repeated[:10]} (outside the vocabulary; each "
                                     "gene's count would shape the cell's bins twice)")  # fmt: skip
            logger.warning("%d genes outside the checkpoint's vocabulary were left out (gene id -1 in the output)",
                           int(unknown.sum()))  # fmt: skip
        cells = RaggedCells(np.concatenate([[0], np.cumsum([len(i) for i in ids])]), np.concatenate(ids))
        if values is not None:
            parsed = np.concatenate([_numbers(v, value_name, f"cell {i}") for i, v in enumerate(values)])
            setattr(cells, value_name, parsed)
            cells.mask = np.concatenate(
                [_mask(m, len(g), f"cell {i}") for i, (m, g) in enumerate(zip(masks or [None] * len(ids), ids))]
            )
        if contexts is not None:
            parsed = [_numbers(c, "context_counts", f"cell {i}") for i, c in enumerate(contexts)]
            cells.context = np.concatenate(parsed) if parsed else np.zeros(0)
            cells.context_offsets = np.concatenate([[0], np.cumsum([len(c) for c in parsed])])
        return cells

    def counts_at_tokens(self, tokens: np.ndarray, counts, context_counts, uniforms: np.ndarray) -> np.ndarray:
        """Cells' raw counts `(n_cells, width)` for new tokens `tokens` (`-1` where a cell has none: NaN there) at the
        positions of cells given by `counts` (and `context_counts`, their other genes), as `__call__` took them: a
        token unchanged keeps its count, another takes a count the cell holds at it ([`counts_at_tokens`], one of
        `uniforms` per position picking among them)."""
        values = [_numbers(cell, "counts", f"cell {i}") for i, cell in enumerate(as_cells(counts, "counts"))]
        sizes = np.array([len(cell) for cell in values])
        inside = np.arange(tokens.shape[1])[None, :] < sizes[:, None]
        contexts = as_cells(context_counts, "context_counts")
        context = [_numbers(c, "context_counts", f"cell {i}") for i, c in enumerate(contexts)] if contexts else []
        found = counts_at_tokens(
            tokens[inside], np.concatenate(values), np.concatenate([[0], np.cumsum(sizes)]), uniforms[inside],
            self.num_rank_bins,
            context=np.concatenate(context) if context else None,
            context_offsets=np.concatenate([[0], np.cumsum([len(c) for c in context])]) if context else None,
        )  # fmt: skip
        out = np.full(tokens.shape, np.nan)
        out[inside] = found
        return out

    invalid_counts = staticmethod(invalid_counts)  # the one count check, for readers that name cells their own way
    as_cells = staticmethod(as_cells)  # a user's cells as 1-D arrays, for the pipelines

    @staticmethod
    def condition_encoder(config: RankDiTConfig) -> ConditionEncoder:
        """The conditions' encoder of a model (its vocabularies, dose, control drug), for the pipelines."""
        return ConditionEncoder.from_config(config)

    @staticmethod
    def check_something_to_impute(ranks, counts, mask, mask_ratio=None) -> None:
        """Refuse values given without a mask: nothing would be imputed, and the input would come back as given."""
        if mask is None and mask_ratio is None and (ranks is not None or counts is not None):
            given = "ranks" if ranks is not None else "counts"
            raise ValueError(f"{given} without mask or mask_ratio: nothing to impute (mask: True at the positions to "
                             "impute; mask_ratio: a share of each cell's genes, masked at random)")  # fmt: skip

    @staticmethod
    def table_cells(counts, column_ids, hidden=None, requested=None) -> tuple[RaggedCells, np.ndarray]:
        """Rows of a count table (an AnnData's) as cells: [`RaggedCells.from_matrix`], the rule training reads
        `.h5ad` files with too; `column_ids` from [`GeneVocab.columns`]."""
        return RaggedCells.from_matrix(counts, column_ids, hidden, requested)

    def _warn_if_partial(self, cells: RaggedCells) -> None:
        visible_zero = (cells.counts == 0) & ~cells.mask
        short = cells.sizes < self.whole_cell_genes
        partial = np.flatnonzero(short & (np.add.reduceat(visible_zero, cells.offsets[:-1]) > 0))
        if len(partial):
            logger.warning(
                "%d cells (e.g. cell %d, %d genes) are given by the counts of fewer than %d genes, some of them zero: "
                "their tokens come from these counts by the training rule (quantile bins of the cell's non-zero "
                "counts). If they are only part of their cells, pass the other genes' counts as context_counts (or "
                "ranks computed from the whole cells), so the bins are those of the whole cells, as in training; "
                "context_counts=[[]] * n_cells says they are whole.",
                len(partial), partial[0], cells.sizes[partial[0]], self.whole_cell_genes,
            )  # fmt: skip

    def encode(self, cells: RaggedCells) -> CellBatch:
        """The batch tokenizer: cells of any lengths -> a padded [`CellBatch`], vectorised over the whole batch.

        Checks that no cell repeats a gene and that the visible values are raw counts (or ranks in 0..B), bins the
        counts by [`rank_tokens`] from each cell's visible counts and its context, puts `[MASK]` at the masked
        positions and pads. Genes with id -1 (outside the vocabulary) are not attended; their visible counts still
        shape the bins. The training collator, the evaluation and `__call__` all end here.
        """
        n = len(cells.gene_ids)
        known = cells.gene_ids >= 0
        self._check_repeats(cells, known)
        if cells.counts is None and cells.ranks is None:  # no values: every known gene is generated
            mask = known
            tokens = np.zeros(n, dtype=np.int64)
        else:
            mask = (np.zeros(n, dtype=bool) if cells.mask is None else cells.mask) & known
            visible = ~(np.zeros(n, dtype=bool) if cells.mask is None else cells.mask)
            tokens = self._tokens(cells, visible, known)
        input_ids = np.where(mask, self.mask_token_id, np.where(known, tokens, 0))
        return CellBatch.from_ragged(cells.offsets, cells.gene_ids, input_ids, known, self.mask_token_id)

    def _check_repeats(self, cells: RaggedCells, known: np.ndarray) -> None:
        repeating, genes = repeated_genes(cells.offsets, cells.gene_ids, known)
        if len(repeating):
            first = repeating[0]
            raise ValueError(f"cell {first}: genes are repeated: token ids {genes[repeating == first][:10].tolist()}")

    def _tokens(self, cells: RaggedCells, visible: np.ndarray, known: np.ndarray) -> np.ndarray:
        """Rank tokens at the visible positions (0 elsewhere): the given ranks, checked, or the counts binned."""
        where = _Positions(cells.offsets)
        if cells.ranks is not None:
            ranks = cells.ranks
            valid = (ranks >= 0) & (ranks <= self.num_rank_bins)
            if ranks.dtype.kind == "f":  # a user's ranks: NaN where masked, and maybe not integers
                valid &= np.isfinite(ranks) & (ranks == np.round(ranks))
            bad = visible & known & ~valid
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(f"{where.cell(i)}: ranks must be integers in 0..{self.num_rank_bins}, got "
                                 f"{_number(ranks[i])} at position {where.position(i)}")  # fmt: skip
            given = np.nan_to_num(ranks) if ranks.dtype.kind == "f" else ranks
            return np.where(visible & known, given, 0).astype(np.int64)
        counts = np.where(visible, cells.counts, 0.0)
        bad = invalid_counts(counts)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            check_counts(counts[i : i + 1], where.cell(i), cells.gene_ids[i : i + 1], np.array([where.position(i)]))
        context, context_offsets = cells.context, cells.context_offsets
        if context is not None:
            bad = invalid_counts(context)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                cell = int(np.searchsorted(context_offsets, i, side="right") - 1)
                check_counts(context[i : i + 1], f"cell {cell}, context_counts", positions=[i - context_offsets[cell]])
        return rank_tokens(counts, self.num_rank_bins, cells.offsets, context=context, context_offsets=context_offsets,
                           checked=True)  # fmt: skip

    # Model side: windows, logits -> distributions.

    def windows(self, cells: CellBatch) -> CellWindows:
        """The cells cut into windows the model's length takes ([`CellBatch.windows`])."""
        return cells.windows(self.max_length)

    def distributions(self, probs: torch.Tensor, cells: CellBatch) -> torch.Tensor:
        """Per-position model probabilities `(n_cells, length, B + 1)` -> the predictive distribution: one-hot at
        visible positions (their token is known), zero at padding and ignored genes."""
        attended = cells["attention_mask"].bool()
        visible = ~cells.mask & attended
        one_hot = F.one_hot(cells["input_ids"].clamp(max=self.num_rank_bins), self.num_rank_bins + 1).to(probs)
        probs = torch.where(visible[..., None], one_hot, probs)
        return probs * attended[..., None]

    logits = staticmethod(guided_logits)  # the denoiser's output under classifier-free guidance, for the pipelines
    check_guidance_scale = staticmethod(check_guidance_scale)  # its argument's one check, for the pipelines
    warn_if_guidance_unused = staticmethod(warn_if_guidance_unused)  # and the one warning that it does nothing
    table_conditions = staticmethod(table_conditions)  # an AnnData's obs columns as conditions, for the pipelines

    @staticmethod
    def add_conditions(cells: CellBatch, conditions, config: RankDiTConfig) -> CellBatch:
        """`cells` told their perturbation conditions: `conditions` is one dict for every cell (`{"drug":
        "Bortezomib", "dose": 0.5}`), a list of one dict per cell, or None (unconditional); see
        [`ConditionEncoder.encode`] for the errors."""
        ids, doses = RankDiTProcessor.condition_encoder(config).encode(conditions, cells.num_cells)
        return cells.replace(condition_ids=ids, doses=doses if config.dose_condition else None)

    @torch.no_grad()
    def predictive_distribution(
        self, model, cells: CellBatch, batch_size: int = 64, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        """p(x0 | visible tokens) over 0..B at every position of `cells` from one pass of `model` (at t = 1 when
        it is time-conditioned): float32 `(n_cells, length, B + 1)` on the CPU. A cell longer than the model's
        length is seen in windows; `batch_size` windows go through the model at a time. Cells with conditions are
        scored under classifier-free guidance of `guidance_scale` ([`guided_logits`])."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        windows = self.windows(cells)
        width, device = windows.inputs["gene_ids"].shape[1], model.device
        probs = []
        for start in range(0, windows.inputs.num_cells, batch_size):
            inputs = windows.inputs.rows(slice(start, start + batch_size))
            timesteps = torch.ones(inputs.num_cells) if model.config.time_conditioning else None
            logits = guided_logits(model, inputs.model_inputs(device, timesteps), guidance_scale)
            probs.append(F.pad(torch.softmax(logits.float(), dim=-1).cpu(), (0, 0, 0, width - logits.shape[1])))
        return self.distributions(windows.to_cells(torch.cat(probs)), cells)


class _Positions:
    """Names the cell and the position in it of flat indices into cells laid out by `offsets`."""

    def __init__(self, offsets: np.ndarray):
        self.offsets = offsets

    def cell(self, i: int) -> str:
        return f"cell {int(np.searchsorted(self.offsets, i, side='right') - 1)}"

    def position(self, i: int) -> int:
        return int(i - self.offsets[np.searchsorted(self.offsets, i, side="right") - 1])


RankDiTProcessor.register_for_auto_class("AutoFeatureExtractor")
