"""Loss ablation on the embedded sample: plain MDLM (lambda = 0) vs the mixed losses, same budget and seed.

Each variant is `train_hf.py` with its defaults (300 steps of 16 cells, tiny preset) and one loss setting, then
scored by `benchmarks/imputation.py`'s evaluation on the same held-out cells and masks (one denoiser pass, no
sampling). Prints the variants side by side per mask ratio and writes JSON. A variant whose folder under
`--runs_dir` already holds a trained pipeline is scored without training it again.

    python benchmarks/loss_ablation.py --runs_dir outputs/ablation --output benchmarks/results/loss_ablation.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from imputation import BenchmarkArguments, evaluate_checkpoint, print_table  # noqa: E402

import train_hf  # noqa: E402
from training import DataArguments  # noqa: E402

VARIANTS = {  # name -> train_hf.py flags
    "MDLM (lambda = 0)": ["--ordinal_term", "none"],
    "NELBO + 1.0 x mean matching": ["--ordinal_term", "mean_matching", "--ordinal_weight", "1.0"],
    "NELBO + 1.0 x RPS": ["--ordinal_term", "rps", "--ordinal_weight", "1.0"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs_dir", type=Path, default=Path("outputs/ablation"))
    parser.add_argument("--mask_ratios", type=float, nargs="+", default=[0.2, 0.5, 0.8, 0.95])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/loss_ablation.json"))
    args = parser.parse_args()

    results = {}
    for name, flags in VARIANTS.items():
        folder = args.runs_dir / flags[1]
        if not (folder / "model_index.json").exists():
            train_hf.main(["--output_dir", str(folder), "--disable_tqdm", "true", *flags])
        bench_args = BenchmarkArguments(checkpoint=str(folder), mask_ratios=args.mask_ratios, sample_steps=0)
        scores, n_cells, _ = evaluate_checkpoint(bench_args, DataArguments())
        results[name] = scores["RankDiT, one pass"]
        results.setdefault("per-gene marginal", scores["per-gene marginal"])

    for ratio in args.mask_ratios:
        rows = {name: by_ratio[str(ratio)] for name, by_ratio in results.items()}
        print_table(rows, f"Mask ratio {ratio}, {n_cells} held-out cells of the embedded sample")
    record = {
        "variants": {name: flags for name, flags in VARIANTS.items()},
        "held_out_cells": n_cells,
        "results": results,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
