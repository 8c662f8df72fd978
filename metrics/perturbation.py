"""Perturbation prediction: the mean-shift baselines B0-B5, fitted on training cells only, and the set metrics.

A perturbation is a (cell line, drug, dose) and its cells; every baseline predicts the *shift* of the line's
control (DMSO) mean that the perturbation causes, and its predicted cells are the line's reference control cells
plus that shift (what "a mean model's cells" can be). The shifts are fitted in any cell x gene space (here
log-normalised expression), on training perturbations only, each against the control cells of its own line and
plates (plates carry offsets of their own):

- B0 no change: shift 0 (the line's control cells);
- B1 the line's mean over its perturbed training cells, minus their controls;
- B2 PerturbMean (STATE): the drug-and-dose's mean shift over the other lines;
- B3 an additive ridge model, line effect + drug-dose effect, plus a low-rank line x drug-dose interaction
  (fitted with the additive part, the unobserved pairs filled in as it goes) when validation says it helps;
- B4 the nearest drug: the shift, in the same line (else over the other lines) and at the same dose, of the
  training drug most similar by structure (Tanimoto similarity of Morgan fingerprints, [`drug_similarity`]), for
  drugs never seen in training;
- B5 dose-pooled PerturbMean: B2 read along the drug's one direction, pooled over the other lines at every dose
  (a drug moves the same genes the same way at every dose, more or less strongly; each dose's mean over a few lines
  carries their own noise, which pooling averages away).
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
    """B0-B5 fitted on training cells of one space (B3 once `fit_b3` has run; B4 given the drugs' similarity).

    Args:
        matrix (`np.ndarray`, `(n_cells, n_genes)`): the training cells.
        keys (`list[Key]`): each cell's (line, drug, dose).
        control (`str`): the control drug.
        plates (`list[str]`, *optional*): each cell's plate: a perturbed cell is then compared with the control
            cells of its line on its plate (on every plate where its plate has none).
    """

    def __init__(self, matrix: np.ndarray, keys: list[Key], control: str, plates: list[str] | None = None):
        self.control = control
        plates = plates if plates is not None else [""] * len(keys)
        is_control = np.array([key[1] == control for key in keys])
        self.control_mean = group_means(matrix[is_control], [k[0] for k, c in zip(keys, is_control) if c])
        plate_means = group_means(matrix[is_control], [(k[0], p) for k, p, c in zip(keys, plates, is_control) if c])
        perturbed = [i for i, key in enumerate(keys) if not is_control[i] and key[0] in self.control_mean]
        matched = [plate_means.get((keys[i][0], plates[i]), self.control_mean[keys[i][0]]) for i in perturbed]
        differences = matrix[perturbed] - np.reshape(matched, (len(perturbed), matrix.shape[1]))
        self.shifts = group_means(differences, [keys[i] for i in perturbed])
        self.line_shift = group_means(differences, [keys[i][0] for i in perturbed])
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

    def b5(self, key: Key) -> np.ndarray:
        """B2 projected on the drug's direction: the first right singular vector of its shifts in the other lines
        at every dose (weighing each shift by its size, as a rank-1 fit does), scaled by B2's shift along it (so
        0 where no other line has the drug at this dose, as B2's scale is then unknown)."""
        others = [shift for (line, drug, _), shift in self.shifts.items() if drug == key[1] and line != key[0]]
        if not others:
            return np.zeros(self.n_genes)
        direction = np.linalg.svd(np.stack(others), full_matrices=False)[2][0]
        return direction * (self.b2(key) @ direction)

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

    def b4(self, key: Key, similarity: dict[tuple[str, str], float]) -> np.ndarray:
        """The shift of the most similar other drug at the same dose (`similarity[(drug, other)]`), in the same
        line where it was seen there, else its mean over the lines that saw it; B2 when no drug is comparable."""
        line, drug, dose = key
        candidates = {d for (_, d, z) in self.shifts if z == dose and d != drug and (drug, d) in similarity}
        if not candidates:
            return self.b2(key)
        nearest = max(sorted(candidates), key=lambda d: similarity[(drug, d)])
        if (line, nearest, dose) in self.shifts:
            return self.shifts[(line, nearest, dose)]
        return np.mean([shift for (_, d, z), shift in self.shifts.items() if d == nearest and z == dose], axis=0)


def drug_similarity(smiles: dict[str, str]) -> dict[tuple[str, str], float]:
    """Tanimoto similarity of the Morgan fingerprints of every two drugs (name -> SMILES), by the repository's one
    rule ([`~dataset_scripts.molecules.tanimoto_similarity`]); drugs whose SMILES RDKit cannot read are left out."""
    from rdkit import Chem, RDLogger

    from dataset_scripts.molecules import tanimoto_similarity

    RDLogger.DisableLog("rdApp.*")
    names = [name for name, text in smiles.items() if text and Chem.MolFromSmiles(text) is not None]
    similarity = tanimoto_similarity([smiles[name] for name in names])
    return {(a, b): float(similarity[i, j]) for i, a in enumerate(names) for j, b in enumerate(names) if i != j}


def pearson_delta(predicted: np.ndarray, real: np.ndarray, top: int | None = None) -> float:
    """Pearson correlation of a predicted and a real shift (mean minus control mean), over all genes or over the
    `top` genes of largest real shift."""
    if top is not None:
        genes = np.argsort(-np.abs(real))[:top]
        predicted, real = predicted[genes], real[genes]
    if predicted.std() == 0 or real.std() == 0:
        return 0.0
    return float(np.corrcoef(predicted, real)[0, 1])


def mae_delta(predicted: np.ndarray, real: np.ndarray) -> float:
    """Mean absolute error of a predicted shift against the real one, over genes."""
    return float(np.abs(predicted - real).mean())


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """The energy distance between two sets of points as an unbiased U-statistic:
    2 E|X - Y| - E|X - X'| - E|Y - Y'|, the within-set means over distinct pairs (0 in expectation iff equal laws;
    a V-statistic's zero diagonal would favour small sets). Each set needs two points."""
    from scipy.spatial.distance import cdist, pdist

    if min(len(x), len(y)) < 2:
        raise ValueError("the energy distance's U-statistic needs at least two points in each set")
    return float(2 * cdist(x, y).mean() - pdist(x).mean() - pdist(y).mean())


def mmd(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """The squared maximum mean discrepancy of two sets with a Gaussian kernel `exp(-|a - b|^2 / (2 bandwidth^2))`,
    as an unbiased U-statistic (within-set means over distinct pairs)."""
    from scipy.spatial.distance import cdist

    def kernel(a, b):
        return np.exp(-cdist(a, b, "sqeuclidean") / (2 * bandwidth**2))

    def within(a):
        k = kernel(a, a)
        return (k.sum() - np.trace(k)) / (len(a) * (len(a) - 1))

    if min(len(x), len(y)) < 2:
        raise ValueError("the MMD's U-statistic needs at least two points in each set")
    return float(within(x) + within(y) - 2 * kernel(x, y).mean())
