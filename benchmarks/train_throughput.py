"""Training throughput per preset: RankDiff's stack against a bare PyTorch loop doing the same arithmetic.

For each preset, the same pre-tokenized batches (random genes and ranks, `--batch_size` cells of `--length`
positions) are trained on two ways, alternating, each `--repeats` times (the best time of each is kept, since
these machines are noisy):

- **RankDiff**: `RankDiTModel` (a transformers `PreTrainedModel`, attention through the SDPA interface) trained by
  `RankDiffusionTrainer` (HF Trainer + accelerate: data loader, NELBO + RPS loss, gradient clipping, fused AdamW,
  learning-rate schedule);
- **bare**: `BareDiT` below, plain `nn.Module`s doing the same block arithmetic (embeddings, adaLN-Zero blocks with
  `scaled_dot_product_attention`, the output layer), and a hand-written loop with the same loss, clipping and fused
  AdamW.

The overhead of the wrapping is (bare tokens/s) / (RankDiff tokens/s) - 1. On CUDA with `--bf16` both run under
bf16 autocast, and model FLOPs utilisation (MFU) is reported against the card's dense bf16 peak.

    python benchmarks/train_throughput.py --presets tiny small
    python benchmarks/train_throughput.py --device cuda --bf16 --presets small base large --batch_size 32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from modeling import RankDiTConfig, RankDiTModel  # noqa: E402
from pipelines import MaskedRankDiffusionScheduler  # noqa: E402
from training import RankDiffTrainingArguments, RankDiffusionTrainer  # noqa: E402
from training.loss import masked_nelbo, masked_ordinal  # noqa: E402

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, per GPU


class BareBlock(nn.Module):
    """The arithmetic of a RankDiT block, written directly: adaLN-Zero, SDPA attention, GELU MLP."""

    def __init__(self, hidden: int, heads: int, intermediate: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)
        self.modulation = nn.Linear(hidden, 6 * hidden)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c)).unsqueeze(1).chunk(6, dim=-1)
        b, n, d = x.shape
        h = F.layer_norm(x, (d,), eps=1e-6) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = x + gate1 * self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        h = F.layer_norm(x, (d,), eps=1e-6) * (1 + scale2) + shift2
        return x + gate2 * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class BareDiT(nn.Module):
    def __init__(self, config: RankDiTConfig):
        super().__init__()
        d = config.hidden_size
        self.ranks = nn.Embedding(config.num_rank_bins + 2, d)
        self.genes = nn.Embedding(config.gene_vocab_size, d)
        self.conditioning = nn.Parameter(torch.randn(1, d) * 0.02)
        self.blocks = nn.ModuleList(
            BareBlock(d, config.num_attention_heads, config.intermediate_size) for _ in range(config.num_hidden_layers)
        )
        self.modulation = nn.Linear(d, 2 * d)
        self.head = nn.Linear(d, config.num_rank_bins + 1)

    def forward(self, gene_ids: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.ranks(input_ids) + self.genes(gene_ids)
        c = self.conditioning.expand(x.shape[0], -1)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.modulation(F.silu(c)).unsqueeze(1).chunk(2, dim=-1)
        return self.head(F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale) + shift).float()


def make_batches(config: RankDiTConfig, count: int, batch_size: int, length: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, length)
    return [
        {
            "gene_ids": torch.randint(3, config.gene_vocab_size, shape, generator=generator),
            "input_ids": torch.randint(0, config.num_rank_bins + 1, shape, generator=generator),
            "attention_mask": torch.ones(shape, dtype=torch.long),
        }
        for _ in range(count)
    ]


class StepClock(TrainerCallback):
    """Wall time at the end of every optimizer step (after the device has finished it)."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def time_rankdiff(config, batches, warmup: int, device: str, bf16: bool, compile_model: bool) -> float:
    """Seconds per optimizer step after `warmup` steps, for the Trainer path."""
    cells = [{k: v[i] for k, v in batch.items()} for batch in batches for i in range(len(batch["gene_ids"]))]
    clock = StepClock()
    args = RankDiffTrainingArguments(
        output_dir="/tmp/rankdiff-throughput",
        max_steps=len(batches),
        per_device_train_batch_size=len(batches[0]["gene_ids"]),
        logging_steps=10**6,
        eval_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=device == "cpu",
        bf16=bf16,
        torch_compile=compile_model,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",  # the batches of the bare loop, in its order
        dataloader_pin_memory=device != "cpu",
        seed=0,
    )
    torch.manual_seed(0)
    trainer = RankDiffusionTrainer(
        model=RankDiTModel(config),
        args=args,
        train_dataset=cells,
        data_collator=lambda rows: {k: torch.stack([row[k] for row in rows]) for k in rows[0]},
        noise_scheduler=MaskedRankDiffusionScheduler(num_rank_bins=config.num_rank_bins),
        callbacks=[clock],
    )
    trainer.train()
    return (clock.times[-1] - clock.times[warmup - 1]) / (len(clock.times) - warmup)


