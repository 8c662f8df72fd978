"""`RankDiTProcessor`: everything between a user's cells and RankDiT's tensors, and back.

Gene names -> token ids (the checkpoint's gene vocabulary), raw counts -> rank tokens (the training rule, from the
whole cell), checks that name the cell, position and value of any bad input, padding and masks, windows for cells
longer than the model's training length, and the model's logits -> per-position distributions. The model holds
none of it. A processor is saved beside the model (`preprocessor_config.json`, which holds the gene vocabulary, and
its code) and as the `processor` component of a diffusers pipeline folder; both load with `trust_remote_code=True`.

This file imports the transformers task (`pipeline_rank_dit.py`) so that a saved processor carries its code: the
task drives the processor loaded beside a model. Every file a module here needs is imported by it directly
(diffusers copies only direct relative imports of remote code).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.nn import functional as F
from transformers.feature_extraction_utils import FeatureExtractionMixin

from .cell_inputs import CellInputs, CellWindows
from .conditions import ConditionEncoder, guided_logits
from .configuration_rank_dit import RankDiTConfig
from .gene_vocab import FIRST_GENE_ID, SPECIAL_TOKENS, GeneVocab
from .pipeline_rank_dit import RankDiTImputationPipeline  # noqa: F401  (its code travels with the processor)
from .rank_tokenizer import checked_counts, rank_tokens

logger = logging.getLogger(__name__)

UNKNOWN_GENE_POLICIES = ("raise", "ignore")


def _listed(values, name: str) -> list:
    """A user's sequence (list, tuple, array, tensor, pandas Index or Series) as a list; a clear error otherwise."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    if hasattr(values, "to_numpy") and not isinstance(values, np.ndarray):  # pandas Index, Series
        values = values.to_numpy()
    if isinstance(values, np.ndarray):
        if values.ndim not in (1, 2):
            raise ValueError(f"{name} must be 1-D (one cell) or 2-D (cells x genes), got shape {values.shape}")
        return list(values)
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
    items = _listed(values, name)
    nested = [_is_cell(item) for item in items]
    if items and all(nested):
        return [_cell_array(_listed(item, f"{name}[{i}]")) for i, item in enumerate(items)]
    if any(nested):
        raise ValueError(f"{name} mixes cells (sequences) and single values: give one cell or a list of cells")
    return [_cell_array(items)]


def _cell_array(items: list) -> np.ndarray:
    """One cell's values as an array: of their numeric (or bool) type when they all share it, else of objects, so
    that a bool among numbers or a number among names is still seen for what it is."""
    kinds = set(map(type, items))
    for dtype, allowed in ((np.int64, (int, np.int64, np.int32)), (np.float64, (float, np.float64, np.float32)),
                           (bool, (bool, np.bool_))):  # fmt: skip
        if items and kinds <= set(allowed):
            return np.array(items, dtype=dtype)
    return np.array(items, dtype=object)


def _first_bad(bad: np.ndarray) -> int:
    return int(np.flatnonzero(bad)[0])


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _shown(value) -> str:
    return f"{_plain(value)!r} ({type(_plain(value)).__name__})"


def _numbers(values: np.ndarray, what: str, where: str) -> np.ndarray:
    """`values` as float64, None as NaN (allowed where a value is masked); a `TypeError` naming the first value that
    is not a number (a string, a bool)."""
    if values.dtype.kind in "iuf":
        return values.astype(np.float64)
    bad = np.array([isinstance(v, (str, bytes, bool, np.bool_)) for v in values], dtype=bool)
    if bad.any():
        j = _first_bad(bad)
        raise TypeError(f"{where}: {what} must be numbers, got {_shown(values[j])} at position {j}")
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


