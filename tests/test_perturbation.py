"""Perturbation-conditioned training and its benchmark: held-out pairs, condition dropout, the CLI contract, B0-B5."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dataset_scripts.tahoe_screen import write_standin_screen
from metrics.perturbation import MeanShiftBaselines, pearson_delta
from modeling.conditions import ConditionEncoder, drug_key

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    root = tmp_path_factory.mktemp("screen") / "tahoe"
    return write_standin_screen(root, num_lines=4, num_drugs=5, cells_per_condition=20, control_cells_per_line=80,
                                num_plates=3, expected_cells=100)  # fmt: skip


def _pairs(root) -> set:
    table = pq.read_table(sorted((root / "data").glob("*.parquet")), columns=["cell_line_id", "drug"])
    return {(line, drug_key(drug)) for line, drug in zip(table["cell_line_id"].to_pylist(), table["drug"].to_pylist())}


@pytest.fixture(scope="module")
def heldout(screen, tmp_path_factory):
    line = sorted(_pairs(screen))[0][0]
    path = tmp_path_factory.mktemp("pairs") / "heldout.csv"
    path.write_text(f"cell_line_id,drug\n{line},Aspirin\n{line},Caffeine\n")
    return path, {(line, "Aspirin"), (line, "Caffeine")}


def test_heldout_pairs_are_test_cells_at_every_dose_and_never_train_or_validate(screen, heldout):
    from training import DataArguments
    from training.data import prepare_data

    path, pairs = heldout
    args = DataArguments(data=str(screen), conditions="cell_line_id,drug,dose", heldout_pairs=str(path),
                         max_eval_cells=2000, max_length=64, interleave_files=2)  # fmt: skip
    data = prepare_data(args, 10)
    setup = data.conditions
    assert set(setup.test_pairs) == pairs and setup.validation_pairs and not set(setup.validation_pairs) & pairs
    assert setup.values["drug"] == sorted(
        {"Acetaminophen", "Aspirin", "Caffeine", "DMSO_TF", "Ibuprofen", "Metformin"}
    )

    def pairs_of(rows):
        return [(r["cell_line_id"], drug_key(r["drug"])) for r in rows]

    trained = pairs_of(data.train_rows)
    assert len(trained) > 1000 and not set(trained) & pairs
    assert not set(trained) & set(setup.validation_pairs) and not set(pairs_of(data.training_rows)) & pairs
    test = data.splits["test"]
    perturbed = [pair for pair in pairs_of(test) if pair[1] != "DMSO_TF"]
    assert set(perturbed) == pairs  # every perturbed test cell is of a held-out pair, and both pairs are there
    doses = {setup.dose_of_sample[s] for s, (_, drug) in zip(test["sample"], pairs_of(test)) if drug != "DMSO_TF"}
    assert doses == {0.05, 0.5, 5.0}  # every dose of them
    assert set(pairs_of(data.splits["validation"])) == set(setup.validation_pairs)
    # The other test cells are the evaluation controls: a hash half of every line's controls, never trained on.
    evaluation = {row["BARCODE_SUB_LIB_ID"] for row in test if drug_key(row["drug"]) == "DMSO_TF"}
    trained_controls = {row["BARCODE_SUB_LIB_ID"] for row in data.train_rows if drug_key(row["drug"]) == "DMSO_TF"}
    assert evaluation and trained_controls and not evaluation & trained_controls
    lines = {pair[0] for pair in pairs_of(test) if pair[1] == "DMSO_TF"}
    assert lines == {pair[0] for pair in _pairs(screen)}  # every line's


def test_drug_effects_start_from_more_training_cells_than_the_baselines_read_and_stay_there(screen, heldout):
    import torch

    from training import DataArguments, ModelArguments
    from training.data import prepare_data
    from training.run import build_model

    path, pairs = heldout
    args = DataArguments(data=str(screen), conditions="cell_line_id,drug,dose", heldout_pairs=str(path),
                         max_length=64, baseline_cells=100, effect_cells=100_000)  # fmt: skip
    data = prepare_data(args, 10)
    rows, cells = data.effect_cells()
    assert len(data.training_cells) == 100 and len(cells) == sum(1 for _ in data.train_rows) > 1000  # every one
    assert len(rows) == len(cells) and not {(r["cell_line_id"], drug_key(r["drug"])) for r in rows} & pairs
    smaller = prepare_data(dataclasses.replace(args, effect_cells=100), 10)  # no more than the baselines read
    assert smaller.effect_cells()[1] is smaller.training_cells
    # The model's drug effects start from the larger sample (the same 100 baseline cells in both runs).
    tables = [build_model(ModelArguments(num_rank_bins=10), args, prepared, seed=0).perturbation_effect.drug_genes
              for prepared in (data, smaller)]  # fmt: skip
    assert tables[0].abs().sum() > 0 and tables[1].abs().sum() > 0 and not torch.allclose(tables[0], tables[1])
    # The table stays at that estimate in training unless asked to learn it, and so, unless asked, does the rest of
    # the effect: the factors at zero (no effect beyond the table's) and every drug's Hill curve at its start.
    effect = build_model(ModelArguments(num_rank_bins=10), args, smaller, seed=0).perturbation_effect
    modulation = (effect.gene_factors, effect.drug_factors, *effect.context_factors, effect.dose_response)
    assert not tables[0].requires_grad and not any(p.requires_grad for p in modulation)
    assert effect.drug_factors.abs().sum() == 0 and effect.dose_response.abs().sum() == 0
    asked = ModelArguments(num_rank_bins=10, learn_drug_shifts=True, learn_effect_modulation=True)
    learned = build_model(asked, args, smaller, seed=0).perturbation_effect
    assert learned.drug_genes.requires_grad
    learned_modulation = (learned.gene_factors, learned.drug_factors, *learned.context_factors, learned.dose_response)
    assert all(p.requires_grad for p in learned_modulation)
    # Drugs known by structure reach the gene factors through their fingerprints' factors: those train.
    by_structure = build_model(ModelArguments(num_rank_bins=10, drug_features=True), args, smaller, seed=0)
    assert by_structure.drug_structure is not None and by_structure.perturbation_effect.gene_factors.requires_grad


def test_grouped_batches_hold_one_line_each_where_they_can_and_lose_no_cell(screen, heldout, tmp_path):
    import torch

    from modeling import RankDiTConfig, RankDiTModel
    from pipelines import MaskedRankDiffusionScheduler
    from training import DataArguments, RankDiffTrainingArguments
    from training.data import prepare_data
    from training.run import group_batches_by
    from training.trainer import BATCHES_PER_GROUP, RankDiffusionTrainer

    with pytest.raises(ValueError, match="group_batches_by must be a categorical condition"):
        DataArguments(data=str(screen), conditions="cell_line_id,drug,dose", group_batches_by="dose")
    args = DataArguments(data=str(screen), conditions="cell_line_id,drug,dose", heldout_pairs=str(heldout[0]),
                         max_length=64, group_batches_by="cell_line_id")  # fmt: skip
    data = prepare_data(args, 10)
    training = RankDiffTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, use_cpu=True,
                                         eval_strategy="no", report_to=[])  # fmt: skip
    config = RankDiTConfig.from_preset("tiny", gene_vocab_size=data.source.vocab.size, max_length=64, num_rank_bins=10)
    rows = list(data.train_rows)
    row_of = {row["BARCODE_SUB_LIB_ID"]: i for i, row in enumerate(rows)}

    def collate(cells: dict) -> torch.Tensor:  # the rows of a batch, each checked whole against its cell's row
        found = [row_of[cell] for cell in cells["BARCODE_SUB_LIB_ID"]]
        for position, i in enumerate(found):
            for name in ("cell_line_id", "drug", "gene_ids", "input_ids"):
                assert np.array_equal(np.asarray(cells[name][position]), np.asarray(rows[i][name]))
        return torch.tensor(found)

    def batches(group: tuple | None, train_rows=data.train_rows) -> list[list[dict]]:
        trainer = RankDiffusionTrainer(
            model=RankDiTModel(config), args=training, train_dataset=train_rows, data_collator=collate,
            noise_scheduler=MaskedRankDiffusionScheduler(num_rank_bins=10), group_batches_by=group,
        )  # fmt: skip
        return [[rows[i] for i in batch.tolist()] for batch in trainer.get_train_dataloader()]

    def lines(batch: list[dict]) -> set:
        return {row["cell_line_id"] for row in batch}

    group = group_batches_by(args, data)
    assert group == ("cell_line_id", 4)
    grouped, plain = batches(group), batches(None)
    cells = [row["BARCODE_SUB_LIB_ID"] for batch in plain for row in batch]
    assert sorted(row["BARCODE_SUB_LIB_ID"] for batch in grouped for row in batch) == sorted(cells) == sorted(row_of)
    assert sum(len(batch) < 8 for batch in grouped) <= 1
    block = BATCHES_PER_GROUP * 4  # a block is the stream's cells, sorted by line and cut, its batches shuffled
    for start in range(0, len(grouped), block):
        cut = grouped[start : start + block]
        assert sorted(r["cell_line_id"] for b in cut for r in b) == sorted(
            r["cell_line_id"] for b in plain[start : start + block] for r in b
        )
        assert sum(len(lines(batch)) - 1 for batch in cut) <= len(set.union(*map(lines, cut))) - 1
    firsts = [next(iter(lines(batch))) for batch in grouped[:block]]
    assert firsts != sorted(firsts)  # not one line after another
    assert np.mean([len(lines(b)) == 1 for b in grouped]) > 0.8 > np.mean([len(lines(b)) == 1 for b in plain])
    drugs = [len({drug_key(row["drug"]) for row in batch}) for batch in grouped if len(lines(batch)) == 1]
    assert np.mean(drugs) > 3  # a batch of one line holds several of its conditions
    with pytest.raises(ValueError, match="not a stream"):
        batches(group, train_rows=data.training_rows)


def test_the_control_drug_must_be_a_drug_of_the_data_and_no_validation_share_holds_out_no_pair(screen, heldout):
    from dataset_scripts import tahoe_builder
    from training import DataArguments
    from training.recipe import condition_setup

    builder = tahoe_builder(str(screen))
    args = DataArguments(data=str(screen), conditions="cell_line_id,drug,dose", control_drug="DMSO")
    with pytest.raises(ValueError, match=r"--control_drug 'DMSO' is not a drug of the data; did you mean \['DMSO_TF'"):
        condition_setup(builder, args)
    args = DataArguments(data=str(screen), conditions="cell_line_id,drug,dose", heldout_pairs=str(heldout[0]),
                         validation_share=0.0)  # fmt: skip
    assert condition_setup(builder, args).validation_pairs == ()


def test_a_screens_drugs_are_known_by_their_fingerprints_where_it_has_smiles(screen, caplog):
    from dataset_scripts import tahoe_builder
    from dataset_scripts.molecules import morgan_fingerprints
    from training import DataArguments
    from training.recipe import ConditionSetup, condition_setup
    from training.run import drug_structures

    setup = condition_setup(
        tahoe_builder(str(screen)), DataArguments(data=str(screen), conditions="cell_line_id,drug")
    )
    assert set(setup.drug_smiles) == set(setup.values["drug"])  # every drug's SMILES, by drug key
    bits = drug_structures(setup)
    assert bits.shape == (len(setup.values["drug"]), 2048) and bits.any(axis=1).all()
    # a drug without SMILES, or with one RDKit cannot read, is known by its id alone (a zero row), and named
    partial = ConditionSetup({"drug": ["A", "B", "C"]}, drug_smiles={"A": "CCO", "C": "C1CC"})
    with caplog.at_level("WARNING"):
        bits = drug_structures(partial)
    assert (bits[0] == morgan_fingerprints(["CCO"])[0]).all() and not bits[1:].any() and "['B']" in caplog.text
    assert "['C']" in caplog.text
    assert drug_structures(ConditionSetup({"drug": ["A"]})) is None and drug_structures(None) is None


def test_heldout_pairs_files_are_checked(screen, tmp_path):
    from training import DataArguments
    from training.data import prepare_data

    def prepare(text):
        (tmp_path / "pairs.csv").write_text(text)
        args = DataArguments(data=str(screen), conditions="cell_line_id,drug,dose",
                             heldout_pairs=str(tmp_path / "pairs.csv"), max_length=64)  # fmt: skip
        return prepare_data(args, 10)

    line = sorted(_pairs(screen))[0][0]
    with pytest.raises(ValueError, match=r"pairs not in the data: \[\('CVCL_9999', 'Aspirin'\)\]"):
        prepare("cell_line_id,drug\nCVCL_9999,Aspirin\n")
    with pytest.raises(ValueError, match="the control DMSO_TF cannot be held out"):
        prepare(f"cell_line_id,drug\n{line},DMSO_TF\n")
    with pytest.raises(ValueError, match=r"\['plate'\] are not categorical conditions"):
        prepare(f"cell_line_id,plate\n{line},plate1\n")
    with pytest.raises(ValueError, match="--heldout_pairs needs --conditions"):
        DataArguments(data=str(screen), heldout_pairs=str(tmp_path / "pairs.csv"))


def test_condition_dropout_nulls_every_condition_of_a_share_of_cells_anew_each_epoch():
    encoder = ConditionEncoder({"cell_line_id": ["A", "B"], "drug": ["DMSO_TF", "X"]}, dose_condition=True)

    def conditions(columns, cells, epoch=0, dose_of_sample={"w1": 0.5, "w2": 0.0}, dropout=0.2):  # noqa: B006
        return encoder.encode_rows(columns, cells, dose_of_sample=dose_of_sample, dropout=dropout, seed=3, epoch=epoch)

    n = 5000
    columns = {"cell_line_id": ["A", "B"] * (n // 2), "drug": ["X"] * n, "sample": ["w1", "w2"] * (n // 2)}
    cells = [f"cell{i}" for i in range(n)]
    first = conditions(columns, cells, epoch=0)
    dropped = (first["condition_ids"] == 0).all(dim=1).numpy()
    assert abs(dropped.mean() - 0.2) < 0.02
    assert np.isnan(first["doses"].numpy()[dropped]).all() and not np.isnan(first["doses"].numpy()[~dropped]).any()
    assert (first["condition_ids"][~dropped] > 0).all()
    again, later = conditions(columns, cells, epoch=0), conditions(columns, cells, epoch=1)
    assert (again["condition_ids"] == first["condition_ids"]).all()
    later_dropped = (later["condition_ids"] == 0).all(dim=1).numpy()
    assert abs(later_dropped.mean() - 0.2) < 0.02 and (later_dropped != dropped).mean() > 0.2
    with pytest.raises(KeyError, match=r"lack the condition columns \['sample'\]"):
        conditions({"cell_line_id": ["A"], "drug": ["X"]}, ["c"])
    none = conditions(columns, cells, dose_of_sample={"w1": 0.5}, dropout=0.0)
    assert (none["condition_ids"] > 0).all() and not np.isnan(none["doses"][::2].numpy()).any()
    assert np.isnan(none["doses"][1::2].numpy()).all()  # a well without metadata: the dose is unknown


@pytest.mark.slow
def test_the_cli_contract_trains_a_conditioned_model_and_the_benchmark_scores_it(screen, heldout, tmp_path):
    import train_hf

    path, _ = heldout
    out = tmp_path / "run"
    flags = f"--data {screen} --conditions cell_line_id,drug,dose --heldout_pairs {path} --condition_dropout 0.2"
    flags += " --control_drug DMSO_TF --max_steps 6 --max_length 64 --max_eval_cells 32 --eval_time_grid 1"
    flags += " --model_card false --use_cpu --disable_tqdm true --interleave_files 2 --eval_strategy no"
    trainer, _ = train_hf.main(["--output_dir", str(out), *flags.split()])
    config = trainer.model.config
    assert config.dose_condition and set(config.conditions) == {"cell_line_id", "drug"}
    assert config.drug_feature_size == 0 and trainer.model.drug_structure is None  # --drug_features: off by default
    recorded = json.loads((out / "run_config.json").read_text())["conditions"]
    assert recorded["conditions"] == config.conditions and recorded["control_drug"] == config.control_drug == "DMSO_TF"
    assert {tuple(p) for p in recorded["test_pairs"]} == heldout[1]
    report = tmp_path / "perturbation.json"
    command = [sys.executable, str(REPO / "benchmarks" / "perturbation.py"), "--checkpoint", str(out), "--data",
               str(screen), "--guidance_scales", "1,2", "--num_inference_steps", "4",
               "--json", str(report), "--no_card"]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "B2 PerturbMean" in done.stdout and "RankDiT" in done.stdout
    results = json.loads(report.read_text())
    assert results["test_perturbations"] == 6 and results["choices"]["guidance_scale"]["chosen"] in (1.0, 2.0)
    methods = results["methods"]
    names = {"B0 no change", "B1 line mean", "B2 PerturbMean", "B3 additive ridge", "ceiling", "RankDiT"}
    assert names <= set(methods)
    wanted = {"pearson_delta", "mae_delta", "discrimination_score_l1", "overlap_at_N", "energy_distance", "mmd"}
    assert all(wanted <= set(scores) for scores in methods.values())
    assert results["ceiling_source"].startswith("a fresh draw")
    assert results["scored_on"] == "test pairs" and config.factorized_guidance
    # The model translates the line's control cells (each to its counterfactual); the same on validation
    # pairs only, and the expected effects read without sampling.
    command = [sys.executable, str(REPO / "benchmarks" / "perturbation.py"), "--checkpoint", str(out),
               "--guidance_scales", "1", "--num_inference_steps", "2", "--no_cell_eval", "--validation_only",
               "--json", str(tmp_path / "validation.json")]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    validation = json.loads((tmp_path / "validation.json").read_text())
    assert validation["scored_on"] == "validation pairs" and "RankDiT" in validation["methods"]
    scored = {tuple(key) for key in validation["perturbations"]}
    assert scored and not scored & {tuple(key) for key in results["perturbations"]}  # never a test pair
    command = [sys.executable, str(REPO / "benchmarks" / "perturbation_effects.py"), "--checkpoint", str(out),
               "--cells", "4", "--guidance_scales", "1,2", "--json", str(tmp_path / "effects.json")]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    effects = json.loads((tmp_path / "effects.json").read_text())
    assert set(effects["by_guidance_scale"]) == {"1.0", "2.0"} and effects["pairs"] == "validation"
    assert all(-1 <= row["pearson_delta"] <= 1 for row in effects["by_guidance_scale"].values())
    # The contract's other form: the baselines and the ceiling of a screen, without a checkpoint.
    command = [sys.executable, str(REPO / "benchmarks" / "perturbation.py"), "--data", str(screen), "--heldout_pairs",
               str(path), "--baselines_only", "--json", str(tmp_path / "baselines.json"), "--no_cell_eval",
               "--panel_size", "64"]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    baselines = json.loads((tmp_path / "baselines.json").read_text())
    assert "RankDiT" not in baselines["methods"] and baselines["test_pairs"] == results["test_pairs"]
    assert baselines["methods"]["B2 PerturbMean"]["pearson_delta"] == pytest.approx(
        methods["B2 PerturbMean"]["pearson_delta"]
    )  # the same split and draws as the checkpoint's run


def _additive_screen(interaction: float, seed: int = 0):
    """Cells of 5 lines x 4 treatments (+ control) whose mean shift is line + treatment (+ a rank-1 interaction)."""
    rng = np.random.default_rng(seed)
    lines, treatments, genes = [f"L{i}" for i in range(5)], [("D", d) for d in (0.5, 1.0, 2.0, 4.0)], 30
    base, line_effect = rng.normal(size=(5, genes)), rng.normal(size=(5, genes))
    drug_effect, u, v = rng.normal(size=(4, genes)), rng.normal(size=5), rng.normal(size=(4, genes))
    rows, keys = [], []
    for li, line in enumerate(lines):
        rows.append(base[li] + 0.01 * rng.normal(size=(20, genes)))
        keys += [(line, "DMSO_TF", 0.0)] * 20
        for ti, (drug, dose) in enumerate(treatments):
            shift = line_effect[li] + drug_effect[ti] + interaction * u[li] * v[ti]
            rows.append(base[li] + shift + 0.01 * rng.normal(size=(20, genes)))
            keys += [(line, drug, dose)] * 20
    return np.vstack(rows), keys, lambda li, ti: line_effect[li] + drug_effect[ti] + interaction * u[li] * v[ti]


def test_baselines_b2_leaves_the_line_out_and_b3_recovers_additive_and_low_rank_shifts():
    matrix, keys, truth = _additive_screen(interaction=0.0)
    held = ("L0", "D", 2.0)
    train = [i for i, k in enumerate(keys) if k != held]
    base = MeanShiftBaselines(matrix[train], [keys[i] for i in train], "DMSO_TF")
    others = [base.shifts[(f"L{i}", "D", 2.0)] for i in range(1, 5)]
    np.testing.assert_allclose(base.b2(held), np.mean(others, axis=0))
    # A pair seen in training: PerturbMean still leaves its own line out (L2, L3, L4; L0 holds no D 2.0 cells).
    own = [base.shifts[(f"L{i}", "D", 2.0)] for i in (2, 3, 4)]
    np.testing.assert_allclose(base.b2(("L1", "D", 2.0)), np.mean(own, axis=0))
    # B1 by hand: the line's mean over its perturbed training cells (never its controls) minus its control mean.
    line = np.array([k[0] == "L1" for k in keys]) & np.isin(np.arange(len(keys)), train)
    treated = line & np.array([k[1] != "DMSO_TF" for k in keys])
    controls = line & np.array([k[1] == "DMSO_TF" for k in keys])
    np.testing.assert_allclose(base.b1(("L1", "D", 2.0)), matrix[treated].mean(0) - matrix[controls].mean(0))
    # B3 recovers the held-out pair's shift itself, not only its direction (from the observed pairs alone).
    np.testing.assert_allclose(base.fit_b3(0.01, 0).b3(held), truth(0, 2), atol=0.05)
    assert pearson_delta(base.b3(held), truth(0, 2)) > 0.99
    assert np.abs(base.b0(held)).sum() == 0
    matrix, keys, truth = _additive_screen(interaction=3.0)
    train = [i for i, k in enumerate(keys) if k != held]
    base = MeanShiftBaselines(matrix[train], [keys[i] for i in train], "DMSO_TF")
    additive = np.abs(base.fit_b3(0.01, 0).b3(held) - truth(0, 2)).mean()
    low_rank = np.abs(base.fit_b3(0.01, 1).b3(held) - truth(0, 2)).mean()
    assert low_rank < 0.5 * additive


def test_b5_pools_a_drug_over_its_doses_along_one_direction_and_leaves_the_line_out():
    rng = np.random.default_rng(0)
    genes, sizes = 200, {0.05: 0.1, 0.5: 0.5, 5.0: 1.0}  # dose -> share of the drug's full effect
    direction, elsewhere = rng.normal(size=(2, genes))
    keys, rows = [], []
    for line in range(6):
        keys += [(f"L{line}", "DMSO_TF", 0.0)] * 10
        rows.append(rng.normal(0.0, 0.3, (10, genes)))
        for dose, size in sizes.items():
            # The held line's own cells move another way: B5 must not read them.
            effect = 3.0 * elsewhere if line == 0 else size * direction
            keys += [(f"L{line}", "D", dose)] * 10
            rows.append(effect + rng.normal(0.0, 0.5, (10, genes)))
    base = MeanShiftBaselines(np.vstack(rows), keys, "DMSO_TF")
    low = ("L0", "D", 0.05)
    # At the lowest dose each line's shift is mostly noise; the drug's direction from every dose is not.
    assert pearson_delta(base.b5(low), direction) > max(0.99, pearson_delta(base.b2(low), direction) + 0.15)
    for dose, size in sizes.items():  # sized at each dose by B2's shift along it
        np.testing.assert_allclose(base.b5(("L0", "D", dose)) @ direction / (direction @ direction), size, atol=0.03)
    assert np.abs(base.b5(("L0", "Unknown", 0.5))).sum() == 0


def test_pearson_delta_is_zero_for_a_constant_prediction_and_sees_noise_among_top_genes():
    rng = np.random.default_rng(0)
    real = np.r_[np.full(50, 2.0), rng.normal(0, 0.1, 100)]
    predicted = np.r_[np.full(50, 2.0) + rng.normal(0, 0.01, 50), rng.normal(0, 0.1, 100)]
    assert pearson_delta(predicted, real) > 0.95 and pearson_delta(np.zeros(150), real) == 0.0
    assert pearson_delta(predicted, real, top=50) < 0.5  # among the top genes the prediction is noise


def test_b4_takes_the_structurally_nearest_drug_in_the_same_line_else_over_the_other_lines():
    from metrics.perturbation import drug_similarity

    rng = np.random.default_rng(0)
    keys, rows = [], []
    for line in ("L0", "L1"):
        keys += [(line, "DMSO_TF", 0.0)] * 5
        rows.append(rng.normal(size=(5, 4)))
        for drug, shift in (("Ibuprofen", 1.0), ("Caffeine", -1.0)):
            if (line, drug) == ("L1", "Ibuprofen"):
                continue
            keys += [(line, drug, 0.5)] * 5
            rows.append(rows[-1][:5] * 0 + shift + (line == "L1"))
    base = MeanShiftBaselines(np.vstack(rows), keys, "DMSO_TF")
    smiles = {"Ibuprofen": "CC(C)CC1=CC=C(C=C1)C(C)C(=O)O", "Caffeine": "CN1C=NC2=C1C(=O)N(C(=O)N2C)C",
              "Naproxen": "COC1=CC2=C(C=C1)C=C(C=C2)C(C)C(=O)O"}  # fmt: skip
    similarity = drug_similarity(smiles)
    assert similarity[("Naproxen", "Ibuprofen")] > similarity[("Naproxen", "Caffeine")]
    # Naproxen, never seen: its nearest drug is ibuprofen (a propionic acid NSAID), not caffeine.
    np.testing.assert_allclose(base.b4(("L0", "Naproxen", 0.5), similarity), base.shifts[("L0", "Ibuprofen", 0.5)])
    # L1 never saw ibuprofen: its shift over the lines that did.
    np.testing.assert_allclose(base.b4(("L1", "Naproxen", 0.5), similarity), base.shifts[("L0", "Ibuprofen", 0.5)])
    # Without a comparable drug (no SMILES): B2.
    np.testing.assert_allclose(base.b4(("L0", "Unknown", 0.5), similarity), base.b2(("L0", "Unknown", 0.5)))
