"""Perturbation prediction: the mean-shift baselines B0-B3, fitted on training cells only, and the set metrics.

A perturbation is a (cell line, drug, dose) and its cells; every baseline predicts the *shift* of the line's
control (DMSO) mean that the perturbation causes, and its predicted cells are the line's control cells plus that
shift (what "a mean model's cells" can be). The shifts are fitted in any cell x gene space (log-normalised
expression, or rank tokens), on training perturbations only:

- B0 no change: shift 0 (the line's control cells);
- B1 the line's mean over its perturbed training cells, minus its control mean;
- B2 PerturbMean (STATE): the drug-and-dose's mean shift over the other lines;
- B3 an additive ridge model, line effect + drug-dose effect, plus a low-rank line x drug-dose interaction
  (fitted with the additive part, the unobserved pairs filled in as it goes) when validation says it helps.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

Key = tuple[str, str, float]  # (line, drug, dose)


def group_means(matrix: np.ndarray, keys: list) -> dict:
    """The mean row of `matrix` for each distinct key of `keys` (one per row)."""
    rows = defaultdict(list)
    for i, key in enumerate(keys):
        rows[key].append(i)
    return {key: matrix[index].mean(axis=0) for key, index in rows.items()}


class MeanShiftBaselines:
    """B0-B3 fitted on training cells of one space.

    Args:
        matrix (`np.ndarray`, `(n_cells, n_genes)`): the training cells.
        keys (`list[Key]`): each cell's (line, drug, dose).
        control (`str`): the control drug.
    """

    def __init__(self, matrix: np.ndarray, keys: list[Key], control: str):
        self.control = control
        means = group_means(matrix, keys)
        self.control_mean = {line: mean for (line, drug, _), mean in means.items() if drug == control}
        self.shifts = {
            key: mean - self.control_mean[key[0]]
            for key, mean in means.items()
            if key[1] != control and key[0] in self.control_mean
        }
        perturbed = [i for i, key in enumerate(keys) if key[1] != control and key[0] in self.control_mean]
        line_means = group_means(matrix[perturbed], [keys[i][0] for i in perturbed])
        self.line_shift = {line: mean - self.control_mean[line] for line, mean in line_means.items()}
        self.lines = sorted(self.control_mean)
        self.treatments = sorted({key[1:] for key in self.shifts})
        self.n_genes = matrix.shape[1]
        self.ridge_alpha, self.rank = 1.0, 0
        self._ridge = None

    def b0(self, key: Key) -> np.ndarray:
        return np.zeros(self.n_genes)

    def b1(self, key: Key) -> np.ndarray:
        return self.line_shift.get(key[0], np.zeros(self.n_genes))

    def b2(self, key: Key) -> np.ndarray:
        others = [shift for (line, *treatment), shift in self.shifts.items()
                  if tuple(treatment) == key[1:] and line != key[0]]  # fmt: skip
        return np.mean(others, axis=0) if others else np.zeros(self.n_genes)

    def fit_b3(self, alpha: float, rank: int, iterations: int = 100) -> MeanShiftBaselines:
        """Fit B3 with ridge penalty `alpha` and a line x treatment interaction of `rank` (0: additive only).

        With an interaction, the additive part and the rank-`rank` residual are fitted together by filling the
        unobserved (line, treatment) shifts with the current prediction and refitting both, until they agree.
        """
        lines, treatments = self.lines, self.treatments
        n_l, n_t = len(lines), len(treatments)
        grid = [(line, *treatment) for line in lines for treatment in treatments]
        design = np.zeros((len(grid), n_l + n_t))
        for row, (line, *treatment) in enumerate(grid):
            design[row, lines.index(line)] = 1.0
            design[row, n_l + treatments.index(tuple(treatment))] = 1.0
        observed = np.array([key in self.shifts for key in grid])
        targets = np.stack([self.shifts.get(key, np.zeros(self.n_genes)) for key in grid])
        interaction = np.zeros((len(grid), self.n_genes))
        filled = targets
        for _ in range(iterations if rank > 0 else 1):
            rows = slice(None) if rank > 0 else observed  # additive only: the observed shifts alone
            x, y = design[rows], filled[rows] - interaction[rows]
            # Ridge without intercept (the one-hots span it): (X'X + alpha I)^-1 X'Y, all genes at once.
            coef = np.linalg.solve(x.T @ x + alpha * np.eye(n_l + n_t), x.T @ y)
            if rank > 0:
                residual = (filled - design @ coef).reshape(n_l, n_t * self.n_genes)
                u, s, vt = np.linalg.svd(residual, full_matrices=False)
                interaction = ((u[:, :rank] * s[:rank]) @ vt[:rank]).reshape(len(grid), self.n_genes)
                filled = np.where(observed[:, None], targets, design @ coef + interaction)
        self._ridge, self._interaction = coef, interaction.reshape(n_l, n_t, self.n_genes)
        self.ridge_alpha, self.rank = alpha, rank
        return self

    def b3(self, key: Key) -> np.ndarray:
        if self._ridge is None:
            raise ValueError("fit B3 first (fit_b3)")
        line, treatment = key[0], key[1:]
        if line not in self.lines or treatment not in self.treatments:
            return self.b2(key)  # an unseen line or treatment: no effect to add
        l_, t_ = self.lines.index(line), self.treatments.index(treatment)
        return self._ridge[l_] + self._ridge[len(self.lines) + t_] + self._interaction[l_, t_]


def pearson_delta(predicted: np.ndarray, real: np.ndarray, top: int | None = None) -> float:
    """Pearson correlation of a predicted and a real shift (mean minus control mean), over all genes or over the
    `top` genes of largest real shift."""
    if top is not None:
        genes = np.argsort(-np.abs(real))[:top]
        predicted, real = predicted[genes], real[genes]
    if predicted.std() == 0 or real.std() == 0:
        return 0.0
    return float(np.corrcoef(predicted, real)[0, 1])


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """The energy distance between two sets of points: 2 E|X - Y| - E|X - X'| - E|Y - Y'| (0 iff equal laws)."""
    from scipy.spatial.distance import cdist

    return float(2 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean())
