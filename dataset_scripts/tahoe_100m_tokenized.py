"""`Tahoe100MTokenized`: a `datasets` builder that streams Tahoe-100M parquet shards as RankDiff token sequences.

It is the one reader of Tahoe-layout data: `train_hf.py` trains from its stream, and its `sample_cells` gives the
cells the baselines are fitted on and the evaluation scores. Usage:

```python
>>> from glob import glob
>>> from dataset_scripts.tahoe_100m_tokenized import Tahoe100MTokenized

>>> builder = Tahoe100MTokenized(data_dir="/data/tahoe")  # Hub layout: data/*.parquet, metadata/gene_metadata.parquet
>>> builder = Tahoe100MTokenized(data_files={"train": sorted(glob("shards/*.parquet"))})
>>> train = builder.as_streaming_dataset(split="train").shuffle(seed=0, buffer_size=1)  # new shard order per epoch
>>> builder.download_and_prepare(); cells = builder.as_dataset(split="validation")  # or materialise
```

With neither `data_dir` nor `data_files`, the Hub dataset `hub_dataset` (`tahoebio/Tahoe-100M`) is read through
`hf://` paths; a local copy is streamed from its files as they are (no Arrow cache). Each cell's rank tokens are
computed over all its expressed genes, then the sequence keeps up to `max_length` genes by the selection rules of
[`modeling.CellTokenizer.select_batch`] (the same code the trainer's collator runs); with `max_length=None` every
expressed gene is kept and the rules are left to the collator, which draws anew each epoch. Both steps are
vectorised over blocks of cells and give each cell exactly what the per-cell tokenizer gives.

Mixing: Tahoe files are grouped by plate. The files (or row groups, when files are few) are dealt into shards of
about `interleave_files` files drawn across the data (seeded), each shard reads its files side by side, an equal
part of a `window_rows`-row window from each in turn, and shuffles each window of cells (a shuffle buffer whose
order is fixed by the seed and the epoch, `set_epoch`). So a batch holds cells of many files and plates, while the
stream stays a pure function of (seed, epoch): `.shuffle(seed, buffer_size=1)` also permutes the shard order per
epoch (the Trainer calls the dataset's `set_epoch`), and `state_dict()` / `load_state_dict()`, or replaying the
same number of cells, resume it exactly. Shards are split
over ranks and DataLoader workers by `datasets` (`split_dataset_by_node`): give `shard_multiple` = ranks x workers
so each reads its own files.

Splits: by a hash of `BARCODE_SUB_LIB_ID` (`split_by="barcode"`: every file holds cells of every split, and the
same wells lie on both sides), by `plate` or by file; a plate or file hold-out reads only the files that can hold
its cells (plates are read from the parquet footers' statistics).

Bad input, one policy: rows whose `genes` and `expressions` differ in length, with negative, NaN or non-integer
counts, with gene ids outside the vocabulary or repeated, or with no expressed gene are skipped and counted per
reason, and each file logs what it skipped; a file that cannot be read (corrupt, empty) is skipped with a warning
naming it (`on_bad_files="error"` raises instead). A file without the Tahoe columns, or missing gene metadata, is an
error naming it before anything is read.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import datasets
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.builder import Key
from tqdm.auto import tqdm

from modeling import CellTokenizer
from modeling.conditions import condition_value

from .schema import CELL_ID_COLUMN, FIRST_GENE_TOKEN_ID, METADATA_COLUMNS, missing_columns
from .splits import TEST_SHARE, VALIDATION_SHARE, pair_split, split_names
from .tokenization import SKIP_REASONS, TokenizedBatch, tokenize_arrow_batch

logger = logging.getLogger(__name__)

HUB_DATASET = "tahoebio/Tahoe-100M"
READ_ROWS = 256  # rows decoded from each parquet file at a time (a shard holds this many per file it reads)
SPLITS = (datasets.Split.TRAIN, datasets.Split.VALIDATION, datasets.Split.TEST)
SPLIT_BY = ("barcode", "plate", "file", "pair")

# A piece of the data: a parquet file, or one row group of it.
Piece = tuple[str, int | None]


@dataclass
class Tahoe100MTokenizedConfig(datasets.BuilderConfig):
    """Configuration of [`Tahoe100MTokenized`].

    Args:
        gene_metadata (`str`, *optional*): parquet file in the `gene_metadata` schema; by default
            `metadata/gene_metadata.parquet` of `data_dir`, or of the Hub dataset. Without it gene ids are not
            checked against a vocabulary and the rules that draw genes (`zero_share`, `random_share`) are off.
        hub_dataset (`str`, defaults to `"tahoebio/Tahoe-100M"`): the Hub dataset read without `data_dir` and
            `data_files`.
        max_length (`int`, *optional*, defaults to 1024): the most (gene, token) pairs per cell; None keeps every
            expressed gene (the training stream: the collator selects).
        num_rank_bins (`int`, defaults to 50): B.
        zero_share, panel_share, random_share (`float`, default 0): the rules of [`modeling.CellTokenizer`].
        panel (`tuple[int, ...]`, *optional*): the gene panel of the `"panel"` rule.
        seed (`int`, defaults to 0): seed of the per-cell draws, of the dealing of files into shards and of the
            window shuffles.
        split_by (`str`, defaults to `"barcode"`): `"barcode"` (hash of `BARCODE_SUB_LIB_ID`), `"plate"` or `"file"`.
        validation_share, test_share (`float`, defaults to 0.1 and 0.15, as for `train_hf.py`): shares held out with
            `split_by="barcode"`.
        split_seed (`int`, defaults to 0): salt of the barcode hash.
        validation_plates, test_plates (`tuple[str, ...]`): plates held out with `split_by="plate"`.
        validation_files, test_files (`tuple[str, ...]`): file names held out with `split_by="file"`.
        pair_columns (`tuple[str, str]`): with `split_by="pair"`, the two metadata columns whose value pairs are
            held out (e.g. `("cell_line_id", "drug")`; drugs compared by [`drug_key`]).
        validation_pairs, test_pairs (`tuple[tuple[str, str], ...]`): pairs held out with `split_by="pair"`: every
            cell of such a pair goes to that split; all other cells train.
        control_drug (`str`, *optional*): with `split_by="pair"`, the control drug: a hash half of its cells are test
            cells, the perturbation metrics' evaluation control ([`~dataset_scripts.splits.pair_split`]).
        keep_columns (`tuple[str, ...]`): metadata columns carried to the output.
        interleave_files (`int`, defaults to 16): files (or row groups) a shard reads side by side.
        window_rows (`int`, defaults to 1024): rows shuffled together, taken in equal parts from the files a shard
            reads side by side.
        shard_multiple (`int`, defaults to 1): the number of shards is rounded up to a multiple of it (ranks x
            DataLoader workers, so each reads whole shards).
        min_shards (`int`, defaults to 64): when there are fewer files, each parquet row group is a piece of its own.
        on_bad_files (`str`, defaults to `"skip"`): `"skip"` (warn, naming the file) or `"error"` for files that
            cannot be read.
    """

    gene_metadata: str | None = None
    hub_dataset: str = HUB_DATASET
    max_length: int | None = 1024
    num_rank_bins: int = 50
    zero_share: float = 0.0
    panel_share: float = 0.0
    random_share: float = 0.0
    panel: tuple[int, ...] | None = None
    seed: int = 0
    split_by: str = "barcode"
    validation_share: float = VALIDATION_SHARE
    test_share: float = TEST_SHARE
    split_seed: int = 0
    validation_plates: tuple[str, ...] = ()
    test_plates: tuple[str, ...] = ()
    validation_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()
    pair_columns: tuple[str, ...] = ()
    validation_pairs: tuple[tuple[str, ...], ...] = ()
    test_pairs: tuple[tuple[str, ...], ...] = ()
    control_drug: str | None = None
    keep_columns: tuple[str, ...] = METADATA_COLUMNS
    interleave_files: int = 16
    window_rows: int = 1024
    shard_multiple: int = 1
    min_shards: int = 64
    on_bad_files: str = "skip"

    def __post_init__(self):
        super().__post_init__()
        if self.split_by not in SPLIT_BY:
            raise ValueError(f"split_by must be one of {SPLIT_BY}, got {self.split_by!r}")
        if self.on_bad_files not in ("error", "skip"):
            raise ValueError(f"on_bad_files must be 'error' or 'skip', got {self.on_bad_files!r}")
        split_names([], self.validation_share, self.test_share)  # checks the shares
        if isinstance(self.keep_columns, (str, bytes)):
            raise TypeError(f"keep_columns must be a tuple of column names, got the string {self.keep_columns!r}")
        unknown = set(self.keep_columns) - set(METADATA_COLUMNS)
        if unknown:
            raise ValueError(f"keep_columns must come from {METADATA_COLUMNS}, got {sorted(unknown)}")
        for name in ("num_rank_bins", "max_length", "interleave_files", "window_rows", "shard_multiple", "min_shards"):
            value = getattr(self, name)
            if (value is not None or name != "max_length") and not _is_positive_int(value):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("seed", "split_seed"):
            if not (_is_positive_int(getattr(self, name)) or getattr(self, name) == 0):
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        for split in ("validation", "test"):
            for kind in ("plates", "files", "pairs"):
                named = getattr(self, f"{split}_{kind}")
                if isinstance(named, (str, bytes)):
                    raise TypeError(f"{split}_{kind} must be a tuple of names, got the string {named!r}")
                used = {"plates": "plate", "files": "file", "pairs": "pair"}[kind]
                if named and self.split_by != used:
                    raise ValueError(f"{split}_{kind} holds out {kind}: give split_by={used!r}, not {self.split_by!r}")
        if self.panel is not None:
            panel = list(self.panel)
            bad = [g for g in panel if not _is_positive_int(g) or g < FIRST_GENE_TOKEN_ID]
            repeated = sorted(g for g in set(panel) if panel.count(g) > 1) if len(set(panel)) != len(panel) else []
            if bad or repeated:
                raise ValueError(f"panel must list distinct gene ids >= {FIRST_GENE_TOKEN_ID} (special tokens below), "
                                 f"got {bad[:5] or repeated[:5]}")  # fmt: skip
        for name in ("zero_share", "panel_share", "random_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a share in [0, 1], got {getattr(self, name)!r}")
        if self.split_by == "pair":
            if len(self.pair_columns) != 2 or not set(self.pair_columns) <= set(METADATA_COLUMNS):
                raise ValueError(f"split_by='pair' needs two pair_columns from {METADATA_COLUMNS}, got "
                                 f"{self.pair_columns}")  # fmt: skip
            for split in ("validation", "test"):
                pairs = tuple(tuple(condition_value(c, v) for c, v in zip(self.pair_columns, pair))
                              for pair in getattr(self, f"{split}_pairs"))  # fmt: skip
                setattr(self, f"{split}_pairs", pairs)
            both = set(self.validation_pairs) & set(self.test_pairs)
            if both:
                raise ValueError(f"pairs both in validation and test: {sorted(both)}")

    def held_out(self, split: str) -> tuple:
        """The plates, file names or value pairs of a held-out split (`split_by` "plate", "file" or "pair")."""
        kind = {"plate": "plates", "pair": "pairs"}.get(self.split_by, "files")
        return getattr(self, f"{split}_{kind}", ())


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
            homepage=f"https://huggingface.co/datasets/{self.config.hub_dataset}",
            license="cc0-1.0",
        )

    # Files, pieces and shards

    def input_files(self) -> tuple[list[str], str | None]:
        """The expression files (sorted) and the gene metadata file (None when there is none)."""
        data_files = self.config.data_files
        if data_files:
            files = [str(f) for split_files in data_files.values() for f in split_files]
            metadata_root = self.config.data_dir
        elif self.config.data_dir:
            files = sorted(str(p) for p in Path(self.config.data_dir, "data").glob("*.parquet"))
            metadata_root = self.config.data_dir
        else:
            from huggingface_hub import HfFileSystem

            pattern = f"datasets/{self.config.hub_dataset}/data/*.parquet"
            files = sorted("hf://" + p for p in HfFileSystem().glob(pattern))
            metadata_root = f"hf://datasets/{self.config.hub_dataset}"
        if not files:
            raise FileNotFoundError(f"no parquet files in data_files={data_files}, data_dir={self.config.data_dir}")
        metadata = self.config.gene_metadata
        if metadata is None and metadata_root is not None:
            candidate = f"{metadata_root}/metadata/gene_metadata.parquet"
            metadata = candidate if candidate.startswith("hf://") or os.path.exists(candidate) else None
        return sorted(set(files)), metadata

    def _bad_file(self, file: str, error: Exception) -> None:
        if self.config.on_bad_files == "error":
            raise ValueError(f"cannot read parquet file {file}: {error}") from error
        logger.warning("skipping unreadable parquet file %s: %s", file, error)

    def check_files(self, files: list[str]) -> dict[str, pq.FileMetaData]:
        """The footers of the readable files (read once); a file without the Tahoe columns is an error naming it."""
        footers = self.__dict__.setdefault("_footer_cache", {})
        for file in (f for f in files if f not in footers):
            try:
                with fsspec.open(file, "rb") as f:
                    footers[file] = pq.ParquetFile(f).metadata
            except (OSError, pa.ArrowException) as error:
                footers[file] = None
                self._bad_file(file, error)
                continue
            missing = missing_columns(footers[file].schema.to_arrow_schema())
            if missing:
                raise ValueError(f"{file} is not a Tahoe-layout expression_data file: it lacks the columns {missing}")
        return {file: footers[file] for file in files if footers.get(file) is not None}

    def schema(self) -> pa.Schema:
        """The Arrow schema of the first readable file."""
        for file in self.input_files()[0]:
            footer = self.check_files([file]).get(file)
            if footer is not None:
                return footer.schema.to_arrow_schema()
        raise ValueError(f"none of the files of {self.config.data_dir or self.config.data_files} can be read")

    def pieces(self, split: str) -> list[Piece]:
        """The pieces (files, or row groups when files are fewer than `min_shards`) that can hold cells of `split`:
        every piece for the barcode split, only those of its plates or files for a plate or file hold-out."""
        files, _ = self.input_files()
        config = self.config
        by_row_group = len(files) < config.min_shards
        local = not files[0].startswith("hf://")
        footers = self.check_files(files) if local or by_row_group or config.split_by == "plate" else {}
        if local or by_row_group:
            files = [f for f in files if f in footers]
        held = {name for s in ("validation", "test") for name in config.held_out(s)}
        wanted = set(config.held_out(split))
        if config.split_by == "file":
            files = [f for f in files if (Path(f).name in wanted if split != "train" else Path(f).name not in held)]
        pieces = [(f, g) for f in files for g in range(footers[f].num_row_groups)] if by_row_group else []
        pieces = pieces or [(f, None) for f in files]
        if config.split_by != "plate":
            return pieces
        if split != "train" and not wanted:
            return []

        def may_hold(piece: Piece) -> bool:
            plates = _plates_in(footers[piece[0]], piece[1])
            if plates is None:  # no statistics: read it and filter its rows
                return True
            return bool(plates & wanted) if split != "train" else bool(plates - held)

        return [piece for piece in pieces if may_hold(piece)]

    def check_held_out(self) -> None:
        """Raise, naming them, unless every plate or file a hold-out names is in the data: the files' names, the
        plates of their footers' statistics (the `plate` column is read only where the footers do not say)."""
        config = self.config
        if config.split_by not in ("plate", "file"):
            return
        named = {name for split in ("validation", "test") for name in config.held_out(split)}
        files, _ = self.input_files()
        if config.split_by == "file":
            present = {Path(file).name for file in files}
        else:
            plates = [_plates_in(footer, None) for footer in self.check_files(files).values()]
            if any(found is None for found in plates):
                present = {str(plate) for plate in self.distinct(["plate"])["plate"].to_pylist()}
            else:
                present = set().union(*plates)
        missing = sorted(named - present)
        if missing:
            shown = ", ".join(sorted(present)[:20]) + (", ..." if len(present) > 20 else "")
            raise ValueError(f"--split_by {config.split_by}: {missing} are not in the data; it holds {shown}")

    def shards(self, pieces: list[Piece]) -> list[tuple[Piece, ...]]:
        """Pieces dealt into shards of about `interleave_files`, after a seeded shuffle (so each shard holds pieces
        from across the data); the number of shards is a multiple of `shard_multiple` when there are enough."""
        config = self.config
        count = math.ceil(len(pieces) / config.interleave_files)
        count = min(len(pieces), math.ceil(count / config.shard_multiple) * config.shard_multiple)
        order = np.random.default_rng(config.seed).permutation(len(pieces))
        return [tuple(pieces[i] for i in sorted(order[k::count])) for k in range(count)]

    def known_genes(self) -> np.ndarray | None:
        """The vocabulary's gene ids (sorted), None without gene metadata."""
        _, metadata = self.input_files()
        if metadata is None:
            return None
        with fsspec.open(metadata, "rb") as f:
            return np.sort(pq.read_table(f, columns=["token_id"])["token_id"].to_numpy())

    def _split_generators(self, dl_manager):
        self.check_held_out()
        known_genes = self.known_genes()
        panel = np.asarray(self.config.panel or [], dtype=np.int64)
        if known_genes is not None and not np.isin(panel, known_genes).all():
            raise ValueError(f"panel: gene ids {panel[~np.isin(panel, known_genes)][:10].tolist()} are not genes of "
                             "gene_metadata")  # fmt: skip
        return [
            datasets.SplitGenerator(
                name=split,
                gen_kwargs={
                    "shards": self.shards(self.pieces(str(split))),
                    "split": str(split),
                    "tokenizer": self.cell_tokenizer(known_genes),
                    "known_genes": known_genes,
                },
            )
            for split in SPLITS
        ]

    def cell_tokenizer(self, known_genes: np.ndarray | None) -> CellTokenizer | None:
        """The selection rules of the config (None with `max_length=None`: every expressed gene is kept)."""
        config = self.config
        if config.max_length is None:
            return None
        if known_genes is None and (config.zero_share > 0 or config.random_share > 0):
            raise ValueError("zero_share > 0 and random_share > 0 need gene_metadata to draw genes from")
        return CellTokenizer(
            num_bins=config.num_rank_bins,
            max_length=config.max_length,
            zero_share=config.zero_share,
            panel_share=config.panel_share,
            random_share=config.random_share,
            seed=config.seed,
            gene_pool=known_genes,
            panel=np.array(config.panel) if config.panel is not None else None,
        )

    # Rows

    def split_of(self, table: pa.Table, file: str) -> np.ndarray:
        """The split name of every row of `table`, read from `file`."""
        config = self.config
        if config.split_by == "file":
            name = Path(file).name
            split = next((s for s in ("validation", "test") if name in config.held_out(s)), "train")
            return np.full(table.num_rows, split)
        if config.split_by == "pair":
            columns = [table.column(c).to_pylist() for c in config.pair_columns]
            pairs = [tuple(condition_value(c, v) for c, v in zip(config.pair_columns, pair)) for pair in zip(*columns)]
            drugs = table.column("drug").to_pylist() if config.control_drug else []
            drugs = [condition_value("drug", d) for d in drugs]
            return pair_split(pairs, drugs, table.column(CELL_ID_COLUMN).to_pylist(), config.test_pairs,
                              config.validation_pairs, config.control_drug, config.split_seed)  # fmt: skip
        if config.split_by == "plate":
            plates = np.array(table.column("plate").to_pylist(), dtype=object)
            splits = np.full(table.num_rows, "train", dtype=object)
            for split in ("validation", "test"):
                splits[np.isin(plates, list(config.held_out(split)))] = split
            return splits.astype(str)
        cell_ids = table.column(CELL_ID_COLUMN).to_pylist()
        return split_names(cell_ids, config.validation_share, config.test_share, config.split_seed)

    def tokenize(
        self, table: pa.Table, tokenizer: CellTokenizer | None, known_genes
    ) -> tuple[pa.Table, TokenizedBatch]:
        """Raw Tahoe rows -> the output columns of the good rows, and the tokenized batch (which rows were skipped
        and why)."""
        batch = tokenize_arrow_batch(table, self.config.num_rank_bins, known_genes)
        kept = table if batch.kept.all() else table.filter(pa.array(batch.kept))
        offsets, gene_ids, input_ids = batch.offsets, batch.gene_ids, batch.ranks
        if tokenizer is not None:
            cell_ids = kept.column(CELL_ID_COLUMN).to_pylist()
            offsets, gene_ids, input_ids = tokenizer.select_batch(offsets, gene_ids, input_ids, cell_ids)
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
        return pa.table(columns), batch

    def _blocks(self, piece: Piece, rows: int, columns: list[str] | None = None):
        """Record batches of `rows` rows of one piece (the list columns, the kept metadata, the cell id and plate
        by default); a file that cannot be read ends with a warning."""
        file, row_group = piece
        columns = columns or ["genes", "expressions", *self.config.keep_columns, *self.split_columns]
        try:
            with fsspec.open(file, "rb") as f:
                parquet = pq.ParquetFile(f)
                columns = [c for c in dict.fromkeys(columns) if c in parquet.schema_arrow.names]
                groups = [row_group] if row_group is not None else None
                yield from parquet.iter_batches(rows, row_groups=groups, columns=columns)
        except Exception as error:  # not `except (OSError, ...)`: evaluated when a generator closes at exit
            if not isinstance(error, (OSError, pa.ArrowException)):
                raise
            self._bad_file(file, error)

    @property
    def split_columns(self) -> list[str]:
        """The columns the split of a row is read from."""
        control = ["drug"] if self.config.control_drug and "drug" not in self.config.pair_columns else []
        return [CELL_ID_COLUMN, "plate", *self.config.pair_columns, *control]

    def distinct(self, columns: list[str]) -> pa.Table:
        """The distinct combinations of metadata `columns` over every file (only those columns are read; a
        condition's vocabulary and the pairs a screen holds)."""
        parts = []
        for file in tqdm(self.input_files()[0], desc="reading conditions", unit="file"):
            for batch in self._blocks((file, None), 1 << 16, columns=columns):
                table = pa.Table.from_batches([batch]).select(columns)
                parts.append(table.group_by(columns, use_threads=False).aggregate([]))
        if not parts:
            raise ValueError(f"no readable rows to read {columns} from")
        table = pa.concat_tables(parts, promote_options="permissive")
        return table.group_by(columns, use_threads=False).aggregate([])

    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose window shuffles the next iteration draws (DataLoader workers copy it when an epoch's
        iterator is made, as they copy the collator; [`EpochCallback`] sets both)."""
        self.epoch = epoch

    def _generate_tables(self, shards, split, tokenizer, known_genes):
        for shard_idx, pieces in enumerate(shards):
            readers = {piece: _RowReader(self._blocks(piece, READ_ROWS)) for piece in pieces}
            skipped = {piece: Counter() for piece in pieces}
            salt = _piece_salt(pieces[0])  # fixed by the shard's content, not its place in the order
            window = 0
            while readers:
                blocks, rows, sources, offset = [], [], [], 0  # a part of each live piece; its rows in the split
                part = -(-self.config.window_rows // len(readers))
                for piece in list(readers):
                    block = readers[piece].take(part)
                    if block is None:
                        del readers[piece]
                        _report_skipped(piece, split, skipped.pop(piece))
                        continue
                    in_split = np.flatnonzero(self.split_of(block, piece[0]) == split)
                    rows.append(in_split + offset)
                    sources += [piece] * len(in_split)
                    blocks.append(block)
                    offset += len(block)
                rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
                if len(rows):  # one copy of the window: its cells in the split, shuffled
                    seed = [self.config.seed, self.epoch, salt, window]
                    order = np.random.default_rng(seed).permutation(len(rows))
                    table = pa.concat_tables(blocks, promote_options="permissive").take(rows[order])
                    table, batch = self.tokenize(table, tokenizer, known_genes)
                    for row in np.flatnonzero(~batch.kept):
                        skipped[sources[order[row]]][SKIP_REASONS[batch.reasons[row]]] += 1
                    yield Key(shard_idx, window), table
                window += 1

    def sample_cells(self, sizes: dict[str, int], seed: int = 0, max_files: int = 64) -> dict[str, pa.Table]:
        """Raw Tahoe rows drawn across the data, for fitting baselines and scoring: `sizes[split]` cells of each
        split (fewer when its files hold fewer), bad rows skipped by the same policy as the stream.

        The pieces that can hold a split are cut, in file order, into `max_files` strata and one piece is drawn
        from each (so every plate of plate-grouped files is in the sample); each drawn piece gives an equal share
        of cells, a seeded uniform draw of its rows in the split. Only the cell-id and plate columns of a piece are
        read to draw its rows, then the drawn rows' lists.
        """
        known_genes = self.known_genes()
        wanted: dict[Piece, dict[str, int]] = {}
        for split, size in sizes.items():
            pieces = self.pieces(split)
            if not pieces or size <= 0:
                continue
            rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
            strata = np.array_split(np.arange(len(pieces)), min(max_files, len(pieces)))
            drawn = [pieces[rng.choice(stratum)] for stratum in strata]
            for index, piece in enumerate(drawn):
                share = size // len(drawn) + (index < size % len(drawn))
                wanted.setdefault(piece, {})[split] = share
        parts: dict[str, list[pa.Table]] = {split: [] for split in sizes}
        for piece, shares in tqdm(sorted(wanted.items()), desc="sampling cells across the files", unit="file"):
            keys = [b for b in self._blocks(piece, 1 << 16, columns=self.split_columns)]
            if not keys:
                continue
            splits = self.split_of(pa.Table.from_batches(keys), piece[0])
            rng = np.random.default_rng([seed, _piece_salt(piece)])
            chosen = {}
            for split, share in shares.items():
                rows = np.flatnonzero(splits == split)
                chosen[split] = np.sort(rng.choice(rows, min(share, len(rows)), replace=False))
            start, skipped = 0, Counter()
            for record_batch in self._blocks(piece, 4096):
                table = pa.Table.from_batches([record_batch])
                for split, rows in chosen.items():
                    inside = rows[(rows >= start) & (rows < start + table.num_rows)] - start
                    if len(inside):
                        picked = table.take(inside)
                        kept = tokenize_arrow_batch(picked, self.config.num_rank_bins, known_genes)
                        skipped.update(kept.skipped)
                        parts[split].append(picked if kept.kept.all() else picked.filter(pa.array(kept.kept)))
                start += table.num_rows
            _report_skipped(piece, "sampled", skipped)
        return {
            split: pa.concat_tables(tables, promote_options="permissive") if tables else None
            for split, tables in parts.items()
        }


class _RowReader:
    """The next `n` rows of a stream of record batches, as a table of zero-copy slices."""

    def __init__(self, batches):
        self.batches, self.batch, self.start = batches, None, 0

    def take(self, n: int) -> pa.Table | None:
        slices = []
        while n > 0:
            if self.batch is None or self.start >= len(self.batch):
                self.batch, self.start = next(self.batches, None), 0
                if self.batch is None:
                    break
            slices.append(self.batch.slice(self.start, n))
            self.start += len(slices[-1])
            n -= len(slices[-1])
        return pa.Table.from_batches(slices) if slices else None


def _piece_salt(piece: Piece) -> int:
    """A seed salt of a piece from its file name and row group, not its folder: the same data gives the same
    stream and samples wherever it lies (a copy, a clone, the Hub)."""
    return zlib.crc32(f"{Path(piece[0]).name}:{piece[1]}".encode())


def _plates_in(footer: pq.FileMetaData, row_group: int | None) -> set[str] | None:
    """The plates of a file (or one row group) from the footer's statistics; None when they do not say."""
    names = footer.schema.names
    if "plate" not in names:
        return None
    column = names.index("plate")
    plates = set()
    for group in [row_group] if row_group is not None else range(footer.num_row_groups):
        stats = footer.row_group(group).column(column).statistics
        if stats is None or not stats.has_min_max or stats.min != stats.max:
            return None
        plates.add(stats.min.decode() if isinstance(stats.min, bytes) else stats.min)
    return plates


def _report_skipped(piece: Piece, split: str, skipped: Counter) -> None:
    if skipped:
        file, row_group = piece
        where = file if row_group is None else f"{file} (row group {row_group})"
        logger.warning("%s, %s split: skipped %d cells: %s", where, split, sum(skipped.values()), dict(skipped))


def _is_positive_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1
