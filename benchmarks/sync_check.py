"""Does sampling wait for the GPU? One pipeline run with every step after the first under
`torch.cuda.set_sync_debug_mode("error")`, so any host sync in the step loop raises and is printed with where it is.

    python benchmarks/sync_check.py --preset base --cells 16

Known syncs, outside the step loop (before it or at its end): building the windows, the seeds and the per-cell
inputs on the host and copying them over (host -> device copies), the first-hitting sampler's step count (one per
batch of windows, in `scheduler.begin`), and the copy of the finished tokens back. `use_cache=True` adds one per
step (the choice of the windows to recompute); this check runs without it.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from modeling import RankDiTConfig, RankDiTModel, RankDiTProcessor  # noqa: E402
from pipelines import MaskedRankDiffusionPipeline, MaskedRankDiffusionScheduler  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--cells", type=int, default=16)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("sync check: needs a CUDA GPU")
        return 1
    config = RankDiTConfig.from_preset(args.preset, gene_vocab_size=20_000, max_length=1024)
    model = RankDiTModel(config).eval()
    pipe = MaskedRankDiffusionPipeline(
        model=model, scheduler=MaskedRankDiffusionScheduler(), processor=RankDiTProcessor.from_model_config(config)
    ).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    genes = np.stack([rng.choice(np.arange(3, 20_000), 1024, replace=False) for _ in range(args.cells)])
    ranks = rng.integers(0, 51, genes.shape)

    def strict_after_first_step(pipe, step, timestep, callback_kwargs):
        torch.cuda.set_sync_debug_mode("error")
        return callback_kwargs

    failures = 0
    for sampler in ("ancestral", "confidence", "first-hitting"):
        try:
            pipe(genes, ranks=ranks, mask_ratio=0.5, num_inference_steps=args.steps, sampler=sampler, use_cache=False,
                 generator=torch.Generator().manual_seed(0), callback_on_step_end=strict_after_first_step)  # fmt: skip
            print(f"{sampler}: no host sync in the step loop")
        except RuntimeError:
            failures += 1
            print(f"{sampler}: a host sync in the step loop:\n{traceback.format_exc(limit=-6)}")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return failures


if __name__ == "__main__":
    sys.exit(main())
