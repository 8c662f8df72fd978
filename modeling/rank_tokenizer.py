"""Per-cell rank tokens: counts -> quantile bins, and the (gene id, rank token) sequence of one cell."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

SELECTION_RULES = ("expressed", "panel")


def quantile_edges(
    sorted_counts: np.ndarray, num_bins: int, starts: np.ndarray | None = None, sizes: np.ndarray | None = None
) -> np.ndarray:
    """The quantiles `linspace(0, 1, num_bins)` of sorted integer counts, with linear interpolation, exactly.

    This is `np.quantile(counts, np.linspace(0, 1, num_bins))` computed from integer positions, so an edge that
    falls on a data point (or between two equal ones) is that count exactly instead of a float a hair below it,
    which would move every tied count one bin up. With `starts` and `sizes`, `sorted_counts` holds many cells
    back to back (each sorted) and the result is their `(n_cells, num_bins)` edges.
    """
    if starts is None:
        return quantile_edges(sorted_counts, num_bins, np.zeros(1, dtype=np.int64), np.array([len(sorted_counts)]))[0]
    divisor = max(num_bins - 1, 1)
    steps = np.arange(num_bins, dtype=np.int64)[None, :] * (sizes[:, None] - 1)
    low, remainder = np.divmod(steps, divisor)
    high = np.minimum(low + 1, sizes[:, None] - 1)
    low_values = sorted_counts[starts[:, None] + low]
    gap = sorted_counts[starts[:, None] + high] - low_values
    return low_values + (gap * remainder) / divisor


def rank_tokens(
    counts: np.ndarray, num_bins: int = 50, *, where: str = "cell", genes: np.ndarray | None = None
) -> np.ndarray:
    """Rank tokens of one cell's counts with the MosaicFM / Tahoe-x1 rule.

    The bin edges are the quantiles `linspace(0, 1, num_bins)` of the cell's non-zero counts (linear
    interpolation, see [`quantile_edges`]); an expressed gene gets `bucketize(count, edges, right=False) + 1`, so
    tied counts share a bin and the smallest count is bin 1. Unexpressed genes get 0.

    Args:
        counts (`np.ndarray`): raw counts of every gene of the cell (1-D, non-negative integers).
        num_bins (`int`): B, the number of bins for expressed genes.
        where (`str`): how to name the cell in error messages.
        genes (`np.ndarray`, *optional*): the gene id of each count, to name a bad count's gene.

    Returns:
        `np.ndarray` of int64 tokens in 0..B, one per count.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1:
        raise ValueError(f"{where}: counts must be 1-D, got shape {counts.shape}")
    bad = ~np.isfinite(counts) | (counts < 0) | (counts != np.round(counts))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        gene = f" (gene {int(genes[i])})" if genes is not None else ""
        raise ValueError(
            f"{where}: counts must be non-negative integers (raw UMI counts), got {float(counts[i])} at position "
            f"{i}{gene}; {int(bad.sum())} bad values in all"
        )
    expressed = counts > 0
    if not expressed.any():
        raise ValueError(f"{where}: the cell has no expressed genes")
    nonzero = counts[expressed]
    edges = quantile_edges(np.sort(nonzero), num_bins)
    tokens = np.zeros(len(counts), dtype=np.int64)
    tokens[expressed] = np.searchsorted(edges, nonzero, side="left") + 1
    return tokens


def cell_rng(seed: int, epoch: int, cell_id: str) -> np.random.Generator:
    """A generator fixed by (seed, epoch, cell id), so workers, ranks and resumes draw the same genes."""
    digest = int.from_bytes(hashlib.blake2b(cell_id.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, epoch, digest])


