"""Tahoe-100M `expression_data` rows: where they come from, the held-out split, and the training collator.

A data source is the embedded real sample (default), a local folder or file of parquet in the Tahoe-100M schema
(the Hub layout `data/*.parquet` + `metadata/gene_metadata.parquet`, or loose parquet files), or a Hub dataset id
such as `tahoebio/Tahoe-100M` (streamed).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import torch
from datasets.distributed import split_dataset_by_node
from transformers import TrainerCallback

from modeling import CellTokenizer, GeneVocab

from .anndata_source import load_anndata
from .schema import CELL_ID_COLUMN, marker_positions, missing_columns

EMBEDDED_SAMPLE = Path(__file__).resolve().parent.parent / "data" / "celltypist_sample"
GENE_METADATA_PATH = "metadata/gene_metadata.parquet"


@dataclass
class ExpressionSource:
    """Resolved data source: the rows (a `datasets` dataset, maybe streaming) and the gene vocabulary."""

    rows: datasets.Dataset | datasets.IterableDataset
    vocab: GeneVocab
    name: str


def read_gene_vocab(path: str | os.PathLike) -> GeneVocab:
    """Read a parquet file in Tahoe-100M's `gene_metadata` schema (`token_id`, `ensembl_id`, `gene_symbol`)."""
    table = pq.read_table(path, columns=["token_id", "ensembl_id", "gene_symbol"])
    return GeneVocab(table["token_id"].to_numpy(), table["ensembl_id"].to_pylist(), table["gene_symbol"].to_pylist())


