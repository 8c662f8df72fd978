"""The perturbation protocol tells a predictor of drug effects from one that knows nothing: each side of a delta
against its own control, the evaluation controls kept out of training, metrics read as their library defines them."""

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from dataset_scripts.splits import pair_split
from metrics.perturbation import energy_distance, mmd
from metrics.perturbation_protocol import (
    ScreenCells,
    cell_roles,
    delta_scores,
    drug_blind_prediction,
    metric_directions,
    oracle_prediction,
    paired_bootstrap,
    split_truth,
)

LINES, DRUGS, GENES = [f"L{i}" for i in range(4)], [f"D{i}" for i in range(8)], 300


def _effects(seed: int = 0):
    """Each drug's log-fold change on 40 of the genes, the genes' base means, each line's own scale."""
    rng = np.random.default_rng(seed)
    base = rng.lognormal(-1.0, 1.0, GENES)
    effects = np.zeros((len(DRUGS), GENES))
    for d in range(len(DRUGS)):
        effects[d, rng.choice(GENES, 40, replace=False)] = rng.normal(0, 0.8, 40)
    return base, effects


def _screen(draw: int, cells_per_perturbation: int = 60, controls_per_line: int = 120) -> ScreenCells:
    """A screen of Poisson counts: every line x drug at one dose on one plate, and each line's controls; `draw`
    gives a fresh draw of the same wells (same cell ids' roles are irrelevant to it)."""
    base, effects = _effects()
    rng = np.random.default_rng(100 + draw)
    rows, means = [], []
    for line in LINES:
        for d, drug in enumerate(["DMSO_TF", *DRUGS]):
            n = controls_per_line if drug == "DMSO_TF" else cells_per_perturbation
            shift = effects[d - 1] if d else 0.0
            rows += [(f"{draw}-{line}-{drug}-{i}", line, drug, 0.0 if d == 0 else 0.5, "plate1") for i in range(n)]
            means += [base * np.exp(shift) * 8] * n
    counts = rng.poisson(np.array(means)).astype(np.float32)
    obs = pd.DataFrame(rows, columns=["cell_id", "line", "drug", "dose", "plate"])
    obs["pair:cell_line_id"], obs["pair:drug"] = obs["line"], obs["drug"]
    matrix = sparse.csr_matrix(counts)
    return ScreenCells(obs, matrix, counts.sum(axis=1))


HELD_OUT = tuple((line, drug) for i, line in enumerate(LINES) for drug in DRUGS[2 * i : 2 * i + 2])


@pytest.fixture(scope="module")
def truth():
    cells = _screen(0)
    roles = cell_roles(cells, ("cell_line_id", "drug"), HELD_OUT, (), "DMSO_TF", seed=0)
    return split_truth(cells, roles, np.arange(GENES), "DMSO_TF", "test"), cells, roles


def test_the_evaluation_controls_are_a_hash_half_no_predictor_sees(truth):
    truth, cells, roles = truth
    is_control = (cells.obs["drug"] == "DMSO_TF").to_numpy()
    assert 0.35 < (roles[is_control] == "test").mean() < 0.65  # about half of each line's controls
    assert set(roles[is_control]) == {"train", "test"}
    held = [pair in set(HELD_OUT) for pair in zip(cells.obs["line"], cells.obs["drug"])]
    assert (roles[held] == "test").all() and (roles[~np.array(held) & ~is_control] == "train").all()
    # The same rule with another seed keeps other controls apart; a cell's role does not depend on its batch.
    other = pair_split([("x", "y")] * len(cells.obs), cells.obs["drug"].tolist(), cells.obs["cell_id"].tolist(),
                       (), (), "DMSO_TF", seed=1)  # fmt: skip
    assert ((other == "test") != (roles == "test"))[is_control].mean() > 0.3
    # No evaluation control is among the training cells or the reference controls a predictor gets.
    evaluation = np.vstack(list(truth.evaluation_controls.values()))
    reference = np.vstack(list(truth.reference_controls.values()))
    assert len(evaluation) + len(reference) == is_control.sum()
    training = {row.tobytes() for row in truth.training}
    assert not any(row.tobytes() in training for row in evaluation)


