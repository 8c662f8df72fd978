"""`rank_imputation`: scores of predictive distributions over rank tokens at masked positions.

A local `evaluate` module: `evaluate.load("metrics/rank_imputation")` works offline. Give it, for every *masked*
position of held-out cells only, the predicted distribution over ranks 0..B, the true rank and the cell it
belongs to.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Scores of predictive distributions over ordered rank tokens 0..B at masked positions: masked NLL,
accuracy and within-one-bin accuracy of the most likely rank, MAE of the expected rank (in bins), mean per-cell
Spearman correlation of expected and true ranks (cells with at least `min_cell_positions` positions), coverage of
the central 50% and 90% predictive intervals (of the randomised PIT, so a calibrated predictor scores the nominal
level), and the expected calibration error of the most likely rank. Each is
given over all positions (`*_all`), over positions whose true rank is 0 (`*_zero`) and over the others
(`*_nonzero`). The points of the reliability diagram (10 equal-width bins of the confidence in the most likely rank,
over all positions) come with them.

Ties make token distances misleading: most non-zero counts are 1, so count 1 is token 1 and count 2 is token 18 or
so. Given `levels`, the value of each token on a tie-aware scale in that position's cell (see `token_levels` in
`metrics/imputation.py`: level j is the cell's j-th smallest distinct count, 0 is not expressed), the ordinal
metrics are also computed on that scale (`mae_level_*`, `within_one_level_*`, `spearman_level_*`), where a count
1 / count 2 mix-up costs one level. Given `strata`, a label per position (for example the gene's detection rate in
training cells), every metric is also given per label (`nll_<label>`, ...)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: `(n_positions, B + 1)` predicted probabilities of ranks 0..B at masked positions.
    references: `(n_positions,)` true ranks.
    cell_ids: `(n_positions,)` the cell of each position (for the per-cell Spearman correlation).
    min_cell_positions: cells with fewer positions are left out of the Spearman mean (default 10).
    levels: optional `(n_positions, B + 1)` value of each token on the tie-aware scale of the position's cell.
    strata: optional `(n_positions,)` string labels; every metric is also given per label.
Returns:
    dict of floats: nll_*, accuracy_*, within_one_*, mae_*, spearman_*, coverage_50_*, coverage_90_*, ece_*, with
    `levels` mae_level_*, within_one_level_*, spearman_level_*, and positions_* / spearman_cells_* (how many were
    scored), for * in all, zero, nonzero and each stratum label; and lists of 10: reliability_confidence,
    reliability_accuracy (NaN for empty bins) and reliability_positions.
Examples:
    >>> metric = evaluate.load("metrics/rank_imputation")
    >>> metric.compute(predictions=[[0.1, 0.9], [0.8, 0.2]], references=[1, 0], cell_ids=[0, 0])["accuracy_all"]
    1.0
"""


def position_nll(probs, truth) -> np.ndarray:
    """-log p(true token) at each position, p floored at 1e-12: RankDiff's one masked-NLL computation (the trainer's
    evaluation, the benchmarks and this module's `nll_*` all call it)."""
    probs, truth = np.asarray(probs, dtype=np.float64), np.asarray(truth)
    return -np.log(np.clip(probs[np.arange(len(truth)), truth], 1e-12, None))


def interval_coverage(probs: np.ndarray, truth: np.ndarray, level: float) -> np.ndarray:
    """How much of each truth's probability atom lies in the central `level` interval of the distribution.

    This is the chance that the randomised PIT, uniform on [F(t - 1), F(t)], falls in [(1 - level) / 2,
    (1 + level) / 2]: it averages to `level` exactly for a calibrated predictor, where counting whole discrete
    intervals would over-cover.
    """
    rows = np.arange(len(truth))
    upper = np.cumsum(probs, axis=1)[rows, truth]
    atom = probs[rows, truth]
    lower = upper - atom
    overlap = np.clip(np.minimum(upper, (1.0 + level) / 2.0) - np.maximum(lower, (1.0 - level) / 2.0), 0.0, None)
    return np.divide(overlap, atom, out=np.zeros_like(atom), where=atom > 0)


