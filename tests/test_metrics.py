import evaluate
import numpy as np
import pytest
import torch
from conftest import REPO
from scipy import sparse

from metrics import CellAwareMarginal, MagicImputation, NearestCellRates, NearestCells, PerGeneMarginal
from modeling import CellBatch, rank_tokens


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
    truth = np.tile(np.arange(12) % 5, 2)
    probs = np.eye(5)[truth]  # perfect in cell 0 ...
    probs[12:] = np.eye(5)[4 - truth[12:]]  # ... reversed in cell 1
    cells = np.repeat([0, 1], 12)
    scores = metric.compute(predictions=probs, references=truth, cell_ids=cells)
    assert scores["spearman_cells_all"] == 2 and scores["spearman_all"] == pytest.approx(0.0)
    short = metric.compute(predictions=probs[:9], references=truth[:9], cell_ids=cells[:9])
    assert short["spearman_cells_all"] == 0 and np.isnan(short["spearman_all"])


def test_per_cell_spearman_sign_and_value_by_hand(metric):
    # Cell 0: predicted 1..10, truth with neighbours swapped (d = 1 everywhere): rho = 1 - 6 * 10 / (10 * 99).
    # Cell 1: predicted 1..10, truth reversed: rho = -1. The mean over the two cells is their average.
    predicted = np.tile(np.arange(1, 11), 2)
    truth = np.r_[[2, 1, 4, 3, 6, 5, 8, 7, 10, 9], np.arange(10, 0, -1)]
    scores = metric.compute(predictions=np.eye(11)[predicted], references=truth, cell_ids=np.repeat([0, 1], 10))
    assert scores["spearman_all"] == pytest.approx(((1 - 60 / 990) + (-1)) / 2)


def test_per_cell_spearman_equals_scipy_cell_by_cell_with_ties_short_and_constant_cells():
    from scipy.stats import spearmanr

    from metrics.rank_imputation.rank_imputation import mean_cell_spearman

    rng = np.random.default_rng(0)
    sizes = [30, 12, 9, 25, 40, 15]  # the 9-position cell is too short
    cells = np.repeat([7, 3, 11, 0, 5, 2], sizes)  # ids neither sorted nor contiguous in value
    truth = rng.integers(0, 4, len(cells)).astype(float)  # heavy ties, as zeros are
    expected = np.round(truth + rng.normal(0, 1.5, len(cells)), 1)
    truth[cells == 0] = 2.0  # no spread in the truth
    expected[cells == 2] = 1.0  # no spread in the prediction
    order = rng.permutation(len(cells))  # positions of a cell need not be adjacent
    rho, n_cells = mean_cell_spearman(expected[order], truth[order], cells[order], min_positions=10)
    by_hand = [spearmanr(expected[cells == c], truth[cells == c]).statistic for c in (7, 3, 5)]
    assert n_cells == 3 and rho == pytest.approx(np.mean(by_hand), abs=1e-12)
    assert np.isnan(mean_cell_spearman(expected[:0], truth[:0], cells[:0], 10)[0])
    expected[cells == 7] = np.where(np.arange(30) == 4, np.nan, expected[cells == 7])  # scipy's rho is NaN
    rho, n_cells = mean_cell_spearman(expected, truth, cells, min_positions=10)
    assert n_cells == 2 and rho == pytest.approx(np.mean(by_hand[1:]), abs=1e-12)


def test_tie_aware_scale_counts_a_count_one_two_mix_up_as_one_level(metric):
    # A cell whose counts 1, 2, 3 are tokens 1, 18, 30: predicting token 1 for a count-2 gene is 17 bins off but one
    # level off; the expected level of a 50 / 50 guess between tokens 18 and 30 is 2.5.
    from metrics.imputation import token_levels

    levels = token_levels(np.array([1, 1, 18, 30, 1, 18]), num_bins=50)
    assert levels[[0, 1, 18, 30]].tolist() == [0, 1, 2, 3] and levels[24] == pytest.approx(2.5) and levels[50] == 3
    probs = np.zeros((2, 51))
    probs[0, 1] = 1.0
    probs[1, [18, 30]] = 0.5
    scores = metric.compute(predictions=probs, references=[18, 18], cell_ids=[0, 0], levels=np.stack([levels] * 2))
    assert scores["mae_all"] == pytest.approx((17 + 6) / 2) and scores["mae_level_all"] == pytest.approx(0.75)
    assert scores["within_one_level_all"] == 1.0 and scores["within_one_all"] == 0.5


