"""Sampling cost of `MaskedRankDiffusionPipeline`: model calls and wall time per cell, per sampler; the loop's own
cost per step; whole cells.

One cell of 1,024 genes at mask ratios 0.2 / 0.8 / 1.0 and 16 / 64 / 256 / 1,024 steps, for the cached ancestral
sampler, the first-hitting sampler (one step per masked gene, whatever the step count) and confidence-ordered
unmasking, side by side in the same run with the ancestral sampler without caching. The model is the checkpoint's
(`--checkpoint`, a `train_hf.py` output folder) or a fresh RankDiT of `--preset`: the cost does not depend on the
weights. Prints a markdown table and writes JSON.

`--overhead` measures, through `pipe(...)`, (a) the time per step of everything but the model (the pipeline's loop
and the scheduler's step), with a stand-in model that returns fixed logits at once, for `--windows` windows of
1,024 genes and the first of `--steps` steps;
(b) the same with the real model; (c) sampling one whole cell of 3,000 genes (three windows). The script runs
against older versions of the pipeline too (built without a processor), to compare before and after side by side:

    python benchmarks/sampling.py --output benchmarks/results/sampling.json
    python benchmarks/sampling.py --overhead --output benchmarks/results/sampling_overhead.json
"""

from __future__ import annotations

import argparse
import inspect
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


class FixedLogits(RankDiTModel):
    """A stand-in denoiser that returns the same logits at once (a fresh tensor, as a model's output is): what is
    left of a step is the loop's own cost."""

    def forward(self, gene_ids, input_ids, attention_mask=None, timesteps=None, return_dict=True):
        logits = self.rank_embedding.weight[: self.config.num_rank_tokens, 0].expand(*input_ids.shape, -1).clone()
        return type("Output", (), {"logits": logits})()


def make_pipeline(model: RankDiTModel, device: str) -> MaskedRankDiffusionPipeline:
    components = {"model": model.eval(), "scheduler": MaskedRankDiffusionScheduler()}
    if "processor" in inspect.signature(MaskedRankDiffusionPipeline.__init__).parameters:
        from modeling import RankDiTProcessor

        components["processor"] = RankDiTProcessor.from_model_config(model.config)
    pipe = MaskedRankDiffusionPipeline(**components)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(checkpoint: str | None, preset: str, device: str, model_class=RankDiTModel):
    if checkpoint:
        pipe = MaskedRankDiffusionPipeline.from_pretrained(checkpoint, trust_remote_code=True)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    torch.manual_seed(0)
    config = RankDiTConfig.from_preset(preset, gene_vocab_size=20_000, max_length=1024)
    return make_pipeline(model_class(config), device)