def test_a_drug_blind_predictor_scores_about_zero_and_a_fresh_draw_of_the_truth_near_the_ceiling(truth):
    truth, _, _ = truth
    blind = np.mean(delta_scores(drug_blind_prediction(truth, np.random.default_rng(0)), truth)["pearson_delta"])
    assert abs(blind) < 0.1, blind
    fresh = oracle_prediction(truth, _screen(1), np.arange(GENES), np.random.default_rng(0))
    oracle = np.mean(delta_scores(fresh, truth)["pearson_delta"])
    # The ceiling by cell-eval's own estimate, from the real cells alone (disjoint halves, Spearman-Brown).
    assert oracle == pytest.approx(_cell_eval_ceiling(truth), abs=0.1)
    assert oracle > 0.5


def _cell_eval_ceiling(truth) -> float:
    import tempfile

    import anndata
    from cell_eval import MetricsEvaluator

    values = []
    for ctx in sorted(set(truth.context.values())):
        keys = [k for k in truth.keys if truth.context[k] == ctx]
        names = [k[1] for k in keys for _ in range(len(truth.real[k]))]
        control = truth.evaluation_controls[ctx]
        obs = pd.DataFrame({"perturbation": names + ["control"] * len(control)})
        obs.index = obs.index.astype(str)
        real = anndata.AnnData(np.vstack([truth.real[k] for k in keys] + [control]), obs=obs)
        with tempfile.TemporaryDirectory() as outdir:
            evaluator = MetricsEvaluator(None, real, control_pert="control", pert_col="perturbation", num_threads=1,
                                         outdir=outdir)  # fmt: skip
            skip = ["mse", "mae", "clustering_agreement"]
            _, ceiling = evaluator.compute_ceiling(profile="anndata", write_csv=False, skip_metrics=skip)
        frame = ceiling.to_pandas().set_index("statistic") if "statistic" in ceiling.columns else ceiling.to_pandas()
        values.append(float(frame["pearson_delta"].iloc[0]) * len(keys))
    return sum(values) / len(truth.keys)


def test_metric_directions_are_read_from_cell_eval_and_discrimination_is_higher_better():
    directions = metric_directions()
    assert directions["discrimination_score_l1"] == "higher" and directions["pearson_delta"] == "higher"
    assert directions["mae_delta"] == "lower" and directions["overlap_at_N"] == "higher"


def test_energy_distance_and_mmd_are_unbiased_u_statistics():
    # By hand: X = {0, 2}, Y = {1, 3}: 2 E|X - Y| = 2 (1 + 3 + 1 + 1) / 4 = 3; the within-set means over distinct
    # pairs are 2 and 2, so 3 - 4 = -1 (the V-statistic, with its zero diagonal, would say 3 - 1 - 1 = 1).
    x, y = np.array([[0.0], [2.0]]), np.array([[1.0], [3.0]])
    assert energy_distance(x, y) == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    # Unbiased: two draws of one law average 0 even for small sets; different laws are far apart.
    same = [energy_distance(rng.normal(size=(5, 3)), rng.normal(size=(5, 3))) for _ in range(400)]
    assert abs(np.mean(same)) < 0.05
    assert energy_distance(rng.normal(size=(200, 3)), 3 * rng.normal(size=(200, 3))) > 1.0
    kernel_same = [mmd(rng.normal(size=(5, 3)), rng.normal(size=(5, 3)), 1.0) for _ in range(400)]
    assert abs(np.mean(kernel_same)) < 0.01
    assert mmd(rng.normal(size=(200, 3)), rng.normal(size=(200, 3)) + 2.0, 1.0) > 0.3
    # By hand with a huge bandwidth-free case: identical singleton-free sets at distance -> k = exp(-d^2 / 2).
    a, b = np.array([[0.0], [0.0]]), np.array([[1.0], [1.0]])
    assert mmd(a, b, 1.0) == pytest.approx(1 + 1 - 2 * np.exp(-0.5))


def test_paired_bootstrap_interval_covers_the_mean_difference():
    rng = np.random.default_rng(0)
    a = rng.normal(0.3, 0.1, 50)
    b = a - 0.1 + rng.normal(0, 0.01, 50)
    result = paired_bootstrap(a, b, seed=0)
    assert result["difference"] == pytest.approx(0.1, abs=0.01)
    assert result["ci95"][0] < 0.1 < result["ci95"][1] and result["ci95"][1] - result["ci95"][0] < 0.02


