"""Stream training batches exactly as `train_hf.py` reads them, and say how fast and how mixed they are.

The run is built as `train_hf.py` builds it (`training.run.build_training`: data, splits, the `Tahoe100MTokenized`
stream, collator, the Trainer's own train DataLoader) and `--batches` batches of `--batch_size` cells are drawn from
it.
Beside it, in the same process, a plain per-cell loop reads the same files with pyarrow and applies the same rank
rule and selection (the run's `CellTokenizer`, one cell at a time) to as many cells. With `--train_steps N` the run
then trains N steps and the time the Trainer waits for batches is measured (its `get_batch_samples`).

Prints a table and writes JSON with `cells_per_s` (after the first batch), `per_cell_loop_cells_per_s`,
`speedup_over_per_cell_loop`, `cells_per_s_per_core`, `peak_rss_mib`, `rss_growth_mib` (resident memory after all
batches minus after the first tenth), `mean_plates_per_batch` (distinct `plate` values per batch, averaged; null
without a plate column), `distinct_shards` (files that fed the batches; null for a Hub stream),
`mean_expressed_genes`, `data_wait_share` (with `--train_steps`) and the settings.

    python benchmarks/data_stream.py --data /data/tahoe_standin --batches 20 --batch_size 32 --json stream.json

Every data flag of `train_hf.py` (`--max_length`, `--zero_share`, `--validation_share`, ...) is taken too.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dataset_scripts import cell_counts  # noqa: E402
from dataset_scripts.schema import CELL_ID_COLUMN  # noqa: E402
from training import DataArguments, DiffusionArguments, ModelArguments, RankDiffTrainingArguments  # noqa: E402
from training.run import build_training  # noqa: E402


@dataclass
class StreamArguments:
    batches: int = field(default=20, metadata={"help": "training batches to draw"})
    batch_size: int = field(default=32, metadata={"help": "cells per batch"})
    json: str | None = field(default=None, metadata={"help": "where the JSON record goes"})
    train_steps: int = field(default=0, metadata={"help": "then train this many steps and measure the data wait"})


def resident_mib() -> float:
    """The process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def per_cell_loop(files: list[Path], tokenizer, cells: int) -> tuple[float, int]:
    """Cells per second of a plain loop: pyarrow batches of the same files, each cell through `cell_counts` and
    the per-cell `CellTokenizer` (the same rank rule and selection), until `cells` cells."""
    done, start = 0, time.perf_counter()
    for file in files:
        for record_batch in pq.ParquetFile(file).iter_batches(1024, columns=["genes", "expressions", CELL_ID_COLUMN]):
            for row in record_batch.to_pylist():
                genes, counts = cell_counts(row)
                tokenizer(genes, counts, cell_id=row[CELL_ID_COLUMN])
                done += 1
                if done == cells:
                    return done / (time.perf_counter() - start), done
    return done / (time.perf_counter() - start), done


