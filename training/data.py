"""The data side of a run: the train / validation / test split, what is fitted on training cells alone (the per-gene
marginal, the pool of genes seen, the evaluation panels) and cells as panel sequences."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import anndata
import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets.table import InMemoryTable
from scipy import sparse

from dataset_scripts import (
    EMBEDDED_SAMPLE,
    load_expression_data,
    read_gene_vocab,
    split_by_cell_id,
    tahoe_builder,
)
from dataset_scripts.expression_data import ExpressionSource
from dataset_scripts.schema import CELL_ID_COLUMN
from dataset_scripts.tokenization import tokenize_arrow_batch
from metrics import CellAwareMarginal, MagicImputation, NearestCellRates, NearestCells, PerGeneMarginal
from metrics.imputation import PanelCells, choose_on_validation, token_levels
from modeling import RankDiTProcessor

from .arguments import DataArguments
from .recipe import ConditionSetup, DataRecipe, anndata_condition_setup, condition_setup

logger = logging.getLogger(__name__)

TRAINING_PANEL = "training panel"
HVG_PANEL = "highly variable genes"
RANDOM_PANEL = "random detected genes"
PANELS = (TRAINING_PANEL, HVG_PANEL, RANDOM_PANEL)


@dataclass
class TrainingCells:
    """Training cells held in memory for the baselines, the panels and the reference cells: `counts` and rank
    `tokens`, both `(n_cells, gene_vocab_size)` CSR matrices with an entry per expressed gene, and their `cell_ids`."""

    counts: sparse.csr_matrix
    tokens: sparse.csr_matrix
    cell_ids: list[str]

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
    """Up to `max_cells` rows drawn across the whole data, not its first rows: a seeded uniform draw, kept in file
    order, from a dataset; from a stream (an `.h5ad` file), the first cells after a shuffle buffer of 10,000."""
    if max_cells is None:
        return rows
    if isinstance(rows, datasets.Dataset):
        if max_cells >= len(rows):
            return rows
        return rows.select(np.sort(np.random.default_rng(seed).choice(len(rows), max_cells, replace=False)))
    return rows.shuffle(seed=seed, buffer_size=10_000).take(max_cells)


def training_cells(table: pa.Table, num_bins: int, gene_vocab_size: int) -> TrainingCells:
    """Raw Tahoe-schema rows -> a [`TrainingCells`], tokens by the batch tokenizer of the stream."""
    batch = tokenize_arrow_batch(table, num_bins)
    if len(batch.offsets) == 1:
        raise ValueError("no training cells to fit the baselines on")
    shape = (len(batch.offsets) - 1, gene_vocab_size)
    indices, indptr = batch.gene_ids.astype(np.int32), batch.offsets
    return TrainingCells(
        sparse.csr_matrix((batch.counts.astype(np.float32), indices, indptr), shape=shape),
        sparse.csr_matrix((batch.ranks.astype(np.int16), indices, indptr), shape=shape),
        [cell for cell, kept in zip(table.column(CELL_ID_COLUMN).to_pylist(), batch.kept) if kept],
    )


def highly_variable_genes(cells: TrainingCells, size: int, min_cells: int = 3) -> np.ndarray:
    """The `size` most variable genes of the training cells by scanpy's `seurat` rule (dispersion of
    library-size-normalised log counts, normalised within bins of mean expression), among genes seen in at least
    `min_cells` cells."""
    import scanpy as sc

    seen = np.flatnonzero(np.bincount(cells.counts.indices, minlength=cells.counts.shape[1]) >= min_cells)
    adata = anndata.AnnData(cells.counts[:, seen].astype(np.float32))
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=min(size, len(seen)), flavor="seurat")
    return np.sort(seen[adata.var["highly_variable"].to_numpy()])


def most_detected_genes(detection: np.ndarray, size: int) -> np.ndarray:
    """The training panel's rule: the `size` genes detected most often (ties by gene id), sorted; `detection` is
    per gene id (a count or a rate)."""
    seen = np.flatnonzero(detection > 0)
    return np.sort(np.argsort(-detection, kind="stable")[: min(size, len(seen))])


def choose_panels(
    cells: TrainingCells, size: int, *, min_detection: float = 0.05, seed: int = 0
) -> dict[str, np.ndarray]:
    """The three evaluation panels, chosen on training cells only (sorted gene ids, up to `size` genes each):

    - `"training panel"`: the most often detected genes (the panel the `"panel"` training rule uses);
    - `"highly variable genes"`: scanpy's highly variable genes ([`highly_variable_genes`]);
    - `"random detected genes"`: a seeded random draw among genes detected in at least `min_detection` of cells.
    """
    detection = cells.detection_rate
    detected = np.flatnonzero(detection >= min_detection)
    random = np.random.default_rng(seed).choice(detected, size=min(size, len(detected)), replace=False)
    return {
        TRAINING_PANEL: most_detected_genes(detection, size),
        HVG_PANEL: highly_variable_genes(cells, size),
        RANDOM_PANEL: np.sort(random),
    }


def panel_cells(rows, genes: np.ndarray, processor: RankDiTProcessor) -> PanelCells:
    """Raw Tahoe-schema `rows` (a list of dicts, a dataset or a pyarrow table) on the panel `genes` (sorted) as
    [`PanelCells`]: the processor's batch of their counts at the panel, each with its other counts as context, so
    the tokens are those of the whole cell, as in the training stream."""
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows))
    if not table.num_rows:
        raise ValueError("no cells to score on the panel")
    batch = tokenize_arrow_batch(table, processor.num_rank_bins)
    on_panel = batch.on_genes(genes)
    levels = [token_levels(batch.cell(i)[1], processor.num_rank_bins) for i in range(batch.num_cells)]
    counts = torch.from_numpy(on_panel.counts.reshape(batch.num_cells, len(genes)).astype(np.float32))
    return PanelCells(processor.encode(on_panel), counts, np.stack(levels))


@dataclass
class PreparedData:
    """The data of a run: the source, its splits (the training stream, sampled validation and test rows), the
    training cells read for the baselines (raw rows and as a matrix), the per-gene marginal, the pool of genes seen
    in training and the evaluation panels, all fitted on the training split alone."""

    source: ExpressionSource
    splits: dict[str, datasets.Dataset | datasets.IterableDataset]
    training_rows: datasets.Dataset
    training_cells: TrainingCells
    baseline: PerGeneMarginal
    gene_pool: np.ndarray
    panels: dict[str, np.ndarray]
    recipe: DataRecipe
    conditions: ConditionSetup | None = None

    def effect_cells(self) -> tuple[datasets.Dataset, TrainingCells]:
        """The training rows and cells each drug's effect is estimated from: `--effect_cells` of them, drawn across
        the data as the baselines' are, where that is more than the baselines read (read now, and not kept); else the
        baselines' own."""
        args = self.recipe.data_arguments()
        if self.conditions is None or "drug" not in self.conditions.values or args.effect_cells <= args.baseline_cells:
            return self.training_rows, self.training_cells
        if self.source.builder is not None:
            table = self.source.builder.sample_cells({"train": args.effect_cells}, seed=args.split_seed,
                                                     max_files=args.sample_files)["train"]  # fmt: skip
        else:
            table = pa.Table.from_pylist(list(sample_rows(self.source.rows, args.effect_cells, seed=args.split_seed)))
        logger.info("drug effects estimated from %d training cells", table.num_rows)
        return as_dataset(table, []), training_cells(table, self.recipe.num_rank_bins, self.source.vocab.size)

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

    def panel_cells(self, rows, genes: np.ndarray, processor: RankDiTProcessor) -> PanelCells:
        """Raw Tahoe-schema `rows` on the panel `genes` (sorted), through the processor as a user's cells go: each
        cell's counts at the panel genes with its other counts as context, so its tokens are those of the whole
        cell, as in the training stream (bad rows are skipped, as everywhere)."""
        return panel_cells(rows, genes, processor)

    def imputation_baselines(self, validation: PanelCells) -> tuple[dict, dict]:
        """The baselines the model is compared with, fitted on the training cells, each family's settings chosen
        by masked NLL on `validation` (validation cells on the training panel, half of each cell masked).

        Returns:
            `(baselines, choices)`: name -> baseline, and per family the chosen setting and every candidate's NLL.
        """
        choices = {}

        def choose(family: str, candidates: dict):
            best, nll = choose_on_validation(candidates, validation)
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
        nearest = NearestCells(self.training_cells.cells(), cell_aware)
        nearest = choose(
            "nearest cells",
            {f"k={k}, prior_weight={w}": nearest.with_settings(k, w) for k in (5, 15, 50) for w in (1, 5)},
        )
        magic = MagicImputation(self.training_cells.counts, cell_aware)
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
        rates = NearestCellRates(self.training_cells.counts, cell_aware)
        rates = choose(
            "nearest cells' rates",
            {
                f"k={k}, shrinkage={s}, prior_weight={w}": rates.with_settings(k=k, shrinkage=s, prior_weight=w)
                for k in (16, 32, 64)
                for s in (0.1, 0.3, 0.5)
                for w in (0.02, 0.1)
            },
        )
        baselines = {
            "per-gene marginal": self.baseline,
            "cell-aware marginal": cell_aware,
            f"nearest cells (k={nearest.k})": nearest,
            f"MAGIC (knn={magic.knn}, t={magic.t})": magic,
            f"nearest cells' rates (k={rates.k})": rates,
        }
        return baselines, choices


