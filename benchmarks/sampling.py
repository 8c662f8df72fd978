"""Sampling cost of `MaskedRankDiffusionPipeline`: model calls and wall time per cell, per sampler.

One cell of 1,024 genes at mask ratios 0.2 / 0.8 / 1.0 and 16 / 64 / 256 / 1,024 steps, for the cached ancestral
sampler, the first-hitting sampler (one step per masked gene, whatever the step count) and confidence-ordered
unmasking, side by side in the same run with the ancestral sampler without caching. The model is the checkpoint's
(`--checkpoint`, a `train_hf.py` output folder) or a fresh RankDiT of `--preset`: the cost does not depend on the
weights. Prints a markdown table and writes JSON.

    python benchmarks/sampling.py --output benchmarks/results/sampling.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from modeling import RankDiTConfig, RankDiTModel  # noqa: E402
from pipelines import MaskedRankDiffusionPipeline, MaskedRankDiffusionScheduler  # noqa: E402

RATIOS = (0.2, 0.8, 1.0)
STEPS = (16, 64, 256, 1024)
RUNS = (  # (label, sampler, use_cache)
    ("ancestral, no cache (reference)", "ancestral", False),
    ("ancestral, cached", "ancestral", True),
    ("confidence (top-k)", "confidence", True),
    ("first-hitting", "first-hitting", True),
)


def load_pipeline(checkpoint: str | None, preset: str, device: str) -> MaskedRankDiffusionPipeline:
    if checkpoint:
        pipe = MaskedRankDiffusionPipeline.from_pretrained(checkpoint, trust_remote_code=True)
    else:
        torch.manual_seed(0)
        config = RankDiTConfig.from_preset(preset, gene_vocab_size=20_000, max_length=1024)
        pipe = MaskedRankDiffusionPipeline(model=RankDiTModel(config).eval(), scheduler=MaskedRankDiffusionScheduler())
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a train_hf.py output folder (default: a fresh model of --preset)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--cells", type=int, default=1, help="cells denoised together (times are per cell)")
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/sampling.json"))
    args = parser.parse_args()

    pipe = load_pipeline(args.checkpoint, args.preset, args.device)
    length = min(1024, pipe.model.config.max_length)
    rng = np.random.default_rng(0)
    gene_ids = np.stack(
        [rng.choice(np.arange(3, pipe.model.config.gene_vocab_size), length, replace=False) for _ in range(args.cells)]
    )
    ranks = rng.integers(0, pipe.model.config.num_rank_bins + 1, gene_ids.shape)
    pipe(gene_ids[:, :64], ranks=ranks[:, :64], mask_ratio=0.5, num_inference_steps=4)  # warm-up

    results = []
    for ratio in RATIOS:
        for label, sampler, use_cache in RUNS:
            for steps in [args.steps[0]] if sampler == "first-hitting" else args.steps:
                inputs = {"ranks": ranks, "mask_ratio": ratio} if ratio < 1.0 else {}  # 1.0: generate whole cells
                start = time.perf_counter()
                out = pipe(
                    gene_ids,
                    **inputs,
                    num_inference_steps=steps,
                    sampler=sampler,
                    use_cache=use_cache,
                    generator=torch.Generator().manual_seed(0),
                )
                seconds = (time.perf_counter() - start) / args.cells
                results.append(
                    {
                        "mask_ratio": ratio,
                        "sampler": label,
                        "steps": "one per masked gene" if sampler == "first-hitting" else steps,
                        "model_calls_per_cell": float(out.model_calls.mean()),
                        "seconds_per_cell": seconds,
                    }
                )
                row = results[-1]
                print(f"{ratio} {label} {row['steps']}: {seconds:.2f} s", file=sys.stderr, flush=True)

    print(f"\n{pipe.model.config.num_hidden_layers}-layer RankDiT, {length} genes per cell, {args.device}\n")
    print("| mask ratio | sampler | steps | model calls / cell | seconds / cell |\n| --- | --- | --- | --- | --- |")
    for row in results:
        print(
            f"| {row['mask_ratio']} | {row['sampler']} | {row['steps']} | {row['model_calls_per_cell']:.0f} | "
            f"{row['seconds_per_cell']:.2f} |"
        )
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{os.cpu_count()}-core CPU"
    record = {
        "model": args.checkpoint or f"fresh {args.preset} preset",
        "genes_per_cell": length,
        "cells": args.cells,
        "device": device,
        "machine": f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