def data_wait(trainer, steps: int) -> tuple[float, float]:
    """Train `steps` steps; returns (share of the time spent waiting for batches, seconds per step)."""
    waited, fetch = [0.0], trainer.get_batch_samples

    def timed_fetch(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fetch(*args, **kwargs)
        finally:
            waited[0] += time.perf_counter() - start

    trainer.get_batch_samples = timed_fetch
    trainer.args.max_steps, trainer.args.eval_strategy = steps, "no"
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    return waited[0] / total, total / steps


def shard_of_cells(data: str | None) -> dict[str, Path]:
    """Cell id -> the parquet file it lives in, for a local Tahoe-layout folder (empty for other sources)."""
    if data is None or not Path(data).is_dir():
        return {}
    files = sorted((Path(data) / "data").glob("*.parquet")) or sorted(Path(data).glob("*.parquet"))
    return {cell: file for file in files for cell in pq.read_table(file, columns=[CELL_ID_COLUMN])[0].to_pylist()}


@dataclass
class StreamReading:
    """What the training dataloader gave: per batch its time since the start, its (plate, cell id) pairs, and in
    all the expressed genes and cells, the attended tokens, and the memory grown after the first tenth."""

    times: list[float] = field(default_factory=list)
    cells: list[list[tuple[str | None, str]]] = field(default_factory=list)
    expressed: list[int] = field(default_factory=lambda: [0, 0])  # expressed genes, cells
    tokens: int = 0
    rss_growth_mib: float | None = None


def read_stream(trainer, batches: int) -> StreamReading:
    """Read `batches` batches through the trainer's own dataloader and collator (workers included), recording
    what each held."""
    collate, reading, rss_early = trainer.data_collator, StreamReading(), None

    def recording_collator(batch):  # the training collator's tensors, and what the batch held (in a worker too)
        cell_ids = [str(cell) for cell in batch[CELL_ID_COLUMN]]
        plates = [str(plate) for plate in batch["plate"]] if "plate" in batch else [None] * len(cell_ids)
        return {**collate(batch), "cells": list(zip(plates, cell_ids)), "expressed": sum(map(len, batch["input_ids"]))}

    trainer.data_collator = recording_collator
    try:
        loader = trainer.get_train_dataloader()
        start = time.perf_counter()
        for index, batch in enumerate(loader):
            reading.times.append(time.perf_counter() - start)
            reading.cells.append(batch["cells"])
            reading.expressed[0] += batch["expressed"]
            reading.expressed[1] += len(batch["cells"])
            reading.tokens += int(batch["attention_mask"].sum())
            if index + 1 == max(1, batches // 10):
                rss_early = resident_mib()
            if index + 1 == batches:
                break
    finally:
        trainer.data_collator = collate
    reading.rss_growth_mib = resident_mib() - rss_early if rss_early is not None else None
    return reading


def main() -> None:
    parser = HfArgumentParser((StreamArguments, ModelArguments, DataArguments, DiffusionArguments,
                               RankDiffTrainingArguments))  # fmt: skip
    stream_args, model_args, data_args, diffusion_args, training_args = parser.parse_args_into_dataclasses(
        args=[*sys.argv[1:], "--output_dir", tempfile.mkdtemp(prefix="data-stream-"), "--report_to", "none"]
    )
    training_args.per_device_train_batch_size = stream_args.batch_size
    run = build_training(model_args, data_args, diffusion_args, training_args)
    trainer = run.trainer
    collate = trainer.data_collator
    reading = read_stream(trainer, stream_args.batches)
    times, seen, expressed, tokens = reading.times, reading.cells, reading.expressed, reading.tokens
    cells = [len(b) for b in seen]
    elapsed = times[-1] - times[0] if len(times) > 1 else float("nan")
    shards = shard_of_cells(data_args.data)
    files = sorted(set(shards.values()))
    loop_cells_per_s, loop_cells = per_cell_loop(files, collate.cell_tokenizer, sum(cells)) if files else (None, 0)
    cells_per_s = sum(cells[1:]) / elapsed if elapsed > 0 else None
    workers = max(1, training_args.dataloader_num_workers)
    wait_share, step_s = data_wait(trainer, stream_args.train_steps) if stream_args.train_steps else (None, None)
    plates = [len({p for p, _ in b}) for b in seen if all(p is not None for p, _ in b)]
    record = {
        "data": data_args.data or "embedded sample",
        "batches": len(times),
        "batch_size": stream_args.batch_size,
        "max_length": data_args.max_length,
        "cells_per_s": cells_per_s,
        "per_cell_loop_cells_per_s": loop_cells_per_s,
        "per_cell_loop_cells": loop_cells,
        "speedup_over_per_cell_loop": cells_per_s / loop_cells_per_s if cells_per_s and loop_cells_per_s else None,
        "cores": workers,
        "cells_per_s_per_core": cells_per_s / workers if cells_per_s else None,
        "mean_expressed_genes": expressed[0] / max(expressed[1], 1),
        "tokens_per_batch": tokens / max(len(times), 1),
        "first_batch_s": times[0] if times else None,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_growth_mib": reading.rss_growth_mib,
        "mean_plates_per_batch": float(np.mean(plates)) if plates else None,
        "distinct_shards": len({shards[c] for b in seen for _, c in b if c in shards}) if shards else None,
        "train_steps": stream_args.train_steps,
        "data_wait_share": wait_share,
        "train_step_s": step_s,
        "machine": f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
    }
    print("| measure | value |\n| --- | --- |")
    for key, value in record.items():
        print(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    if stream_args.json:
        Path(stream_args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(stream_args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
