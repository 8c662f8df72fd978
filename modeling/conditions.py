"""A cell's perturbation conditions, all in one place: the values as the model keys them, their ids, the dose, the
condition dropout of training and classifier-free guidance over them.

The config lists each categorical condition's values (`config.conditions`: value i has id i + 1, id 0 is the
learned null value) and whether the dose (uM) is a condition (`config.dose_condition`; NaN is its null). Drugs are
keyed by [`drug_key`] (Tahoe's tables write one drug several ways). Training replaces a cell's conditions by the
nulls at a rate (condition dropout), so one model is both conditional and unconditional, and sampling can
extrapolate from the one to the other ([`guided_logits`]).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

DOSE = "dose"
# The perturbation of a cell, as opposed to its context (the cell line, the plate): what factorised condition
# dropout removes alone and what factorised guidance contrasts.
PERTURBATION = ("drug", DOSE)
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


def _is_null(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def dropped_cells(
    cell_ids: Sequence[str], rate: float, seed: int = 0, epoch: int = 0, what: str = "conditions"
) -> np.ndarray:
    """Which cells have `what` (all their conditions, or the perturbation) replaced by the nulls (condition
    dropout): each with probability `rate`, by a hash of (what, seed, epoch, cell id), so a resumed run drops the
    same cells, each epoch drops others and the two kinds of dropout are drawn apart."""
    if rate <= 0:
        return np.zeros(len(cell_ids), dtype=bool)
    keys = (f"{what}:{seed}:{epoch}:{cell}".encode() for cell in cell_ids)
    draws = [int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") / 2**64 for key in keys]
    return np.array(draws) < rate


def table_conditions(obs, condition_columns) -> list[dict] | None:
    """One conditions dict per row of a table (an AnnData's `obs`) from `condition_columns` (names, or condition ->
    column); None without columns. Missing values (NaN) are the condition's null."""
    if isinstance(condition_columns, (str, bytes)):
        raise TypeError(f"condition_columns must be a list of obs column names (or a dict), got {condition_columns!r}")
    if not condition_columns:
        return None
    columns = dict(condition_columns) if isinstance(condition_columns, dict) else {c: c for c in condition_columns}
    missing = [column for column in columns.values() if column not in obs.columns]
    if missing:
        raise KeyError(f"condition columns {missing} are not in obs; its columns: {list(obs.columns)}")
    values = {
        name: obs[column].astype(object).where(obs[column].notna(), None).tolist() for name, column in columns.items()
    }
    return [{name: values[name][i] for name in columns} for i in range(len(obs))]


