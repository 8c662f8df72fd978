"""Tahoe-100M `expression_data` rows: where they come from, and the collator that turns them into batches.

A data source is the embedded real sample (default), a local folder or file of parquet in the Tahoe-100M schema
(the Hub layout `data/*.parquet` + `metadata/gene_metadata.parquet`, or loose parquet files), an `.h5ad` file, or a
Hub dataset id such as `tahoebio/Tahoe-100M`. Training reads Tahoe-layout sources through the
[`Tahoe100MTokenized`] stream ([`tahoe_builder`]); [`load_expression_data`] gives their raw rows as a `datasets`
table for small data, tools and tests.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets.distributed import split_dataset_by_node
from transformers import TrainerCallback

from modeling import CellBatch, CellTokenizer, GeneVocab, RaggedCells, RankDiTProcessor
from modeling.conditions import DOSE, ConditionEncoder

from .anndata_source import load_anndata
from .schema import CELL_ID_COLUMN, CONTEXT_COLUMN, marker_positions
from .tahoe_100m_tokenized import Tahoe100MTokenized
from .tokenization import tokenize_arrow_batch

logger = logging.getLogger(__name__)

EMBEDDED_SAMPLE = Path(__file__).resolve().parent.parent / "data" / "celltypist_sample"
GENE_METADATA_PATH = "metadata/gene_metadata.parquet"


@dataclass
class ExpressionSource:
    """Resolved data source: the rows (a `datasets` dataset, maybe streaming), the gene vocabulary, and the builder
    of a Tahoe-layout stream."""

    rows: datasets.Dataset | datasets.IterableDataset
    vocab: GeneVocab
    name: str
    builder: Tahoe100MTokenized | None = None


def read_gene_vocab(path: str | os.PathLike) -> GeneVocab:
    """Read a parquet file in Tahoe-100M's `gene_metadata` schema (`token_id`, `ensembl_id`, `gene_symbol`)."""
    with fsspec.open(path, "rb") as f:  # a local path or an hf:// one
        table = pq.read_table(f, columns=["token_id", "ensembl_id", "gene_symbol"])
    return GeneVocab(table["token_id"].to_numpy(), table["ensembl_id"].to_pylist(), table["gene_symbol"].to_pylist())


def read_vocab_file(path: str | os.PathLike) -> GeneVocab:
    """A `gene_metadata` parquet file, or a checkpoint's `preprocessor_config.json` (its gene vocabulary)."""
    return GeneVocab.from_file(path) if str(path).endswith(".json") else read_gene_vocab(path)


def load_expression_data(
    data: str | os.PathLike | None = None,
    *,
    config_name: str | None = None,
    gene_vocab: str | os.PathLike | None = None,
    layer: str | None = None,
    gene_column: str | None = None,
    obs_columns: tuple[str, ...] = (),
) -> ExpressionSource:
    """Open a source of Tahoe-100M-schema rows.

    Args:
        data: `None` for the embedded sample; a local folder (Hub layout or loose `*.parquet`) or parquet file; an
            `.h5ad` file of raw counts (streamed from disk); or a Hub dataset id (streamed; its
            `metadata/gene_metadata.parquet` gives the vocabulary).
        config_name: dataset config for a Hub id (`expression_data` is Tahoe-100M's default).
        gene_vocab: vocabulary for an `.h5ad` file (`gene_metadata` parquet or a `preprocessor_config.json`); by
            default the embedded sample's GENCODE v44 genes.
        layer, gene_column, obs_columns: see [`load_anndata`].
    """
    path = Path(data) if data is not None else EMBEDDED_SAMPLE
    if path.suffix == ".h5ad":
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        vocab = read_vocab_file(gene_vocab or EMBEDDED_SAMPLE / GENE_METADATA_PATH)
        rows, _ = load_anndata(path, vocab, layer=layer, gene_column=gene_column, obs_columns=obs_columns)
        return ExpressionSource(rows, vocab, str(path))
    builder = tahoe_builder(data)
    if builder.config.data_files:  # local: the raw rows as a table (the footers are checked first)
        files = builder.check_files(builder.input_files()[0])
        rows = datasets.load_dataset("parquet", data_files=list(files), split="train")
    else:
        rows = datasets.load_dataset(str(data), config_name, split="train", streaming=True)
    return ExpressionSource(rows, read_gene_vocab(builder.input_files()[1]), str(data or EMBEDDED_SAMPLE))


