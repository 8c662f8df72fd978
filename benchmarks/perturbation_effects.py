"""Has the model learned drug effects? Its expected effects on validation (or training) pairs, read without sampling.

    python benchmarks/perturbation_effects.py --checkpoint outputs/screen [--pairs training] [--guidance_scales 1,2]

For each perturbation (line, drug, dose), the same `--cells` training control cells of the line are translated
through the pipeline twice (`pipe(gene_ids=..., control_counts=..., conditions=..., output_type="probs")`, the
distribution of each translated token): under the perturbation and under the control. The model's effect is the
difference of the two mean expected expressions (each token mapped to the mean expression of the gene's entries
with that token in the line's training control cells), paired on the same cells, so neither sampling nor the
choice of control cells adds noise; it is scored by Pearson delta against the real effect (validation pairs: the
protocol's, against evaluation controls; training pairs: the training cells against the line's training controls,
a check that the model fits what it was trained on). A diagnostic of the effect the model learned, without
sampling; `benchmarks/perturbation.py` scores settings on validation pairs and reports test pairs, from the
translated cells' counts. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import perturbation as protocol  # noqa: E402

from dataset_scripts.tokenization import TokenizedBatch  # noqa: E402
from metrics.perturbation import pearson_delta  # noqa: E402
from metrics.perturbation_protocol import ScreenCells, cell_roles, read_screen_cells, split_truth  # noqa: E402
from training.data import most_detected_genes  # noqa: E402

logger = logging.getLogger("perturbation_effects")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a pipeline folder trained with --conditions")
    parser.add_argument("--pairs", choices=("validation", "training"), default="validation")
    parser.add_argument("--max_perturbations", type=protocol.positive_int, default=36,
                        help="training pairs scored at most (a seeded draw)")  # fmt: skip
    parser.add_argument("--cells", type=protocol.positive_int, default=32, help="control cells per perturbation")
    parser.add_argument("--guidance_scales", type=protocol.guidance_scales, default=[1.0, 2.0])
    parser.add_argument("--batch_size", type=protocol.positive_int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="benchmarks/results/perturbation_effects.json")
    return parser.parse_args(argv)


def real_training_effects(cells, roles, genes, control: str, limit: int, seed: int) -> dict:
    """Real effects of training perturbations: their training cells minus the line's training control cells."""
    obs, train = cells.obs, roles == "train"
    triples = zip(obs["line"][train], obs["drug"][train], obs["dose"][train])
    keys = sorted({(line, drug, float(dose)) for line, drug, dose in triples if drug != control})
    chosen = np.random.default_rng(seed).choice(len(keys), min(limit, len(keys)), replace=False)
    lines, drugs, doses = obs["line"].to_numpy(), obs["drug"].to_numpy(), obs["dose"].astype(float).to_numpy()
    effects = {}
    for key in (keys[i] for i in sorted(chosen)):
        rows = np.flatnonzero(train & (lines == key[0]) & (drugs == key[1]) & (doses == key[2]))
        controls = np.flatnonzero(train & (lines == key[0]) & (drugs == control))
        effects[key] = cells.expression(genes, rows).mean(0) - cells.expression(genes, controls).mean(0)
    return effects


def expected_expression(pipe, cells, rows, genes, conditions: dict, table: np.ndarray, scale: float, args):
    """Mean expected expression on `genes` of the control cells `rows` translated under `conditions`."""
    probs = pipe(gene_ids=[genes.tolist()] * len(rows), conditions=conditions, guidance_scale=scale,
                 output_type="probs", batch_size=args.batch_size,
                 **protocol.whole_cells_on(cells.counts[rows], genes)).probs  # fmt: skip
    return (probs * table[None]).sum(-1).mean(0)


