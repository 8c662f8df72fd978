"""Perturbation benchmark: a conditioned checkpoint's generated cells for held-out (line, drug) pairs against B0-B3.

    python benchmarks/perturbation.py --checkpoint outputs/screen --data /tmp/screen

The checkpoint's `run_config.json` names the held-out pairs (every dose of them is a test cell never trained on) and
the validation pairs. Cells are read from `--data` (a Tahoe-layout folder) and split by the same rule as in
training. Everything is on the checkpoint's training panel (the genes most often detected in training cells,
chosen without the test cells), in two spaces: log-normalised expression (`log1p(1e4 x count / cell total)`) and
rank tokens.

- The model: the pipeline generates whole cells on the panel for each held-out (line, drug, dose), as many as
  the real ones (at most `--cells_per_condition`), told the conditions, with the guidance scale chosen on the
  validation pairs (mean Pearson delta). Generated rank tokens become expression by the line's control cells:
  token b -> the mean log-normalised expression of the entries with token b in the line's training DMSO cells
  (0 -> 0), i.e. quantile-mapping to the line's DMSO counts.
- B0-B3 ([`metrics.perturbation.MeanShiftBaselines`]): fitted on training cells only; their cells are the line's
  training DMSO cells (drawn with replacement) plus the predicted shift; B3's ridge penalty and interaction rank
  are chosen on the validation pairs.
- Metrics: `cell-eval` (the Virtual Cell Challenge's package) per line, with the line's real DMSO cells of the
  plates of its test cells as the control of both the real and the predicted cells: `pearson_delta`,
  `overlap_at_N` (DE overlap), `discrimination_score_l1` (its normalised rank; lower is better), `mae`; besides,
  the Pearson delta on each perturbation's top-50 genes by real shift, and the energy distance between predicted
  and real cells (20 principal components of training cells' expression).

Prints a table and writes JSON (`--json`), and puts the table, a plot of predicted vs real shifts and the JSON
into the checkpoint folder and its model card (`--no_card` leaves the folder alone).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "rankdiff-inductor"))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from dataset_scripts import tahoe_builder  # noqa: E402
from dataset_scripts.tahoe_metadata import sample_conditions  # noqa: E402
from dataset_scripts.tokenization import tokenize_arrow_batch  # noqa: E402
from metrics.perturbation import MeanShiftBaselines, energy_distance, pearson_delta  # noqa: E402
from modeling.conditions import condition_value  # noqa: E402
from training.data import TRAINING_PANEL, choose_panels, reference_cells  # noqa: E402
from training.recipe import DataRecipe  # noqa: E402

logger = logging.getLogger("perturbation")
METHODS = ("B0 no change", "B1 line mean", "B2 PerturbMean", "B3 additive ridge")
SPACES = ("expression", "tokens")
CELL_EVAL_METRICS = {
    "pearson_delta": "Pearson delta",
    "overlap_at_N": "DE overlap",
    "discrimination_score_l1": "discrimination L1",
    "mae": "MAE",
}


def read_screen(data: str, setup: dict, processor, panel_size: int) -> dict:
    """Every cell of a Tahoe-layout screen: its (line, drug, dose), plate and split, and its tokens and
    log-normalised expression on the training panel (chosen here from training cells as training chose it)."""
    builder = tahoe_builder(data, split_by="pair", pair_columns=tuple(setup["pair_columns"]),
                            test_pairs=tuple(map(tuple, setup["test_pairs"])),
                            validation_pairs=tuple(map(tuple, setup["validation_pairs"])))  # fmt: skip
    files, _ = builder.input_files()
    known_genes = builder.known_genes()
    num_bins = processor.num_rank_bins
    dose_of = {sample: dose for sample, (_, dose) in sample_conditions(data).items()}
    tables, obs = [], []
    for file in files:
        table = pq.read_table(file)
        batch = tokenize_arrow_batch(table, num_bins, known_genes)
        kept = table.filter(batch.kept) if not batch.kept.all() else table
        splits = builder.split_of(kept, file)
        frame = pd.DataFrame({
            "line": kept["cell_line_id"].to_pylist(),
            "drug": [condition_value("drug", d) for d in kept["drug"].to_pylist()],
            "dose": [dose_of.get(s, np.nan) for s in kept["sample"].to_pylist()],
            "plate": kept["plate"].to_pylist(),
            "split": splits,
        })  # fmt: skip
        tables.append((kept.filter(pa.array(splits == "train")), batch))
        obs.append(frame)
    obs = pd.concat(obs, ignore_index=True)
    train_table = pa.concat_tables([train for train, _ in tables])
    reference = reference_cells(train_table, num_bins, int(known_genes.max()) + 1)
    panel = choose_panels(reference, panel_size)[TRAINING_PANEL]
    tokens, expression = [], []
    for _, batch in tables:
        cells = batch.on_genes(panel)
        counts = cells.counts.reshape(batch.num_cells, len(panel))
        totals = np.add.reduceat(batch.counts.astype(np.float64), batch.offsets[:-1])
        tokens.append(processor.encode(cells)["input_ids"].numpy())
        expression.append(np.log1p(1e4 * counts / totals[:, None]))
    return {"obs": obs, "panel": panel, "tokens": np.vstack(tokens), "expression": np.vstack(expression)}


def key_of(row) -> tuple:
    return (row.line, row.drug, float(row.dose))


def token_to_expression(screen: dict, control: str, num_bins: int) -> dict[str, np.ndarray]:
    """Per line, the expression of each token: the mean log-normalised expression of the entries with that token in
    the line's training DMSO cells (0 for token 0; the all-lines value where a line never shows a token)."""
    obs = screen["obs"]
    is_control = (obs["drug"] == control) & (obs["split"] == "train")

    def table(rows) -> np.ndarray:
        tokens, expression = screen["tokens"][rows].ravel(), screen["expression"][rows].ravel()
        sums = np.bincount(tokens, weights=expression, minlength=num_bins + 1)
        counts = np.bincount(tokens, minlength=num_bins + 1)
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)

    overall = table(np.flatnonzero(is_control))
    lookup = {}
    for line in obs["line"].unique():
        values = table(np.flatnonzero(is_control & (obs["line"] == line)))
        lookup[line] = np.nan_to_num(np.where(np.isnan(values), overall, values))
        lookup[line][0] = 0.0
    return lookup