def tahoe_builder(data: str | os.PathLike | None, **config) -> Tahoe100MTokenized:
    """The [`Tahoe100MTokenized`] builder of a Tahoe-layout source: `None` (the embedded sample), a local folder
    (Hub layout or loose `*.parquet`), a parquet file, or a Hub dataset id. `config` goes to the builder.

    Raises:
        FileNotFoundError: a local source without parquet files or without its `metadata/gene_metadata.parquet`;
            a path that does not exist and is not a Hub id (`data/celltypist_sampl` is a mistyped path).
    """
    path = Path(data) if data is not None else EMBEDDED_SAMPLE
    if data is None or path.exists():
        if path.is_dir():
            files = sorted((path / "data").glob("*.parquet")) or sorted(path.glob("*.parquet"))
            metadata = path / GENE_METADATA_PATH
        else:
            files, metadata = [path], path.parent.parent / GENE_METADATA_PATH
        if not files:
            raise FileNotFoundError(f"no parquet files in {path} (looked in {path / 'data'} and {path})")
        if not metadata.exists():
            raise FileNotFoundError(f"no gene metadata for {path}: expected {metadata}")
        data_files = {"train": [str(f) for f in files]}
        return Tahoe100MTokenized(data_files=data_files, gene_metadata=str(metadata), **config)
    if not is_hub_dataset_id(str(data)):
        raise FileNotFoundError(f"{data} does not exist (a Hub dataset id looks like 'owner/name')")
    return Tahoe100MTokenized(hub_dataset=str(data), **config)


def is_hub_dataset_id(name: str) -> bool:
    """Whether a data source names a Hub dataset (`owner/name`) rather than a local file or folder."""
    if Path(name).exists() or name.startswith(("/", ".", "~")) or name.endswith(".parquet"):
        return False
    if Path(name).parent.is_dir() and str(Path(name).parent) != ".":  # `data/celltypist_sampl`: a mistyped path
        return False
    return name.count("/") == 1


def shard_for_process(rows, rank: int, world_size: int):
    """The rows process `rank` of `world_size` reads: a contiguous block of a map-style dataset, or its own shards
    of a streamed one (`datasets.distributed.split_dataset_by_node`, also split over its DataLoader workers)."""
    if world_size == 1:
        return rows
    if isinstance(rows, datasets.IterableDataset):
        return split_dataset_by_node(rows, rank=rank, world_size=world_size)
    return rows.shard(num_shards=world_size, index=rank, contiguous=True)


def cell_counts(row: dict) -> tuple[np.ndarray, np.ndarray]:
    """Gene ids and counts of a row, without the position-0 `<cls>` marker (expression -2) when present."""
    genes = np.asarray(row["genes"], dtype=np.int64)
    counts = np.asarray(row["expressions"], dtype=np.float64)
    if len(genes) != len(counts):
        raise ValueError(f"cell {row.get(CELL_ID_COLUMN)!r}: {len(genes)} genes but {len(counts)} expressions")
    if len(marker_positions(np.array([0, len(counts)]), genes, counts)):
        genes, counts = genes[1:], counts[1:]
    return genes, counts


def _flatten(lists, total: int) -> np.ndarray:
    """Lists (or numpy arrays, from a numpy-formatted stream) of integers, back to back as one int64 array."""
    if total and isinstance(lists[0], np.ndarray):
        return np.concatenate(lists).astype(np.int64, copy=False)
    return np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=total)


def _arrow_column(values):
    """A batch's column as Arrow takes it: a numpy-formatted stream stacks lists of one length into a 2-D array."""
    return list(values) if isinstance(values, np.ndarray) and values.ndim == 2 else values


def tokenized_cells(rows: list[dict] | dict[str, list], num_bins: int) -> tuple[np.ndarray, ...]:
    """`(offsets, gene_ids, rank tokens, cell ids)` of a batch, given as a list of rows or as columns (a dict of
    lists, `IterableDataset.batch`): rows of the [`Tahoe100MTokenized`] stream (`gene_ids` / `input_ids`, already
    rank tokens) as they are, raw Tahoe-schema rows (`genes` / `expressions`, from an `.h5ad` file or a table of
    sampled cells) through the same batch tokenizer, bad rows skipped."""
    columns = rows if isinstance(rows, dict) else {name: [row[name] for row in rows] for name in rows[0]}
    cell_ids = list(columns[CELL_ID_COLUMN])
    if "input_ids" in columns:
        sizes = np.fromiter(map(len, columns["input_ids"]), dtype=np.int64, count=len(cell_ids))
        genes, tokens = (_flatten(columns[name], int(sizes.sum())) for name in ("gene_ids", "input_ids"))
        return np.concatenate([[0], np.cumsum(sizes)]), genes, tokens, cell_ids
    names = ("genes", "expressions", CELL_ID_COLUMN, *([CONTEXT_COLUMN] if CONTEXT_COLUMN in columns else []))
    table = pa.table({name: _arrow_column(columns[name]) for name in names})
    batch = tokenize_arrow_batch(table, num_bins)
    kept_ids = [cell for cell, kept in zip(cell_ids, batch.kept) if kept]
    if batch.skipped:
        bad = [cell for cell, kept in zip(cell_ids, batch.kept) if not kept]
        if not kept_ids:
            raise ValueError(f"every cell of the batch is a bad row ({dict(batch.skipped)}): {bad[:5]}")
        logger.warning("skipped %d bad cells (%s), e.g. %s", len(bad), dict(batch.skipped), bad[:3])
    return batch.offsets, batch.gene_ids, batch.ranks, kept_ids