class ConditionEncoder:
    """Value -> id of each categorical condition of a model, and the dose as a number.

    Args:
        conditions (`dict[str, list[str]]`, *optional*): each condition's values in id order (`config.conditions`).
        dose_condition (`bool`, defaults to `False`): whether the dose (uM) is a condition.
        control_drug (`str`, *optional*): the control (vehicle) drug, which a caller may not tell with a dose > 0.
    """

    def __init__(self, conditions: Mapping[str, Sequence[str]] | None = None, dose_condition: bool = False,
                 control_drug: str | None = None):  # fmt: skip
        self.values = {name: [str(v) for v in values] for name, values in (conditions or {}).items()}
        self._ids = {name: {v: i + 1 for i, v in enumerate(values)} for name, values in self.values.items()}
        self.dose_condition = dose_condition
        self.control_drug = condition_value("drug", control_drug)

    @classmethod
    def from_config(cls, config) -> ConditionEncoder:
        return cls(config.conditions, config.dose_condition, getattr(config, "control_drug", None))

    @property
    def names(self) -> list[str]:
        """Every condition a caller may give: the categorical ones, then `"dose"` when it is one."""
        return [*self.values, *([DOSE] if self.dose_condition else [])]

    def __bool__(self) -> bool:
        return bool(self.names)

    @property
    def perturbation_columns(self) -> list[int]:
        """The columns of `condition_ids` that hold the perturbation (the drug; the dose, the other half of
        [`PERTURBATION`], is `doses`)."""
        return [i for i, name in enumerate(self.values) if name in PERTURBATION]

    def ids(self, name: str, values: Sequence) -> np.ndarray:
        """Ids of one condition's `values` (None or NaN: the null id 0); drugs are compared by [`drug_key`].

        Raises:
            KeyError: a value the model was not trained on, named with (some of) the known ones.
        """
        table, out = self._ids[name], np.zeros(len(values), dtype=np.int64)
        for i, value in enumerate(values):
            if _is_null(value):
                continue
            key = condition_value(name, value)
            if key not in table:
                known = self.values[name]
                shown = ", ".join(known[:10]) + (", ..." if len(known) > 10 else "")
                raise KeyError(f"unknown {name} {value!r}: the model knows {len(known)} ({shown})")
            out[i] = table[key]
        return out

    def encode_columns(self, columns: Mapping[str, Sequence], n_cells: int) -> tuple[np.ndarray, np.ndarray]:
        """`(condition_ids (n_cells, n_categorical), doses (n_cells,))` of per-cell columns; a condition missing
        from `columns` is null for every cell (doses NaN)."""
        unknown = sorted(set(columns) - set(self.names))
        if unknown:
            raise KeyError(f"unknown conditions {unknown}: the model is conditioned on {self.names or 'nothing'}")
        ids = np.zeros((n_cells, len(self.values)), dtype=np.int64)
        for column, name in enumerate(self.values):
            if name in columns:
                ids[:, column] = self.ids(name, list(columns[name]))
        doses = np.full(n_cells, np.nan)
        if DOSE in columns:
            doses = np.asarray([dose_value(d, cell) for cell, d in enumerate(columns[DOSE])], dtype=np.float64)
        return ids, doses

    def encode(
        self, conditions: Mapping | Sequence[Mapping] | None, n_cells: int
    ) -> tuple[torch.LongTensor | None, torch.Tensor | None]:
        """The model's `condition_ids` and `doses` for `conditions`: one dict for every cell, a list of one dict
        per cell, or None (every condition null). A condition left out of a dict, or None, is null for that cell.

        Raises:
            ValueError: a list of the wrong length, or conditions for a model that has none.
            KeyError: an unknown condition or value (named).
        """
        if conditions is None:
            return None, None
        if not self:
            raise ValueError("this model has no conditions (config.conditions, config.dose_condition)")
        rows = [conditions] * n_cells if isinstance(conditions, Mapping) else list(conditions)
        if len(rows) != n_cells or not all(isinstance(row, Mapping) for row in rows):
            raise ValueError(f"conditions must be one dict or a list of {n_cells} dicts (one per cell)")
        names = list(dict.fromkeys(name for row in rows for name in row))
        ids, doses = self.encode_columns({name: [row.get(name) for row in rows] for name in names}, n_cells)
        control_id = self._ids.get("drug", {}).get(self.control_drug)
        if control_id is not None and DOSE in names:
            dosed = np.flatnonzero((ids[:, list(self.values).index("drug")] == control_id) & (doses > 0))
            if len(dosed):
                raise ValueError(f"cell {dosed[0]}: {self.control_drug} is the control (the vehicle, no drug): its "
                                 f"dose is 0 or unknown, got {rows[dosed[0]][DOSE]!r}")  # fmt: skip
        return torch.from_numpy(ids), torch.from_numpy(doses).float()

    def encode_rows(
        self,
        columns: Mapping[str, Sequence],
        cell_ids: Sequence[str],
        *,
        dose_of_sample: Mapping[str, float] | None = None,
        dropout: float = 0.0,
        perturbation_dropout: float = 0.0,
        seed: int = 0,
        epoch: int = 0,
    ) -> dict[str, torch.Tensor]:
        """The conditions of training rows (`columns`: per-cell lists) as the model's keyword arguments, with
        condition dropout ([`dropped_cells`]): every condition of `dropout` of the cells, and the perturbation alone
        (drug and dose, the line kept) of `perturbation_dropout` of them. The dose comes from a `dose` column or,
        for rows that name their well (`sample`, Tahoe), from `dose_of_sample` (a well without one: an unknown dose).

        Raises:
            KeyError: a condition's column is missing (named with the columns there are).
        """
        by_sample = self.dose_condition and DOSE not in columns
        needed = [*self.values, *(["sample"] if by_sample else [])]
        missing = [name for name in needed if name not in columns]
        if missing:
            raise KeyError(f"the rows lack the condition columns {missing}; they have {sorted(columns)}")
        if by_sample and dose_of_sample is None:
            raise ValueError("a dose-conditioned model needs each well's dose (dose_of_sample) or a dose column")
        values = {name: list(columns[name]) for name in self.values}
        if self.dose_condition:
            samples = columns["sample"] if by_sample else None
            values[DOSE] = list(columns[DOSE]) if not by_sample else [
                float("nan") if s is None else dose_of_sample.get(str(s), float("nan")) for s in samples
            ]  # fmt: skip
        ids, doses = self.encode_columns(values, len(cell_ids))
        dropped = dropped_cells(cell_ids, dropout, seed, epoch)
        ids[dropped], doses[dropped] = 0, np.nan
        perturbation = dropped_cells(cell_ids, perturbation_dropout, seed, epoch, what="perturbation")
        ids[np.ix_(perturbation, self.perturbation_columns)], doses[perturbation] = 0, np.nan
        out = {"condition_ids": torch.from_numpy(ids)} if self.values else {}
        if self.dose_condition:
            out["doses"] = torch.from_numpy(doses).float()
        return out