def generate(pipe, screen, keys_and_counts, guidance_scale, steps, seed, batch_size) -> dict:
    """Generated rank tokens on the panel for each (line, drug, dose) -> count, from one pipeline call."""
    conditions, owners = [], []
    for key, count in keys_and_counts.items():
        conditions += [{"cell_line_id": key[0], "drug": key[1], "dose": key[2]}] * count
        owners += [key] * count
    genes = screen["panel"].tolist()
    ranks = pipe(
        gene_ids=[genes] * len(conditions),
        conditions=conditions,
        guidance_scale=guidance_scale,
        num_inference_steps=steps,
        batch_size=batch_size,
        generator=torch.Generator().manual_seed(seed),
    ).ranks
    return {key: ranks[[i for i, owner in enumerate(owners) if owner == key]] for key in keys_and_counts}


def mean_pearson(predicted: dict, real: dict, control_mean: dict, top: int | None = None) -> float:
    """The mean over perturbations of the Pearson delta of the predicted cells' mean (all genes, or `top`)."""
    shifts = [(predicted[k].mean(0) - control_mean[k[0]], real[k].mean(0) - control_mean[k[0]]) for k in real]
    return float(np.mean([pearson_delta(p, r, top) for p, r in shifts]))


def cell_eval_scores(real_cells: dict, predicted_cells: dict, controls: dict, genes: list[str], discrete: bool):
    """cell-eval metrics per perturbation, one evaluation per line with its plate-matched DMSO cells as control."""
    import anndata
    from cell_eval import MetricsEvaluator

    rows = []
    for line in sorted({key[0] for key in real_cells}):
        keys = [key for key in real_cells if key[0] == line]

        def adata(cells, keys=keys, line=line):
            names = [f"{k[1]} {k[2]:g} uM" for k in keys for _ in range(len(cells[k]))]
            matrix = np.vstack([cells[k] for k in keys] + [controls[line]]).astype(np.float32)
            obs = pd.DataFrame({"perturbation": names + ["control"] * len(controls[line])})
            obs.index = obs.index.astype(str)
            return anndata.AnnData(matrix, obs=obs, var=pd.DataFrame(index=genes))

        with tempfile.TemporaryDirectory() as outdir:
            evaluator = MetricsEvaluator(adata(predicted_cells), adata(real_cells), control_pert="control",
                                         pert_col="perturbation", num_threads=1, outdir=outdir,
                                         allow_discrete=discrete)  # fmt: skip
            results, _ = evaluator.compute(profile="full", write_csv=False)
        frame = results.to_pandas()
        frame["line"] = line
        rows.append(frame)
    return pd.concat(rows, ignore_index=True)