class RankDiTProcessor(FeatureExtractionMixin):
    r"""Turns cells as users have them into [`CellInputs`] for a RankDiT model, and its logits into distributions.

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
    >>> cells.ranks  # 51 = [MASK]
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

    # Input: cells -> CellInputs.

    def rank_tokens(self, counts, reference=None) -> np.ndarray:
        """Rank tokens of one cell's raw counts by the training rule ([`rank_tokens`]); with `reference`, binned
        by those counts' quantiles instead (e.g. a cell's visible counts)."""
        return rank_tokens(counts, self.num_rank_bins, reference=reference)

    def gene_token_ids(self, genes, cell: int = 0) -> np.ndarray:
        """Token ids of one cell's genes (token ids, Ensembl ids or symbols); -1 for genes outside the vocabulary.

        Raises a `TypeError` / `ValueError` naming the position of a value that is no gene: a float, a bool, a
        special id (`<pad>`, `<cls>`, `<eoc>`), an id outside the model's range, or a repeated gene.
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
            numbers = genes[numbered].astype(np.int64)
            positions = np.flatnonzero(numbered)
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
            ids[numbered] = self.gene_vocab.lookup(numbers.tolist()) if self.gene_vocab is not None else numbers
        if named.any():
            if self.gene_vocab is None:
                raise ValueError("gene names need the checkpoint's gene vocabulary (processor.gene_vocab is None)")
            ids[named] = self.gene_vocab.lookup(genes[named].tolist())
        known = ids[ids >= 0]
        unique, seen = np.unique(known, return_counts=True)
        if (seen > 1).any():
            raise ValueError(f"{where}: genes are repeated: token ids {unique[seen > 1][:10].tolist()}")
        return ids

    def _mask(self, values: np.ndarray | None, n: int, where: str) -> np.ndarray:
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

    def _rank_values(self, values: np.ndarray, visible: np.ndarray, where: str) -> np.ndarray:
        ranks = _numbers(values, "ranks", where)
        valid = np.isfinite(ranks) & (ranks == np.round(ranks)) & (ranks >= 0) & (ranks <= self.num_rank_bins)
        bad = visible & ~valid
        if bad.any():
            j = _first_bad(bad)
            high, shown = self.num_rank_bins, _plain(values[j])
            raise ValueError(f"{where}: ranks must be integers in 0..{high}, got {shown!r} at position {j}")
        return np.where(visible, ranks, 0).astype(np.int64)

    def __call__(
        self,
        gene_ids,
        ranks=None,
        counts=None,
        mask=None,
        *,
        context_counts=None,
        unknown_genes: str = "raise",
    ) -> CellInputs:
        """Check cells and turn them into a padded [`CellInputs`] batch; cells may hold any number of genes.

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
            [`CellInputs`]: `(n_cells, longest cell)`, in the positions given (ignored genes are not attended).
        """
        if unknown_genes not in UNKNOWN_GENE_POLICIES:
            raise ValueError(f"unknown_genes must be one of {UNKNOWN_GENE_POLICIES}, got {unknown_genes!r}")
        if ranks is not None and counts is not None:
            raise ValueError("give ranks or counts, not both")
        if mask is not None and ranks is None and counts is None:
            raise ValueError("a mask needs the ranks (or counts) of the positions it keeps")
        if context_counts is not None and counts is None:
            raise ValueError("context_counts go with counts: they join the counts in each cell's quantile bins")
        value_name = "ranks" if ranks is not None else "counts"
        cells = as_cells(gene_ids, "gene_ids")
        values = as_cells(ranks if ranks is not None else counts, value_name)
        masks = as_cells(mask, "mask")
        contexts = as_cells(context_counts, "context_counts")
        if not cells or min(len(c) for c in cells) == 0:
            raise ValueError("gene_ids must hold at least one gene per cell")
        for name, other in ((value_name, values), ("mask", masks)):
            if other is not None and len(other) != len(cells):
                raise ValueError(f"{name} must hold one cell per cell of gene_ids ({len(cells)}), got {len(other)}")
            if other is not None:
                for i, (genes, given) in enumerate(zip(cells, other)):
                    if len(given) != len(genes):
                        raise ValueError(f"cell {i}: {name} has {len(given)} values for {len(genes)} genes")
        if contexts is not None and len(contexts) != len(cells):
            raise ValueError(f"context_counts must hold one list per cell ({len(cells)}), got {len(contexts)}")

        n_cells, width = len(cells), max(len(c) for c in cells)
        out_genes = torch.zeros(n_cells, width, dtype=torch.long)
        out_ranks = torch.zeros(n_cells, width, dtype=torch.long)
        out_mask = torch.zeros(n_cells, width, dtype=torch.bool)
        attention_mask = torch.zeros(n_cells, width, dtype=torch.bool)
        partial, ignored = [], 0
        for i, genes in enumerate(cells):
            where, n = f"cell {i}", len(genes)
            ids = self.gene_token_ids(genes, i)
            unknown = ids < 0
            if unknown.any() and unknown_genes == "raise":
                shown = ", ".join(f"{genes[j]!r} (position {j})" for j in np.flatnonzero(unknown)[:10])
                raise KeyError(f"{where}: {int(unknown.sum())} of {n} genes are not in the checkpoint's vocabulary: "
                               f"{shown}; pass unknown_genes='ignore' to leave them out")  # fmt: skip
            ignored += int(unknown.sum())
            # `hidden`: what the user hides (its values never shape the bins); `cell_mask`: what the model predicts.
            hidden = self._mask(masks[i] if masks is not None else None, n, where) if values is not None else ~unknown
            cell_mask = hidden & ~unknown
            out_genes[i, :n] = torch.from_numpy(ids)
            attention_mask[i, :n] = torch.from_numpy(~unknown)
            out_mask[i, :n] = torch.from_numpy(cell_mask)
            if values is None:
                continue
            visible = ~hidden
            if counts is not None:  # bins from the visible counts only: hidden values must not shape them
                given = _numbers(values[i], "counts", where)
                context = checked_counts(
                    _numbers(contexts[i], "context_counts", where) if contexts is not None else np.zeros(0),
                    f"{where}, context_counts",
                )
                shown_counts = checked_counts(given[visible], where, ids[visible], np.flatnonzero(visible))
                if contexts is None and n < self.whole_cell_genes and (shown_counts == 0).any():
                    partial.append(i)
                reference = np.r_[shown_counts, context]  # the cell's genes outside the vocabulary count too
                tokens = np.zeros(n, dtype=np.int64)
                if reference.any():  # with no visible expressed gene there is nothing to bin
                    tokens[visible] = rank_tokens(shown_counts, self.num_rank_bins, reference=reference)
            else:
                tokens = self._rank_values(values[i], visible & ~unknown, where)
            out_ranks[i, :n] = torch.from_numpy(np.where(visible & ~unknown, tokens, 0))
        if partial:
            logger.warning(
                "%d cells (e.g. cell %d, %d genes) are given by the counts of fewer than %d genes, some of them zero: "
                "their tokens come from these counts by the training rule (quantile bins of the cell's non-zero "
                "counts). If they are only part of their cells, pass the other genes' counts as context_counts (or "
                "ranks computed from the whole cells), so the bins are those of the whole cells, as in training; "
                "context_counts=[[]] * n_cells says they are whole.",
                len(partial), partial[0], len(cells[partial[0]]), self.whole_cell_genes,
            )  # fmt: skip
        if ignored:
            logger.warning("%d genes outside the checkpoint's vocabulary were left out (gene id -1 in the output)",
                           ignored)  # fmt: skip
        out_ranks[out_mask] = self.mask_token_id
        return CellInputs(out_genes, out_ranks, out_mask, attention_mask)

    # Model side: windows, model inputs, logits -> distributions.

    def windows(self, cells: CellInputs) -> CellWindows:
        """The cells cut into windows the model's length takes ([`CellInputs.windows`])."""
        return cells.windows(self.max_length)

    @staticmethod
    def model_inputs(cells: CellInputs, device: torch.device | str, timesteps: torch.Tensor | None = None) -> dict:
        """Keyword arguments of the model's forward for `cells` (padded windows), on `device`; no attention mask
        for a batch without padding (checked here, on the host: the model then need not look)."""
        padded = not bool(cells.attention_mask.all())
        return {
            "gene_ids": cells.gene_ids.clamp(min=0).to(device),
            "input_ids": cells.ranks.to(device),
            "attention_mask": cells.attention_mask.to(device) if padded else None,
            "timesteps": None if timesteps is None else timesteps.to(device),
            **{
                name: getattr(cells, name).to(device)
                for name in ("condition_ids", "doses")
                if getattr(cells, name) is not None
            },
        }

    def distributions(self, probs: torch.Tensor, cells: CellInputs) -> torch.Tensor:
        """Per-position model probabilities `(n_cells, length, B + 1)` -> the predictive distribution: one-hot at
        visible positions (their token is known), zero at padding and ignored genes."""
        visible = ~cells.mask & cells.attention_mask
        one_hot = F.one_hot(cells.ranks.clamp(max=self.num_rank_bins), self.num_rank_bins + 1).to(probs)
        probs = torch.where(visible[..., None], one_hot, probs)
        return probs * cells.attention_mask[..., None]

    logits = staticmethod(guided_logits)  # the denoiser's output under classifier-free guidance, for the pipelines

    @staticmethod
    def add_conditions(cells: CellInputs, conditions, config: RankDiTConfig) -> CellInputs:
        """`cells` told their perturbation conditions: `conditions` is one dict for every cell (`{"drug":
        "Bortezomib", "dose": 0.5}`), a list of one dict per cell, or None (unconditional); see
        [`ConditionEncoder.encode`] for the errors."""
        ids, doses = ConditionEncoder.from_config(config).encode(conditions, len(cells))
        return dataclasses.replace(cells, condition_ids=ids, doses=doses)

    @torch.no_grad()
    def predictive_distribution(
        self, model, cells: CellInputs, batch_size: int = 64, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        """p(x0 | visible tokens) over 0..B at every position of `cells` from one pass of `model` (at t = 1 when
        it is time-conditioned): float32 `(n_cells, length, B + 1)` on the CPU. A cell longer than the model's
        length is seen in windows; `batch_size` windows go through the model at a time. Cells with conditions are
        scored under classifier-free guidance of `guidance_scale` ([`guided_logits`])."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        windows = self.windows(cells)
        width, device = windows.inputs.gene_ids.shape[1], model.device
        probs = []
        for start in range(0, len(windows.inputs), batch_size):
            inputs = windows.inputs.rows(slice(start, start + batch_size))
            timesteps = torch.ones(len(inputs)) if model.config.time_conditioning else None
            logits = guided_logits(model, self.model_inputs(inputs, device, timesteps), guidance_scale)
            probs.append(F.pad(torch.softmax(logits.float(), dim=-1).cpu(), (0, 0, 0, width - logits.shape[1])))
        return self.distributions(windows.to_cells(torch.cat(probs)), cells)


RankDiTProcessor.register_for_auto_class("AutoFeatureExtractor")