def time_bare(config, batches, warmup: int, device: str, bf16: bool, compile_model: bool) -> float:
    """Seconds per optimizer step after `warmup` steps, for the hand-written loop."""
    torch.manual_seed(0)
    model = BareDiT(config).to(device)
    step_model = torch.compile(model) if compile_model else model
    scheduler = MaskedRankDiffusionScheduler(num_rank_bins=config.num_rank_bins)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    autocast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    times = []
    for batch in batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        original = batch["input_ids"]
        timesteps = scheduler.sample_timesteps(len(original), device=device)
        noisy = scheduler.add_noise(original, timesteps, maskable=batch["attention_mask"].bool())
        masked = noisy == scheduler.config.mask_token_id
        with autocast:
            logits = step_model(batch["gene_ids"], noisy)
        count = batch["attention_mask"].sum()
        loss = masked_nelbo(logits, original, masked, timesteps, scheduler) / count
        loss = loss + masked_ordinal(logits, original, masked, timesteps, scheduler, "rps", "nelbo") / count
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    return (times[-1] - times[warmup - 1]) / (len(times) - warmup)


def flops_per_token(config: RankDiTConfig, length: int) -> float:
    """Training FLOPs per token: 6 x the parameters a token passes through (not the embeddings) + attention."""
    d, layers, inner = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    matmul_params = layers * (4 * d * d + 2 * d * inner) + d * (config.num_rank_bins + 1)
    return 6 * matmul_params + 12 * layers * d * length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the best is kept")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/train_throughput.json"))
    args = parser.parse_args()

    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in device_name), None) if args.bf16 else None
    rows = []
    for preset in args.presets:
        config = RankDiTConfig.from_preset(preset, max_length=args.length)
        batches = make_batches(config, args.warmup + args.steps, args.batch_size, args.length)
        best = {"RankDiff": float("inf"), "bare": float("inf")}
        for _ in range(args.repeats):
            for name, timer in (("RankDiff", time_rankdiff), ("bare", time_bare)):
                seconds = timer(config, batches, args.warmup, args.device, args.bf16, args.compile)
                best[name] = min(best[name], seconds)
        tokens = args.batch_size * args.length
        row = {
            "preset": preset,
            "parameters_M": round(sum(p.numel() for p in RankDiTModel(config).parameters()) / 1e6, 2),
            "cells_per_s": round(args.batch_size / best["RankDiff"], 2),
            "tokens_per_s": round(tokens / best["RankDiff"]),
            "bare_tokens_per_s": round(tokens / best["bare"]),
            "overhead_percent": round(100 * (best["RankDiff"] / best["bare"] - 1), 1),
        }
        if peak:
            row["mfu_percent"] = round(100 * flops_per_token(config, args.length) * row["tokens_per_s"] / peak, 1)
        rows.append(row)
        print(f"{preset}: {row}", file=sys.stderr)

    print(f"\nTraining throughput on {device_name}, batch {args.batch_size} x {args.length} positions"
          f"{', bf16' if args.bf16 else ''}{', compiled' if args.compile else ''}\n")  # fmt: skip
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "device": device_name,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "results": rows,
    }
    args.output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
