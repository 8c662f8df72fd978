"""Data sources of RankDiff: Tahoe-100M-schema rows, the held-out split and the training collator."""

from .expression_data import (
    EMBEDDED_SAMPLE,
    EpochCallback,
    ExpressionSource,
    RankDiffusionCollator,
    cell_counts,
    is_hub_dataset_id,
    load_expression_data,
    pad_cells,
    read_gene_vocab,
    shard_for_process,
    split_by_cell_id,
    split_names,
    with_length_column,
)

__all__ = [
    "EMBEDDED_SAMPLE",
    "EpochCallback",
    "ExpressionSource",
    "RankDiffusionCollator",
    "cell_counts",
    "is_hub_dataset_id",
    "load_expression_data",
    "pad_cells",
    "read_gene_vocab",
    "shard_for_process",
    "split_by_cell_id",
    "split_names",
    "with_length_column",
]
