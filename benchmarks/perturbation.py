"""Perturbation benchmark: predicted drug effects on held-out (line, drug) pairs, each side against its own control.

    python benchmarks/perturbation.py --data DIR --heldout_pairs pairs.csv --baselines_only --json OUT
    python benchmarks/perturbation.py --checkpoint outputs/screen [--data DIR]   # adds the model

Every dose of a held-out pair is a test perturbation. The split is the training one
([`dataset_scripts.splits.pair_split`]): a checkpoint's `run_config.json` gives its pairs, validation pairs and
seed; without one, `--heldout_pairs` and `--split_seed` give them as `train_hf.py` would. A hash half of each
(line, plate)'s control cells is the *evaluation* control, never trained on or seen by a predictor; the other half
is the *reference* control. The real effect of a perturbation is its test cells' mean minus the evaluation
controls' mean (same line and plates); a predictor's effect is its cells' mean minus *its own* control's mean
([`metrics.perturbation_protocol`]). Everything is in log-normalised expression (`log1p(1e4 x count / total)`)
on the training panel (the `--panel_size` genes most often detected in training cells).

Methods ([`metrics.perturbation.MeanShiftBaselines`], fitted on training cells, settings chosen on the validation
pairs): B0 no change, B1 line mean, B2 PerturbMean, B3 additive ridge, B4 nearest drug by fingerprint (from the
screen's `drug_metadata.parquet` SMILES), B5 PerturbMean pooled over doses along the drug's direction; a mean model's
cells are reference control cells plus its shift. Two checks of the protocol: a drug-blind predictor (cells of the
line's training cells, any drug) must score about 0, and the ceiling, a fresh draw of the same wells (`DIR/oracle`,
which `tahoe_standin --responses` writes, its effects the expected ones of a large draw; else half the real cells
predicting the other half, a lower bound), the best anyone can do.
With `--checkpoint`, RankDiT translates control cells as a user does (`pipe(gene_ids=..., control_counts=...,
conditions=...)`): training control cells of the line (whole cells, drawn at random), as many as the real cells of
each perturbation, under the perturbation and under the control alike, guided with the scale chosen on validation:
the same control cells with the same random draws for every perturbation of a line and for its own control (a
translation is each control cell's counterfactual, as a baseline's cells are its own control shifted). Its cells
are the pipeline's translated counts, log-normalised as real cells are, over their new totals.

Metrics, mean over test perturbations: `pearson_delta` and `mae_delta` of the effects; cell-eval's
`discrimination_score_l1` (higher is better, with its chance level), `overlap_at_N`, `precision_at_N`,
`de_spearman_lfc_sig`, `de_direction_match`, one evaluation per line and plates; the energy distance and MMD
(unbiased U-statistics) between predicted and real cells at equal numbers on 20 principal components of training
cells. Beside each, a paired bootstrap 95% interval of the difference to the best baseline (by validation
Pearson delta). Where some test drugs had no training cells (a `--heldout_pairs` file holding out every pair of a
drug), a second table scores those drugs' perturbations against B4, the nearest drug by structure (`unseen_drugs`
in the JSON). Prints the tables, writes JSON (`methods`: name -> metric -> mean), and with a checkpoint puts them and
a plot into its folder and card (`--no_card` leaves it alone).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "rankdiff-inductor"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from dataset_scripts.tahoe_metadata import DRUG_METADATA_PATH, drug_smiles  # noqa: E402
from dataset_scripts.tahoe_standin import positive_int  # noqa: E402
from metrics.perturbation import MeanShiftBaselines, drug_similarity, pearson_delta  # noqa: E402
from metrics.perturbation_protocol import (  # noqa: E402
    ORACLE_DIR,
    Prediction,
    ScreenCells,
    Truth,
    cell_eval_scores,
    cell_roles,
    delta_scores,
    distribution_scores,
    drug_blind_prediction,
    log_normalised,
    mean_model_prediction,
    metric_directions,
    oracle_prediction,
    paired_bootstrap,
    read_expected_expression,
    read_screen_cells,
    split_half_prediction,
    split_truth,
)
from training.data import most_detected_genes  # noqa: E402

logger = logging.getLogger("perturbation")
NEAREST_DRUG = "B4 nearest drug"
DOSE_POOLED = "B5 dose-pooled PerturbMean"
BASELINES = ("B0 no change", "B1 line mean", "B2 PerturbMean", "B3 additive ridge", NEAREST_DRUG, DOSE_POOLED)
DRUG_BLIND, CEILING, MODEL = "drug-blind (line's cells)", "ceiling", "RankDiT"


def guidance_scales(text: str) -> list[float]:
    """An argparse type: comma-separated guidance scales, each a finite number >= 0 (argparse names the flag)."""
    try:
        scales = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not all(math.isfinite(scale) and scale >= 0 for scale in scales):
        raise argparse.ArgumentTypeError(f"{text!r}: each scale must be a finite number >= 0")
    return scales


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a Tahoe-layout screen (default: the checkpoint's run_config.json's)")
    parser.add_argument("--heldout_pairs", help="CSV of held-out pairs as train_hf.py takes (a checkpoint's own)")
    parser.add_argument("--checkpoint", help="a pipeline folder trained with --conditions and --heldout_pairs")
    parser.add_argument("--baselines_only", action="store_true", help="score the baselines and the ceiling only")
    parser.add_argument("--split_seed", type=int, default=0, help="the split's seed, without a checkpoint")
    parser.add_argument("--control_drug", default="DMSO_TF", help="the control, without a checkpoint")
    parser.add_argument("--panel_size", type=int, default=512, help="without a checkpoint (else its max_length)")
    parser.add_argument("--no_cell_eval", action="store_true", help="skip cell-eval's DE metrics (faster)")
    parser.add_argument(
        "--cells_per_condition",
        type=int,
        help="the model's cells per perturbation at most "
        "(default: as many as the real ones; the distribution metrics compare equal numbers)",
    )
    parser.add_argument("--guidance_scales", type=guidance_scales, default=[1.0, 2.0, 4.0],
                        help="candidates, comma-separated, chosen on validation pairs (default 1,2,4)")  # fmt: skip
    parser.add_argument(
        "--num_inference_steps",
        type=positive_int,
        default=None,
        help="blocks of genes a translation goes through (the pipeline's default: 2)",
    )
    parser.add_argument("--batch_size", type=positive_int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws of predicted cells")
    parser.add_argument("--json", default="benchmarks/results/perturbation.json")
    parser.add_argument("--no_card", action="store_true", help="leave the checkpoint folder and its card alone")
    parser.add_argument("--validation_only", action="store_true",
                        help="score every method on the validation pairs instead of the test pairs (to choose "
                        "settings; the test pairs are not read)")  # fmt: skip
    args = parser.parse_args(argv)
    args.no_card = args.no_card or args.validation_only  # the card reports test pairs only
    if args.checkpoint is None and not args.baselines_only:
        parser.error("give --checkpoint (to score the model) or --baselines_only")
    if args.checkpoint is None and (args.data is None or args.heldout_pairs is None):
        parser.error("without --checkpoint, --data and --heldout_pairs name the screen and its held-out pairs")
    return args


def split_setup(args) -> dict:
    """The split to score: pair columns, test and validation pairs, control, seed, data folder and panel size;
    from the checkpoint's `run_config.json`, or from `--heldout_pairs` by the training rule."""
    if args.checkpoint is not None:
        from training.recipe import DataRecipe

        recipe = DataRecipe.load(Path(args.checkpoint))
        conditions = recipe.conditions
        if conditions is None or not conditions["test_pairs"]:
            raise ValueError(f"{args.checkpoint} was trained without --conditions and --heldout_pairs")
        data = args.data or recipe.data["data"]
        if data is None:
            raise ValueError("the run was trained on the embedded sample, which holds no perturbations: give --data")
        setup = {**conditions, "data": data, "split_seed": recipe.data.get("split_seed", 0)}
    else:
        setup = pairs_setup(args.data, args.heldout_pairs, args.split_seed, args.control_drug)
    if args.checkpoint is not None and args.heldout_pairs is not None:
        given = pairs_setup(setup["data"], args.heldout_pairs, setup["split_seed"], setup["control_drug"])
        if {tuple(p) for p in given["test_pairs"]} != {tuple(p) for p in setup["test_pairs"]}:
            raise ValueError(f"{args.heldout_pairs} does not hold the pairs {args.checkpoint} was trained without")
    return setup


