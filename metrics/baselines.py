"""Baselines scored on the same masks as the model.

Each has `predict(cells, counts=None)` -> `(n_cells, length, B + 1)` probabilities at every position, computed only
from what the model sees too (the genes of each sequence and the tokens at its visible positions: `cells` is a
[`CellBatch`] with `[MASK]` at the masked positions) and from the training cells it was fitted on. `counts`, the
raw counts at the visible positions (NaN where masked), is read only by the two methods whose users give them
counts: [`MagicImputation`], the library method, and [`NearestCellRates`].
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import numpy as np
import torch
from scipy import sparse

from modeling import CellBatch

from .imputation import token_levels


def masked_cells(cells: CellBatch):
    """`(row, masked, visible)` for each cell with masked positions: boolean arrays over its positions."""
    mask = cells.mask
    for row in range(cells.num_cells):
        real = cells["attention_mask"][row].bool().numpy()
        masked = real & mask[row].numpy()
        if masked.any():
            yield row, masked, real & ~masked


class PerGeneMarginal:
    """Each gene's marginal distribution over rank tokens 0..B, estimated on training cells.

    It predicts every masked position from its gene alone, ignoring the rest of the cell. Counts get a pseudocount
    of `pseudocount` spread evenly over the B + 1 classes, so unseen genes are uniform and no probability is zero.

    Args:
        num_rank_bins (`int`): B.
        gene_vocab_size (`int`): number of gene ids.
        pseudocount (`float`, *optional*, defaults to 1.0): total added count per gene.
    """

    def __init__(self, num_rank_bins: int, gene_vocab_size: int, pseudocount: float = 1.0):
        self.num_rank_bins = num_rank_bins
        self.pseudocount = pseudocount
        self.nonzero_counts = np.zeros((gene_vocab_size, num_rank_bins + 1), dtype=np.float64)
        self.num_cells = 0
        self._log_table: torch.Tensor | None = None

    def update(self, genes: np.ndarray, tokens: np.ndarray) -> None:
        """Add one cell: its expressed genes and their rank tokens (unlisted genes count as token 0)."""
        outside = (genes < 0) | (genes >= len(self.nonzero_counts))
        if outside.any():
            raise ValueError(
                f"gene ids must be in 0..{len(self.nonzero_counts) - 1}, got {genes[outside][:10].tolist()}"
            )
        expressed = tokens > 0
        np.add.at(self.nonzero_counts, (genes[expressed], tokens[expressed]), 1.0)
        self.num_cells += 1
        self._log_table = None

    def fit(self, cells: Iterable[tuple[np.ndarray, np.ndarray]]) -> PerGeneMarginal:
        """Add every (genes, tokens) cell of `cells` and return self."""
        for genes, tokens in cells:
            self.update(genes, tokens)
        return self

    @property
    def detection_counts(self) -> np.ndarray:
        """Number of fitted cells in which each gene is expressed."""
        return self.nonzero_counts.sum(axis=1)

    def probabilities(self) -> np.ndarray:
        """`(gene_vocab_size, B + 1)` table of smoothed per-gene token probabilities."""
        counts = self.nonzero_counts.copy()
        counts[:, 0] = self.num_cells - self.detection_counts
        counts += self.pseudocount / counts.shape[1]
        return counts / counts.sum(axis=1, keepdims=True)

    def log_probs(self, gene_ids: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of shape `gene_ids.shape + (B + 1,)`."""
        if self._log_table is None:
            self._log_table = torch.from_numpy(np.log(self.probabilities())).float()
        return self._log_table.to(gene_ids.device)[gene_ids]

    def predict(self, cells: CellBatch, counts: torch.Tensor | None = None) -> torch.Tensor:
        """Each position's gene marginal, whatever the rest of the cell says."""
        return self.log_probs(cells["gene_ids"]).exp()


def visible_token_sets(cells: CellBatch, num_classes: int) -> torch.Tensor:
    """`(n_cells, num_classes)`: True for each token seen at a visible position of the cell, and for 0."""
    visible = cells["attention_mask"].bool() & ~cells.mask
    seen = torch.zeros(cells.num_cells, num_classes + 1, dtype=torch.bool)
    seen.scatter_(1, torch.where(visible, cells["input_ids"], num_classes), True)
    seen[:, 0] = True
    return seen[:, :num_classes]


