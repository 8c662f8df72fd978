"""The perturbation scoring protocol: each side of a delta against its own control.

A perturbation's real effect is the mean of its test cells minus the mean of its *evaluation* control cells: the
control (DMSO) cells of its line on its plates that the held-out-pairs split keeps apart by a hash
([`dataset_scripts.splits.pair_split`]), never trained on and never seen by a predictor. A predictor's effect is
the mean of its cells minus the mean of *its own* control: a mean model's (B0-B5) is the line's *reference*
control cells (the other hash half, which it may use), a generator's the control cells it generates, the
ceiling's the fresh draw of the same wells it comes from. No cell is on both sides of a comparison, so a predictor
that knows nothing of the drug scores about 0 (when one control served both sides, the control's sampling noise
was in both deltas and such a predictor scored 0.57 Pearson delta).

A context is a line and the plates its perturbation's cells are on: both controls are taken there, since plates
carry offsets of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from scipy import sparse
from scipy.spatial.distance import pdist

from dataset_scripts import tahoe_builder
from dataset_scripts.schema import CELL_ID_COLUMN
from dataset_scripts.splits import pair_split
from dataset_scripts.tahoe_metadata import sample_conditions
from dataset_scripts.tokenization import tokenize_arrow_batch
from modeling.conditions import condition_value
from modeling.rank_tokenizer import segment_ids

from .perturbation import Key, energy_distance, mae_delta, mmd, pearson_delta

Context = tuple[str, tuple[str, ...]]  # (line, plates)
ORACLE_DIR = "oracle"
EXPECTED_EXPRESSION = "expected_expression.parquet"
# cell-eval's metrics that the benchmark reports (directions read from cell-eval's registry).
CELL_EVAL_METRICS = (
    "discrimination_score_l1",
    "overlap_at_N",
    "precision_at_N",
    "de_spearman_lfc_sig",
    "de_direction_match",
)


def log_normalised(counts: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Cells' expression as every side of a comparison is read: `log1p(1e4 x count / cell total)`, `counts`
    `(cells, genes)` and `totals` `(cells,)`."""
    return np.log1p(1e4 * counts / totals[:, None]).astype(np.float32)