def pairs_setup(data: str, heldout_pairs: str, split_seed: int, control_drug: str) -> dict:
    """The split `train_hf.py --heldout_pairs` makes of a screen: the validation pairs drawn as training draws them."""
    from dataset_scripts import tahoe_builder
    from training import DataArguments
    from training.recipe import condition_setup

    with open(heldout_pairs) as f:
        header = [name.strip() for name in f.readline().split(",")]
    conditions = ",".join(dict.fromkeys([*header, "cell_line_id", "drug", "dose"]))
    data_args = DataArguments(data=str(data), conditions=conditions, heldout_pairs=heldout_pairs,
                              split_seed=split_seed, control_drug=control_drug)  # fmt: skip
    setup = condition_setup(tahoe_builder(str(data)), data_args).to_dict()
    return {**setup, "data": str(data), "split_seed": split_seed}


def fit_baselines(truth: Truth, validation: Truth) -> tuple[MeanShiftBaselines, dict]:
    """B0-B5 fitted on the training cells, B3's ridge penalty and interaction rank chosen on the validation pairs
    (mean Pearson delta of its shift against the real effect)."""
    obs = truth.training_obs
    keys = list(zip(obs["line"], obs["drug"], obs["dose"].astype(float)))
    base = MeanShiftBaselines(truth.training, keys, truth.control, obs["plate"].tolist())
    best = None
    for alpha in (0.1, 1.0, 10.0):
        for rank in (0, 1, 2):
            base.fit_b3(alpha, rank)
            score = np.mean([pearson_delta(base.b3(k), validation.real_delta(k)) for k in validation.keys])
            if best is None or score > best[0]:
                best = (float(score), alpha, rank)
    base.fit_b3(best[1], best[2])
    choices = {"B3": {"alpha": best[1], "rank": best[2], "validation_pearson_delta": best[0]}}
    return base, choices


