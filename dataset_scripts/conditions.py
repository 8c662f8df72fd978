"""Perturbation conditions of Tahoe-100M cells: which drug at which dose, and condition vocabularies.

Tahoe-100M rows name the drug (`drug`) and the well (`sample`), not the dose: the dose is in
`metadata/sample_metadata.parquet`, column `drugname_drugconc`, a Python literal such as
`[('Bortezomib', 0.5, 'uM')]` (the control is `[('DMSO_TF', 0.0, 'uM')]`), joined on `sample`. Drug names vary
between tables (trailing spaces, `"Trametinib (DMSO_TF solvate)"`): [`drug_key`] is the one identity of a drug.
"""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch

from modeling.conditions import DOSE, ConditionEncoder

from .splits import held_out_fraction

CONTROL_DRUG = "DMSO_TF"
SAMPLE_METADATA_PATH = "metadata/sample_metadata.parquet"
UNITS_IN_UM = {"nM": 1e-3, "uM": 1.0, "µM": 1.0, "mM": 1e3, "M": 1e6}
_SOLVATE = re.compile(r"\s*\([^()]*\bsolvate\)\s*$", flags=re.IGNORECASE)


def drug_key(name: str) -> str:
    """A drug's identity across Tahoe's tables: the name without surrounding spaces or a solvate suffix
    (`"Ibuprofen "` and `"Metformin (DMSO_TF solvate)"` are `"Ibuprofen"` and `"Metformin"`)."""
    return _SOLVATE.sub("", name.strip()).strip()


def condition_value(column: str, value) -> str | None:
    """A condition's value as the model keys it: drugs by [`drug_key`], everything else as a string (None stays)."""
    if value is None:
        return None
    return drug_key(str(value)) if column == "drug" else str(value)


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
    path = f"{root}/{SAMPLE_METADATA_PATH}" if str(root).startswith("hf://") else Path(root) / SAMPLE_METADATA_PATH
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


@dataclass
class CellConditions:
    """Each cell's conditions read from its row and encoded for the model, with condition dropout for
    classifier-free guidance.

    Args:
        encoder ([`ConditionEncoder`]): the model's vocabularies.
        dose_of_sample (`dict[str, float]`, *optional*): each well's dose in uM ([`sample_conditions`]), for rows
            that name their well (`sample`) rather than carry a `dose` column.
        dropout (`float`, defaults to 0): share of cells whose conditions are all replaced by the nulls, drawn by a
            hash of (seed, epoch, cell id): the same cells after a resume, other cells each epoch.
        seed (`int`, defaults to 0): salt of that draw.
    """

    encoder: ConditionEncoder
    dose_of_sample: dict[str, float] | None = None
    dropout: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"condition dropout must be in [0, 1), got {self.dropout}")
        if self.encoder.dose_condition and self.dose_of_sample is None:
            raise ValueError("a dose-conditioned model needs each well's dose (sample_conditions) or a dose column")

    def __call__(self, columns: dict, cell_ids: list[str], epoch: int = 0) -> dict[str, torch.Tensor]:
        """`{"condition_ids": (n, k), "doses": (n,)}` for the cells of `columns` (a dict of per-cell lists: each
        categorical condition, and `dose` or the well, `sample`, whose dose the metadata gives).

        Raises:
            KeyError: a condition's column is missing (named with the columns there are).
        """
        n = len(cell_ids)
        needed = [*self.encoder.values, *(["sample"] if self.encoder.dose_condition and DOSE not in columns else [])]
        missing = [name for name in needed if name not in columns]
        if missing:
            raise KeyError(f"the rows lack the condition columns {missing}; they have {sorted(columns)}")
        values = {name: [condition_value(name, v) for v in columns[name]] for name in self.encoder.values}
        if self.encoder.dose_condition:
            if DOSE in columns:
                values[DOSE] = list(columns[DOSE])
            else:
                values[DOSE] = [self._dose(sample) for sample in columns["sample"]]
        ids, doses = self.encoder.encode_columns(values, n)
        if self.dropout > 0:
            dropped = np.array([held_out_fraction(f"{epoch}:{cell}", self.seed) < self.dropout for cell in cell_ids])
            ids[dropped], doses[dropped] = 0, np.nan
        out = {"condition_ids": torch.from_numpy(ids)} if self.encoder.values else {}
        if self.encoder.dose_condition:
            out["doses"] = torch.from_numpy(doses).float()
        return out

    def _dose(self, sample) -> float:
        if sample is None or str(sample) not in self.dose_of_sample:
            return float("nan")  # a well without metadata: the dose is unknown, its null
        return self.dose_of_sample[str(sample)]