def test_scores_per_stratum(metric):
    probs = np.eye(3)[[0, 1, 2, 0]] * 0.7 + 0.1
    scores = metric.compute(predictions=probs, references=[0, 1, 1, 2], cell_ids=[0] * 4, strata=["a", "a", "b", "b"])
    assert scores["positions_a"] == 2 and scores["accuracy_a"] == 1.0 and scores["accuracy_b"] == 0.0
    assert scores["nll_a"] == pytest.approx(-np.log(0.8))


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


def _masked_cell(gene_ids, tokens, masked, mask_token_id):
    gene_ids, tokens, masked = torch.tensor([gene_ids]), torch.tensor([tokens]), torch.tensor([masked])
    data = {"gene_ids": gene_ids, "input_ids": tokens.masked_fill(masked, mask_token_id)}
    return CellBatch({**data, "attention_mask": torch.ones_like(masked)}, mask_token_id)


def test_per_gene_marginal_on_toy_cells():
    per_gene = PerGeneMarginal(num_rank_bins=9, gene_vocab_size=10, pseudocount=1e-9).fit(_toy_cells())
    probs = per_gene.predict(_masked_cell([3, 6], [9, 0], [False, True], 10))
    assert probs[0, 0, 0] == pytest.approx(0.5) and probs[0, 0, 9] + probs[0, 0, 8] == pytest.approx(0.5)