def timed(pipe, repeats: int = 3, **call) -> float:
    """The median wall time of `pipe(**call)`, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pipe(**call, generator=torch.Generator().manual_seed(0))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def overhead(args) -> list[dict]:
    """The loop's own cost per step, the cost per step with the model, and one whole cell's sampling time."""
    rng = np.random.default_rng(0)
    steps, windows, rows = args.steps[0], args.windows, []
    models = (("loop and scheduler only (fixed logits)", FixedLogits), ("with the model", RankDiTModel))
    for label, model_class in models:
        pipe = load_pipeline(None, args.preset, args.device, model_class)
        genes = np.stack([rng.choice(np.arange(3, 20_000), 1024, replace=False) for _ in range(windows)])
        ranks = rng.integers(0, 51, genes.shape)
        call = dict(gene_ids=genes, ranks=ranks, mask_ratio=0.5, num_inference_steps=steps, use_cache=False)
        timed(pipe, repeats=1, **{**call, "num_inference_steps": 2})  # warm-up
        seconds = timed(pipe, **call)
        rows.append({"measure": f"ms per step, {windows} windows x 1,024 genes, half masked: {label}",
                     "value": 1000 * seconds / steps})  # fmt: skip
    genes = rng.choice(np.arange(3, 20_000), 3000, replace=False)
    counts = rng.negative_binomial(1, 0.3, 3000).astype(float) + (np.arange(3000) == 0)
    call = dict(gene_ids=[genes], counts=[counts], mask_ratio=0.5, num_inference_steps=steps)
    if "context_counts" in inspect.signature(pipe.__call__).parameters:
        call["context_counts"] = [[]]
    rows.append({"measure": f"s to sample one whole cell of 3,000 genes (3 windows), half masked, {steps} steps",
                 "value": timed(pipe, **call)})  # fmt: skip
    return rows


def timed_runs(pipe: MaskedRankDiffusionPipeline, cells: int, steps: list[int]) -> tuple[int, list[dict]]:
    """Seconds and model calls per cell of each sampler, step count and mask ratio, on `cells` random cells of the
    model's length (at most 1,024 genes); returns that length and one row per run."""
    length = min(1024, pipe.model.config.max_length)
    rng = np.random.default_rng(0)
    gene_ids = np.stack(
        [rng.choice(np.arange(3, pipe.model.config.gene_vocab_size), length, replace=False) for _ in range(cells)]
    )
    ranks = rng.integers(0, pipe.model.config.num_rank_bins + 1, gene_ids.shape)
    pipe(gene_ids[:, :64], ranks=ranks[:, :64], mask_ratio=0.5, num_inference_steps=4)  # warm-up
    results = []
    for ratio in RATIOS:
        for label, sampler, use_cache in RUNS:
            for count in [steps[0]] if sampler == "first-hitting" else steps:
                inputs = {"ranks": ranks, "mask_ratio": ratio} if ratio < 1.0 else {}  # 1.0: generate whole cells
                start = time.perf_counter()
                out = pipe(
                    gene_ids,
                    **inputs,
                    num_inference_steps=count,
                    sampler=sampler,
                    use_cache=use_cache,
                    generator=torch.Generator().manual_seed(0),
                )
                seconds = (time.perf_counter() - start) / cells
                results.append(
                    {
                        "mask_ratio": ratio,
                        "sampler": label,
                        "steps": "one per masked gene" if sampler == "first-hitting" else count,
                        "model_calls_per_cell": float(out.model_calls.mean()),
                        "seconds_per_cell": seconds,
                    }
                )
                print(f"{ratio} {label} {results[-1]['steps']}: {seconds:.2f} s", file=sys.stderr, flush=True)
    return length, results


def write_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a train_hf.py output folder (default: a fresh model of --preset)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--cells", type=int, default=1, help="cells denoised together (times are per cell)")
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--overhead", action="store_true", help="measure the loop's own cost and whole cells only")
    parser.add_argument("--windows", type=int, default=64, help="windows sampled together for --overhead")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/sampling.json"))
    args = parser.parse_args()
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{os.cpu_count()}-core CPU"
    machine = f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}"
    if args.overhead:
        rows = overhead(args)
        print(f"\n{args.preset} RankDiT, {args.device}\n\n| measure | value |\n| --- | --- |")
        for row in rows:
            print(f"| {row['measure']} | {row['value']:.2f} |")
        record = {"device": device_name, "machine": machine, "date": time.strftime("%Y-%m-%d"), "results": rows}
        write_record(args.output, record)
        return

    pipe = load_pipeline(args.checkpoint, args.preset, args.device)
    length, results = timed_runs(pipe, args.cells, args.steps)
    print(f"\n{pipe.model.config.num_hidden_layers}-layer RankDiT, {length} genes per cell, {args.device}\n")
    print("| mask ratio | sampler | steps | model calls / cell | seconds / cell |\n| --- | --- | --- | --- | --- |")
    for row in results:
        print(
            f"| {row['mask_ratio']} | {row['sampler']} | {row['steps']} | {row['model_calls_per_cell']:.0f} | "
            f"{row['seconds_per_cell']:.2f} |"
        )
    record = {
        "model": args.checkpoint or f"fresh {args.preset} preset",
        "genes_per_cell": length,
        "cells": args.cells,
        "device": device_name,
        "machine": machine,
        "date": time.strftime("%Y-%m-%d"),
        "results": results,
    }
    write_record(args.output, record)


if __name__ == "__main__":
    main()
