"""The data side of a run: the train / validation / test split, what is fitted on training cells alone (the per-gene
marginal, the pool of genes seen, the evaluation panels) and cells as panel sequences."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anndata
import datasets
import numpy as np
import torch
from scipy import sparse
from tqdm.auto import tqdm

from dataset_scripts import cell_counts, load_expression_data, split_by_cell_id
from dataset_scripts.expression_data import ExpressionSource
from dataset_scripts.schema import CELL_ID_COLUMN
from metrics import CellAwareMarginal, MagicImputation, NearestCells, PerGeneMarginal
from metrics.imputation import PanelCells, choose_on_validation, token_levels
from modeling import CellTokenizer, rank_tokens

from .arguments import DataArguments

logger = logging.getLogger(__name__)

TRAINING_PANEL = "training panel"
HVG_PANEL = "highly variable genes"
RANDOM_PANEL = "random detected genes"
PANELS = (TRAINING_PANEL, HVG_PANEL, RANDOM_PANEL)


@dataclass
class ReferenceCells:
    """Training cells held in memory for the baselines and the panels: `counts` and rank `tokens`, both
    `(n_cells, gene_vocab_size)` CSR matrices with an entry per expressed gene."""

    counts: sparse.csr_matrix
    tokens: sparse.csr_matrix

    def __len__(self) -> int:
        return self.counts.shape[0]

    def cells(self):
        """(gene ids, rank tokens) of each cell's expressed genes."""
        for i in range(len(self)):
            start, stop = self.tokens.indptr[i], self.tokens.indptr[i + 1]
            yield self.tokens.indices[start:stop].astype(np.int64), self.tokens.data[start:stop].astype(np.int64)

    def gene_loadings(self, n_components: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Each seen gene's coordinates on the top principal axes of the cells' library-size-normalised log counts
        (randomised SVD of the uncentred sparse matrix): `(genes, (len(genes), n_components))`, each axis scaled to
        unit variance over the genes, so every axis counts alike. Genes that vary together get similar rows."""
        from sklearn.utils.extmath import randomized_svd

        genes = np.flatnonzero(np.bincount(self.counts.indices, minlength=self.counts.shape[1]))
        matrix = self.counts[:, genes].astype(np.float64)
        library = np.asarray(matrix.sum(axis=1)).ravel()
        matrix = sparse.diags(1e4 / np.maximum(library, 1e-12)) @ matrix
        matrix.data = np.log1p(matrix.data)
        n_components = min(n_components, min(matrix.shape) - 1)
        _, _, axes = randomized_svd(matrix, n_components, random_state=seed)
        return genes, axes.T / axes.T.std(axis=0, keepdims=True).clip(min=1e-12)

    @property
    def detection_rate(self) -> np.ndarray:
        """Share of the cells that express each gene."""
        return np.bincount(self.counts.indices, minlength=self.counts.shape[1]) / max(len(self), 1)


def sample_rows(rows, max_cells: int | None, seed: int = 0):
    """Up to `max_cells` rows drawn across the whole data, not its first rows (files are ordered by plate): a seeded
    uniform draw, kept in file order, from a dataset; from a stream, the first cells after its file order and a
    buffer of 10,000 cells are shuffled (so many files, not all, are read)."""
    if max_cells is None:
        return rows
    if isinstance(rows, datasets.Dataset):
        if max_cells >= len(rows):
            return rows
        return rows.select(np.sort(np.random.default_rng(seed).choice(len(rows), max_cells, replace=False)))
    return rows.shuffle(seed=seed, buffer_size=10_000).take(max_cells)


def read_reference_cells(rows, num_bins: int, gene_vocab_size: int, max_cells: int | None = None) -> ReferenceCells:
    """Read up to `max_cells` rows, drawn across the data ([`sample_rows`]), with a progress bar, into a
    [`ReferenceCells`]; tokens by the training rule."""
    rows = sample_rows(rows, max_cells)
    total = len(rows) if isinstance(rows, datasets.Dataset) else max_cells
    indptr, genes, counts, tokens = [0], [], [], []
    for row in tqdm(rows, desc="reading training cells", unit="cell", total=total):
        cell_genes, cell_values = cell_counts(row)
        cell_tokens = rank_tokens(cell_values, num_bins, where=f"cell {row[CELL_ID_COLUMN]!r}", genes=cell_genes)
        expressed = cell_tokens > 0
        genes.append(cell_genes[expressed])
        counts.append(cell_values[expressed])
        tokens.append(cell_tokens[expressed])
        indptr.append(indptr[-1] + int(expressed.sum()))
    if len(indptr) == 1:
        raise ValueError("no training cells to fit the baselines on")
    shape = (len(indptr) - 1, gene_vocab_size)
    indices = np.concatenate(genes).astype(np.int32)
    return ReferenceCells(
        sparse.csr_matrix((np.concatenate(counts).astype(np.float32), indices, indptr), shape=shape),
        sparse.csr_matrix((np.concatenate(tokens).astype(np.int16), indices, indptr), shape=shape),
    )


def highly_variable_genes(reference: ReferenceCells, size: int, min_cells: int = 3) -> np.ndarray:
    """The `size` most variable genes of the training cells by scanpy's `seurat` rule (dispersion of
    library-size-normalised log counts, normalised within bins of mean expression), among genes seen in at least
    `min_cells` cells."""
    import scanpy as sc

    seen = np.flatnonzero(np.bincount(reference.counts.indices, minlength=reference.counts.shape[1]) >= min_cells)
    adata = anndata.AnnData(reference.counts[:, seen].astype(np.float32))
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=min(size, len(seen)), flavor="seurat")
    return np.sort(seen[adata.var["highly_variable"].to_numpy()])


def choose_panels(
    reference: ReferenceCells, size: int, *, min_detection: float = 0.05, seed: int = 0
) -> dict[str, np.ndarray]:
    """The three evaluation panels, chosen on training cells only (sorted gene ids, up to `size` genes each):

    - `"training panel"`: the most often detected genes (the panel the `"panel"` training rule uses);
    - `"highly variable genes"`: scanpy's highly variable genes ([`highly_variable_genes`]);
    - `"random detected genes"`: a seeded random draw among genes detected in at least `min_detection` of cells.
    """
    detection = reference.detection_rate
    seen = np.flatnonzero(detection > 0)
    training = np.argsort(-detection, kind="stable")[: min(size, len(seen))]
    detected = np.flatnonzero(detection >= min_detection)
    random = np.random.default_rng(seed).choice(detected, size=min(size, len(detected)), replace=False)
    return {
        TRAINING_PANEL: np.sort(training),
        HVG_PANEL: highly_variable_genes(reference, size),
        RANDOM_PANEL: np.sort(random),
    }


@dataclass
class PreparedData:
    """The data of a run: the source, its splits, the training cells read for the baselines, the per-gene marginal,
    the pool of genes seen in training and the evaluation panels, all fitted on the training split alone."""

    source: ExpressionSource
    splits: dict[str, datasets.Dataset | datasets.IterableDataset]
    reference: ReferenceCells
    baseline: PerGeneMarginal
    gene_pool: np.ndarray
    panels: dict[str, np.ndarray]

    @property
    def train_rows(self):
        return self.splits["train"]

    @property
    def validation_rows(self):
        return self.splits["validation"]

    @property
    def test_rows(self):
        return self.splits["test"]

    @property
    def panel(self) -> np.ndarray:
        """The training panel (the `"panel"` training rule and the trainer's evaluation)."""
        return self.panels[TRAINING_PANEL]

    def panel_cells(self, rows, genes: np.ndarray, num_bins: int) -> PanelCells:
        """`rows` (cells) on the panel `genes`, with tokens from each whole cell by the training rule."""
        tokenizer = CellTokenizer(num_bins=num_bins, max_length=len(genes), panel=genes)
        gene_ids, tokens, counts, levels = [], [], [], []
        for row in rows:
            cell_genes, cell_values = cell_counts(row)
            where, cell_id = f"cell {row[CELL_ID_COLUMN]!r}", row[CELL_ID_COLUMN]
            cell_tokens = rank_tokens(cell_values, num_bins, where=where, genes=cell_genes)
            panel_genes, panel_tokens = tokenizer.select(cell_genes, cell_tokens, cell_id=cell_id, rule="panel")
            counts.append(tokenizer.select(cell_genes, cell_values, cell_id=cell_id, rule="panel")[1])
            gene_ids.append(panel_genes)
            tokens.append(panel_tokens)
            levels.append(token_levels(cell_tokens, num_bins))
        if not gene_ids:
            raise ValueError("no cells to score on the panel")
        return PanelCells(
            torch.from_numpy(np.stack(gene_ids)),
            torch.from_numpy(np.stack(tokens)),
            torch.ones(len(gene_ids), len(genes), dtype=torch.bool),
            torch.from_numpy(np.stack(counts)).float(),
            np.stack(levels),
        )

    def imputation_baselines(self, validation: PanelCells, mask_token_id: int) -> tuple[dict, dict]:
        """The baselines the model is compared with, fitted on the training cells, each family's settings chosen
        by masked NLL on `validation` (validation cells on the training panel, half of each cell masked).

        Returns:
            `(baselines, choices)`: name -> baseline, and per family the chosen setting and every candidate's NLL.
        """
        choices = {}

        def choose(family: str, candidates: dict):
            best, nll = choose_on_validation(candidates, validation, mask_token_id)
            choices[family] = {"chosen": best, "validation_masked_nll_0.5": nll}
            return candidates[best]

        cell_aware = choose(
            "cell-aware marginal",
            {
                f"unseen_weight={w}, depth_adjusted={d}": CellAwareMarginal(self.baseline, w, d)
                for w in (0.003, 0.01, 0.03, 0.1, 0.3)
                for d in (False, True)
            },
        )
        nearest = NearestCells(self.reference.cells(), cell_aware)
        nearest = choose(
            "nearest cells",
            {f"k={k}, prior_weight={w}": nearest.with_settings(k, w) for k in (5, 15, 50) for w in (1, 5)},
        )
        magic = MagicImputation(self.reference.counts, cell_aware)
        magic = choose(
            "MAGIC",
            {
                f"knn={knn}, t={t}, bandwidth={h}, prior_weight={w}": magic.with_settings(
                    knn=knn, t=t, bandwidth=h, prior_weight=w
                )
                for knn in (5, 15)
                for t in (1, 3)
                for h in (0.1, 0.3, 1.0)
                for w in (0.1, 0.3)
            },
        )
        baselines = {
            "per-gene marginal": self.baseline,
            "cell-aware marginal": cell_aware,
            f"nearest cells (k={nearest.k})": nearest,
            f"MAGIC (knn={magic.knn}, t={magic.t})": magic,
        }
        return baselines, choices


def prepare_data(data_args: DataArguments, num_bins: int) -> PreparedData:
    """Open the data, split the cells by a hash of their id, read the training cells the baselines are fitted on,
    and choose the gene pool and the evaluation panels from them."""
    source = load_expression_data(
        data_args.data,
        config_name=data_args.data_config,
        gene_vocab=data_args.gene_vocab,
        layer=data_args.layer,
        gene_column=data_args.gene_column,
        obs_columns=tuple(data_args.obs_columns),
    )
    splits = split_by_cell_id(source.rows, data_args.validation_share, data_args.test_share, seed=data_args.split_seed)
    for name in ("validation", "test"):  # a sample across the data, not its first cells (one plate)
        splits[name] = sample_rows(splits[name], data_args.max_eval_cells, seed=data_args.split_seed)
    logger.info("data: %s, %d genes in the vocabulary", source.name, len(source.vocab))
    reference = read_reference_cells(splits["train"], num_bins, source.vocab.size, data_args.baseline_cells)
    baseline = PerGeneMarginal(num_bins, source.vocab.size).fit(reference.cells())
    gene_pool = np.flatnonzero(baseline.detection_counts > 0)
    panels = choose_panels(reference, data_args.panel_size or data_args.max_length, seed=data_args.split_seed)
    logger.info(
        "per-gene marginal fitted on %d training cells; %d genes seen; panels of %s genes",
        baseline.num_cells,
        len(gene_pool),
        ", ".join(f"{len(genes)} ({name})" for name, genes in panels.items()),
    )
    return PreparedData(source, splits, reference, baseline, gene_pool, panels)