def shifts_of(base: MeanShiftBaselines, similarity: dict) -> dict:
    """Each baseline's shift function (B4 with the drugs' structure `similarity`)."""
    return dict(zip(BASELINES, (base.b0, base.b1, base.b2, base.b3, lambda key: base.b4(key, similarity), base.b5)))


def screen_similarity(data: str) -> dict:
    """Drug structure similarity from the screen's `metadata/drug_metadata.parquet` (none without SMILES)."""
    smiles = drug_smiles(data)
    if not smiles:
        logger.warning("no drug SMILES in %s/%s: B4 falls back to B2", data, DRUG_METADATA_PATH)
    return drug_similarity(smiles)


def score_all(predictions: dict, truth: Truth, genes: np.ndarray, cell_eval: bool, seed: int) -> dict:
    """Per-perturbation scores of every method: effects, distributions (20 PCs of training cells) and cell-eval."""
    from sklearn.decomposition import PCA

    pca = PCA(min(20, truth.training.shape[1]), random_state=seed).fit(truth.training)
    scores = {}
    for name, prediction in predictions.items():
        logger.info("scoring %s", name)
        scores[name] = {**delta_scores(prediction, truth), **distribution_scores(prediction, truth, pca.transform)}
        if cell_eval:
            scores[name].update(cell_eval_scores(prediction, truth, [str(g) for g in genes]))
    return scores


def summarise(scores: dict, best_baseline: str, seed: int) -> tuple[dict, dict]:
    """Each method's mean of each metric, and the paired bootstrap difference to `best_baseline`."""
    means = {name: {m: float(np.nanmean(v)) for m, v in by_metric.items()} for name, by_metric in scores.items()}
    versus = {
        name: {m: paired_bootstrap(v, scores[best_baseline][m], seed) for m, v in by_metric.items()
               if m != "discrimination chance"}
        for name, by_metric in scores.items() if name != best_baseline
    }  # fmt: skip
    return means, versus


def unseen_drugs(scores: dict, keys: list, seen_drugs: set, seed: int) -> dict | None:
    """The methods on the perturbations whose drug no training cell received (None when there are none): their
    means and the paired bootstrap difference to the nearest drug by structure (B4)."""
    rows = [i for i, key in enumerate(keys) if key[1] not in seen_drugs]
    if not rows:
        return None
    subset = {name: {m: np.asarray(v)[rows] for m, v in by_metric.items()} for name, by_metric in scores.items()}
    means, versus = summarise(subset, NEAREST_DRUG, seed)
    drugs = sorted({keys[i][1] for i in rows})
    return {"drugs": drugs, "perturbations": len(rows), "methods": means, "versus_nearest_drug": versus}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cell_eval").setLevel(logging.WARNING)
    started = time.perf_counter()
    setup = split_setup(args)
    pipe = None if args.checkpoint is None or args.baselines_only else load_pipeline(args.checkpoint)
    panel_size = pipe.model.config.max_length if pipe is not None else args.panel_size
    cells = read_screen_cells(setup["data"], tuple(setup["pair_columns"]))
    oracle = read_oracle(setup["data"], tuple(setup["pair_columns"]))
    report, predictions, truth = evaluate_split(cells, oracle, setup, panel_size, args, pipe)
    report.update(checkpoint=args.checkpoint, seconds=round(time.perf_counter() - started, 1))
    write_report(report, args, predictions, truth)
    return report