def plot_deltas(real: dict, predictions: dict, control_mean: dict, path: Path, most: int = 4) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(real)[:most]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        truth = real[key].mean(0) - control_mean[key[0]]
        for name, cells in predictions.items():
            ax.scatter(truth, cells[key].mean(0) - control_mean[key[0]], s=6, alpha=0.6, label=name)
        lim = np.abs(truth).max() * 1.1
        ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8)
        ax.set(title=f"{key[0]}, {key[1]} {key[2]:g} uM", xlabel="real shift", ylabel="predicted shift")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a pipeline folder trained with --heldout_pairs")
    parser.add_argument("--data", help="the Tahoe-layout folder it was trained on (default: its run_config.json's)")
    parser.add_argument("--cells_per_condition", type=int, default=64)
    parser.add_argument("--guidance_scales", default="1,2,4", help="candidates, chosen on the validation pairs")
    parser.add_argument("--num_inference_steps", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="benchmarks/results/perturbation.json")
    parser.add_argument("--no_card", action="store_true", help="leave the checkpoint folder and its card alone")
    return parser.parse_args(argv)


def run_setup(checkpoint: Path, data: str | None) -> tuple[dict, str]:
    """The conditions and held-out pairs a run recorded in its `run_config.json`, and its data folder."""
    recipe = DataRecipe.load(checkpoint)
    setup = recipe.conditions
    if setup is None or not setup["test_pairs"]:
        raise ValueError(f"{checkpoint} was trained without --conditions and --heldout_pairs: nothing is held out")
    data = data or recipe.data["data"]
    if data is None:
        raise ValueError("the run was trained on the embedded sample, which holds no perturbations: give --data")
    return setup, data


def split_cells(screen: dict, control: str) -> dict:
    """Each cell's (line, drug, dose) key, the training rows, each line's training DMSO rows, and the perturbed cells
    of the validation and test pairs in both spaces (key -> cells)."""
    obs = screen["obs"]
    keys = [key_of(row) for row in obs.itertuples()]
    is_train = (obs["split"] == "train").to_numpy()

    def perturbed(split: str, space: str) -> dict:
        grouped = {}
        for i in np.flatnonzero((obs["split"] == split) & (obs["drug"] != control)):
            grouped.setdefault(keys[i], []).append(i)
        return {key: screen[space][index] for key, index in sorted(grouped.items())}

    lines = obs["line"].unique()
    return {
        "keys": keys,
        "train": np.flatnonzero(is_train),
        "control_rows": {
            line: np.flatnonzero(is_train & (obs["drug"] == control) & (obs["line"] == line)) for line in lines
        },  # fmt: skip
        "validation": {space: perturbed("validation", space) for space in SPACES},
        "test": {space: perturbed("test", space) for space in SPACES},
    }


def choose_b3(baselines: dict, validation: dict) -> dict:
    """B3's ridge penalty and interaction rank in each space, chosen on the validation pairs (and fitted)."""
    choices = {}
    for space in SPACES:
        base, best = baselines[space], None
        for alpha in (0.1, 1.0, 10.0):
            for rank in (0, 1, 2):
                base.fit_b3(alpha, rank)
                predicted = {k: (base.control_mean[k[0]] + base.b3(k))[None] for k in validation[space]}
                score = mean_pearson(predicted, validation[space], base.control_mean)
                if best is None or score > best[0]:
                    best = (score, alpha, rank)
        base.fit_b3(best[1], best[2])
        choices[f"B3 ({space})"] = {"alpha": best[1], "rank": best[2], "validation_pearson_delta": best[0]}
    return choices