def test_cell_aware_marginal_keeps_the_tokens_the_cell_shows_and_follows_its_depth():
    per_gene = PerGeneMarginal(num_rank_bins=4, gene_vocab_size=12, pseudocount=1e-9)
    # Genes 3-10 are expressed in half the cells, with tokens 1..4 equally often.
    for i in range(16):
        per_gene.update(np.arange(3, 11), np.where(np.arange(8) % 2 == i % 2, (i // 2) % 4 + 1, 0))
    cell = _masked_cell([3, 4, 5, 6, 7, 8, 9, 10], [2, 2, 4, 4, 0, 0, 0, 0], [False] * 4 + [True] * 4, 5)
    flat = CellAwareMarginal(per_gene, unseen_weight=0.01, depth_adjusted=False).predict(cell)[0, 7].double()
    # Expressed: tokens 2 and 4 (seen) weigh 1, tokens 1 and 3 weigh 0.01; expression stays at the gene's 1/2.
    torch.testing.assert_close(flat, torch.tensor([0.5, 0.005 / 2.02, 0.5 / 2.02, 0.005 / 2.02, 0.5 / 2.02]).double())
    deep = CellAwareMarginal(per_gene, unseen_weight=0.01, depth_adjusted=True).predict(cell)[0, 7]
    # All 4 visible genes expressed: solving 4 (1 - exp(-rate s)) = 4 drives the chance of expression up.
    assert deep[0] < 0.05 and deep[1:].sum() > 0.95 and deep[2] == pytest.approx(deep[4])
    shallow = _masked_cell([3, 4, 5, 6, 7, 8, 9, 10], [2, 0, 0, 0, 0, 0, 0, 0], [False] * 4 + [True] * 4, 5)
    assert CellAwareMarginal(per_gene, depth_adjusted=True).predict(shallow)[0, 7, 0] > 0.5
    with pytest.raises(ValueError, match="unseen_weight"):
        CellAwareMarginal(per_gene, unseen_weight=0.0)


def test_nearest_cells_follow_the_neighbours_on_the_level_scale():
    cells = _toy_cells()
    prior = CellAwareMarginal(PerGeneMarginal(num_rank_bins=9, gene_vocab_size=10).fit(cells))
    knn = NearestCells(cells, prior, k=5, prior_weight=0.0)
    # Visible: genes 3 and 4 high, gene 6 off. Masked: 5 (neighbours say 9) and 7 (neighbours say 0).
    cell = _masked_cell([3, 4, 6, 5, 7], [9, 8, 0, 0, 0], [False, False, False, True, True], 10)
    probs = knn.predict(cell)
    assert probs[0, 3, 9] == pytest.approx(1.0) and probs[0, 4, 0] == pytest.approx(1.0)
    # The same cell with its levels shown by other tokens (counts 1 and 2 as tokens 3 and 7): the votes follow.
    cell = _masked_cell([3, 4, 6, 5, 7], [7, 3, 0, 0, 0], [False, False, False, True, True], 10)
    assert knn.predict(cell)[0, 3, 7] == pytest.approx(1.0)
    # Settings chosen on validation share the training cells: the same as building anew.
    torch.testing.assert_close(
        knn.with_settings(3, 2.0).predict(cell), NearestCells(cells, prior, 3, 2.0).predict(cell)
    )


def test_nearest_cells_mix_k_votes_with_prior_weight_pseudo_cells_into_distributions():
    cells = _toy_cells()
    prior = CellAwareMarginal(PerGeneMarginal(num_rank_bins=9, gene_vocab_size=10).fit(cells))
    cell = _masked_cell([3, 4, 6, 5, 7], [9, 8, 0, 0, 0], [False, False, False, True, True], 10)
    smoothed = NearestCells(cells, prior, k=5, prior_weight=2.0).predict(cell)[0].double()
    # By hand: the 5 neighbours (the cells of the same kind, genes 3-5 high) vote 9 at gene 5 and 0 at gene 7, and
    # 2 pseudo-cells vote the prior: (votes + 2 prior) / (5 + 2).
    at = prior.predict(cell)[0].double()
    expected_5 = (5 * torch.eye(10, dtype=torch.float64)[9] + 2 * at[3]) / 7
    expected_7 = (5 * torch.eye(10, dtype=torch.float64)[0] + 2 * at[4]) / 7
    torch.testing.assert_close(smoothed[3], expected_5, atol=1e-6, rtol=0)
    torch.testing.assert_close(smoothed[4], expected_7, atol=1e-6, rtol=0)
    torch.testing.assert_close(smoothed.sum(dim=-1), torch.ones(5, dtype=torch.float64), atol=1e-6, rtol=0)


def test_magic_baseline_reads_the_cells_own_tokens_at_similar_genes():
    rng = np.random.default_rng(0)
    # 60 cells of two types: genes 3-12 high (counts ~20) in type A and low (~1) in type B, genes 13-22 the reverse.
    counts = np.zeros((60, 25))
    for i in range(60):
        high = slice(3, 13) if i % 2 else slice(13, 23)
        low = slice(13, 23) if i % 2 else slice(3, 13)
        counts[i, high] = rng.poisson(20, 10)
        counts[i, low] = rng.poisson(1, 10)
    cells = [(np.flatnonzero(c), rank_tokens(c[c > 0], 10)) for c in counts]
    prior = CellAwareMarginal(PerGeneMarginal(num_rank_bins=10, gene_vocab_size=25).fit(cells))
    magic = MagicImputation(sparse.csr_matrix(counts), prior, knn=5, t=3, bandwidth=0.3, prior_weight=0.05)
    # A type-A cell: gene 3 masked; the visible high genes (4-12) carry tokens 7..10, the low ones 1..3.
    query = np.r_[0, 0, 0, rng.poisson(20, 10), rng.poisson(1, 10), 0, 0].astype(float)
    genes = np.arange(3, 23)
    tokens = rank_tokens(query[genes], 10)
    masked = genes == 3
    cell = _masked_cell(genes.tolist(), tokens.tolist(), masked.tolist(), 11)
    visible_counts = torch.tensor([np.where(masked, np.nan, query[genes])]).float()
    probs = magic.predict(cell, visible_counts)[0, 0]
    high_tokens = np.unique(tokens[1:10])
    assert probs[high_tokens].sum() > 0.8
    # Imputations are kept per cells, mask and counts: other counts at the same genes are imputed anew.
    other = magic.with_settings(knn=5, t=3, bandwidth=1.0, prior_weight=0.05)
    swapped = torch.tensor([np.where(masked, np.nan, np.r_[query[13:23], query[3:13]])]).float()
    assert not np.allclose(other.impute(cell, swapped), other.impute(cell, visible_counts))
    assert len(magic._imputed) == 2 and other._imputed is magic._imputed
    with pytest.raises(ValueError, match="visible counts"):
        magic.predict(cell)


def test_nearest_cell_rates_read_a_neighbours_counts_on_the_cells_depth_as_its_tokens():
    from scipy.stats import poisson

    # Training cells at genes 1-6: the first of the query's profile at half its depth at genes 1-4, the second of
    # another profile at its depth, the third with no count at genes 1-4.
    counts = np.zeros((3, 7))
    counts[0, 1:7] = [10, 20, 30, 40, 6, 1]
    counts[1, 1:7] = [80, 60, 40, 20, 3, 50]
    counts[2, 5:7] = [100, 100]
    cells = [(np.flatnonzero(c), rank_tokens(c[c > 0], 9)) for c in counts]
    prior = CellAwareMarginal(PerGeneMarginal(num_rank_bins=9, gene_vocab_size=7).fit(cells))
    rates = NearestCellRates(sparse.csr_matrix(counts), prior, k=1, shrinkage=0.0, prior_weight=0.0)
    # The query shows counts 20, 40, 60, 80 as tokens 2, 4, 6, 8 and hides genes 5 and 6.
    cell = _masked_cell([1, 2, 3, 4, 5, 6], [2, 4, 6, 8, 0, 0], [False] * 4 + [True] * 2, 10)
    visible_counts = torch.tensor([[20.0, 40.0, 60.0, 80.0, float("nan"), float("nan")]])
    # The query reads count c as the token interpolated between count 1's (token 1) and the counts it shows, B = 9
    # above them, 0 at 0.
    count = np.arange(400)
    token = np.rint(np.interp(count, [0, 1, 20, 40, 60, 80], [0, 1, 2, 4, 6, 8], right=9)).astype(int)

    def binned(rate: float) -> torch.Tensor:
        return torch.from_numpy(np.bincount(token, weights=poisson.pmf(count, rate), minlength=10))

    # By hand: the nearest cell is the first (same profile); its counts 6 and 1 on twice its depth are Poisson rates
    # of 12 and 2.
    probs = rates.predict(cell, visible_counts)[0].double()
    torch.testing.assert_close(probs[4:], torch.stack([binned(12.0), binned(2.0)]), atol=1e-6, rtol=0)
    # Two neighbours (the third, with no depth at genes 1-4, is never one, whatever k), shrunk all the way: one
    # Poisson at their mean rates, (12 + 3 * 200 / 200) / 2 = 7.5 and (2 + 50) / 2 = 26.
    for k in (2, 3):
        both = rates.with_settings(k=k, shrinkage=1.0, prior_weight=0.0).predict(cell, visible_counts)[0].double()
        torch.testing.assert_close(both[4:], torch.stack([binned(7.5), binned(26.0)]), atol=1e-6, rtol=0)
    # Not shrunk: the mean of the two Poissons; with the prior mixed in at 0.4.
    mixed = rates.with_settings(k=2, shrinkage=0.0, prior_weight=0.4).predict(cell, visible_counts)[0].double()
    expected = 0.6 * (binned(12.0) + binned(3.0)) / 2 + 0.4 * prior.predict(cell)[0, 4].double()
    torch.testing.assert_close(mixed[4], expected, atol=1e-6, rtol=0)
    # A cell showing no expressed gene gets the prior; counts are required.
    blank = _masked_cell([1, 2, 5], [0, 0, 0], [False, False, True], 10)
    torch.testing.assert_close(rates.predict(blank, torch.tensor([[0.0, 0.0, float("nan")]])), prior.predict(blank))
    with pytest.raises(ValueError, match="visible counts"):
        rates.predict(cell)


def test_only_masked_positions_are_scored(metric):
    from metrics.imputation import score_masked

    generator = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 6, (3, 60), generator=generator)
    masked = torch.rand(3, 60, generator=generator) < 0.4
    probs = torch.softmax(torch.randn(3, 60, 6, generator=generator), dim=-1)
    scores = score_masked(probs, truth, masked)
    assert scores["positions_all"] == int(masked.sum())
    cheat = probs.clone()
    cheat[~masked] = torch.nn.functional.one_hot(truth[~masked], 6).float()  # perfect where visible
    assert scores["spearman_cells_all"] == 3
    np.testing.assert_equal(score_masked(cheat, truth, masked), scores)
    # The evaluate module's compute is the same scoring (its Arrow table holds float32 probabilities).
    cells = torch.arange(3)[:, None].expand(3, 60)[masked].numpy()
    module = metric.compute(predictions=probs[masked].numpy(), references=truth[masked].numpy(), cell_ids=cells)
    assert module.keys() == scores.keys()
    for key, value in scores.items():
        np.testing.assert_allclose(module[key], value, rtol=1e-6, err_msg=key)
