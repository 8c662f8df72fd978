"""Tahoe-100M's metadata of a well: which drug at which dose.

Tahoe-100M rows name the drug (`drug`) and the well (`sample`), not the dose: the dose is in
`metadata/sample_metadata.parquet`, column `drugname_drugconc`, a Python literal such as
`[('Bortezomib', 0.5, 'uM')]` (the control is `[('DMSO_TF', 0.0, 'uM')]`), joined on `sample`. Drug names vary
between tables (trailing spaces, `"Trametinib (DMSO_TF solvate)"`): [`modeling.conditions.drug_key`] is the one
identity of a drug. Each drug's structure is in `metadata/drug_metadata.parquet`, column `canonical_smiles`. How
conditions reach the model is `modeling/conditions.py`'s.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import fsspec
import pyarrow.parquet as pq

from modeling.conditions import drug_key

CONTROL_DRUG = "DMSO_TF"
SAMPLE_METADATA_PATH = "metadata/sample_metadata.parquet"
DRUG_METADATA_PATH = "metadata/drug_metadata.parquet"
UNITS_IN_UM = {"nM": 1e-3, "uM": 1.0, "µM": 1.0, "mM": 1e3, "M": 1e6}


def parse_drug_doses(value: str, *, where: str = "drugname_drugconc") -> list[tuple[str, float]]:
    """`"[('Bortezomib', 0.5, 'uM')]"` -> `[("Bortezomib", 0.5)]`: (drug key, dose in uM) for each drug of a well.

    Raises:
        ValueError: the value is not a list of (name, number, unit) with a known unit; the message names it.
    """
    try:
        entries = ast.literal_eval(value)
        pairs = []
        for name, amount, unit in entries:
            if unit not in UNITS_IN_UM:
                raise ValueError(f"unknown unit {unit!r} (known: {sorted(UNITS_IN_UM)})")
            pairs.append((drug_key(str(name)), float(amount) * UNITS_IN_UM[unit]))
    except (ValueError, TypeError, SyntaxError) as error:
        raise ValueError(f"{where}: cannot read {value!r} as [(drug, dose, unit), ...]: {error}") from error
    if not pairs:
        raise ValueError(f"{where}: {value!r} names no drug")
    return pairs


def sample_conditions(root: str | os.PathLike) -> dict[str, tuple[str, float]]:
    """Each well's (drug key, dose in uM), read from `ROOT/metadata/sample_metadata.parquet` of a Tahoe-layout
    folder (local or `hf://`). The control's dose is 0.

    Raises:
        FileNotFoundError: the metadata file is missing (named).
        ValueError: a column is missing, or a well holds several drugs (combinations are not modelled).
    """
    path = _metadata_path(root, SAMPLE_METADATA_PATH)
    if not str(path).startswith("hf://") and not Path(path).exists():
        raise FileNotFoundError(f"no sample metadata: expected {path} (its drugname_drugconc gives each well's dose)")
    with fsspec.open(str(path), "rb") as f:
        schema = pq.read_schema(f)
        missing = [c for c in ("sample", "drugname_drugconc") if c not in schema.names]
        if missing:
            raise ValueError(f"{path} lacks the columns {missing}")
        table = pq.read_table(f, columns=["sample", "drugname_drugconc"])
    conditions = {}
    for sample, value in zip(table["sample"].to_pylist(), table["drugname_drugconc"].to_pylist()):
        pairs = parse_drug_doses(value, where=f"{path}, sample {sample!r}")
        if len(pairs) > 1:
            raise ValueError(f"{path}: sample {sample!r} holds several drugs {pairs}; combinations are not modelled")
        conditions[str(sample)] = pairs[0]
    return conditions


def _metadata_path(root: str | os.PathLike, relative: str) -> str | Path:
    return f"{root}/{relative}" if str(root).startswith("hf://") else Path(root) / relative


def drug_smiles(root: str | os.PathLike) -> dict[str, str]:
    """Each drug's canonical SMILES (drug key -> SMILES) from `ROOT/metadata/drug_metadata.parquet` of a
    Tahoe-layout folder (local or `hf://`); empty where the file, its `canonical_smiles` column or a drug's value is
    missing (a drug is then known by its id alone)."""
    try:
        with fsspec.open(str(_metadata_path(root, DRUG_METADATA_PATH)), "rb") as f:
            if not {"drug", "canonical_smiles"} <= set(pq.read_schema(f).names):
                return {}
            table = pq.read_table(f, columns=["drug", "canonical_smiles"])
    except FileNotFoundError:
        return {}
    pairs = zip(table["drug"].to_pylist(), table["canonical_smiles"].to_pylist())
    return {
        drug_key(str(drug)): str(smiles).strip() for drug, smiles in pairs if drug and smiles and str(smiles).strip()
    }
