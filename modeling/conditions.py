"""A cell's perturbation conditions as the denoiser takes them, and classifier-free guidance over them.

The config lists each categorical condition's values (`config.conditions`: value i has id i + 1, id 0 is the
learned null value) and whether the dose (uM) is a condition (`config.dose_condition`; NaN is its null). Training
replaces a cell's conditions by the nulls at a rate (condition dropout), so one model is both conditional and
unconditional, and sampling can extrapolate from the one to the other ([`guided_logits`]).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

DOSE = "dose"


class ConditionEncoder:
    """Value -> id of each categorical condition of a model, and the dose as a number.

    Args:
        conditions (`dict[str, list[str]]`, *optional*): each condition's values in id order (`config.conditions`).
        dose_condition (`bool`, defaults to `False`): whether the dose (uM) is a condition.
    """

    def __init__(self, conditions: Mapping[str, Sequence[str]] | None = None, dose_condition: bool = False):
        self.values = {name: [str(v) for v in values] for name, values in (conditions or {}).items()}
        self._ids = {name: {v: i + 1 for i, v in enumerate(values)} for name, values in self.values.items()}
        self.dose_condition = dose_condition

    @classmethod
    def from_config(cls, config) -> ConditionEncoder:
        return cls(config.conditions, config.dose_condition)

    @property
    def names(self) -> list[str]:
        """Every condition a caller may give: the categorical ones, then `"dose"` when it is one."""
        return [*self.values, *([DOSE] if self.dose_condition else [])]

    def __bool__(self) -> bool:
        return bool(self.names)

    def ids(self, name: str, values: Sequence) -> np.ndarray:
        """Ids of one condition's `values` (None or NaN: the null id 0).

        Raises:
            KeyError: a value the model was not trained on, named with (some of) the known ones.
        """
        table, out = self._ids[name], np.zeros(len(values), dtype=np.int64)
        for i, value in enumerate(values):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            if str(value) not in table:
                known = self.values[name]
                shown = ", ".join(known[:10]) + (", ..." if len(known) > 10 else "")
                raise KeyError(f"unknown {name} {value!r}: the model knows {len(known)} ({shown})")
            out[i] = table[str(value)]
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
            given = [np.nan if d is None else d for d in columns[DOSE]]
            doses = np.asarray(given, dtype=np.float64)
            if (doses < 0).any():
                raise ValueError(f"doses must be >= 0 uM (NaN: unknown), got {doses[doses < 0][0]}")
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
        return torch.from_numpy(ids), torch.from_numpy(doses).float()


def guided_logits(model, inputs: dict, guidance_scale: float = 1.0) -> torch.Tensor:
    """The denoiser's float32 output for `inputs` (the model's keyword arguments), under classifier-free guidance.

    With a guidance scale w other than 1 and conditions given, the result is the log-probabilities
    `log p(x | null) + w * (log p(x | c) - log p(x | null))` (softmax renormalises them): w = 1 is the conditional
    model, w = 0 the unconditional one (every condition null), w > 1 pushes away from the unconditional. Both are
    evaluated in one pass of twice the batch.
    """
    conditioned = inputs.get("condition_ids") is not None or inputs.get("doses") is not None
    if guidance_scale == 1.0 or not conditioned:
        return model(**inputs).logits.float()
    batch = next(v for v in inputs.values() if isinstance(v, torch.Tensor)).shape[0]
    ids, doses = inputs.get("condition_ids"), inputs.get("doses")
    null_ids = None if ids is None else torch.cat([ids, torch.zeros_like(ids)])
    null_doses = None if doses is None else torch.cat([doses, torch.full_like(doses, float("nan"))])
    doubled = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    doubled.update(condition_ids=null_ids, doses=null_doses)
    log_probs = torch.log_softmax(model(**doubled).logits.float(), dim=-1)
    conditional, unconditional = log_probs[:batch], log_probs[batch:]
    return unconditional + guidance_scale * (conditional - unconditional)