def read_oracle(data: str, pair_columns: tuple[str, ...]) -> tuple[ScreenCells, dict | None] | None:
    """The screen's fresh draw of the same wells (`DIR/oracle`) and its expected expression where the simulator
    wrote one; None where it has no fresh draw."""
    oracle = Path(data) / ORACLE_DIR
    if (oracle / "data").is_dir():
        return read_screen_cells(oracle, pair_columns), read_expected_expression(oracle)
    logger.warning("no fresh draw in %s: the ceiling is half the real cells predicting the other half", oracle)
    return None


def evaluate_split(cells: ScreenCells, oracle, setup: dict, panel_size: int, args, pipe=None) -> tuple:
    """Score every method on one split of a screen: `(report, predictions, truth)`."""
    roles = cell_roles(cells, setup["pair_columns"], map(tuple, setup["test_pairs"]),
                       map(tuple, setup["validation_pairs"]), setup["control_drug"], setup["split_seed"])  # fmt: skip
    genes = most_detected_genes(cells.detection(np.flatnonzero(roles == "train")), panel_size)
    validation = split_truth(cells, roles, genes, setup["control_drug"], "validation")
    truth = validation if args.validation_only else split_truth(cells, roles, genes, setup["control_drug"], "test")
    logger.info("%d test perturbations (%d cells), %d validation perturbations, %d panel genes", len(truth.keys),
                sum(len(v) for v in truth.real.values()), len(validation.keys), len(genes))  # fmt: skip
    base, choices = fit_baselines(truth, validation)
    similarity = screen_similarity(setup["data"])
    rng = np.random.default_rng(args.seed)
    shifts = shifts_of(base, similarity)
    predictions = {name: mean_model_prediction(truth, shift, rng) for name, shift in shifts.items()}
    predictions[DRUG_BLIND] = drug_blind_prediction(truth, rng)
    if oracle is not None:
        predictions[CEILING] = oracle_prediction(truth, oracle[0], genes, rng, oracle[1])
    else:
        predictions[CEILING] = split_half_prediction(truth, rng)
    if pipe is not None:
        predictions[MODEL], choices["guidance_scale"] = model_prediction(pipe, cells, roles, genes, truth,
                                                                         validation, args)  # fmt: skip
    scores = score_all(predictions, truth, genes, not args.no_cell_eval, args.seed)
    best = best_baseline(base, similarity, validation)
    means, versus = summarise(scores, best, args.seed)
    report = {
        "data": str(setup["data"]),
        "test_pairs": [list(p) for p in setup["test_pairs"]],
        "validation_pairs": [list(p) for p in setup["validation_pairs"]],
        "split_seed": setup["split_seed"],
        "scored_on": "validation pairs" if args.validation_only else "test pairs",
        "test_perturbations": len(truth.keys),
        "test_cells": int(sum(len(v) for v in truth.real.values())),
        "evaluation_controls": int(sum(len(v) for v in truth.evaluation_controls.values())),
        "panel_genes": len(genes),
        "ceiling_source": predictions[CEILING].notes["source"],
        "choices": choices,
        "best_baseline": best,
        "directions": metric_directions(),
        "methods": means,
        "versus_best_baseline": versus,
        "unseen_drugs": unseen_drugs(scores, truth.keys, {key[1] for key in base.shifts}, args.seed),
        "perturbations": [list(key) for key in truth.keys],
        "per_perturbation": scores,
        "date": time.strftime("%Y-%m-%d"),
    }
    return report, predictions, truth


def best_baseline(base: MeanShiftBaselines, similarity: dict, validation: Truth) -> str:
    """The baseline whose shifts have the highest mean Pearson delta on the validation perturbations."""
    shifts = shifts_of(base, similarity)
    return max(BASELINES, key=lambda name: np.mean([pearson_delta(shifts[name](k), validation.real_delta(k))
                                                      for k in validation.keys]))  # fmt: skip