@dataclass
class CellTokenizer:
    """Turns one cell (expressed gene ids and raw counts) into a sequence of (gene id, rank token) pairs.

    Rank tokens are computed over *all* expressed genes before any subsampling. Which genes enter the sequence
    follows a selection rule:

    - `"expressed"`: up to `max_length - round(zero_share * max_length)` expressed genes drawn uniformly (all of
      them if they fit), then randomly drawn unexpressed genes of `gene_pool` (token 0) to fill the zero share, so
      the model learns zeros. Being in such a sequence says a gene is probably expressed.
    - `"panel"`: up to `max_length` genes of `panel` drawn without looking at the counts (the whole panel when it
      fits), each with its token (0 if not expressed). Being in the sequence says nothing about expression.

    With `rule=None` each cell uses `"panel"` with probability `panel_share`, else `"expressed"`. All draws are
    fixed by (seed, epoch, cell id).

    Args:
        num_bins (`int`): B of [`rank_tokens`].
        max_length (`int`): L, the most pairs in a sequence.
        zero_share (`float`): share of the `"expressed"` sequence given to unexpressed genes.
        panel_share (`float`): probability of the `"panel"` rule when the rule is not given.
        seed (`int`): base seed of the draws.
        gene_pool (`np.ndarray`, *optional*): the genes to draw unexpressed genes from (for example the genes seen
            in the training split); needed when `zero_share > 0`.
        panel (`np.ndarray`, *optional*): the gene panel of the `"panel"` rule; needed when that rule is used.
    """

    num_bins: int = 50
    max_length: int = 1024
    zero_share: float = 0.0
    panel_share: float = 0.0
    seed: int = 0
    gene_pool: np.ndarray | None = None
    panel: np.ndarray | None = None

    def __post_init__(self):
        if not 0.0 <= self.zero_share < 1.0:
            raise ValueError(f"zero_share must be in [0, 1), got {self.zero_share}")
        if not 0.0 <= self.panel_share <= 1.0:
            raise ValueError(f"panel_share must be in [0, 1], got {self.panel_share}")
        for name in ("gene_pool", "panel"):
            if getattr(self, name) is not None:
                setattr(self, name, np.unique(np.asarray(getattr(self, name), dtype=np.int64)))
        if self.zero_share > 0 and self.gene_pool is None:
            raise ValueError("zero_share > 0 needs a gene_pool to draw unexpressed genes from")
        if self.panel_share > 0 and self.panel is None:
            raise ValueError("panel_share > 0 needs a panel")

    def __call__(
        self,
        genes: np.ndarray,
        counts: np.ndarray,
        *,
        cell_id: str,
        epoch: int = 0,
        rule: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize one cell.

        Args:
            genes (`np.ndarray`): gene token ids of the cell's listed genes (unique).
            counts (`np.ndarray`): their raw counts (zeros allowed).
            cell_id (`str`): a stable id of the cell (Tahoe-100M: `BARCODE_SUB_LIB_ID`), seeds the draws.
            epoch (`int`): the training epoch, so each epoch draws another subsample.
            rule (`str`, *optional*): `"expressed"` or `"panel"`; drawn with `panel_share` when None.

        Returns:
            `(gene_ids, input_ids)`: two int64 arrays of the same length, at most `max_length`.
        """
        where = f"cell {cell_id!r}"
        genes = np.asarray(genes, dtype=np.int64)
        if genes.ndim != 1 or genes.shape != np.shape(counts):
            raise ValueError(f"{where}: genes and counts differ in shape: {genes.shape} vs {np.shape(counts)}")
        unique, seen = np.unique(genes, return_counts=True)
        if (seen > 1).any():
            raise ValueError(f"{where}: gene ids are repeated: {unique[seen > 1][:10].tolist()}")
        tokens = rank_tokens(counts, self.num_bins, where=where, genes=genes)
        return self.select(genes, tokens, cell_id=cell_id, epoch=epoch, rule=rule)

    def select(
        self, genes: np.ndarray, tokens: np.ndarray, *, cell_id: str, epoch: int = 0, rule: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The sequence of a cell whose rank tokens are known: the selection-rule half of `__call__`.

        Args:
            genes (`np.ndarray`): the cell's listed gene ids.
            tokens (`np.ndarray`): their rank tokens from the whole cell (0 for listed zero counts).
            cell_id, epoch, rule: as in `__call__`.
        """
        rng = cell_rng(self.seed, epoch, cell_id)
        if rule is None:
            rule = "panel" if self.panel_share > 0 and rng.random() < self.panel_share else "expressed"
        if rule == "panel":
            return self._panel(genes, tokens, rng)
        if rule == "expressed":
            return self._expressed(genes, tokens, rng)
        raise ValueError(f"rule must be one of {SELECTION_RULES}, got {rule!r}")

    def _expressed(self, genes, tokens, rng):
        expressed = np.flatnonzero(tokens)
        n_zero = round(self.zero_share * self.max_length)
        n_expressed = min(len(expressed), self.max_length - n_zero)
        if n_expressed < len(expressed):
            expressed = np.sort(rng.choice(expressed, n_expressed, replace=False))
        gene_ids, input_ids = genes[expressed], tokens[expressed]
        if n_zero:
            unexpressed = np.setdiff1d(self.gene_pool, genes[tokens > 0], assume_unique=True)
            zeros = rng.choice(unexpressed, min(n_zero, len(unexpressed)), replace=False)
            gene_ids = np.concatenate([gene_ids, zeros])
            input_ids = np.concatenate([input_ids, np.zeros(len(zeros), dtype=np.int64)])
        return gene_ids, input_ids

    def _panel(self, genes, tokens, rng):
        if self.panel is None:
            raise ValueError("the panel rule needs CellTokenizer(panel=...)")
        panel = self.panel
        if len(panel) > self.max_length:
            panel = np.sort(rng.choice(panel, self.max_length, replace=False))
        order = np.argsort(genes)
        position = np.searchsorted(genes[order], panel).clip(max=len(genes) - 1)
        listed = genes[order][position] == panel
        input_ids = np.where(listed, tokens[order][position], 0)
        return panel.copy(), input_ids