def reliability_table(confidence: np.ndarray, correct: np.ndarray, num_bins: int = 10):
    """Per equal-width bin of the confidence in the most likely rank: mean confidence, accuracy and number of
    positions (NaN where a bin is empty): the points of a reliability diagram."""
    bins = np.minimum((confidence * num_bins).astype(int), num_bins - 1)
    positions = np.bincount(bins, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(bins, confidence, minlength=num_bins) / positions
        accuracy = np.bincount(bins, correct.astype(np.float64), minlength=num_bins) / positions
    return mean_confidence, accuracy, positions


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, num_bins: int = 10) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by their sizes."""
    mean_confidence, accuracy, positions = reliability_table(confidence, correct, num_bins)
    filled = positions > 0
    return float((positions[filled] * np.abs(accuracy[filled] - mean_confidence[filled])).sum() / len(confidence))


def mean_cell_spearman(expected: np.ndarray, truth: np.ndarray, cells: np.ndarray, min_positions: int):
    """Mean over cells (with enough positions and some spread) of Spearman(expected, truth); and the cell count.

    Spearman's rho is Pearson's correlation of tie-averaged ranks (scipy's `spearmanr`), taken for every cell at
    once: ranks within cells from one sort, the correlations from per-cell sums."""
    if not len(truth):
        return float("nan"), 0
    _, cell = np.unique(cells, return_inverse=True)
    x, spread_x = _ranks_within(np.asarray(expected, dtype=np.float64), cell)
    y, spread_y = _ranks_within(np.asarray(truth, dtype=np.float64), cell)
    n = np.bincount(cell).astype(np.float64)
    sums = {name: np.bincount(cell, weights=values) for name, values in
            {"x": x, "y": y, "xx": x * x, "yy": y * y, "xy": x * y}.items()}  # fmt: skip
    covariance = sums["xy"] - sums["x"] * sums["y"] / n
    variance_x, variance_y = sums["xx"] - sums["x"] ** 2 / n, sums["yy"] - sums["y"] ** 2 / n
    kept = (n >= min_positions) & spread_x & spread_y
    rho = np.clip(covariance[kept] / np.sqrt(variance_x[kept] * variance_y[kept]), -1.0, 1.0)
    return (float(rho.mean()) if kept.any() else float("nan")), int(kept.sum())


def _ranks_within(values: np.ndarray, cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ranks 1..n of `values` within each cell (`cell`: 0..C-1), ties given their mean rank; and whether each cell's
    values differ at all (none of them NaN)."""
    order = np.lexsort((values, cell))
    v, c = values[order], cell[order]
    starts_cell = np.r_[True, c[1:] != c[:-1]]
    starts_tie = starts_cell | np.r_[True, v[1:] != v[:-1]]
    position = np.arange(len(v))
    rank = position - np.maximum.accumulate(np.where(starts_cell, position, 0)) + 1
    tie = np.cumsum(starts_tie) - 1
    ranks = np.empty(len(v))
    ranks[order] = (np.bincount(tie, weights=rank) / np.bincount(tie))[tie]
    size = cell.max(initial=-1) + 1
    ties_per_cell = np.bincount(c, weights=starts_tie, minlength=size)
    undefined = np.bincount(cell, weights=np.isnan(values), minlength=size) > 0  # scipy's rho is NaN there
    return ranks, (ties_per_cell > 1) & ~undefined


def score(
    probs: np.ndarray,
    truth: np.ndarray,
    cells: np.ndarray,
    min_cell_positions: int = 10,
    levels: np.ndarray | None = None,
    strata: np.ndarray | None = None,
) -> dict:
    """Every metric of this module, as plain numpy (what `compute` calls)."""
    probs, truth, cells = np.asarray(probs, dtype=np.float64), np.asarray(truth), np.asarray(cells)
    ranks = np.arange(probs.shape[1])
    best = probs.argmax(axis=1)
    expected = probs @ ranks
    subsets = {"all": np.ones(len(truth), bool), "zero": truth == 0, "nonzero": truth != 0}
    if strata is not None:
        strata = np.asarray(strata).astype(str)
        subsets.update({label: strata == label for label in sorted(set(strata.tolist()))})
    if levels is not None:
        levels = np.asarray(levels, dtype=np.float64)
        rows = np.arange(len(truth))
        true_level, best_level = levels[rows, truth], levels[rows, best]
        expected_level = (probs * levels).sum(axis=1)
    results = {}
    for subset, keep in subsets.items():
        results[f"positions_{subset}"] = int(keep.sum())
        if not keep.any():
            continue
        p, t, b = probs[keep], truth[keep], best[keep]
        results[f"nll_{subset}"] = float(position_nll(p, t).mean())
        results[f"accuracy_{subset}"] = float((b == t).mean())
        results[f"within_one_{subset}"] = float((np.abs(b - t) <= 1).mean())
        results[f"mae_{subset}"] = float(np.abs(expected[keep] - t).mean())
        spearman, n_cells = mean_cell_spearman(expected[keep], t, cells[keep], min_cell_positions)
        results[f"spearman_{subset}"], results[f"spearman_cells_{subset}"] = spearman, n_cells
        if levels is not None:
            results[f"mae_level_{subset}"] = float(np.abs(expected_level[keep] - true_level[keep]).mean())
            results[f"within_one_level_{subset}"] = float((np.abs(best_level[keep] - true_level[keep]) <= 1).mean())
            results[f"spearman_level_{subset}"] = mean_cell_spearman(
                expected_level[keep], true_level[keep], cells[keep], min_cell_positions
            )[0]
        for level in (0.5, 0.9):
            results[f"coverage_{round(level * 100)}_{subset}"] = float(interval_coverage(p, t, level).mean())
        results[f"ece_{subset}"] = expected_calibration_error(p.max(axis=1), b == t)
    table = reliability_table(probs.max(axis=1), best == truth)
    for name, column in zip(("confidence", "accuracy", "positions"), table):
        results[f"reliability_{name}"] = column.tolist()
    return results


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RankImputation(evaluate.Metric):
    """See the module docstring."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int32"),
                    "cell_ids": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, cell_ids, min_cell_positions: int = 10, levels=None, strata=None):
        return score(
            np.asarray(predictions), np.asarray(references), np.asarray(cell_ids), min_cell_positions, levels, strata
        )