def load_pipeline(checkpoint: str):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(checkpoint, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_prediction(pipe, cells, roles, genes, truth: Truth, validation: Truth, args) -> tuple[Prediction, dict]:
    """RankDiT's cells for the test perturbations and its own control cells for each line, with the guidance scale
    chosen on the validation pairs (mean Pearson delta)."""
    control = np.flatnonzero((roles == "train") & (cells.obs["drug"] == truth.control).to_numpy())
    lines = cells.obs["line"].to_numpy()[control]
    controls = (cells, {line: control[lines == line] for line in np.unique(lines)})
    guidance, predictions = {}, {}
    for scale in args.guidance_scales:
        predictions[scale] = generated_prediction(pipe, validation, genes, scale, args, controls)
        guidance[scale] = float(np.mean(delta_scores(predictions[scale], validation)["pearson_delta"]))
        logger.info("guidance %g: validation Pearson delta %.3f", scale, guidance[scale])
    chosen = max(guidance, key=guidance.get)
    if truth is validation:  # --validation_only: the chosen scale's validation cells
        return predictions[chosen], {"chosen": chosen, "validation_pearson_delta": guidance}
    prediction = generated_prediction(pipe, truth, genes, chosen, args, controls, seed_offset=1)
    return prediction, {"chosen": chosen, "validation_pearson_delta": guidance}


def generated_prediction(pipe, truth: Truth, genes, scale: float, args, controls: tuple, seed_offset: int = 0):
    """RankDiT's cells on the panel, as a user makes them: control cells of the line (`controls`: the screen's
    cells and the training control rows of each line), drawn at random, translated under each perturbation, as
    many as the real ones (at most `--cells_per_condition`). Its own control is the translation of the same control
    cells under the control (as many as the line's largest evaluation control, at most 256 and at most the cap),
    with the same random draws: a translation is each control cell's counterfactual, so the model's effect is
    paired as a baseline's shift of its own control cells is (the real effect stays against control cells no
    predictor saw). The translated cells' counts (the pipeline's `counts`) are log-normalised as real cells are,
    over their new totals."""
    cap = args.cells_per_condition or max(len(cells) for cells in truth.real.values())
    requests = [((key[0], key[1], key[2]), min(len(truth.real[key]), cap)) for key in truth.keys]
    for line in sorted({key[0] for key in truth.keys}):
        size = max(len(c) for ctx, c in truth.evaluation_controls.items() if ctx[0] == line)
        requests.append(((line, truth.control, 0.0), min(size, 256, max(cap, 2))))
    seed = args.seed + seed_offset
    cells, rows_of_line = controls
    rng, size = np.random.default_rng(seed), {}
    for key, n in requests:
        size[key[0]] = max(size.get(key[0], 0), n)
    rows = {line: rng.choice(rows_of_line[line], n, replace=n > len(rows_of_line[line]))
            for line, n in sorted(size.items())}  # fmt: skip
    generated = {}
    for key, n in tqdm(requests, desc="translating control cells"):  # a line's every request: same cells, same draws
        translated = pipe(
            gene_ids=[genes.tolist()] * size[key[0]],
            conditions=[{"cell_line_id": key[0], "drug": key[1], "dose": key[2]}] * size[key[0]],
            guidance_scale=scale,
            num_inference_steps=args.num_inference_steps,
            batch_size=args.batch_size,
            generator=torch.Generator().manual_seed(seed),
            **whole_cells_on(cells.counts[rows[key[0]]], genes),
        ).counts[:n]
        shown = cells.counts[rows[key[0]][:n]][:, genes].sum(axis=1).A1
        totals = np.maximum(cells.totals[rows[key[0]][:n]] - shown + translated.sum(axis=1), 1.0)
        generated[key] = log_normalised(translated, totals)
    own_controls = {ctx: generated[(ctx[0], truth.control, 0.0)] for ctx in truth.evaluation_controls}
    return Prediction({key: generated[key] for key in truth.keys}, own_controls)


def whole_cells_on(counts, genes: np.ndarray) -> dict:
    """Cells' raw counts (a CSR matrix over gene ids) as the pipeline takes whole cells shown on `genes`:
    `control_counts` on the genes and `context_counts`, each cell's other non-zero counts."""
    other = counts.copy()
    other.data[np.isin(other.indices, genes)] = 0
    other.eliminate_zeros()
    context = [other.data[other.indptr[i] : other.indptr[i + 1]] for i in range(other.shape[0])]
    return {"control_counts": counts[:, genes].toarray(), "context_counts": context}


def methods_table(methods: dict, versus: dict, baseline: str, directions: dict) -> list[str]:
    """Methods x metrics (means), the better direction in the header, and the difference in Pearson delta and
    delta MAE to `baseline` with their 95% intervals."""
    metrics = [m for m in next(iter(methods.values())) if m != "discrimination chance"]
    arrow = {"higher": "↑", "lower": "↓"}
    compared = ("pearson_delta", "mae_delta")
    lines = ["| method | " + " | ".join(f"{m} {arrow[directions[m]]}" for m in metrics) + " | "
             + " | ".join(f"Δ {m} vs {baseline} (95% CI)" for m in compared) + " |",
             "| --- |" + " --- |" * (len(metrics) + len(compared))]  # fmt: skip
    for name, scores in methods.items():
        differences = []
        for metric in compared:
            d = versus.get(name, {}).get(metric)
            differences.append(f"{d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else "-")
        lines.append(
            f"| {name} | " + " | ".join(f"{scores[m]:.3f}" for m in metrics) + f" | {' | '.join(differences)} |"
        )
    return lines


def markdown_table(report: dict) -> str:
    """The methods on the scored perturbations against the best baseline, the chance of discrimination, and (where
    some test drugs had no training cells) the methods on those drugs' perturbations against the nearest drug."""
    methods, directions = report["methods"], report["directions"]
    lines = methods_table(methods, report["versus_best_baseline"], report["best_baseline"], directions)
    chance = next(iter(methods.values())).get("discrimination chance")
    if chance is not None:
        lines.append(f"\ndiscrimination_score_l1 at chance: {chance:.3f}; ceiling: {report['ceiling_source']}")
    unseen = report.get("unseen_drugs")
    if unseen:
        lines.append(f"\nDrugs no training cell received ({', '.join(unseen['drugs'])}; {unseen['perturbations']} "
                     f"perturbations), against {NEAREST_DRUG}:\n")  # fmt: skip
        lines += methods_table(unseen["methods"], unseen["versus_nearest_drug"], NEAREST_DRUG, directions)
    return "\n".join(lines)


def write_report(report: dict, args, predictions: dict, truth: Truth) -> None:
    """Print the table, write the JSON, and (with a checkpoint, unless `--no_card`) put the table, a plot of
    predicted vs real effects and the JSON into the checkpoint folder and its card, recorded in its manifest."""
    table = markdown_table(report)
    print(table)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2, default=float) + "\n")
    if args.checkpoint is None or args.no_card:
        return
    from training.outputs import RunOutputs
    from training.report import PLOTS_DIR, add_card_section

    checkpoint = Path(args.checkpoint)
    with RunOutputs(checkpoint).recording():
        (checkpoint / PLOTS_DIR).mkdir(exist_ok=True)
        shown = {name: predictions[name] for name in (report["best_baseline"], MODEL, CEILING) if name in predictions}
        plot = plot_deltas(truth, shown, checkpoint / PLOTS_DIR / "perturbation_deltas.png")
        (checkpoint / "perturbation_results.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
        section = f"""Held-out (line, drug) pairs, every dose, never trained on ({report["test_perturbations"]}
perturbations, {report["test_cells"]} real cells, {report["panel_genes"]} panel genes). Each effect against its own
control: the real one against evaluation control cells no predictor saw, a predictor's against its own.
`python benchmarks/perturbation.py --checkpoint OUT` (method in its docstring).

{table}

![Predicted vs real effects]({plot.relative_to(checkpoint).as_posix()})
"""
        add_card_section(checkpoint / "README.md", "Perturbation prediction", section)


def plot_deltas(truth: Truth, predictions: dict, path: Path, most: int = 4) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = truth.keys[:most]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        real = truth.real_delta(key)
        for name, prediction in predictions.items():
            ax.scatter(real, prediction.effect(key, truth.context[key]), s=6, alpha=0.6, label=name)
        lim = np.abs(real).max() * 1.1
        ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8)
        ax.set(title=f"{key[0]}, {key[1]} {key[2]:g} uM", xlabel="real effect", ylabel="predicted effect")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
