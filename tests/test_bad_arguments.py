"""Bad training flags are refused when the arguments are parsed, before any data is read, naming the flag and the
value (flags that need the data, such as --control_drug, are checked when it is opened: tests/test_perturbation.py)."""

import re

import numpy as np
import pytest

import train_hf

CASES = [
    (["--ordinal_weight", "nan"], r"--ordinal_weight must be a number in \[0, 1e6\] .*, got nan"),
    (["--ordinal_weight", "1e308"], r"--ordinal_weight must be a number in \[0, 1e6\] .*, got 1e\+308"),
    (["--split_seed", "-1"], "--split_seed must be an integer >= 0, got -1"),
    (["--noise_schedule", "cosine-typo"], "--noise_schedule must be one of .*, got 'cosine-typo'"),
    (["--num_attention_heads", "3"], r"--hidden_size \(64\) must be divisible by --num_attention_heads \(3\)"),
    (["--num_rank_bins", "300"], "--num_rank_bins must be at most 255 with --reference_context"),
    (["--gene_vocab", "vocab.parquet"], "--gene_vocab is the vocabulary of an .h5ad --data"),
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
    (["--learning_rate", "nan"], "--learning_rate must be a finite number >= 0, got nan"),
    (["--learning_rate", "0"], "--learning_rate must be above 0, got 0.0"),
    (["--weight_decay", "-1"], "--weight_decay must be a finite number >= 0, got -1.0"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be a positive integer, got 0"),
    (["--ema_decay", "1"], r"--ema_decay must be in \[0, 1\) \(0: off\), got 1.0"),
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


def test_the_control_drug_with_a_dose_is_refused_naming_the_cell():
    from modeling.conditions import ConditionEncoder

    encoder = ConditionEncoder({"drug": ["DMSO_TF", "X"]}, dose_condition=True, control_drug="DMSO_TF")
    with pytest.raises(ValueError, match="cell 1: DMSO_TF is the control .*: its dose is 0 or unknown, got 5"):
        encoder.encode([{"drug": "X", "dose": 5}, {"drug": "DMSO_TF", "dose": 5}], 2)
    _, doses = encoder.encode([{"drug": "DMSO_TF", "dose": 0.0}, {"drug": "DMSO_TF", "dose": None}], 2)
    assert doses[0] == 0 and np.isnan(doses[1])


def test_an_output_dir_that_is_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "run").write_text("a user's file")
    with pytest.raises(NotADirectoryError, match="--output_dir .*run is a file, not a folder"):
        train_hf.main(["--output_dir", str(tmp_path / "run"), "--max_steps", "1"])
    assert (tmp_path / "run").read_text() == "a user's file"


def test_rankdiff_impute_refuses_bad_paths_before_reading_the_model(tmp_path):
    import anndata

    import rankdiff_cli

    good = tmp_path / "in.h5ad"
    anndata.AnnData(np.ones((2, 3))).write_h5ad(good)
    (tmp_path / "cells.csv").write_text("a,b\n1,2\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "a_file").write_text("")
    cases = [
        ([good, tmp_path / "out"], "OUTPUT .*out is a folder"),
        ([good, tmp_path / "a_file" / "out.h5ad"], "cannot make the folder of OUTPUT .*a_file.out.h5ad"),
        ([tmp_path / "cells.csv", tmp_path / "new.h5ad"], "input .*cells.csv is not an .h5ad file anndata can read"),
        ([good, tmp_path / "new.csv"], "OUTPUT .*new.csv must end in .h5ad"),
        ([good, tmp_path / "new.h5ad", "--device", "nonsense"], "--device 'nonsense' is not a torch device"),
    ]
    for paths, message in cases:
        with pytest.raises(SystemExit, match=message):
            rankdiff_cli.main(["impute", *map(str, paths), "--model", str(tmp_path / "no_model")])
    assert not (tmp_path / "new.h5ad").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "a_file", "cells.csv", "in.h5ad", "out"
    ]  # fmt: skip


@pytest.mark.parametrize("scales", ["1,abc", "1,-2", "nan", ""])
def test_the_perturbation_benchmark_refuses_bad_guidance_scales_naming_the_flag(scales, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "perturbation.py"
    spec = importlib.util.spec_from_file_location("perturbation_benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--baselines_only", "--data", "d", "--heldout_pairs", "p", "--guidance_scales", scales])
    assert f"argument --guidance_scales: {scales!r}" in capsys.readouterr().err
    assert benchmark.parse_args(["--checkpoint", "c", "--guidance_scales", "1,2.5"]).guidance_scales == [1.0, 2.5]


def test_a_heldout_pairs_file_is_read_when_the_flags_are_parsed(tmp_path):
    (tmp_path / "bad.csv").write_text("a;b\n")
    parse = train_hf.build_parser().parse_args_into_dataclasses
    flags = ["--output_dir", "unused", "--conditions", "cell_line_id,drug", "--heldout_pairs"]
    with pytest.raises(FileNotFoundError, match="--heldout_pairs .*missing.csv: no such file"):
        parse(args=[*flags, str(tmp_path / "missing.csv")])
    with pytest.raises(ValueError, match="bad.csv: the header must name two conditions"):
        parse(args=[*flags, str(tmp_path / "bad.csv")])