def dose_value(dose, cell: int) -> float:
    """A cell's dose as the model takes it: a finite number >= 0 in uM; None or NaN is an unknown dose. A string
    (`"5 uM"`), a list, a boolean or an infinite dose is an error naming the cell."""
    number = isinstance(dose, (int, float, np.integer, np.floating)) and not isinstance(dose, (bool, np.bool_))
    if dose is None or (number and math.isnan(dose)):
        return float("nan")
    if not (number and math.isfinite(dose) and dose >= 0):
        raise ValueError(f"cell {cell}: the dose must be a number >= 0 in uM (None or NaN: unknown), got {dose!r}")
    return float(dose)


def warn_if_guidance_unused(guidance_scale: float, conditions, config) -> None:
    """Say so when a guidance scale other than 1 can have no effect: no conditions given, or a model without any."""
    if guidance_scale != 1.0 and (conditions is None or not (config.conditions or config.dose_condition)):
        logger.warning("guidance_scale=%s has no effect without conditions (and a conditioned model)", guidance_scale)


def check_guidance_scale(guidance_scale) -> None:
    """Refuse a guidance scale that is not a finite number >= 0 (NaN or inf would give NaN distributions)."""
    number = isinstance(guidance_scale, (int, float, np.integer, np.floating)) and not isinstance(
        guidance_scale, (bool, np.bool_)
    )
    if not (number and math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise ValueError(
            f"guidance_scale must be a number >= 0 (1: conditional, 0: unconditional), got {guidance_scale!r}"
        )


def guided_logits(model, inputs: dict, guidance_scale: float = 1.0) -> torch.Tensor:
    """The denoiser's float32 output for `inputs` (the model's keyword arguments), under classifier-free guidance.

    With a guidance scale w other than 1 and conditions given, the result is the log-probabilities
    `log p(x | null) + w * (log p(x | c) - log p(x | null))` (softmax renormalises them): w = 1 is the conditional
    model, w = 0 the null one, w > 1 pushes away from it. The null is every condition null, or, for a model trained
    with factorised dropout (`config.factorized_guidance`), the perturbation alone (drug and dose null, the line
    kept): `log p(x | line) + w (log p(x | line, drug, dose) - log p(x | line))`. Both are evaluated in one pass of
    twice the batch.
    """
    conditioned = inputs.get("condition_ids") is not None or inputs.get("doses") is not None
    if guidance_scale == 1.0 or not conditioned:
        return _finite(model(**inputs).logits.float())
    batch = next(v for v in inputs.values() if isinstance(v, torch.Tensor)).shape[0]
    ids, doses = inputs.get("condition_ids"), inputs.get("doses")
    null_ids = None
    if ids is not None:
        nulled = torch.zeros_like(ids)
        if getattr(model.config, "factorized_guidance", False):
            perturbation = ConditionEncoder.from_config(model.config).perturbation_columns
            nulled = ids.clone()
            nulled[:, perturbation] = 0
        null_ids = torch.cat([ids, nulled])
    null_doses = None if doses is None else torch.cat([doses, torch.full_like(doses, float("nan"))])
    doubled = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    doubled.update(condition_ids=null_ids, doses=null_doses)
    log_probs = torch.log_softmax(model(**doubled).logits.float(), dim=-1)
    conditional, unconditional = log_probs[:batch], log_probs[batch:]
    return _finite(unconditional + guidance_scale * (conditional - unconditional))


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """`logits`, refused if any is NaN or infinite (a draw from them would be a silent, arbitrary token). On an
    accelerator the check is a device-side assertion, so the host does not wait for the device."""
    if logits.device.type != "cpu" or torch.compiler.is_compiling():
        torch._assert_async(torch.isfinite(logits).all(), "the denoiser returned NaN or infinite logits")
    elif not torch.isfinite(logits).all():
        row, position, _ = (int(i) for i in (~torch.isfinite(logits)).nonzero()[0])
        raise ValueError(f"the denoiser returned NaN or infinite logits (first at window {row}, position {position}): "
                         "its weights or its inputs hold NaN or infinite values")  # fmt: skip
    return logits
