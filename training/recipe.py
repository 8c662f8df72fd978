"""The recipe of a run's data, saved with the run (`run_config.json`) so that benchmarks rebuild the same data
without repeating the training flags: the data arguments, the rank bins and seed, the evaluation panels chosen on
its training cells, and its perturbation conditions (vocabularies, doses, held-out pairs)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import anndata
import numpy as np

from dataset_scripts import EMBEDDED_SAMPLE
from dataset_scripts.tahoe_metadata import CONTROL_DRUG, drug_smiles, sample_conditions
from modeling.conditions import DOSE, ConditionEncoder, condition_value, dose_value

from .arguments import DataArguments

logger = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"


@dataclass
class ConditionSetup:
    """The perturbation conditions of a run: each categorical condition's values (the model's vocabularies), whether
    the dose is one and each well's dose, each drug's SMILES where the data has them, and the held-out pairs of a
    `--heldout_pairs` split."""

    values: dict[str, list[str]]
    dose: bool = False
    dose_of_sample: dict[str, float] | None = None
    control_drug: str = CONTROL_DRUG
    drug_smiles: dict[str, str] = dataclasses.field(default_factory=dict)
    pair_columns: tuple[str, ...] = ()
    test_pairs: tuple[tuple[str, ...], ...] = ()
    validation_pairs: tuple[tuple[str, ...], ...] = ()

    @property
    def columns(self) -> list[str]:
        """The row columns the conditions are read from."""
        return [*self.values, *(["sample"] if self.dose else [])]

    @property
    def encoder(self) -> ConditionEncoder:
        """The encoder of these conditions (the model's vocabularies)."""
        return ConditionEncoder(self.values, self.dose)

    def to_dict(self) -> dict:
        """What a run records (in `run_config.json`): the vocabularies and the split, not the wells' doses."""
        return {
            "conditions": self.values,
            "dose": self.dose,
            "control_drug": self.control_drug,
            "pair_columns": list(self.pair_columns),
            "test_pairs": [list(p) for p in self.test_pairs],
            "validation_pairs": [list(p) for p in self.validation_pairs],
        }


def read_heldout_pairs(path: str, conditions: list[str]) -> tuple[tuple[str, str], list[tuple[str, str]]]:
    """`(columns, pairs)` of a held-out pairs CSV: a header naming two of `conditions`, one pair per row."""
    import csv

    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    if not rows or len(rows[0]) != 2:
        raise ValueError(f"{path}: the header must name two conditions (e.g. cell_line_id,drug), got {rows[:1]}")
    columns = tuple(name.strip() for name in rows[0])
    unknown = [name for name in columns if name not in conditions or name == DOSE]
    if unknown:
        raise ValueError(f"{path}: {unknown} are not categorical conditions of --conditions {conditions}")
    bad = [row for row in rows[1:] if len(row) != 2]
    if bad or len(rows) < 2:
        raise ValueError(f"{path}: every row must hold one pair of two values; got {bad[:3] or 'no pairs'}")
    pairs = [tuple(condition_value(c, v.strip()) for c, v in zip(columns, row)) for row in rows[1:]]
    return columns, pairs


def condition_setup(builder, data_args: DataArguments) -> ConditionSetup:
    """The conditions of a Tahoe-layout source: vocabularies from every file's values (only those columns are read),
    each well's dose from `metadata/sample_metadata.parquet`, each drug's SMILES from `metadata/drug_metadata.parquet`
    (where present), and the held-out pairs (checked against the data) with the validation pairs drawn among the
    other perturbed ones."""
    names = data_args.condition_names
    categorical = [name for name in names if name != DOSE]
    dose = DOSE in names
    missing = [name for name in categorical if name not in builder.schema().names]
    if missing:
        raise ValueError(f"--conditions {missing} are not columns of the data; it has {builder.schema().names}")
    combos = builder.distinct(categorical) if categorical else None
    values = {
        name: sorted({condition_value(name, v) for v in combos[name].to_pylist()} - {None}) for name in categorical
    }
    empty = [name for name, vals in values.items() if not vals]
    if empty:
        raise ValueError(f"the conditions {empty} hold no values in the data (all null)")
    root = builder.input_files()[1]
    root = str(root).rsplit("/metadata/", 1)[0] if root is not None else str(data_args.data or EMBEDDED_SAMPLE)
    dose_of_sample = None
    if dose:
        dose_of_sample = {sample: amount for sample, (_, amount) in sample_conditions(root).items()}
    smiles = drug_smiles(root) if "drug" in values else {}
    smiles = {drug: smiles[drug] for drug in values.get("drug", []) if drug in smiles}
    setup = ConditionSetup(values, dose, dose_of_sample, control_drug(values, data_args.control_drug), smiles)
    if data_args.heldout_pairs is None:
        return setup
    columns, test_pairs = read_heldout_pairs(data_args.heldout_pairs, categorical)
    present = {
        tuple(condition_value(c, v) for c, v in zip(columns, pair))
        for pair in zip(*(combos[c].to_pylist() for c in columns))
    }
    absent = [pair for pair in test_pairs if pair not in present]
    if absent:
        raise ValueError(f"{data_args.heldout_pairs}: pairs not in the data: {absent[:5]}")
    control = [pair for pair in test_pairs if "drug" in columns and pair[columns.index("drug")] == setup.control_drug]
    if control:
        raise ValueError(f"{data_args.heldout_pairs}: the control {setup.control_drug} cannot be held out: {control}")
    candidates = sorted(
        pair
        for pair in present - set(test_pairs)
        if None not in pair and not ("drug" in columns and pair[columns.index("drug")] == setup.control_drug)
    )
    share = data_args.validation_share
    count = min(len(candidates), max(int(share > 0), round(share * len(candidates))))  # --validation_share 0: none
    chosen = np.random.default_rng(data_args.split_seed).choice(len(candidates), count, replace=False)
    setup.pair_columns, setup.test_pairs = columns, tuple(test_pairs)
    setup.validation_pairs = tuple(candidates[i] for i in sorted(chosen))
    logger.info("held out %d pairs for testing (%s) and %d for validation (%s)", len(test_pairs), test_pairs[:3],
                count, list(setup.validation_pairs)[:3])  # fmt: skip
    return setup


def control_drug(values: dict[str, list[str]], name: str) -> str:
    """`--control_drug` as a condition value, refused when the data's drugs (a `drug` condition) do not hold it."""
    control = condition_value("drug", name)
    if "drug" in values and control not in values["drug"]:
        close = difflib.get_close_matches(control, values["drug"], n=3)
        raise ValueError(
            f"--control_drug {name!r} is not a drug of the data" + (f"; did you mean {close}?" if close else "")
        )
    return control


def anndata_condition_setup(data_args: DataArguments) -> ConditionSetup:
    """The conditions of an `.h5ad` file: `obs` columns (the vocabularies from their values) and, for `dose`, a
    numeric `obs` column of doses in uM."""
    obs = anndata.read_h5ad(data_args.data, backed="r").obs
    missing = [name for name in data_args.condition_names if name not in obs.columns]
    if missing:
        raise ValueError(f"--conditions {missing} are not obs columns of {data_args.data}; it has {list(obs.columns)}")
    categorical = [name for name in data_args.condition_names if name != DOSE]
    values = {name: sorted({str(v) for v in obs[name].dropna().unique()}) for name in categorical}
    dose = DOSE in data_args.condition_names
    if dose:  # refused here, before training, not when a batch first holds a bad dose
        for cell, value in zip(obs.index, obs[DOSE]):
            dose_value(value, cell)
    return ConditionSetup(values, dose, {} if dose else None, control_drug(values, data_args.control_drug))


@dataclass
class DataRecipe:
    """What a run's data is, saved with the run as `run_config.json`.

    Args:
        data: the run's [`DataArguments`], as a dict.
        num_rank_bins: B; seed: the run's seed (it seeds the stream's draws).
        panels: each evaluation panel's gene ids, chosen on the training cells.
        conditions: the [`ConditionSetup`] of a conditioned run ([`~ConditionSetup.to_dict`]), else None.
    """

    data: dict
    num_rank_bins: int
    seed: int
    panels: dict[str, list[int]]
    conditions: dict | None = None

    def save(self, output_dir: str | Path) -> Path:
        path = Path(output_dir) / RUN_CONFIG
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> DataRecipe:
        """The recipe a run saved in its output folder."""
        path = Path(folder) / RUN_CONFIG
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: {folder} is not a finished train_hf.py run")
        return cls(**json.loads(path.read_text()))

    def data_arguments(self, **overrides) -> DataArguments:
        """The run's data arguments, with `overrides` (e.g. `data=`, when the data moved)."""
        return DataArguments(**{**self.data, **{k: v for k, v in overrides.items() if v is not None}})

    def check_panels(self, panels: dict[str, np.ndarray]) -> None:
        """Raise unless `panels` (chosen again from the data) are the run's: the data is not the run's data."""
        differ = [name for name, genes in self.panels.items() if list(map(int, panels.get(name, []))) != genes]
        if differ:
            raise ValueError(f"the panels {differ} chosen from this data differ from the run's: it is not the data "
                             "the run was trained on (or its split differs)")  # fmt: skip
