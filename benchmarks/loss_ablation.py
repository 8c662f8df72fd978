"""Loss ablation on the embedded sample: plain MDLM (lambda = 0) vs the mixed losses, same budget, several seeds.

Each variant is `python train_hf.py` with its defaults and one loss setting, for each seed, then scored by
`benchmarks/imputation.py`'s evaluation (one denoiser pass, no sampling) on *validation* cells (the choice of the
default loss is made there; the reported numbers are on test cells), on every panel and mask ratio, beside the
baselines on the same masks. Prints the mean over seeds per variant (and the spread) and writes JSON. A run whose
folder under `--runs_dir` already holds a trained pipeline is scored without training it again.

    python benchmarks/loss_ablation.py --runs_dir outputs/ablation --output benchmarks/results/loss_ablation.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from imputation import BenchmarkArguments, evaluate_checkpoint, print_table  # noqa: E402

from metrics.imputation import MODEL_METHOD  # noqa: E402

VARIANTS = {  # name -> train_hf.py flags
    "MDLM (lambda = 0)": ["--ordinal_term", "none"],
    "NELBO + 1.0 x mean matching": ["--ordinal_term", "mean_matching", "--ordinal_weight", "1.0"],
    "NELBO + 1.0 x RPS": ["--ordinal_term", "rps", "--ordinal_weight", "1.0"],
}
COLUMNS = {"nll_all": "NLL", "mae_level_all": "MAE (levels)", "spearman_level_all": "Spearman (levels)",
           "coverage_90_all": "90% cover", "ece_all": "ECE"}  # fmt: skip


def mean_over_seeds(runs: list[dict]) -> dict:
    """Per panel and ratio, the mean (and standard deviation, `*_sd`) over seeds of each scalar score."""
    out = {}
    for panel, by_ratio in runs[0].items():
        for ratio, scores in by_ratio.items():
            merged = {}
            for key, value in scores.items():
                if isinstance(value, (int, float)):
                    values = np.array([run[panel][ratio][key] for run in runs], dtype=np.float64)
                    merged[key], merged[f"{key}_sd"] = float(values.mean()), float(values.std())
            out.setdefault(panel, {})[ratio] = merged
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs_dir", type=Path, default=Path("outputs/ablation"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--mask_ratios", type=float, nargs="+", default=[0.2, 0.5, 0.8, 0.95])
    parser.add_argument("--split", default="validation", help="cells the variants are compared on")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/loss_ablation.json"))
    args = parser.parse_args()

    per_seed, baselines = {}, {}
    for name, flags in VARIANTS.items():
        for seed in args.seeds:
            folder = args.runs_dir / f"{flags[1]}-seed{seed}"
            if not (folder / "model_index.json").exists():
                command = [sys.executable, str(ROOT / "train_hf.py"), "--output_dir", str(folder), "--seed", str(seed)]
                command += ["--model_card", "false", "--disable_tqdm", "true", *flags]
                subprocess.run(command, check=True, cwd=ROOT)
            bench_args = BenchmarkArguments(
                checkpoint=str(folder), split=args.split, mask_ratios=args.mask_ratios, sample_steps=0
            )
            record = evaluate_checkpoint(bench_args)
            runs = {panel: by_method[MODEL_METHOD] for panel, by_method in record["results"].items()}
            per_seed.setdefault(name, []).append(runs)
            for panel, by_method in record["results"].items():
                for method, by_ratio in by_method.items():
                    if method != MODEL_METHOD:
                        baselines.setdefault(panel, {}).setdefault(method, by_ratio)
    results = {name: mean_over_seeds(runs) for name, runs in per_seed.items()}

    for panel, by_method in baselines.items():
        for ratio in args.mask_ratios:
            rows = {name: by_panel[panel][str(ratio)] for name, by_panel in results.items()}
            rows.update({method: by_ratio[str(ratio)] for method, by_ratio in by_method.items()})
            title = f"{panel}, mask ratio {ratio}, {args.split} cells, mean of {len(args.seeds)} seeds"
            print_table(rows, title, COLUMNS)
    record = {
        "variants": VARIANTS,
        "seeds": args.seeds,
        "split": args.split,
        "results": results,
        "per_seed": per_seed,
        "baselines": baselines,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