def _depth_scale(rates: torch.Tensor, visible: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """Per cell, the s >= 0 with sum over visible genes of 1 - exp(-rate * s) = observed expressed genes, by
    bisection on log s (a Poisson model of detection: a deeper cell detects every gene more often)."""
    low = torch.full((rates.shape[0],), -12.0, dtype=torch.float64)
    high = torch.full_like(low, 12.0)
    for _ in range(60):
        middle = (low + high) / 2
        detected = ((1 - torch.exp(-rates * middle.exp()[:, None])) * visible).sum(dim=1)
        below = detected < observed
        low, high = torch.where(below, middle, low), torch.where(below, high, middle)
    return ((low + high) / 2).exp()


class CellAwareMarginal:
    """The per-gene marginal told what the cell's visible genes show: which tokens the cell uses and how deep it is.

    Ties make the tokens of a cell few (count 1 is token 1, count 2 about token 18, ...), and they can be read off
    its visible genes. Given expression, a masked gene's token is drawn from its marginal over expressed tokens with
    every token the cell does not show at a visible gene down-weighted by `unseen_weight`. With `depth_adjusted`,
    its chance of expression follows the cell's depth: each gene's detection rate p is a Poisson rate
    -log(1 - p) scaled by a per-cell factor s fitted so that the expected number of expressed visible genes is the
    number seen.

    Args:
        per_gene (`PerGeneMarginal`): fitted on training cells.
        unseen_weight (`float`, defaults to 0.03): relative weight of tokens absent from the cell's visible genes.
        depth_adjusted (`bool`, defaults to `True`): scale the chance of expression to the cell's depth.
    """

    def __init__(self, per_gene: PerGeneMarginal, unseen_weight: float = 0.03, depth_adjusted: bool = True):
        if not 0.0 < unseen_weight <= 1.0:
            raise ValueError(f"unseen_weight must be in (0, 1], got {unseen_weight}")
        self.per_gene = per_gene
        self.unseen_weight = unseen_weight
        self.depth_adjusted = depth_adjusted
        self.table = torch.from_numpy(per_gene.probabilities())

    def predict(self, cells: CellBatch, counts: torch.Tensor | None = None) -> torch.Tensor:
        probs = self.table[cells["gene_ids"]]  # float64 (n_cells, length, B + 1)
        detection = (1 - probs[..., 0]).clamp(1e-4, 1 - 1e-4)
        if self.depth_adjusted:
            visible = cells["attention_mask"].bool() & ~cells.mask
            rates = -torch.log1p(-detection)
            observed = (visible & (cells["input_ids"] > 0)).sum(dim=1).double()
            scale = _depth_scale(rates, visible.double(), observed)
            detection = (1 - torch.exp(-rates * scale[:, None])).clamp(1e-4, 1 - 1e-4)
        seen = visible_token_sets(cells, probs.shape[-1])
        weights = torch.where(seen[:, None, 1:], 1.0, self.unseen_weight)
        expressed = probs[..., 1:] * weights
        expressed = expressed / expressed.sum(dim=-1, keepdim=True)
        return torch.cat([(1 - detection)[..., None], detection[..., None] * expressed], dim=-1).float()


class NearestCells:
    """k-nearest-neighbour imputation: the training cells closest to a cell on its visible genes vote.

    Cells are compared on the tie-aware level scale ([`token_levels`]: a gene's level is the rank of its count among
    the cell's distinct counts, so count 1 is level 1 in every cell whatever its token), by Euclidean distance over
    the cell's visible genes. At a masked gene, each of the `k` neighbours votes for its level there, read as the
    token the cell shows at that level (the highest one it shows when it shows fewer levels); the votes are smoothed
    towards `prior` (a [`CellAwareMarginal`]) with weight `prior_weight` (in cells).

    Args:
        cells (iterable of `(genes, tokens)`): the training cells (expressed genes and their tokens).
        prior (`CellAwareMarginal`): the smoothing distribution.
        k (`int`, defaults to 15): neighbours.
        prior_weight (`float`, defaults to 1.0): pseudo-cells of the prior.
    """

    def __init__(self, cells: Iterable[tuple[np.ndarray, np.ndarray]], prior: CellAwareMarginal, k: int = 15,
                 prior_weight: float = 1.0):  # fmt: skip
        num_bins = prior.table.shape[1] - 1
        rows, columns, values = [], [], []
        for i, (genes, tokens) in enumerate(cells):
            expressed = tokens > 0
            rows.append(np.full(int(expressed.sum()), i))
            columns.append(genes[expressed])
            values.append(token_levels(tokens, num_bins)[tokens[expressed]])
        if not rows:
            raise ValueError("NearestCells needs training cells")
        shape = (len(rows), prior.table.shape[0])
        self.levels = sparse.csc_matrix(
            (np.concatenate(values), (np.concatenate(rows), np.concatenate(columns))), shape=shape, dtype=np.float32
        )
        self.prior = prior
        self.k = min(k, len(rows))
        self.prior_weight = prior_weight

    def with_settings(self, k: int, prior_weight: float) -> NearestCells:
        """The same training cells (shared, not copied) with other settings."""
        other = copy.copy(self)
        other.k, other.prior_weight = min(k, self.levels.shape[0]), prior_weight
        return other

    def predict(self, cells: CellBatch, counts: torch.Tensor | None = None) -> torch.Tensor:
        out = self.prior.predict(cells)
        num_classes = out.shape[-1]
        for row, masked, visible in masked_cells(cells):
            genes, query = cells["gene_ids"][row].numpy(), cells["input_ids"][row].numpy()[visible]
            query_levels = token_levels(query, num_classes - 1)[query]
            shown = np.r_[0, np.unique(query[query > 0])]  # token of each level in this cell
            reference = self.levels[:, genes[visible]].toarray()
            distance = ((reference - query_levels) ** 2).sum(axis=1)
            neighbours = np.argpartition(distance, self.k - 1)[: self.k]
            votes = self.levels[:, genes[masked]][neighbours].toarray().astype(np.int64)  # (k, masked)
            tokens = shown[np.minimum(votes, len(shown) - 1)]
            counts_per_token = np.stack([(tokens == c).sum(axis=0) for c in range(num_classes)], axis=1)
            prior = out[row, torch.from_numpy(np.flatnonzero(masked))].double().numpy()
            probs = (counts_per_token + self.prior_weight * prior) / (self.k + self.prior_weight)
            out[row, torch.from_numpy(np.flatnonzero(masked))] = torch.from_numpy(probs).float()
        return out


class MagicImputation:
    """MAGIC (van Dijk et al., 2018, the `magic-impute` package) as a baseline, its imputed values read as tokens.

    MAGIC smooths counts over a graph of similar cells. It is fitted on the training cells' counts at the sequence's
    genes together with the cells being imputed, whose masked counts are zero (MAGIC's reading of a missing value:
    a dropout), after library-size normalisation and a square root (MAGIC's recommended preprocessing). The rule
    that turns its output into a distribution over the cell's own tokens: a masked gene takes the tokens of the
    cell's visible genes with a Gaussian kernel on the distance between imputed values (z-scored within the cell,
    bandwidth `bandwidth`), so it lands on the tokens the cell uses at similarly imputed genes; this is mixed with
    `prior` (a [`CellAwareMarginal`]) with weight `prior_weight`.

    Args:
        reference_counts (`scipy.sparse.csr_matrix`): `(n_cells, gene_vocab_size)` raw counts of training cells.
        prior (`CellAwareMarginal`): the distribution mixed in.
        knn (`int`, defaults to 5), t (`int`, defaults to 3): MAGIC's neighbours and diffusion time.
        bandwidth (`float`, defaults to 0.3): kernel width in within-cell standard deviations of imputed values.
        prior_weight (`float`, defaults to 0.2): weight of the prior in the mixture.
        seed (`int`, defaults to 0): MAGIC's random state.
    """

    def __init__(self, reference_counts: sparse.csr_matrix, prior: CellAwareMarginal, *, knn: int = 5, t: int = 3,
                 bandwidth: float = 0.3, prior_weight: float = 0.2, seed: int = 0):  # fmt: skip
        self.reference_counts = reference_counts.tocsc()
        self.prior = prior
        self.knn, self.t, self.bandwidth, self.prior_weight, self.seed = knn, t, bandwidth, prior_weight, seed
        self._imputed: dict[tuple, np.ndarray] = {}  # shared by `with_settings` copies

    def with_settings(self, *, knn: int, t: int, bandwidth: float, prior_weight: float) -> MagicImputation:
        """The same training cells and imputations (shared, not copied) with other settings."""
        other = copy.copy(self)
        other.knn, other.t, other.bandwidth, other.prior_weight = knn, t, bandwidth, prior_weight
        return other

    def impute(self, cells: CellBatch, counts: torch.Tensor) -> np.ndarray:
        """MAGIC's imputed values (`(n_cells, length)`, z-scored within each cell over its real positions)."""
        arrays = (cells["gene_ids"], cells.mask, counts.nan_to_num(-1))
        key = (self.knn, self.t, *(x.numpy().tobytes() for x in arrays))
        if key in self._imputed:  # the same cells are read with several bandwidths when settings are chosen
            return self._imputed[key]
        import magic

        real = cells["attention_mask"].bool()
        genes = np.unique(cells["gene_ids"][real].numpy())
        column = torch.from_numpy(np.searchsorted(genes, cells["gene_ids"].numpy()))
        visible = real & ~cells.mask
        query = torch.zeros(cells.num_cells, len(genes), dtype=torch.float64)
        query.scatter_add_(1, column * visible, torch.where(visible, counts.double().nan_to_num(0.0), 0.0))
        data = np.vstack([self.reference_counts[:, genes].toarray(), query.numpy()])
        library = data.sum(axis=1, keepdims=True)
        data = np.sqrt(data / np.maximum(library, 1e-12) * np.median(library[library > 0]))
        operator = magic.MAGIC(
            knn=self.knn, t=self.t, n_pca=min(100, len(genes) - 1), random_state=self.seed, verbose=0
        )
        with warnings.catch_warnings():  # magic's logger is deprecated; identical cells are legal here
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message="Detected zero distance", category=RuntimeWarning)
            imputed = torch.from_numpy(operator.fit_transform(data)[-cells.num_cells :])
        values = imputed.gather(1, column).masked_fill(~real, 0.0)
        n = real.sum(dim=1, keepdim=True)
        mean = values.sum(dim=1, keepdim=True) / n
        std = (((values - mean) ** 2 * real).sum(dim=1, keepdim=True) / n).sqrt().clamp(min=1e-8)
        self._imputed[key] = ((values - mean) / std).numpy()
        return self._imputed[key]

    def predict(self, cells: CellBatch, counts: torch.Tensor | None = None) -> torch.Tensor:
        if counts is None:
            raise ValueError("MagicImputation needs the visible counts")
        values = self.impute(cells, counts)
        out = self.prior.predict(cells)
        num_classes = out.shape[-1]
        for row, masked, visible in masked_cells(cells):
            if not visible.any():
                continue
            distance = values[row, masked][:, None] - values[row, visible][None, :]
            weights = np.exp(-0.5 * (distance / self.bandwidth) ** 2) + 1e-300
            one_hot = np.eye(num_classes)[cells["input_ids"][row].numpy()[visible]]
            kernel = weights @ one_hot / weights.sum(axis=1, keepdims=True)
            at = torch.from_numpy(np.flatnonzero(masked))
            mixed = (1 - self.prior_weight) * kernel + self.prior_weight * out[row, at].double().numpy()
            out[row, at] = torch.from_numpy(mixed).float()
        return out