@dataclass
class ScreenCells:
    """Every readable cell of a Tahoe-layout screen: `obs` (cell id, line, drug key, dose, plate, and the pair
    columns), its raw `counts` (cells x gene ids) and each cell's total count (context counts included)."""

    obs: pd.DataFrame
    counts: sparse.csr_matrix
    totals: np.ndarray

    def expression(self, genes: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Log-normalised expression `log1p(1e4 x count / cell total)` of `rows` (all by default) on `genes`."""
        rows = np.arange(len(self.obs)) if rows is None else rows
        return log_normalised(self.counts[rows][:, genes].toarray(), self.totals[rows])

    def detection(self, rows: np.ndarray) -> np.ndarray:
        """How many of `rows` express each gene."""
        return np.bincount(self.counts[rows].indices, minlength=self.counts.shape[1])


def read_screen_cells(data: str | Path, pair_columns: tuple[str, ...] = ("cell_line_id", "drug")) -> ScreenCells:
    """The cells of a Tahoe-layout folder, with each well's dose from its sample metadata, checked as training
    checks them (a row the stream would skip is left out)."""
    builder = tahoe_builder(str(data))
    files, _ = builder.input_files()
    known = builder.known_genes()
    dose_of = {sample: dose for sample, (_, dose) in sample_conditions(data).items()}
    frames, matrices, totals = [], [], []
    for file in files:
        table = pq.read_table(file)
        batch = tokenize_arrow_batch(table, 2, known)
        kept = table.filter(batch.kept) if not batch.kept.all() else table
        columns = {name: kept[name].to_pylist() for name in dict.fromkeys(("cell_line_id", "drug", *pair_columns))}
        frame = pd.DataFrame({
            "cell_id": kept[CELL_ID_COLUMN].to_pylist(),
            "line": columns["cell_line_id"],
            "drug": [condition_value("drug", d) for d in columns["drug"]],
            "dose": [dose_of.get(s, np.nan) for s in kept["sample"].to_pylist()],
            "plate": kept["plate"].to_pylist(),
        })  # fmt: skip
        for name in pair_columns:
            frame[f"pair:{name}"] = [condition_value(name, v) for v in columns[name]]
        frames.append(frame)
        shape = (batch.num_cells, int(known.max()) + 1)
        matrices.append(sparse.csr_matrix((batch.counts.astype(np.float32), batch.gene_ids, batch.offsets), shape))
        context = np.bincount(segment_ids(batch.context_offsets), batch.context, minlength=batch.num_cells)
        totals.append(np.asarray(matrices[-1].sum(axis=1)).ravel() + context)
    return ScreenCells(pd.concat(frames, ignore_index=True), sparse.vstack(matrices).tocsr(), np.concatenate(totals))


def cell_roles(cells: ScreenCells, pair_columns, test_pairs, validation_pairs, control: str, seed: int) -> np.ndarray:
    """Each cell's split by the training rule ([`pair_split`]): test and validation pairs, the evaluation half of
    the controls in test, the rest train."""
    pairs = list(zip(*(cells.obs[f"pair:{c}"] for c in pair_columns)))
    return pair_split(pairs, cells.obs["drug"].tolist(), cells.obs["cell_id"].tolist(), tuple(test_pairs),
                      tuple(validation_pairs), control, seed)  # fmt: skip


@dataclass
class Truth:
    """The real side of a split on a gene panel: each held-out perturbation's cells, its context, and each
    context's evaluation controls; with the reference controls and training cells the predictors may use."""

    real: dict[Key, np.ndarray]
    context: dict[Key, Context]
    evaluation_controls: dict[Context, np.ndarray]
    reference_controls: dict[Context, np.ndarray]
    training: np.ndarray  # training cells' expression (reference controls included)
    training_obs: pd.DataFrame
    control: str

    @property
    def keys(self) -> list[Key]:
        return sorted(self.real)

    def real_delta(self, key: Key) -> np.ndarray:
        return self.real[key].mean(axis=0) - self.evaluation_controls[self.context[key]].mean(axis=0)


def split_truth(cells: ScreenCells, roles: np.ndarray, genes: np.ndarray, control: str, split: str) -> Truth:
    """The [`Truth`] of the `split` ("test" or "validation") perturbations on `genes`."""
    obs = cells.obs
    is_control = (obs["drug"] == control).to_numpy()
    train = np.flatnonzero(roles == "train")
    held = np.flatnonzero((roles == split) & ~is_control)
    evaluation, reference = (np.flatnonzero((roles == r) & is_control) for r in ("test", "train"))
    keys = [(line, drug, float(dose)) for line, drug, dose in zip(obs["line"], obs["drug"], obs["dose"])]
    rows_of: dict[Key, list[int]] = {}
    for i in held:
        rows_of.setdefault(keys[i], []).append(i)
    context = {key: (key[0], tuple(sorted(set(obs["plate"].iloc[rows])))) for key, rows in rows_of.items()}

    def controls(candidates: np.ndarray, kind: str) -> dict[Context, np.ndarray]:
        found = {}
        for ctx in set(context.values()):
            of_line = candidates[(obs["line"].iloc[candidates] == ctx[0]).to_numpy()]
            on_plates = of_line[obs["plate"].iloc[of_line].isin(ctx[1]).to_numpy()]
            if len(of_line) < 2:
                raise ValueError(f"the line {ctx[0]} has {len(of_line)} {kind} control cells ({control}): its effects "
                                 "cannot be measured; a screen needs control cells of every line")  # fmt: skip
            found[ctx] = cells.expression(genes, on_plates if len(on_plates) >= 2 else of_line)
        return found

    return Truth(
        real={key: cells.expression(genes, np.array(rows)) for key, rows in rows_of.items()},
        context=context,
        evaluation_controls=controls(evaluation, "evaluation"),
        reference_controls=controls(reference, "reference"),
        training=cells.expression(genes, train),
        training_obs=obs.iloc[train].reset_index(drop=True),
        control=control,
    )


@dataclass
class Prediction:
    """A predictor's cells for each perturbation and its own control cells for each context. A split-half ceiling
    brings its own real side (`real`, `real_controls`: the other half)."""

    cells: dict[Key, np.ndarray]
    controls: dict[Context, np.ndarray]
    real: dict[Key, np.ndarray] | None = None
    real_controls: dict[Context, np.ndarray] | None = None
    effects: dict[Key, np.ndarray] | None = None  # stated effects (the ceiling's expected ones), else from cells
    notes: dict = field(default_factory=dict)

    def effect(self, key: Key, context: Context) -> np.ndarray:
        """The predicted effect of a perturbation: as stated, else its cells' mean minus its own control's."""
        if self.effects is not None:
            return self.effects[key]
        return self.cells[key].mean(axis=0) - self.controls[context].mean(axis=0)


def mean_model_prediction(truth: Truth, shift, rng: np.random.Generator) -> Prediction:
    """A mean model's cells: as many of the context's reference control cells as there are real cells (drawn
    without replacement where there are enough) plus the predicted `shift(key)`, kept non-negative; its control is
    the context's reference control cells."""
    cells = {}
    for key in truth.keys:
        reference, n = truth.reference_controls[truth.context[key]], len(truth.real[key])
        drawn = reference[rng.choice(len(reference), n, replace=len(reference) < n)]
        cells[key] = np.clip(drawn + shift(key), 0, None)
    return Prediction(cells, dict(truth.reference_controls))


def drug_blind_prediction(truth: Truth, rng: np.random.Generator) -> Prediction:
    """A predictor that knows nothing of the drug: cells drawn from its line's training cells on its plates (any
    drug, the reference controls included), against the reference controls."""
    obs, cells = truth.training_obs, {}
    for key in truth.keys:
        line, plates = truth.context[key]
        of_line = (obs["line"] == line).to_numpy()
        pool = np.flatnonzero(of_line & obs["plate"].isin(plates).to_numpy())
        pool = pool if len(pool) else np.flatnonzero(of_line)
        cells[key] = truth.training[rng.choice(pool, len(truth.real[key]))]
    return Prediction(cells, dict(truth.reference_controls))


def oracle_prediction(
    truth: Truth, oracle: ScreenCells, genes: np.ndarray, rng: np.random.Generator, expected: dict | None = None
) -> Prediction:
    """The ceiling from a fresh draw of the same wells (a simulator's `ROOT/oracle`): each perturbation's fresh
    cells (as many as the real ones where there are enough), against the fresh controls of its context. With the
    simulator's `expected` expression ([`read_expected_expression`]) its effects are the expected ones: a draw the
    size of the real one is as noisy as the real one, so its MAE would not bound anyone's."""
    obs = oracle.obs
    keys = list(zip(obs["line"], obs["drug"], obs["dose"].astype(float)))
    rows_of: dict = {}
    for i, key in enumerate(keys):
        rows_of.setdefault(key, []).append(i)
    cells, controls = {}, {}
    for key in truth.keys:
        if key not in rows_of:
            raise ValueError(f"the oracle holds no cells of {key}: it is not a fresh draw of this screen")
        rows = np.array(rows_of[key])
        cells[key] = oracle.expression(genes, rng.permutation(rows)[: len(truth.real[key])])
    for ctx in set(truth.context.values()):
        line = (obs["line"] == ctx[0]).to_numpy() & (obs["drug"] == truth.control).to_numpy()
        on_plates = np.flatnonzero(line & obs["plate"].isin(ctx[1]).to_numpy())
        controls[ctx] = oracle.expression(genes, on_plates if len(on_plates) >= 2 else np.flatnonzero(line))
    prediction = Prediction(cells, controls, notes={"source": "a fresh draw of the same wells (ROOT/oracle)"})
    if expected is not None:
        prediction.effects = expected_effects(truth, expected, genes, prediction)
        prediction.notes["source"] += "; effects from the expected expression of a large draw"
    return prediction


def read_expected_expression(folder: str | Path) -> dict | None:
    """A simulator's expected expression (`oracle/expected_expression.parquet`): (line, drug key, dose, plate) ->
    (genes, mean log-normalised expression), wells of one condition and plate averaged; None where absent."""
    path = Path(folder) / EXPECTED_EXPRESSION
    if not path.exists():
        return None
    frame = pq.read_table(path).to_pandas()
    expected = {}
    for key, group in frame.groupby(["cell_line_id", "drug", "dose_um", "plate"]):
        genes = np.asarray(group["genes"].iloc[0])
        expected[(key[0], key[1], float(key[2]), key[3])] = (genes, np.mean(np.stack(group["mean_log_normalised"]), 0))
    return expected


def expected_effects(truth: Truth, expected: dict, genes: np.ndarray, fresh: Prediction) -> dict[Key, np.ndarray]:
    """Each perturbation's expected effect on `genes`: the expected expression of its condition minus its line's
    control's, averaged over its plates (the fresh draw's effect on genes the table lacks)."""
    effects = {}
    for key in truth.keys:
        line, plates = truth.context[key]
        pairs = [(expected.get((*key, p)), expected.get((line, truth.control, 0.0, p))) for p in plates]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        effect = fresh.effect(key, truth.context[key])
        if pairs:
            table_genes = pairs[0][0][0]
            where = np.searchsorted(table_genes, genes).clip(max=len(table_genes) - 1)
            known = table_genes[where] == genes
            mean = np.mean([a[1] - b[1] for a, b in pairs], axis=0)
            effect = np.where(known, mean[where], effect)
        effects[key] = effect
    return effects


def split_half_prediction(truth: Truth, rng: np.random.Generator) -> Prediction:
    """The ceiling where no fresh draw exists: half of each perturbation's real cells and half of its evaluation
    controls predict the other halves (scored at half depth, so a lower bound of the ceiling)."""

    def halves(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = rng.permutation(len(cells))
        return cells[order[: len(cells) // 2]], cells[order[len(cells) // 2 :]]

    cells, real = {}, {}
    for key in truth.keys:
        cells[key], real[key] = halves(truth.real[key])
    controls, real_controls = {}, {}
    for ctx, evaluation in truth.evaluation_controls.items():
        controls[ctx], real_controls[ctx] = halves(evaluation)
    return Prediction(cells, controls, real, real_controls, notes={"source": "split half of the real cells"})


def delta_scores(prediction: Prediction, truth: Truth) -> dict[str, list[float]]:
    """Pearson and MAE of each perturbation's predicted effect (against the predictor's own control) and its real
    effect (against the evaluation control), in the order of `truth.keys`."""
    scores = {"pearson_delta": [], "mae_delta": []}
    for key in truth.keys:
        ctx = truth.context[key]
        predicted = prediction.effect(key, ctx)
        if prediction.real is None:
            real = truth.real_delta(key)
        else:
            real = prediction.real[key].mean(axis=0) - prediction.real_controls[ctx].mean(axis=0)
        scores["pearson_delta"].append(pearson_delta(predicted, real))
        scores["mae_delta"].append(mae_delta(predicted, real))
    return scores


def distribution_scores(prediction: Prediction, truth: Truth, project, seed: int = 0) -> dict[str, list[float]]:
    """Energy distance and MMD (Gaussian kernel, bandwidth the median distance among the real cells) between each
    perturbation's predicted and real cells in `project`'s space, at equal numbers (the first n of each, real cells
    in a seeded order shared by every method)."""
    scores = {"energy_distance": [], "mmd": []}
    for key in truth.keys:
        real = (prediction.real or truth.real)[key]  # a split-half ceiling is compared with the other half
        real = real[np.random.default_rng(seed).permutation(len(real))]
        n = min(len(real), len(prediction.cells[key]))
        if n < 2:  # the U-statistics need two cells a side
            scores["energy_distance"].append(float("nan"))
            scores["mmd"].append(float("nan"))
            continue
        x, y = project(prediction.cells[key][:n]), project(real[:n])
        scores["energy_distance"].append(energy_distance(x, y))
        scores["mmd"].append(mmd(x, y, float(np.median(pdist(y))) or 1.0))
    return scores


def cell_eval_scores(prediction: Prediction, truth: Truth, genes: list[str]) -> dict[str, list[float]]:
    """cell-eval's metrics ([`CELL_EVAL_METRICS`]) per perturbation, one evaluation per context: the real cells
    with the evaluation controls against the predicted cells with the predictor's own controls. Also each
    perturbation's chance level of `discrimination_score_l1` (1 - (n - 1) / 2n among the n of its context)."""
    import tempfile

    import anndata
    from cell_eval import MetricsEvaluator
    from cell_eval.metrics import metrics_registry

    skip = [name for name in metrics_registry.list_metrics() if name not in CELL_EVAL_METRICS]
    real_cells = prediction.real or truth.real
    real_controls = prediction.real_controls or truth.evaluation_controls
    by_key = {}
    for ctx in sorted(set(truth.context.values())):
        keys = [key for key in truth.keys if truth.context[key] == ctx]

        def adata(cells, controls, keys=keys, ctx=ctx):
            names = [f"{k[1]} {k[2]:g} uM" for k in keys for _ in range(len(cells[k]))]
            matrix = np.vstack([cells[k] for k in keys] + [controls[ctx]]).astype(np.float32)
            obs = pd.DataFrame({"perturbation": names + ["control"] * len(controls[ctx])})
            obs.index = obs.index.astype(str)
            return anndata.AnnData(matrix, obs=obs, var=pd.DataFrame(index=genes))

        with tempfile.TemporaryDirectory() as outdir:
            predicted, real = adata(prediction.cells, prediction.controls), adata(real_cells, real_controls)
            evaluator = MetricsEvaluator(predicted, real, control_pert="control", pert_col="perturbation",
                                         num_threads=1, outdir=outdir, allow_discrete=False)  # fmt: skip
            results, _ = evaluator.compute(profile="full", skip_metrics=skip, write_csv=False)
        frame = results.to_pandas().set_index("perturbation")
        for key in keys:
            row = frame.loc[f"{key[1]} {key[2]:g} uM"]
            by_key[key] = {m: float(row[m]) if m in row else float("nan") for m in CELL_EVAL_METRICS}
            by_key[key]["discrimination chance"] = 1 - (len(keys) - 1) / (2 * len(keys))
            if len(keys) < 2:  # ranked among itself alone: 1 whatever the prediction, so no information
                by_key[key]["discrimination_score_l1"] = by_key[key]["discrimination chance"] = float("nan")
    names = [*CELL_EVAL_METRICS, "discrimination chance"]
    return {name: [by_key[key][name] for key in truth.keys] for name in names}


def metric_directions() -> dict[str, str]:
    """Each reported metric's better direction: cell-eval's from its own registry, ours by definition."""
    from cell_eval._types import MetricBestValue
    from cell_eval.metrics import metrics_registry

    directions = {"pearson_delta": "higher", "mae_delta": "lower", "energy_distance": "lower", "mmd": "lower"}
    for name in CELL_EVAL_METRICS:
        best = metrics_registry.get_metric(name).best_value
        directions[name] = "higher" if best == MetricBestValue.ONE else "lower"
    return directions


def paired_bootstrap(a: np.ndarray, b: np.ndarray, seed: int = 0, draws: int = 2000) -> dict:
    """The mean of `a - b` over paired items (perturbations) and its 95% bootstrap interval (items resampled)."""
    difference = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    keep = ~np.isnan(difference)
    difference = difference[keep]
    if len(difference) == 0:
        return {"difference": float("nan"), "ci95": [float("nan"), float("nan")]}
    resampled = np.random.default_rng(seed).choice(difference, (draws, len(difference))).mean(axis=1)
    return {"difference": float(difference.mean()), "ci95": [float(np.percentile(resampled, q)) for q in (2.5, 97.5)]}
