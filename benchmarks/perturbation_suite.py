"""The perturbation benchmark over the splits users ask about, several seeds, with paired bootstrap intervals.

    python benchmarks/perturbation_suite.py --data DIR --json benchmarks/results/perturbation_suite.json

Three questions, each a family of held-out-pairs splits scored by `benchmarks/perturbation.py`'s protocol (the
training split rule, each side of a delta against its own control, the baselines, the drug-blind check and the
ceiling), for each of `--seeds` seeds (the seed draws the splits, the validation pairs and the control halves):

- `pairs`: (line, drug) pairs in `--folds` folds, every line and drug keeping at least 3 training pairs;
- `unseen drug`: every pair of one drug held out (leave-one-drug-out, `--drugs_left_out` drugs per seed);
- `unseen line`: one line keeps `--shots` drugs in training, every other pair of it is held out (few-shot).

Per question, each method's mean over all test perturbations of every split and seed, and the paired bootstrap
95% interval of its difference to the best baseline of each split (chosen on that split's validation pairs),
perturbations resampled. The screen (and its fresh draw) is read once. Prints a table per question, writes JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from perturbation import BASELINES, evaluate_split, pairs_setup, read_oracle  # the benchmark beside

from metrics.perturbation_protocol import paired_bootstrap, read_screen_cells
from modeling.conditions import condition_value

logger = logging.getLogger("perturbation_suite")
QUESTIONS = ("pairs", "unseen drug", "unseen line")


def screen_pairs(cells, control: str) -> tuple[list[str], list[str], set]:
    """The lines, the perturbing drugs and the (line, drug) pairs a screen holds."""
    obs = cells.obs[cells.obs["drug"] != condition_value("drug", control)]
    pairs = set(zip(obs["line"], obs["drug"]))
    return sorted({p[0] for p in pairs}), sorted({p[1] for p in pairs}), pairs


def pair_folds(lines, drugs, pairs, folds: int, rng, min_training: int = 3) -> list[list[tuple]]:
    """(line, drug) pairs dealt into `folds` folds along shuffled diagonals (pair (i, j) -> fold (i + j) mod folds),
    so each fold takes about 1/folds of every line's and every drug's pairs; checked to leave each line and drug
    `min_training` training pairs."""
    line_order, drug_order = rng.permutation(len(lines)), rng.permutation(len(drugs))
    dealt = [[] for _ in range(folds)]
    for i, line in enumerate(lines):
        for j, drug in enumerate(drugs):
            if (line, drug) in pairs:
                dealt[(line_order[i] + drug_order[j]) % folds].append((line, drug))
    for fold in dealt:
        for index, name in ((0, "line"), (1, "drug")):
            for value in {p[index] for p in pairs}:
                kept = sum(1 for p in pairs if p[index] == value and p not in fold)
                if kept < min_training:
                    raise ValueError(f"a fold leaves the {name} {value} {kept} training pairs (< {min_training})")
    return [sorted(fold) for fold in dealt if fold]


def question_splits(question: str, lines, drugs, pairs, args, rng) -> list[list[tuple]]:
    """The held-out pairs of each split of a question."""
    if question == "pairs":
        return pair_folds(lines, drugs, pairs, args.folds, rng)
    if question == "unseen drug":
        chosen = rng.choice(drugs, min(args.drugs_left_out, len(drugs)), replace=False)
        return [sorted(p for p in pairs if p[1] == drug) for drug in chosen]
    line = lines[rng.integers(len(lines))]
    own = sorted(p for p in pairs if p[0] == line)
    kept = {own[i] for i in rng.choice(len(own), min(args.shots, len(own)), replace=False)}
    return [[p for p in own if p not in kept]]


def write_pairs(pairs: list[tuple], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["cell_line_id", "drug"])
        writer.writerows(pairs)
    return path


def run_question(question: str, cells, oracle, args) -> dict:
    """Every split and seed of a question: per method and metric, the pooled per-perturbation scores, with the
    best baseline's score of the same perturbation beside each."""
    lines, drugs, pairs = screen_pairs(cells, args.control_drug)
    pooled: dict = {}
    splits = 0
    for seed in range(args.seeds):
        rng = np.random.default_rng([seed, QUESTIONS.index(question)])
        for held in question_splits(question, lines, drugs, pairs, args, rng):
            with tempfile.TemporaryDirectory() as folder:
                path = write_pairs(held, Path(folder) / "pairs.csv")
                setup = pairs_setup(args.data, str(path), seed, args.control_drug)
            args.seed = seed
            report, _, _ = evaluate_split(cells, oracle, setup, args.panel_size, args)
            splits += 1
            best = report["per_perturbation"][report["best_baseline"]]
            keys = [tuple(key) for key in report["perturbations"]]
            for name, by_metric in report["per_perturbation"].items():
                for metric, values in by_metric.items():
                    entry = pooled.setdefault(name, {}).setdefault(metric, {"values": [], "best": [], "keys": []})
                    entry["values"] += values
                    entry["best"] += best[metric]
                    entry["keys"] += keys
            logger.info("%s, seed %d: %d held-out pairs, best baseline %s", question, seed, len(held),
                        report["best_baseline"])  # fmt: skip
    return summarise_question(pooled, splits, args.seeds)