def count_token_table(counts: np.ndarray, tokens: np.ndarray, num_rank_bins: int, size: int) -> np.ndarray:
    """`(size,)` the token of each count 0..size-1 in one cell, from the (count, token) pairs of its visible genes
    and count 1's token 1 (the smallest count a cell can hold is its bin 1): a count it shows takes the token it
    shows, a count between two the interpolated token, a count above them all the top token B; 0 is token 0. Rank
    tokens rise with the count, so the table does too."""
    expressed = counts > 0
    pairs = np.unique(np.stack([np.r_[1, counts[expressed]], np.r_[1, tokens[expressed]]], axis=1), axis=0)
    table = np.interp(np.arange(size), pairs[:, 0], pairs[:, 1], left=0, right=num_rank_bins)
    return np.rint(table).astype(np.int64)


def poisson_mixture(rates: np.ndarray) -> np.ndarray:
    """`(n, size)`: at counts 0..size-1, the mean over the rows of `rates` `(m, n)` of Poisson probabilities, by the
    recurrence log p(c) = log p(c - 1) + log(rate) - log(c) (a rate of 0 puts everything on count 0). Each column
    runs to its largest rate + 10 standard deviations + 20 (zeros beyond: the tail there is below 1e-9), so a few
    high rates do not lengthen the others; `size` is the longest."""
    order = np.argsort(-rates.max(axis=0, initial=0.0))
    rates = rates[:, order]
    peak = rates.max(axis=0, initial=0.0)
    sizes = (peak + 10 * np.sqrt(peak) + 20).astype(np.int64)
    log_rate = np.log(np.maximum(rates, 1e-300))
    log_p = -rates
    out = np.zeros((rates.shape[1], int(sizes.max(initial=1))))
    out[:, 0] = np.exp(log_p).mean(axis=0)
    active = rates.shape[1]  # columns still running: a prefix, as they are sorted by size
    for count in range(1, out.shape[1]):
        while sizes[active - 1] <= count:
            active -= 1
        log_p[:, :active] += log_rate[:, :active] - np.log(count)
        out[:active, count] = np.exp(log_p[:, :active]).mean(axis=0)
    return out[np.argsort(order)]