def as_dataset(table: pa.Table | None, columns: list[str]) -> datasets.Dataset:
    """An in-memory `datasets.Dataset` of sampled rows (an empty one with `columns` when there are none)."""
    if table is None:
        table = pa.table({name: pa.array([], type=pa.string()) for name in columns})
    return datasets.Dataset(InMemoryTable(table))


def open_data(
    data_args: DataArguments, num_bins: int, seed: int, shard_multiple: int
) -> tuple[ExpressionSource, dict, ConditionSetup | None]:
    """The training stream, a sample of raw rows of each split (pyarrow tables, or None when a split is empty) and
    the run's conditions (None without `--conditions`).

    Tahoe-layout data (the embedded sample, a local folder or file, a Hub id) streams through
    [`Tahoe100MTokenized`] (rank tokens of every expressed gene; the collator selects) and its cells are sampled
    across the files; an `.h5ad` file streams its rows, split by the barcode hash, to the collator's batch tokenizer.
    """
    sizes = {
        "train": data_args.baseline_cells,
        "validation": data_args.max_eval_cells,
        "test": data_args.max_eval_cells,
    }
    if str(data_args.data).endswith(".h5ad"):
        if data_args.split_by != "barcode" or data_args.heldout_pairs is not None:
            raise ValueError("an .h5ad file is split by barcode only (it has no plates, files or held-out pairs)")
        setup = anndata_condition_setup(data_args) if data_args.conditions else None
        source = load_expression_data(
            data_args.data,
            gene_vocab=data_args.gene_vocab,
            layer=data_args.layer,
            gene_column=data_args.gene_column,
            obs_columns=tuple(dict.fromkeys([*data_args.obs_columns, *data_args.condition_names])),
        )
        shares = (data_args.validation_share, data_args.test_share)
        splits = split_by_cell_id(source.rows, *shares, seed=data_args.split_seed)
        samples = {
            name: pa.Table.from_pylist(list(sample_rows(splits[name], size, seed=data_args.split_seed))) or None
            for name, size in sizes.items()
        }
        return ExpressionSource(splits["train"], source.vocab, source.name), samples, setup
    config = {
        "max_length": None,
        "num_rank_bins": num_bins,
        "seed": seed,
        "split_by": data_args.split_by,
        **{
            name: getattr(data_args, name)
            for name in ("validation_share", "test_share")
            if getattr(data_args, name) is not None
        },  # fmt: skip
        "split_seed": data_args.split_seed,
        "validation_plates": tuple(data_args.validation_plates),
        "test_plates": tuple(data_args.test_plates),
        "validation_files": tuple(data_args.validation_files),
        "test_files": tuple(data_args.test_files),
        "interleave_files": data_args.interleave_files,
        "shard_multiple": shard_multiple,
    }
    first = tahoe_builder(data_args.data, **config)
    first.check_held_out()  # the plates or files a hold-out names are in the data, before any cell is read
    names = first.schema().names
    setup = condition_setup(first, data_args) if data_args.conditions else None
    if setup is not None and setup.pair_columns:
        config.update(split_by="pair", pair_columns=setup.pair_columns, test_pairs=setup.test_pairs,
                      validation_pairs=setup.validation_pairs, control_drug=setup.control_drug)  # fmt: skip
    wanted = (CELL_ID_COLUMN, "plate", *(setup.columns if setup is not None else ()))
    keep_columns = tuple(name for name in dict.fromkeys(wanted) if name in names)
    builder = tahoe_builder(data_args.data, keep_columns=keep_columns, **config)
    samples = builder.sample_cells(sizes, seed=data_args.split_seed, max_files=data_args.sample_files)
    stream = builder.as_streaming_dataset("train")  # the trainer batches it and shuffles its shard order per epoch
    name = str(data_args.data) if data_args.data is not None else str(EMBEDDED_SAMPLE)
    return ExpressionSource(stream, read_gene_vocab(builder.input_files()[1]), name, builder), samples, setup


