"""The train / validation / test split of cells by a hash of their id: the one rule of every reader."""

from __future__ import annotations

import hashlib

import numpy as np

from .schema import CELL_ID_COLUMN

# Default shares of the split, for every reader (the trainer's data and the streaming builder).
VALIDATION_SHARE, TEST_SHARE = 0.1, 0.15
# With held-out pairs, the share of the control cells kept apart as the perturbation metric's own control.
EVALUATION_CONTROL_SHARE = 0.5


def held_out_fraction(cell_id: str, seed: int | str = 0) -> float:
    """A stable number in [0, 1) per cell id, the key of the barcode split ([`split_names`])."""
    digest = hashlib.blake2b(f"{seed}:{cell_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def split_names(cell_ids: list[str], validation_share: float, test_share: float, seed: int = 0) -> np.ndarray:
    """The split of each cell by a hash of its id: `"validation"` below `validation_share`, `"test"` in the next
    `test_share`, `"train"` above. Stable across runs, machines and data orders; the one rule of every reader."""
    if not (0.0 <= validation_share and 0.0 <= test_share and validation_share + test_share < 1.0):
        raise ValueError(
            f"validation_share and test_share must be >= 0 with a sum below 1, got {validation_share} and {test_share}"
        )
    fraction = np.array([held_out_fraction(c, seed) for c in cell_ids])
    held_out = np.where(fraction < validation_share + test_share, "test", "train")
    return np.where(fraction < validation_share, "validation", held_out)


def pair_split(
    pairs: list[tuple],
    drugs: list[str],
    cell_ids: list[str],
    test_pairs: tuple,
    validation_pairs: tuple,
    control_drug: str | None,
    seed: int = 0,
) -> np.ndarray:
    """The split of each cell of a held-out-pairs split: `"test"` and `"validation"` for the cells of those pairs
    (at every dose), `"train"` for the others, except a hash half of the control cells (`control_drug`, compared by
    drug key), which is `"test"` too: the evaluation control of the perturbation metrics, never trained on and
    never seen by a predictor (the other half is the reference control a predictor may use). The hash is salted
    apart from the barcode split's, so within every (line, plate) about half the controls are evaluation ones."""
    splits = np.full(len(pairs), "train", dtype=object)
    for split, held in (("validation", set(validation_pairs)), ("test", set(test_pairs))):
        splits[[pair in held for pair in pairs]] = split
    if control_drug is not None:
        evaluation = np.array([held_out_fraction(c, f"control-{seed}") < EVALUATION_CONTROL_SHARE for c in cell_ids])
        is_control = np.array([drug == control_drug for drug in drugs], dtype=bool)
        splits[is_control & evaluation] = "test"
    return splits.astype(str)


SPLIT_NAMES = ("train", "validation", "test")


def split_by_cell_id(rows, validation_share: float, test_share: float = 0.0, seed: int = 0) -> dict:
    """Split rows into train / validation / test by a hash of `BARCODE_SUB_LIB_ID` ([`split_names`]): no cell
    lands in two splits. Returns `{"train": ..., "validation": ..., "test": ...}` (empty splits included)."""
    if not 0.0 < validation_share:
        raise ValueError(f"validation_share must be positive, got {validation_share}")

    def in_split(batch, split: str):
        return (split_names(batch[CELL_ID_COLUMN], validation_share, test_share, seed) == split).tolist()

    split_names([], validation_share, test_share)  # checks the shares before any row is read
    return {split: rows.filter(in_split, batched=True, fn_kwargs={"split": split}) for split in SPLIT_NAMES}
