"""Bad training flags are refused when the arguments are parsed, before any data is read, naming the flag and the
value (flags that need the data, such as --control_drug, are checked when it is opened: tests/test_perturbation.py)."""

import re

import numpy as np
import pytest

import train_hf

CASES = [
    (["--ordinal_weight", "nan"], "--ordinal_weight must be a finite number >= 0, got nan"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be a positive integer, got 0"),
    (["--max_steps", "0"], "--max_steps must be a positive integer, got 0"),
    (["--panel_size", "0"], "--panel_size must be a positive integer, got 0"),
    (["--max_length", "0"], "--max_length must be a positive integer, got 0"),
    (["--num_rank_bins", "0"], "--num_rank_bins must be a positive integer, got 0"),
    (["--eval_time_grid", "0"], "--eval_time_grid must be a positive integer, got 0"),
    (["--card_mask_ratios", "0.5", "1.5"], r"--card_mask_ratios must be shares in \(0, 1\), got \[0.5, 1.5\]"),
    (["--conditions", ","], "--conditions must name columns, comma-separated, got ','"),
    (["--conditions", "drug,drug"], r"--conditions names \['drug'\] more than once"),
    (["--zero_share", "1.5"], r"--zero_share must be a share in \[0, 1\], got 1.5"),
    (["--validation_share", "1"], r"--validation_share must be a share in \[0, 1\), got 1.0"),
    (["--eval_mask_ratio", "0.9999"], r"--eval_mask_ratio must be in \(0, 1 - eps\)"),
    (["--reference_neighbours", "0"], "--reference_neighbours must be at least 1 and below --reference_cells"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[case[0][0] for case in CASES])
def test_bad_flags_are_refused_when_parsed_naming_the_flag_and_the_value(argv, message):
    with pytest.raises(ValueError, match=message):
        train_hf.build_parser().parse_args_into_dataclasses(args=["--output_dir", "unused", *argv])


@pytest.mark.parametrize("dose", [float("inf"), True, -1.0, "5 uM", [0.5]], ids=["inf", "True", "-1", "5 uM", "list"])
def test_a_dose_that_is_not_a_number_in_micromolar_is_refused_naming_the_cell(dose):
    from modeling.conditions import ConditionEncoder

    encoder = ConditionEncoder({"drug": ["DMSO_TF", "X"]}, dose_condition=True)
    with pytest.raises(
        ValueError, match=f"cell 1: the dose must be a number >= 0 in uM .*, got {re.escape(repr(dose))}"
    ):
        encoder.encode([{"drug": "X", "dose": 0.5}, {"drug": "X", "dose": dose}], 2)
    _, doses = encoder.encode([{"drug": "X", "dose": None}, {"drug": "X", "dose": np.float32(5)}], 2)
    assert np.isnan(doses[0]) and doses[1] == 5  # None (and NaN): an unknown dose


def test_an_output_dir_that_is_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "run").write_text("a user's file")
    with pytest.raises(NotADirectoryError, match="--output_dir .*run is a file, not a folder"):
        train_hf.main(["--output_dir", str(tmp_path / "run"), "--max_steps", "1"])
    assert (tmp_path / "run").read_text() == "a user's file"