@dataclass
class RankDiffusionCollator:
    """Selects each cell's sequence by the rules of its [`CellTokenizer`] and makes the batch with the processor.

    Rows come from the [`Tahoe100MTokenized`] stream (rank tokens of every expressed gene) or are raw Tahoe-schema
    rows ([`tokenized_cells`]); the selection is [`CellTokenizer.select_batch`], the builder's own; the batch is the
    processor's [`~modeling.RankDiTProcessor.encode`] (the one batch tokenizer of training, evaluation and
    inference), with the clean tokens as `labels` (-100 at padding).

    Args:
        processor: the run's [`RankDiTProcessor`].
        cell_tokenizer: the [`CellTokenizer`] with the sequence rules (not named `tokenizer`: the Trainer would
            call `save_pretrained` on it at every checkpoint).
        rule: force a selection rule (`"panel"` for evaluation); None lets the tokenizer draw one per cell.
        epoch: the training epoch, kept current by [`EpochCallback`] so each epoch draws new subsamples.
        conditions ([`ConditionEncoder`], *optional*): read each cell's perturbation conditions from its row into
            `condition_ids` / `doses` ([`~ConditionEncoder.encode_rows`]), nulled at `condition_dropout` (drawn by a
            hash of `seed`, the epoch and the cell), the drug and dose alone at `perturbation_dropout`;
            `dose_of_sample` gives each Tahoe well's dose.
        reference_rows (`dict[str, int]`, *optional*): the row of each cell that is a reference cell, given as
            `reference_self` (-1 for the others), so that no cell reads itself as its own reference.
        reference_group (`str`, *optional*): the condition that groups a grouped reference (its control cells by
            line): each cell's id of it, never dropped, given as `reference_group`.
    """

    processor: RankDiTProcessor
    cell_tokenizer: CellTokenizer
    rule: str | None = None
    epoch: int = 0
    conditions: ConditionEncoder | None = None
    dose_of_sample: dict[str, float] | None = None
    condition_dropout: float = 0.0
    perturbation_dropout: float = 0.0
    seed: int = 0
    reference_rows: dict[str, int] | None = None
    reference_group: str | None = None

    def __call__(self, rows: list[dict] | dict[str, list]) -> CellBatch:
        offsets, genes, tokens, cell_ids = tokenized_cells(rows, self.processor.num_rank_bins)
        selected = self.cell_tokenizer.select_batch(offsets, genes, tokens, cell_ids, epoch=self.epoch, rule=self.rule)
        batch = self.processor.encode(RaggedCells(selected[0], selected[1], ranks=selected[2]))
        batch["labels"] = batch["input_ids"].masked_fill(~batch["attention_mask"], -100)
        if self.reference_rows is not None:
            batch["reference_self"] = torch.tensor([self.reference_rows.get(cell, -1) for cell in cell_ids])
        if self.conditions is not None:
            columns = rows if isinstance(rows, dict) else {name: [row.get(name) for row in rows] for name in rows[0]}
            row_of = {cell: i for i, cell in enumerate(columns[CELL_ID_COLUMN])}
            kept = [row_of[cell] for cell in cell_ids]  # bad rows were skipped
            wanted = (*self.conditions.values, "sample", DOSE)
            picked = {name: [columns[name][i] for i in kept] for name in wanted if name in columns}
            encoded = self.conditions.encode_rows(
                picked, cell_ids, dose_of_sample=self.dose_of_sample, dropout=self.condition_dropout,
                perturbation_dropout=self.perturbation_dropout, seed=self.seed, epoch=self.epoch,
            )  # fmt: skip
            batch.update(encoded)
            if self.reference_group is not None:
                group = self.reference_group
                batch["reference_group"] = torch.from_numpy(self.conditions.ids(group, picked[group]))
        return batch


class EpochCallback(TrainerCallback):
    """Tells the collator and the stream's builder which epoch starts, so subsampling is fixed by (seed, epoch, cell
    id) and the stream's windows are shuffled anew.

    DataLoader workers copy both when the epoch's iterator is made, after this callback runs; with
    `dataloader_persistent_workers` they would keep the first epoch's copies.
    """

    def __init__(self, collator: RankDiffusionCollator, builder: Tahoe100MTokenized | None = None):
        self.collator, self.builder = collator, builder

    def on_epoch_begin(self, args, state, control, **kwargs):
        epoch = int(state.epoch + 1e-6)
        self.collator.epoch = epoch
        if self.builder is not None:
            self.builder.set_epoch(epoch)