def read_vocab_file(path: str | os.PathLike) -> GeneVocab:
    """A `gene_metadata` parquet file or a checkpoint's `gene_vocab.json`."""
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
        gene_vocab: vocabulary for an `.h5ad` file (`gene_metadata` parquet or `gene_vocab.json`); by default the
            embedded sample's GENCODE v44 genes.
        layer, gene_column, obs_columns: see [`load_anndata`].
    """
    path = Path(data) if data is not None else EMBEDDED_SAMPLE
    if path.suffix == ".h5ad":
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        vocab = read_vocab_file(gene_vocab or EMBEDDED_SAMPLE / GENE_METADATA_PATH)
        rows, _ = load_anndata(path, vocab, layer=layer, gene_column=gene_column, obs_columns=obs_columns)
        return ExpressionSource(rows, vocab, str(path))
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
        for file in files:  # the footer only: a wrong file is named before anything is read
            missing = missing_columns(pq.read_schema(file))
            if missing:
                raise ValueError(f"{file} is not a Tahoe-layout expression_data file: it lacks the columns {missing}")
        rows = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
        return ExpressionSource(rows, read_gene_vocab(metadata), str(path))

    if not is_hub_dataset_id(str(data)):
        raise FileNotFoundError(f"{data} does not exist (a Hub dataset id looks like 'owner/name')")
    from huggingface_hub import hf_hub_download

    rows = datasets.load_dataset(str(data), config_name, split="train", streaming=True)
    metadata = hf_hub_download(str(data), GENE_METADATA_PATH, repo_type="dataset")
    return ExpressionSource(rows, read_gene_vocab(metadata), str(data))


def is_hub_dataset_id(name: str) -> bool:
    """Whether a data source names a Hub dataset (`owner/name`) rather than a local file or folder."""
    if Path(name).exists() or name.startswith(("/", ".", "~")) or name.endswith(".parquet"):
        return False
    if Path(name).parent.is_dir() and str(Path(name).parent) != ".":  # `data/celltypist_sampl`: a mistyped path
        return False
    return name.count("/") == 1


# Default shares of the split, for every reader (the trainer's data and the streaming builder).
VALIDATION_SHARE, TEST_SHARE = 0.1, 0.15


def held_out_fraction(cell_id: str, seed: int = 0) -> float:
    """A stable number in [0, 1) per cell id, the key of the barcode split ([`split_names`])."""
    digest = hashlib.blake2b(f"{seed}:{cell_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def split_names(cell_ids: list[str], validation_share: float, test_share: float, seed: int = 0) -> np.ndarray:
    """The split of each cell by a hash of its id: `"validation"` below `validation_share`, `"test"` in the next
    `test_share`, `"train"` above. Stable across runs, machines and data orders; the one rule of every reader."""
    if not (0.0 <= validation_share and 0.0 <= test_share and validation_share + test_share < 1.0):
        raise ValueError(
            f"validation_share and test_share must be >= 0 with a sum below 1, got {validation_share} and {test_share}"
        )
    fraction = np.array([held_out_fraction(c, seed) for c in cell_ids])
    held_out = np.where(fraction < validation_share + test_share, "test", "train")
    return np.where(fraction < validation_share, "validation", held_out)


SPLIT_NAMES = ("train", "validation", "test")


def split_by_cell_id(rows, validation_share: float, test_share: float = 0.0, seed: int = 0) -> dict:
    """Split rows into train / validation / test by a hash of `BARCODE_SUB_LIB_ID` ([`split_names`]): no cell
    lands in two splits. Returns `{"train": ..., "validation": ..., "test": ...}` (empty splits included)."""
    if not 0.0 < validation_share:
        raise ValueError(f"validation_share must be positive, got {validation_share}")

    def in_split(batch, split: str):
        return (split_names(batch[CELL_ID_COLUMN], validation_share, test_share, seed) == split).tolist()

    split_names([], validation_share, test_share)  # checks the shares before any row is read
    return {split: rows.filter(in_split, batched=True, fn_kwargs={"split": split}) for split in SPLIT_NAMES}


def shard_for_process(rows, rank: int, world_size: int):
    """The rows process `rank` of `world_size` reads: a contiguous block of a map-style dataset, or its own shards
    of a streamed one (`datasets.distributed.split_dataset_by_node`, also split over its DataLoader workers)."""
    if world_size == 1:
        return rows
    if isinstance(rows, datasets.IterableDataset):
        return split_dataset_by_node(rows, rank=rank, world_size=world_size)
    return rows.shard(num_shards=world_size, index=rank, contiguous=True)


def with_length_column(rows: datasets.Dataset, max_length: int, column: str = "length") -> datasets.Dataset:
    """Add each cell's number of expressed genes (without the `<cls>` marker), capped at `max_length`: the length
    the Trainer's `group_by_length` sampler groups cells by, so a batch's padding stays small."""

    def lengths(batch):
        return {column: [min(len(g) - len(marker_positions(np.array([0, len(e)]), np.asarray(g), np.asarray(e))),
                             max_length) for g, e in zip(batch["genes"], batch["expressions"])]}  # fmt: skip

    return rows.map(lengths, batched=True, desc="cell lengths")


def cell_counts(row: dict) -> tuple[np.ndarray, np.ndarray]:
    """Gene ids and counts of a row, without the position-0 `<cls>` marker (expression -2) when present."""
    genes = np.asarray(row["genes"], dtype=np.int64)
    counts = np.asarray(row["expressions"], dtype=np.float64)
    if len(genes) != len(counts):
        raise ValueError(f"cell {row.get(CELL_ID_COLUMN)!r}: {len(genes)} genes but {len(counts)} expressions")
    if len(marker_positions(np.array([0, len(counts)]), genes, counts)):
        genes, counts = genes[1:], counts[1:]
    return genes, counts


def pad_cells(cells: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Pad (gene_ids, input_ids) pairs to the longest in the batch; `labels` are -100 at padding."""
    length = max(len(g) for g, _ in cells)
    gene_ids = torch.zeros(len(cells), length, dtype=torch.long)
    input_ids = torch.zeros(len(cells), length, dtype=torch.long)
    attention_mask = torch.zeros(len(cells), length, dtype=torch.long)
    for i, (genes, tokens) in enumerate(cells):
        gene_ids[i, : len(genes)] = torch.from_numpy(genes)
        input_ids[i, : len(tokens)] = torch.from_numpy(tokens)
        attention_mask[i, : len(genes)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"gene_ids": gene_ids, "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class RankDiffusionCollator:
    """Tokenizes raw Tahoe-100M rows (as MosaicFM's collator does) and pads them into a batch.

    Args:
        cell_tokenizer: the [`CellTokenizer`] with the sequence rules (not named `tokenizer`: the Trainer would
            call `save_pretrained` on it at every checkpoint).
        rule: force a selection rule (`"panel"` for evaluation); None lets the tokenizer draw one per cell.
        epoch: the training epoch, kept current by [`EpochCallback`] so each epoch draws new subsamples.
    """

    cell_tokenizer: CellTokenizer
    rule: str | None = None
    epoch: int = 0

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        cells = []
        for row in rows:
            genes, counts = cell_counts(row)
            cells.append(
                self.cell_tokenizer(genes, counts, cell_id=row[CELL_ID_COLUMN], epoch=self.epoch, rule=self.rule)
            )
        return pad_cells(cells)


class EpochCallback(TrainerCallback):
    """Tells the collator which epoch starts, so subsampling is fixed by (seed, epoch, cell id).

    DataLoader workers copy the collator when the epoch's iterator is made, after this callback runs; with
    `dataloader_persistent_workers` they would keep the first epoch's copy.
    """

    def __init__(self, collator: RankDiffusionCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = int(state.epoch + 1e-6)
