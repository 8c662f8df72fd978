"""The Arrow schemas of Tahoe-100M (`tahoebio/Tahoe-100M` on the Hub), shared by every writer and reader here."""

import numpy as np
import pyarrow as pa

from modeling.gene_vocab import FIRST_GENE_ID, SPECIAL_TOKENS

EXPRESSION_SCHEMA = pa.schema(
    [
        ("genes", pa.list_(pa.int64())),
        ("expressions", pa.list_(pa.float32())),
        ("drug", pa.string()),
        ("sample", pa.string()),
        ("BARCODE_SUB_LIB_ID", pa.string()),
        ("cell_line_id", pa.string()),
        ("moa-fine", pa.string()),
        ("canonical_smiles", pa.string()),
        ("pubchem_cid", pa.string()),
        ("plate", pa.string()),
    ]
)
GENE_METADATA_SCHEMA = pa.schema([("token_id", pa.int64()), ("ensembl_id", pa.string()), ("gene_symbol", pa.string())])

# Unique per cell: the id that seeds per-cell draws and the held-out split.
CELL_ID_COLUMN = "BARCODE_SUB_LIB_ID"
# RankDiff's one addition, in rows read from AnnData: the counts of the cell's genes outside the vocabulary (list of
# float32), which shape its rank bins without being listed.
CONTEXT_COLUMN = "context_expressions"

# Every column of a row but the two lists: the cell's metadata.
METADATA_COLUMNS = tuple(name for name in EXPRESSION_SCHEMA.names if name not in ("genes", "expressions"))

# Position 0 of every `expression_data` row: gene `<cls>` with expression -2 (the ids are the vocabulary's).
CLS_TOKEN_ID = next(token_id for token_id, name in SPECIAL_TOKENS.items() if name == "<cls>")
CLS_VALUE = -2.0
FIRST_GENE_TOKEN_ID = FIRST_GENE_ID


def marker_positions(offsets: np.ndarray, genes: np.ndarray, expressions: np.ndarray) -> np.ndarray:
    """Flat positions of the `<cls>` markers of cells laid out by `offsets` (cell i holds `genes[offsets[i]:
    offsets[i + 1]]` and their expressions): a cell's first position when it is gene `<cls>` with value -2. Any other
    negative value is a bad count, not a marker. This is the one place that says how to find it."""
    first = offsets[:-1][np.diff(offsets) > 0]
    return first[(genes[first] == CLS_TOKEN_ID) & (expressions[first] == CLS_VALUE)]


def missing_columns(schema) -> list[str]:
    """The columns a Tahoe-layout `expression_data` file needs that `schema` (a pyarrow schema) lacks."""
    return [name for name in ("genes", "expressions", CELL_ID_COLUMN) if name not in schema.names]