def prepare_data(data_args: DataArguments, num_bins: int, seed: int = 0, shard_multiple: int = 1) -> PreparedData:
    """Open the data (the training stream; validation and test cells drawn across the files), read the training
    cells the baselines are fitted on, and choose the gene pool and the evaluation panels from them."""
    source, samples, conditions = open_data(data_args, num_bins, seed, shard_multiple)
    columns = ["genes", "expressions", CELL_ID_COLUMN]
    splits = {"train": source.rows, **{name: as_dataset(samples[name], columns) for name in ("validation", "test")}}
    logger.info("data: %s, %d genes in the vocabulary", source.name, len(source.vocab))
    if samples["train"] is None:
        raise ValueError(f"no training cells in {source.name}")
    cells = training_cells(samples["train"], num_bins, source.vocab.size)
    baseline = PerGeneMarginal(num_bins, source.vocab.size).fit(cells.cells())
    gene_pool = np.flatnonzero(baseline.detection_counts > 0)
    panels = choose_panels(cells, data_args.panel_size or data_args.max_length, seed=data_args.split_seed)
    logger.info(
        "baselines fitted on %d training cells; %d validation, %d test cells; %d genes seen; panels of %s genes",
        baseline.num_cells,
        len(splits["validation"]),
        len(splits["test"]),
        len(gene_pool),
        ", ".join(f"{len(genes)} ({name})" for name, genes in panels.items()),
    )
    training_rows = as_dataset(samples["train"], columns)
    recipe = DataRecipe(
        dataclasses.asdict(data_args), num_bins, seed, {name: genes.tolist() for name, genes in panels.items()},
        conditions.to_dict() if conditions is not None else None,
    )  # fmt: skip
    return PreparedData(source, splits, training_rows, cells, baseline, gene_pool, panels, recipe, conditions)


def prepare_run_data(folder: str, data: str | None = None) -> PreparedData:
    """The data of a finished run, rebuilt from the recipe it saved ([`DataRecipe`], `run_config.json`): the same
    splits, panels and baselines' training cells, without the training flags. `data` replaces the data source when
    it has moved; the panels chosen again must be the run's."""
    recipe = DataRecipe.load(folder)
    prepared = prepare_data(recipe.data_arguments(data=data), recipe.num_rank_bins, seed=recipe.seed)
    recipe.check_panels(prepared.panels)
    return prepared
