"""Stream training batches exactly as `train_hf.py` reads them, and say how fast and how mixed they are.

The run is built as `train_hf.py` builds it (`training.run.build`: data, splits, tokenizer, collator, the Trainer's
own train DataLoader) and `--batches` batches of `--batch_size` cells are drawn from it. Prints a table and writes
JSON with `cells_per_s` (after the first batch), `peak_rss_mib`, `mean_plates_per_batch` (distinct `plate` values per
batch, averaged; null without a plate column) and `distinct_shards` (files that fed the batches; null for a Hub
stream), and the settings.

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
from dataset_scripts.schema import CELL_ID_COLUMN  # noqa: E402
from training import DataArguments, DiffusionArguments, ModelArguments, RankDiffTrainingArguments  # noqa: E402
from training.run import build  # noqa: E402


@dataclass
class StreamArguments:
    batches: int = field(default=20, metadata={"help": "training batches to draw"})
    batch_size: int = field(default=32, metadata={"help": "cells per batch"})
    json: str | None = field(default=None, metadata={"help": "where the JSON record goes"})


def shard_of_cells(data: str | None) -> dict[str, str]:
    """Cell id -> the parquet file it lives in, for a local Tahoe-layout folder (empty for other sources)."""
    if data is None or not Path(data).is_dir():
        return {}
    files = sorted((Path(data) / "data").glob("*.parquet")) or sorted(Path(data).glob("*.parquet"))
    return {cell: file.name for file in files for cell in pq.read_table(file, columns=[CELL_ID_COLUMN])[0].to_pylist()}


def main() -> None:
    parser = HfArgumentParser((StreamArguments, ModelArguments, DataArguments, DiffusionArguments,
                               RankDiffTrainingArguments))  # fmt: skip
    stream_args, model_args, data_args, diffusion_args, training_args = parser.parse_args_into_dataclasses(
        args=[*sys.argv[1:], "--output_dir", tempfile.mkdtemp(prefix="data-stream-"), "--report_to", "none"]
    )
    training_args.per_device_train_batch_size = stream_args.batch_size
    run = build(model_args, data_args, diffusion_args, training_args)
    trainer = run.trainer
    collate, seen = trainer.data_collator, []

    def recording_collator(rows):  # what each batch held, then the training collator's tensors
        seen.append([(row.get("plate"), row[CELL_ID_COLUMN]) for row in rows])
        return collate(rows)

    trainer.data_collator = recording_collator
    loader = trainer.get_train_dataloader()
    times, tokens = [], 0
    start = time.perf_counter()
    for index, batch in enumerate(loader):
        times.append(time.perf_counter() - start)
        tokens += int(batch["attention_mask"].sum())
        if index + 1 == stream_args.batches:
            break
    cells = [len(b) for b in seen[: len(times)]]
    elapsed = times[-1] - times[0] if len(times) > 1 else float("nan")
    shards = shard_of_cells(data_args.data)
    plates = [len({p for p, _ in b}) for b in seen[: len(times)] if all(p is not None for p, _ in b)]
    record = {
        "data": data_args.data or "embedded sample",
        "batches": len(times),
        "batch_size": stream_args.batch_size,
        "max_length": data_args.max_length,
        "cells_per_s": sum(cells[1:]) / elapsed if elapsed > 0 else None,
        "tokens_per_batch": tokens / max(len(times), 1),
        "first_batch_s": times[0] if times else None,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "mean_plates_per_batch": float(np.mean(plates)) if plates else None,
        "distinct_shards": len({shards[c] for b in seen[: len(times)] for _, c in b if c in shards})
        if shards
        else None,
        "machine": f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
    }
    print("| measure | value |\n| --- | --- |")
    for key, value in record.items():
        print(f"| {key} | {value:.1f} |" if isinstance(value, float) else f"| {key} | {value} |")
    if stream_args.json:
        Path(stream_args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(stream_args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