def test_a_translating_models_own_control_is_the_same_control_cells_translated_with_the_same_draws(truth, monkeypatch):
    from types import SimpleNamespace

    import torch
    from conftest import REPO

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import perturbation as benchmark

    test, cells, roles = truth
    control_rows = np.flatnonzero((roles == "train") & (cells.obs["drug"] == "DMSO_TF").to_numpy())
    lines = cells.obs["line"].to_numpy()[control_rows]
    controls = (cells, {line: control_rows[lines == line] for line in LINES})
    args = SimpleNamespace(cells_per_condition=8, num_inference_steps=2, batch_size=4, seed=0)

    def translator(drug: str):
        """Each control cell itself (its counts plus noise from the generator); under a drug, as `drug` says: the
        same ("blind"), genes 0 and 1 swapped ("swap"), every count doubled ("depth": the panel is the whole cell)."""

        def pipe(gene_ids, conditions, generator, control_counts, **kwargs):
            noise = torch.randint(0, 5, (len(gene_ids), len(gene_ids[0])), generator=generator).numpy()
            counts = (control_counts + noise).astype(float)
            treated = np.array([told["drug"] != "DMSO_TF" for told in conditions])
            if drug == "swap":
                counts[treated, :2] = counts[treated][:, [1, 0]]
            if drug == "depth":
                counts[treated] *= 2
            return SimpleNamespace(counts=counts)

        return pipe

    # Drug-blind and depth alone: no effect at all (cells are normalised over their new totals); a swap: exactly it.
    for drug in ("blind", "swap", "depth"):
        prediction = benchmark.generated_prediction(translator(drug), test, np.arange(GENES), 1.0, args,
                                                    controls=controls)  # fmt: skip
        for key in test.keys:
            own = prediction.controls[test.context[key]]
            swapped = own[:, [1, 0, *range(2, GENES)]] if drug == "swap" else own
            np.testing.assert_allclose(prediction.cells[key], swapped[: len(prediction.cells[key])], rtol=1e-5)
    # The cells are log-normalised over their totals as real cells are: the same noise-free counts, the same values.
    real = cells.expression(np.arange(GENES), control_rows)
    quiet = benchmark.generated_prediction(
        lambda gene_ids, control_counts, **kwargs: SimpleNamespace(counts=control_counts.astype(float)), test,
        np.arange(GENES), 1.0, args, controls=controls,
    )  # fmt: skip
    for own in quiet.controls.values():
        assert all((np.abs(real - row).max(axis=1) < 1e-5).any() for row in own)


def test_drugs_no_training_cell_received_are_scored_apart_against_the_nearest_drug(monkeypatch):
    from conftest import REPO

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import perturbation as benchmark

    keys = [("L1", "A", 1.0), ("L1", "New", 1.0), ("L2", "New", 0.5), ("L2", "A", 0.5)]
    on_new = {benchmark.NEAREST_DRUG: 0.1, "RankDiT": 0.3, "B2 PerturbMean": 0.0}  # Pearson on the new drug
    scores = {name: {"pearson_delta": [0.5, value, value, 0.5], "mae_delta": [0.1, 0.2, 0.2, 0.1]}
              for name, value in on_new.items()}  # fmt: skip
    assert benchmark.unseen_drugs(scores, keys, {"A", "New"}, seed=0) is None  # every drug seen in training
    unseen = benchmark.unseen_drugs(scores, keys, {"A"}, seed=0)
    assert unseen["drugs"] == ["New"] and unseen["perturbations"] == 2
    assert unseen["methods"]["RankDiT"]["pearson_delta"] == pytest.approx(0.3)  # only the unseen drug's rows
    assert unseen["versus_nearest_drug"]["RankDiT"]["pearson_delta"]["difference"] == pytest.approx(0.2)
    report = {"methods": {n: {m: float(np.mean(v)) for m, v in s.items()} for n, s in scores.items()},
              "versus_best_baseline": {}, "best_baseline": "B2 PerturbMean", "unseen_drugs": unseen,
              "directions": {"pearson_delta": "higher", "mae_delta": "lower"}, "ceiling_source": "-"}  # fmt: skip
    table = benchmark.markdown_table(report)
    assert "Drugs no training cell received (New; 2 perturbations)" in table and "+0.200" in table