class NearestCellRates:
    """The nearest training cells' counts as Poisson rates, read as tokens on the cell's own scale.

    A cell's `k` nearest training cells are found on its visible genes (Euclidean distance between square roots of
    library-normalised counts there, each cell normalised by its counts at those genes). At a masked gene, each
    neighbour gives a rate: its count there times the ratio of the cell's visible counts to its own at the same
    genes (the cell's depth), shrunk by `shrinkage` towards the neighbours' mean rate. The cell's count is the
    mixture of Poissons at these rates (counting noise around each neighbour's level), each count read as the token
    the cell gives it ([`count_token_table`]); the result is mixed with `prior` (a [`CellAwareMarginal`]) with
    weight `prior_weight`. Training cells with no count at the cell's visible genes are not neighbours (they have
    no depth there); a cell with no expressed visible gene, or no such training cell, gets the prior alone.

    Args:
        reference_counts (`scipy.sparse.csr_matrix`): `(n_cells, gene_vocab_size)` raw counts of training cells.
        prior (`CellAwareMarginal`): the distribution mixed in.
        k (`int`, defaults to 32): neighbours.
        shrinkage (`float`, defaults to 0.3): share of each neighbour's rate taken from the neighbours' mean.
        prior_weight (`float`, defaults to 0.05): weight of the prior in the mixture.
    """

    def __init__(self, reference_counts: sparse.csr_matrix, prior: CellAwareMarginal, *, k: int = 32,
                 shrinkage: float = 0.3, prior_weight: float = 0.05):  # fmt: skip
        self.reference_counts = reference_counts.tocsc().astype(np.float64)
        self.prior = prior
        self._set(k, shrinkage, prior_weight)

    def _set(self, k: int, shrinkage: float, prior_weight: float) -> None:
        if not (k >= 1 and 0.0 <= shrinkage <= 1.0 and 0.0 <= prior_weight <= 1.0):
            raise ValueError(f"want k >= 1, shrinkage and prior_weight in [0, 1]: {k}, {shrinkage}, {prior_weight}")
        self.k, self.shrinkage, self.prior_weight = k, shrinkage, prior_weight

    def with_settings(self, *, k: int, shrinkage: float, prior_weight: float) -> NearestCellRates:
        """The same training cells (shared, not copied) with other settings."""
        other = copy.copy(self)
        other._set(k, shrinkage, prior_weight)
        return other

    def rates(self, genes: np.ndarray, visible: np.ndarray, visible_counts: np.ndarray) -> np.ndarray | None:
        """`(k, n_masked)` the neighbours' rates at a cell's masked genes (`genes` where not `visible`), on the
        cell's depth and shrunk; None when no training cell has a count at its visible genes."""
        reference = self.reference_counts[:, genes].toarray()
        depth, cell_depth = reference[:, visible].sum(axis=1), visible_counts.sum()
        seen = np.flatnonzero(depth > 0)
        if not len(seen):
            return None
        features = np.sqrt(reference[seen][:, visible] / depth[seen, None])
        distance = ((features - np.sqrt(visible_counts / cell_depth)) ** 2).sum(axis=1)
        k = min(self.k, len(seen))
        neighbours = seen[np.argpartition(distance, k - 1)[:k]]
        scale = cell_depth / depth[neighbours]
        rates = reference[neighbours][:, ~visible] * scale[:, None]
        return (1 - self.shrinkage) * rates + self.shrinkage * rates.mean(axis=0, keepdims=True)

    def predict(self, cells: CellBatch, counts: torch.Tensor | None = None) -> torch.Tensor:
        if counts is None:
            raise ValueError("NearestCellRates needs the visible counts")
        out = self.prior.predict(cells)
        num_classes = out.shape[-1]
        for row, masked, visible in masked_cells(cells):
            genes, tokens = cells["gene_ids"][row].numpy(), cells["input_ids"][row].numpy()
            shown = counts[row].double().numpy()[visible]
            if not (shown > 0).any():
                continue
            real = masked | visible
            rates = self.rates(genes[real], visible[real], shown)
            if rates is None:
                continue
            mixture = poisson_mixture(rates)
            table = count_token_table(shown, tokens[visible], num_classes - 1, mixture.shape[1])
            starts = np.flatnonzero(np.r_[True, table[1:] != table[:-1]])  # the table rises: a run of counts per token
            probs = np.zeros((len(mixture), num_classes))
            probs[:, table[starts]] = np.add.reduceat(mixture, starts, axis=1)
            probs[:, -1] += np.clip(1 - mixture.sum(axis=1), 0.0, None)
            at = torch.from_numpy(np.flatnonzero(masked))
            mixed = (1 - self.prior_weight) * probs + self.prior_weight * out[row, at].double().numpy()
            out[row, at] = torch.from_numpy(mixed).float()
        return out
