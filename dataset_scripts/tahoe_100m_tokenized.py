"""`Tahoe100MTokenized`: a `datasets` builder that streams Tahoe-100M parquet shards as RankDiff token sequences.

Usage:

```python
>>> from glob import glob
>>> from dataset_scripts.tahoe_100m_tokenized import Tahoe100MTokenized

>>> builder = Tahoe100MTokenized(data_dir="/data/tahoe")  # Hub layout: data/*.parquet, metadata/gene_metadata.parquet
>>> builder = Tahoe100MTokenized(data_files={"train": sorted(glob("shards/*.parquet"))})
>>> train = builder.as_streaming_dataset(split="train")  # validation and test come from the same files
>>> builder.download_and_prepare(); cells = builder.as_dataset(split="validation")  # or materialise
```

With neither `data_dir` nor `data_files`, the Hub dataset `tahoebio/Tahoe-100M` is read through `hf://` paths.
Each cell's rank tokens are computed over all its expressed genes, then the sequence keeps up to `max_length`
genes by the "expressed" rule of [`modeling.CellTokenizer`] with draws fixed by (seed, cell id); both steps are
vectorised over a batch of cells and give each cell exactly what the per-cell tokenizer gives. Cells are
assigned to `train` / `validation` / `test` by a hash of `BARCODE_SUB_LIB_ID` or by `plate`, so no cell is in
two splits.

Workers and ranks: each shard (a file, or a parquet row group when files are few) is read by exactly one DataLoader
worker of one rank (`datasets.distributed.split_dataset_by_node`). `state_dict()` / `load_state_dict()` resume the
stream exactly where it stopped without a shuffle buffer, and with `.shuffle(seed, buffer_size=1)`, which only permutes
the shard order. A larger buffer is refilled after a resume: the cells it held at the checkpoint are lost and
others repeat (seen with datasets 5.2), so keep the buffer out when exact resume matters.

Bad input: rows whose `genes` and `expressions` differ in length, with negative, NaN or non-integer counts, with
gene ids outside the vocabulary or repeated, or with no expressed gene are skipped, and each shard logs how many
it skipped and why. A shard that cannot be read raises an error naming the file, unless `on_bad_files="skip"`,
which skips it with a warning.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.builder import Key

from modeling import CellTokenizer

from .expression_data import TEST_SHARE, VALIDATION_SHARE, split_names
from .schema import CELL_ID_COLUMN, METADATA_COLUMNS
from .tokenization import tokenize_arrow_batch

logger = logging.getLogger(__name__)

HUB_DATASET = "tahoebio/Tahoe-100M"
READ_ROWS = 1024  # rows decoded from parquet at a time
SPLITS = (datasets.Split.TRAIN, datasets.Split.VALIDATION, datasets.Split.TEST)


@dataclass
class Tahoe100MTokenizedConfig(datasets.BuilderConfig):
    """Configuration of [`Tahoe100MTokenized`].

    Args:
        gene_metadata (`str`, *optional*): parquet file in the `gene_metadata` schema; by default
            `metadata/gene_metadata.parquet` of `data_dir`, or of the Hub dataset. When it cannot be found, gene ids
            are not checked against a vocabulary and `zero_share` must be 0.
        max_length (`int`, defaults to 1024): the most (gene, token) pairs per cell.
        num_rank_bins (`int`, defaults to 50): B.
        zero_share (`float`, defaults to 0.0): share of the sequence given to unexpressed vocabulary genes.
        seed (`int`, defaults to 0): seed of the per-cell draws.
        split_by (`str`, defaults to `"barcode"`): `"barcode"` (hash of `BARCODE_SUB_LIB_ID`) or `"plate"`.
        validation_share, test_share (`float`, defaults to 0.1 and 0.15, as for `train_hf.py`): shares held out with
            `split_by="barcode"`.
        split_seed (`int`, defaults to 0): salt of the barcode hash.
        validation_plates, test_plates (`tuple[str, ...]`): plates held out with `split_by="plate"`.
        keep_columns (`tuple[str, ...]`): metadata columns carried to the output.
        batch_size (`int`, defaults to 64): cells tokenized at once (small batches stay in cache).
        min_shards (`int`, defaults to 64): when there are fewer files, each parquet row group becomes a shard, so
            every DataLoader worker on every rank gets its own.
        on_bad_files (`str`, defaults to `"error"`): `"error"` or `"skip"` for shards that cannot be read.
    """

    gene_metadata: str | None = None
    max_length: int = 1024
    num_rank_bins: int = 50
    zero_share: float = 0.0
    seed: int = 0
    split_by: str = "barcode"
    validation_share: float = VALIDATION_SHARE
    test_share: float = TEST_SHARE
    split_seed: int = 0
    validation_plates: tuple[str, ...] = ()
    test_plates: tuple[str, ...] = ()
    keep_columns: tuple[str, ...] = METADATA_COLUMNS
    batch_size: int = 64
    min_shards: int = 64
    on_bad_files: str = "error"

    def __post_init__(self):
        super().__post_init__()
        if self.split_by not in ("barcode", "plate"):
            raise ValueError(f"split_by must be 'barcode' or 'plate', got {self.split_by!r}")
        if self.on_bad_files not in ("error", "skip"):
            raise ValueError(f"on_bad_files must be 'error' or 'skip', got {self.on_bad_files!r}")
        split_names([], self.validation_share, self.test_share)  # checks the shares
        unknown = set(self.keep_columns) - set(METADATA_COLUMNS)
        if unknown:
            raise ValueError(f"keep_columns must come from {METADATA_COLUMNS}, got {sorted(unknown)}")


class Tahoe100MTokenized(datasets.ArrowBasedBuilder):
    """Tahoe-100M `expression_data` as RankDiff sequences: see the module docstring."""

    BUILDER_CONFIG_CLASS = Tahoe100MTokenizedConfig
    config: Tahoe100MTokenizedConfig

    def _info(self) -> datasets.DatasetInfo:
        features = {
            "gene_ids": datasets.List(datasets.Value("int32")),
            "input_ids": datasets.List(datasets.Value("int32")),
            "length": datasets.Value("int32"),
            "n_expressed": datasets.Value("int32"),
            "total_counts": datasets.Value("float64"),
        }
        features.update({name: datasets.Value("string") for name in self.config.keep_columns})
        return datasets.DatasetInfo(
            description="Tahoe-100M cells as (gene id, per-cell rank token) sequences for RankDiff.",
            features=datasets.Features(features),
            homepage=f"https://huggingface.co/datasets/{HUB_DATASET}",
            license="cc0-1.0",
        )

    def _input_files(self) -> tuple[list[str], str | None]:
        data_files = self.config.data_files
        if data_files:
            files = [str(f) for split_files in data_files.values() for f in split_files]
            metadata_root = self.config.data_dir
        elif self.config.data_dir:
            files = sorted(str(p) for p in Path(self.config.data_dir, "data").glob("*.parquet"))
            metadata_root = self.config.data_dir
        else:
            from huggingface_hub import HfFileSystem

            files = sorted("hf://" + p for p in HfFileSystem().glob(f"datasets/{HUB_DATASET}/data/*.parquet"))
            metadata_root = f"hf://datasets/{HUB_DATASET}"
        if not files:
            raise FileNotFoundError(f"no parquet files in data_files={data_files}, data_dir={self.config.data_dir}")
        metadata = self.config.gene_metadata
        if metadata is None and metadata_root is not None:
            candidate = f"{metadata_root}/metadata/gene_metadata.parquet"
            metadata = candidate if candidate.startswith("hf://") or os.path.exists(candidate) else None
        return sorted(set(files)), metadata

    def _shards(self, files: list[str]) -> tuple[list[str], list[int | None]]:
        """One shard per file, or per row group when files are fewer than `min_shards`."""
        if len(files) >= self.config.min_shards:
            return files, [None] * len(files)
        shard_files, row_groups = [], []
        for file in files:
            try:
                with open(file, "rb") as f:
                    count = pq.ParquetFile(f).num_row_groups
            except (OSError, pa.ArrowException) as error:
                self._bad_file(file, error)
                continue
            shard_files += [file] * count
            row_groups += list(range(count))
        return shard_files, row_groups

    def _bad_file(self, file: str, error: Exception) -> None:
        if self.config.on_bad_files == "error":
            raise ValueError(f"cannot read parquet shard {file}: {error}") from error
        logger.warning("skipping unreadable parquet shard %s (on_bad_files='skip'): %s", file, error)

    def _split_generators(self, dl_manager):
        files, metadata = self._input_files()
        files = dl_manager.download(files)
        known_genes = None
        if metadata is not None:
            with open(dl_manager.download(metadata), "rb") as f:
                known_genes = np.sort(pq.read_table(f, columns=["token_id"])["token_id"].to_numpy())
        elif self.config.zero_share > 0:
            raise ValueError("zero_share > 0 needs gene_metadata to draw unexpressed genes from")
        shard_files, row_groups = self._shards(files)
        tokenizer = CellTokenizer(
            num_bins=self.config.num_rank_bins,
            max_length=self.config.max_length,
            zero_share=self.config.zero_share,
            seed=self.config.seed,
            gene_pool=known_genes if self.config.zero_share > 0 else None,
        )
        return [
            datasets.SplitGenerator(
                name=split,
                gen_kwargs={
                    "files": shard_files,
                    "row_groups": row_groups,
                    "split": str(split),
                    "tokenizer": tokenizer,
                    "known_genes": known_genes,
                },
            )
            for split in SPLITS
        ]

    def _split_of(self, table: pa.Table) -> np.ndarray:
        """The split name of every row of `table`."""
        config = self.config
        if config.split_by == "plate":
            plates = table.column("plate").to_pylist()
            return np.array(
                [
                    "validation" if p in config.validation_plates else "test" if p in config.test_plates else "train"
                    for p in plates
                ]
            )
        cell_ids = table.column(CELL_ID_COLUMN).to_pylist()
        return split_names(cell_ids, config.validation_share, config.test_share, config.split_seed)

    def _tokenize(self, table: pa.Table, tokenizer: CellTokenizer, known_genes, skipped: Counter) -> pa.Table:
        batch = tokenize_arrow_batch(table, self.config.num_rank_bins, known_genes)
        skipped.update(batch.skipped)
        kept = table if batch.kept.all() else table.filter(pa.array(batch.kept))
        cell_ids = kept.column(CELL_ID_COLUMN).to_pylist()
        offsets, gene_ids, input_ids = tokenizer.select_expressed(
            batch.offsets, batch.gene_ids, batch.input_ids, cell_ids
        )
        list_offsets = pa.array(offsets.astype(np.int32))
        starts = batch.offsets[:-1]
        columns = {
            "gene_ids": pa.ListArray.from_arrays(list_offsets, pa.array(gene_ids.astype(np.int32))),
            "input_ids": pa.ListArray.from_arrays(list_offsets, pa.array(input_ids.astype(np.int32))),
            "length": pa.array(np.diff(offsets).astype(np.int32)),
            "n_expressed": pa.array(np.diff(batch.offsets).astype(np.int32)),
            "total_counts": pa.array(np.add.reduceat(batch.counts.astype(np.float64), starts) if len(starts) else []),
        }
        for name in self.config.keep_columns:
            columns[name] = kept.column(name)
        return pa.table(columns)

    def _generate_tables(self, files, row_groups, split, tokenizer, known_genes):
        columns = ["genes", "expressions", *dict.fromkeys([*self.config.keep_columns, CELL_ID_COLUMN, "plate"])]
        for shard_idx, (file, row_group) in enumerate(zip(files, row_groups)):
            skipped = Counter()
            try:
                with open(file, "rb") as f:
                    parquet = pq.ParquetFile(f)
                    groups = [row_group] if row_group is not None else None
                    # Parquet decodes faster in large batches; tokenization runs on small slices that stay in cache.
                    batches = parquet.iter_batches(READ_ROWS, row_groups=groups, columns=columns)
                    chunk_idx = 0
                    for record_batch in batches:
                        table = pa.Table.from_batches([record_batch])
                        in_split = self._split_of(table) == split
                        table = table if in_split.all() else table.filter(pa.array(in_split))
                        for start in range(0, table.num_rows, self.config.batch_size):
                            chunk = table.slice(start, self.config.batch_size)
                            yield Key(shard_idx, chunk_idx), self._tokenize(chunk, tokenizer, known_genes, skipped)
                            chunk_idx += 1
            except Exception as error:  # not `except (OSError, ...)`: evaluated when a generator closes at exit
                if not isinstance(error, (OSError, pa.ArrowException)):
                    raise
                self._bad_file(file, error)
            if skipped:
                logger.warning(
                    "%s (row group %s, %s split): skipped %d cells: %s",
                    file,
                    row_group,
                    split,
                    sum(skipped.values()),
                    dict(skipped),
                )
