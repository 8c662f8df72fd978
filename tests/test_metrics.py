import evaluate
import numpy as np
import pytest
import torch
from conftest import REPO

from metrics import GlobalMarginal, NearestCells, PerGeneMarginal


@pytest.fixture(scope="module")
def metric():
    return evaluate.load(str(REPO / "metrics" / "rank_imputation"))


def test_hand_computed_scores(metric):
    predictions = [
        [0.7, 0.2, 0.1, 0.0],  # truth 0: best 0, E = 0.4
        [0.1, 0.2, 0.3, 0.4],  # truth 2: best 3, E = 2.0
        [0.0, 0.5, 0.5, 0.0],  # truth 3: best 1, E = 1.5
    ]
    scores = metric.compute(predictions=predictions, references=[0, 2, 3], cell_ids=[0, 0, 1])
    assert scores["positions_all"] == 3 and scores["positions_zero"] == 1 and scores["positions_nonzero"] == 2
    assert scores["nll_all"] == pytest.approx(-(np.log(0.7) + np.log(0.3) + np.log(1e-12)) / 3)
    assert scores["accuracy_all"] == pytest.approx(1 / 3) and scores["accuracy_nonzero"] == 0.0
    assert scores["within_one_all"] == pytest.approx(2 / 3)
    assert scores["mae_all"] == pytest.approx((0.4 + 0.0 + 1.5) / 3) and scores["mae_zero"] == pytest.approx(0.4)
    # share of the truth's atom [F(t-1), F(t)] inside [0.25, 0.75]: 0.45 / 0.7, 0.3 / 0.3, and 0 for p(t) = 0
    assert scores["coverage_50_all"] == pytest.approx((0.45 / 0.7 + 1.0 + 0.0) / 3)
    # confidences 0.7, 0.4, 0.5 in three bins with accuracies 1, 0, 0
    assert scores["ece_all"] == pytest.approx((0.3 + 0.4 + 0.5) / 3)


def test_per_cell_spearman_needs_enough_positions(metric):
    rng = np.random.default_rng(0)
    truth = np.tile(np.arange(12) % 5, 2)
    probs = np.eye(5)[truth]  # perfect in cell 0 ...
    probs[12:] = np.eye(5)[4 - truth[12:]]  # ... reversed in cell 1
    cells = np.repeat([0, 1], 12)
    scores = metric.compute(predictions=probs, references=truth, cell_ids=cells)
    assert scores["spearman_cells_all"] == 2 and scores["spearman_all"] == pytest.approx(0.0)
    short = metric.compute(predictions=probs[:9], references=truth[:9], cell_ids=cells[:9])
    assert short["spearman_cells_all"] == 0 and np.isnan(short["spearman_all"])
    assert rng  # the seed documents that nothing here is random


def test_a_calibrated_predictor_scores_near_nominal(metric):
    rng = np.random.default_rng(0)
    ranks = np.arange(51)
    centres, widths = rng.uniform(0, 50, 4000), rng.uniform(2, 8, 4000)
    probs = np.exp(-0.5 * ((ranks - centres[:, None]) / widths[:, None]) ** 2)
    probs /= probs.sum(axis=1, keepdims=True)
    truth = np.array([rng.choice(51, p=p) for p in probs])  # drawn from the predicted distributions
    scores = metric.compute(predictions=probs, references=truth, cell_ids=np.arange(4000) // 40)
    assert 0.48 < scores["coverage_50_all"] < 0.52 and 0.88 < scores["coverage_90_all"] < 0.92
    assert scores["ece_all"] < 0.03
    overconfident = np.eye(51)[probs.argmax(axis=1)] * 0.9 + 0.1 / 51
    bad = metric.compute(predictions=overconfident, references=truth, cell_ids=np.arange(4000) // 40)
    assert bad["coverage_90_all"] < 0.7 and bad["ece_all"] > 0.5


def _toy_cells():
    # Two kinds of cell: genes 3-5 high and 6-8 off, or the reverse.
    cells = []
    for i in range(20):
        genes = np.array([3, 4, 5]) if i % 2 else np.array([6, 7, 8])
        cells.append((genes, np.array([9, 8, 9]) if i % 4 < 2 else np.array([8, 9, 9])))
    return cells


def test_marginal_baselines_on_toy_cells():
    per_gene = PerGeneMarginal(num_rank_bins=9, gene_vocab_size=10, pseudocount=1e-9).fit(_toy_cells())
    gene_ids = torch.tensor([[3, 6]])
    probs = per_gene.predict(gene_ids)
    assert probs[0, 0, 0] == pytest.approx(0.5) and probs[0, 0, 9] + probs[0, 0, 8] == pytest.approx(0.5)
    global_marginal = GlobalMarginal(per_gene, genes=np.arange(3, 9)).predict(gene_ids)
    torch.testing.assert_close(global_marginal[0, 0], global_marginal[0, 1])
    torch.testing.assert_close(global_marginal[0, 0], per_gene.predict(torch.arange(3, 9)).mean(0))


def test_nearest_cells_follow_the_neighbours():
    cells = _toy_cells()
    prior = PerGeneMarginal(num_rank_bins=9, gene_vocab_size=10).fit(cells)
    knn = NearestCells(cells, prior, k=5, prior_weight=0.0)
    mask = 10
    # Visible: genes 3 and 4 high, gene 6 off. Masked: 5 (neighbours say 9) and 7 (neighbours say 0).
    gene_ids, input_ids = torch.tensor([[3, 4, 6, 5, 7]]), torch.tensor([[9, 8, 0, mask, mask]])
    probs = knn.predict(gene_ids, input_ids, torch.ones_like(gene_ids), mask)
    assert probs[0, 3].argmax() == 9 and probs[0, 3, 9] == pytest.approx(1.0)
    assert probs[0, 4, 0] == pytest.approx(1.0)
    torch.testing.assert_close(probs[0, :3], prior.predict(gene_ids)[0, :3])  # visible rows: untouched prior


def test_only_masked_positions_are_scored(metric):
    from metrics.imputation import score_masked

    generator = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 6, (3, 60), generator=generator)
    masked = torch.rand(3, 60, generator=generator) < 0.4
    probs = torch.softmax(torch.randn(3, 60, 6, generator=generator), dim=-1)
    scores = score_masked(metric, probs, truth, masked)
    assert scores["positions_all"] == int(masked.sum())
    cheat = probs.clone()
    cheat[~masked] = torch.nn.functional.one_hot(truth[~masked], 6).float()  # perfect where visible
    assert scores["spearman_cells_all"] == 3
    np.testing.assert_equal(score_masked(metric, cheat, truth, masked), scores)
