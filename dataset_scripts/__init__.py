"""Data sources of RankDiff: the Tahoe-100M stream, Tahoe-schema rows, the held-out split and the collator."""

from .expression_data import (
    EMBEDDED_SAMPLE,
    EpochCallback,
    ExpressionSource,
    RankDiffusionCollator,
    cell_counts,
    is_hub_dataset_id,
    load_expression_data,
    read_gene_vocab,
    shard_for_process,
    tahoe_builder,
    tokenized_cells,
)
from .splits import split_by_cell_id, split_names
from .tahoe_100m_tokenized import Tahoe100MTokenized

__all__ = [
    "EMBEDDED_SAMPLE",
    "EpochCallback",
    "ExpressionSource",
    "RankDiffusionCollator",
    "Tahoe100MTokenized",
    "cell_counts",
    "is_hub_dataset_id",
    "load_expression_data",
    "read_gene_vocab",
    "shard_for_process",
    "split_by_cell_id",
    "split_names",
    "tahoe_builder",
    "tokenized_cells",
]