def per_perturbation(entry: dict) -> tuple[np.ndarray, np.ndarray]:
    """A method's and the best baselines' scores averaged per perturbation over the seeds that scored it, so the
    bootstrap resamples perturbations, not a perturbation's repeats (which would narrow the interval)."""
    keys = sorted(set(entry["keys"]))
    index = {key: i for i, key in enumerate(keys)}
    rows = np.array([index[key] for key in entry["keys"]])
    counts = np.bincount(rows, minlength=len(keys))
    return (np.bincount(rows, np.asarray(entry["values"], float), len(keys)) / counts,
            np.bincount(rows, np.asarray(entry["best"], float), len(keys)) / counts)  # fmt: skip


def summarise_question(pooled: dict, splits: int, seeds: int) -> dict:
    methods, versus = {}, {}
    for name, by_metric in pooled.items():
        methods[name] = {m: float(np.nanmean(entry["values"])) for m, entry in by_metric.items()}
        versus[name] = {m: paired_bootstrap(*per_perturbation(entry)) for m, entry in by_metric.items()
                        if m in ("pearson_delta", "mae_delta")}  # fmt: skip
    entry = next(iter(pooled.values()))["pearson_delta"]
    perturbations, distinct = len(entry["values"]), len(set(entry["keys"]))
    return {"splits": splits, "seeds": seeds, "perturbations": perturbations, "distinct_perturbations": distinct,
            "methods": methods,
            "versus_best_baseline": versus}  # fmt: skip


def markdown_table(question: str, result: dict) -> str:
    metrics = ("pearson_delta", "mae_delta", "energy_distance", "mmd")
    header = " | ".join(f"{m} {'↑' if m == 'pearson_delta' else '↓'}" for m in metrics)
    lines = [f"**{question}** ({result['splits']} splits over {result['seeds']} seeds, {result['perturbations']} "
             "test perturbations)", "", f"| method | {header} | Δ pearson_delta vs best baseline (95% CI) | "
             "Δ mae_delta (95% CI) |", "| --- |" + " --- |" * 6]  # fmt: skip
    for name, scores in result["methods"].items():
        cis = [result["versus_best_baseline"][name][m] for m in ("pearson_delta", "mae_delta")]
        shown = [f"{c['difference']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]" for c in cis]
        lines.append(f"| {name} | " + " | ".join([*(f"{scores[m]:.3f}" for m in metrics), *shown]) + " |")
    return "\n".join(lines)


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a Tahoe-layout screen (with DIR/oracle for the ceiling)")
    parser.add_argument("--questions", default=",".join(QUESTIONS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--drugs_left_out", type=int, default=4, help="unseen-drug splits per seed")
    parser.add_argument("--shots", type=int, default=3, help="the unseen line's training drugs")
    parser.add_argument("--control_drug", default="DMSO_TF")
    parser.add_argument("--panel_size", type=int, default=512)
    parser.add_argument("--cell_eval", action="store_true", help="add cell-eval's DE metrics (slow)")
    parser.add_argument("--json", default="benchmarks/results/perturbation_suite.json")
    args = parser.parse_args(argv)
    args.no_cell_eval = not args.cell_eval
    args.validation_only = False  # every split is scored on its test pairs
    unknown = set(args.questions.split(",")) - set(QUESTIONS)
    if unknown:
        parser.error(f"--questions must come from {QUESTIONS}, got {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("perturbation").setLevel(logging.WARNING)
    logging.getLogger("cell_eval").setLevel(logging.WARNING)
    started = time.perf_counter()
    cells = read_screen_cells(args.data)
    oracle = read_oracle(args.data, ("cell_line_id", "drug"))
    results = {question: run_question(question, cells, oracle, args) for question in args.questions.split(",")}
    for question, result in results.items():
        print(markdown_table(question, result) + "\n")
    report = {"data": args.data, "baselines": list(BASELINES), "questions": results,
              "seconds": round(time.perf_counter() - started, 1), "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2, default=float) + "\n")
    return report


if __name__ == "__main__":
    main()