def token_expression(pipe, cells: ScreenCells, roles: np.ndarray, genes: np.ndarray, control: str) -> dict:
    """Per line, the expression of each rank token at each panel gene `(genes, B + 1)`: the mean log-normalised
    expression of the gene's entries with that token in the line's reference control cells, i.e. quantile mapping
    to the line's control counts gene by gene (0 for token 0; where the line's controls never show a token at a
    gene, the token's mean over the line's genes, else over every line)."""
    rows = np.flatnonzero((roles == "train") & (cells.obs["drug"] == control).to_numpy())
    counts = cells.counts[rows]
    batch = TokenizedBatch(counts.indptr.astype(np.int64), counts.indices.astype(np.int64),
                           counts=counts.data.astype(np.float64), context=np.zeros(0),
                           context_offsets=np.zeros(len(rows) + 1, dtype=np.int64))  # fmt: skip
    tokens = pipe.processor.encode(batch.on_genes(genes))["input_ids"].numpy()
    expression, lines = cells.expression(genes, rows), cells.obs["line"].to_numpy()[rows]
    size = pipe.model.config.num_rank_bins + 1

    def table(where) -> tuple[np.ndarray, np.ndarray]:
        """(gene, token) sums and counts of the entries of the rows `where`."""
        index, shape = (np.arange(len(genes)) * size + tokens[where]).ravel(), (len(genes), size)
        sums = np.bincount(index, weights=expression[where].ravel(), minlength=len(genes) * size)
        return sums.reshape(shape), np.bincount(index, minlength=len(genes) * size).reshape(shape)

    def mean(sums: np.ndarray, seen: np.ndarray) -> np.ndarray:
        return np.where(seen > 0, sums / np.maximum(seen, 1), np.nan)

    sums, seen = table(slice(None))
    overall, lookup = mean(sums.sum(0), seen.sum(0)), {}
    for line in np.unique(lines):
        sums, seen = table(lines == line)
        of_line = mean(sums.sum(0), seen.sum(0))
        fallback = np.where(np.isnan(of_line), overall, of_line)
        lookup[line] = np.nan_to_num(np.where(seen > 0, mean(sums, seen), fallback[None, :]))
        lookup[line][:, 0] = 0.0
    return lookup


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    setup = protocol.split_setup(protocol.parse_args(["--checkpoint", args.checkpoint]))
    pipe = protocol.load_pipeline(args.checkpoint)
    cells = read_screen_cells(setup["data"], tuple(setup["pair_columns"]))
    roles = cell_roles(cells, setup["pair_columns"], map(tuple, setup["test_pairs"]),
                       map(tuple, setup["validation_pairs"]), setup["control_drug"], setup["split_seed"])  # fmt: skip
    genes = most_detected_genes(cells.detection(np.flatnonzero(roles == "train")), pipe.model.config.max_length)
    control = setup["control_drug"]
    if args.pairs == "validation":
        truth = split_truth(cells, roles, genes, control, "validation")
        effects = {key: truth.real_delta(key) for key in truth.keys}
    else:
        effects = real_training_effects(cells, roles, genes, control, args.max_perturbations, args.seed)
    lookup = token_expression(pipe, cells, roles, genes, control)
    controls = np.flatnonzero((roles == "train") & (cells.obs["drug"] == control).to_numpy())
    lines = cells.obs["line"].to_numpy()[controls]
    rows_of = {}
    for i, key in enumerate(effects):
        pool = controls[lines == key[0]]
        rows_of[key] = np.random.default_rng([args.seed, i]).choice(pool, args.cells, replace=args.cells > len(pool))
    results = {}
    for scale in args.guidance_scales:
        scores, sizes = [], []
        for key, real in effects.items():
            told = {"cell_line_id": key[0], "drug": key[1], "dose": key[2]}
            vehicle = {"cell_line_id": key[0], "drug": control, "dose": 0.0}
            treated, untreated = (expected_expression(pipe, cells, rows_of[key], genes, conditions, lookup[key[0]],
                                                      scale, args) for conditions in (told, vehicle))  # fmt: skip
            scores.append(pearson_delta(treated - untreated, real))
            sizes.append(float(np.abs(treated - untreated).mean()))
        results[str(scale)] = {"pearson_delta": float(np.mean(scores)), "mean_abs_effect": float(np.mean(sizes))}
        logger.info("guidance %g: Pearson delta %.3f", scale, results[str(scale)]["pearson_delta"])
    report = {
        "checkpoint": args.checkpoint,
        "pairs": args.pairs,
        "perturbations": len(effects),
        "cells": args.cells,
        "real_mean_abs_effect": float(np.mean([np.abs(v).mean() for v in effects.values()])),
        "by_guidance_scale": results,
    }
    print(f"| guidance scale | Pearson delta ({args.pairs} pairs, {len(effects)}) | mean abs effect |")
    print("| --- | --- | --- |")
    for scale, row in results.items():
        print(f"| {scale} | {row['pearson_delta']:.3f} | {row['mean_abs_effect']:.3f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
