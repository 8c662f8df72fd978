"""The Arrow schemas of Tahoe-100M (`tahoebio/Tahoe-100M` on the Hub), shared by every writer and reader here."""

import pyarrow as pa

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

# Position 0 of every `expression_data` row: gene `<cls>` with expression -2.
CLS_TOKEN_ID, CLS_VALUE = 1, -2.0
FIRST_GENE_TOKEN_ID = 3