def mean_shift_cells(screen: dict, cells: dict, baselines: dict, num_bins: int, rng) -> dict:
    """Each baseline's cells for every test perturbation in both spaces: the line's training DMSO cells (drawn with
    replacement) plus the predicted shift."""
    predictions = {space: {} for space in SPACES}
    for space in SPACES:
        base, top = baselines[space], num_bins if space == "tokens" else None
        for name, method in zip(METHODS, (base.b0, base.b1, base.b2, base.b3)):
            shifted = {}
            for key, real in cells["test"][space].items():
                drawn = rng.choice(cells["control_rows"][key[0]], len(real))
                shifted[key] = np.clip(screen[space][drawn] + method(key), 0, top)
            predictions[space][name] = shifted
    return predictions


def score_methods(screen: dict, cells: dict, predictions: dict, baselines: dict, seed: int) -> dict:
    """cell-eval metrics of every method against the test cells, with each line's real DMSO cells of the plates
    its test cells come from as the control of real and predicted, and the energy distance on training PCs."""
    from sklearn.decomposition import PCA

    obs, results = screen["obs"], {}
    genes = [str(g) for g in screen["panel"]]
    test_rows = np.flatnonzero(obs["split"] == "test")
    for space in SPACES:
        controls = {}
        for line in {k[0] for k in cells["test"][space]}:
            plates = set(obs["plate"].iloc[test_rows][obs["line"].iloc[test_rows] == line])
            rows = cells["control_rows"][line]
            controls[line] = screen[space][rows[obs["plate"].iloc[rows].isin(plates).to_numpy()]]
        real = cells["test"][space]
        for name, predicted in predictions[space].items():
            scores = cell_eval_scores(real, predicted, controls, genes, discrete=space == "tokens")
            mean = {label: float(scores[metric].mean()) for metric, label in CELL_EVAL_METRICS.items()}
            mean["Pearson delta top-50"] = mean_pearson(predicted, real, baselines[space].control_mean, top=50)
            results.setdefault(space, {})[name] = mean
    pca = PCA(20, random_state=seed).fit(screen["expression"][cells["train"]])
    for name, predicted in predictions["expression"].items():
        results["expression"][name]["energy distance"] = float(np.mean([
            energy_distance(pca.transform(predicted[k]), pca.transform(real))
            for k, real in cells["test"]["expression"].items()
        ]))  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from diffusers import DiffusionPipeline

    checkpoint = Path(args.checkpoint)
    setup, data = run_setup(checkpoint, args.data)
    pipe = DiffusionPipeline.from_pretrained(checkpoint, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    num_bins, control = pipe.model.config.num_rank_bins, setup["control_drug"]
    started = time.perf_counter()
    screen = read_screen(data, setup, pipe.processor, pipe.model.config.max_length)
    cells = split_cells(screen, control)
    train = cells["train"]
    baselines = {s: MeanShiftBaselines(screen[s][train], [cells["keys"][i] for i in train], control) for s in SPACES}
    test = cells["test"]
    logger.info("%d test perturbations (%d cells), %d validation perturbations", len(test["tokens"]),
                sum(len(v) for v in test["tokens"].values()), len(cells["validation"]["tokens"]))  # fmt: skip
    choices = choose_b3(baselines, cells["validation"])
    lookup = token_to_expression(screen, control, num_bins)
    generated, model_name, choices["guidance_scale"] = generate_for_pairs(pipe, screen, cells, baselines, lookup, args)
    predictions = mean_shift_cells(screen, cells, baselines, num_bins, np.random.default_rng(args.seed))
    predictions["tokens"][model_name] = generated
    predictions["expression"][model_name] = {key: lookup[key[0]][tokens] for key, tokens in generated.items()}
    results = score_methods(screen, cells, predictions, baselines, args.seed)
    report = {
        "checkpoint": str(checkpoint),
        "data": str(data),
        "test_pairs": setup["test_pairs"],
        "validation_pairs": setup["validation_pairs"],
        "test_perturbations": len(test["tokens"]),
        "test_cells": int(sum(len(v) for v in test["tokens"].values())),
        "panel_genes": len(screen["panel"]),
        "choices": choices,
        "results": results,
        "seconds": round(time.perf_counter() - started, 1),
        "date": time.strftime("%Y-%m-%d"),
    }
    write_report(report, args, checkpoint, predictions, test, baselines, model_name)
    return report


def generate_for_pairs(pipe, screen: dict, cells: dict, baselines: dict, lookup: dict, args) -> tuple[dict, str, dict]:
    """The model's cells for the test perturbations (as many as the real ones, at most `--cells_per_condition`), with
    the guidance scale chosen on the validation pairs (mean Pearson delta in expression space; `lookup`: each line's
    expression of each token)."""
    counts = {
        split: {key: min(len(real), args.cells_per_condition) for key, real in cells[split]["tokens"].items()}
        for split in ("validation", "test")
    }
    guidance = {}
    for scale in [float(s) for s in args.guidance_scales.split(",")]:
        generated = generate(pipe, screen, counts["validation"], scale, args.num_inference_steps, args.seed,
                             args.batch_size)  # fmt: skip
        as_expression = {key: lookup[key[0]][tokens] for key, tokens in generated.items()}
        guidance[scale] = mean_pearson(as_expression, cells["validation"]["expression"],
                                       baselines["expression"].control_mean)  # fmt: skip
        logger.info("guidance %g: validation Pearson delta %.3f", scale, guidance[scale])
    chosen = max(guidance, key=guidance.get)
    generated = generate(pipe, screen, counts["test"], chosen, args.num_inference_steps, args.seed + 1,
                         args.batch_size)  # fmt: skip
    return generated, f"RankDiT (guidance {chosen:g})", {"chosen": chosen, "validation_pearson_delta": guidance}


def write_report(report: dict, args, checkpoint: Path, predictions: dict, test: dict, baselines: dict, model_name):
    """Print the table, write the JSON, and (unless `--no_card`) put the table, a plot of predicted vs real shifts
    and the JSON into the checkpoint folder and its card, recorded in the folder's manifest."""
    table = markdown_table(report["results"])
    print(table)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2, default=float) + "\n")
    if args.no_card:
        return
    from training.outputs import RunOutputs
    from training.report import PLOTS_DIR, add_card_section

    with RunOutputs(checkpoint).recording():
        (checkpoint / PLOTS_DIR).mkdir(exist_ok=True)
        shown = {name: predictions["expression"][name] for name in ("B2 PerturbMean", "B3 additive ridge", model_name)}
        plot = plot_deltas(test["expression"], shown, baselines["expression"].control_mean,
                           checkpoint / PLOTS_DIR / "perturbation_deltas.png")  # fmt: skip
        (checkpoint / "perturbation_results.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
        add_card_section(checkpoint / "README.md", "Perturbation prediction", perturbation_section(report, table,
                         plot.relative_to(checkpoint).as_posix()))  # fmt: skip


def markdown_table(results: dict) -> str:
    lines = []
    for space, by_method in results.items():
        columns = list(next(iter(by_method.values())))
        lines += [f"**{space}**", "", "| method | " + " | ".join(columns) + " |",
                  "| --- |" + " --- |" * len(columns)]  # fmt: skip
        lines += [f"| {name} | " + " | ".join(f"{v:.3f}" for v in scores.values()) + " |"
                  for name, scores in by_method.items()]  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def perturbation_section(report: dict, table: str, plot: str) -> str:
    pairs = ", ".join(" / ".join(p) for p in report["test_pairs"])
    return f"""Held-out (line, drug) pairs, every dose, never trained on: {pairs} ({report["test_perturbations"]}
perturbations, {report["test_cells"]} real cells), on the {report["panel_genes"]} panel genes. Baselines fitted on
training cells only (B0 the line's DMSO cells, B1 the line's perturbed mean, B2 PerturbMean, B3 additive ridge with
a low-rank interaction when validation chose one); guidance scale and B3's settings chosen on the validation pairs
({json.dumps(report["choices"], default=float)}). `cell-eval` metrics per line with the line's plate-matched DMSO
cells as control (discrimination: normalised rank, lower is better; energy distance: lower is better). Generated
rank tokens become expression by the mean expression of each token in the line's DMSO cells.
`python benchmarks/perturbation.py --checkpoint OUT --data DIR`.

{table}

![Predicted vs real shifts]({plot})
"""


if __name__ == "__main__":
    main()
