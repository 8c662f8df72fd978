"""Train a RankDiT denoiser as an MDLM-style masked diffusion model with the Hugging Face Trainer.

With no arguments it trains the tiny preset on the embedded real sample (559 cells) on the CPU in a few minutes,
evaluates it on held-out cells beside the per-gene marginal baseline, and writes a diffusers pipeline folder that
`DiffusionPipeline.from_pretrained(OUTPUT_DIR, trust_remote_code=True)` loads:

    OUTPUT_DIR/model_index.json, pipeline_masked_rank_diffusion.py, eval_results.json
    OUTPUT_DIR/model/          config.json, model.safetensors, modeling code, gene_vocab.json
    OUTPUT_DIR/scheduler/      scheduler_config.json, scheduler code

Examples:
    python train_hf.py
    python train_hf.py --data /data/tahoe/ --preset base --max_steps 100000 --bf16 --output_dir outputs/base
    python train_hf.py --help
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from transformers import HfArgumentParser, set_seed

from dataset_scripts import (
    EpochCallback,
    RankDiffusionCollator,
    full_cell_tokens,
    load_expression_data,
    split_by_cell_id,
)
from dataset_scripts.expression_data import ExpressionSource
from metrics import PerGeneMarginal
from modeling import CellTokenizer, RankDiTConfig, RankDiTModel
from pipelines import MaskedRankDiffusionPipeline, MaskedRankDiffusionScheduler
from training import (
    DataArguments,
    DiffusionArguments,
    ModelArguments,
    RankDiffTrainingArguments,
    RankDiffusionTrainer,
)

logger = logging.getLogger("train_hf")


def export_pipeline_folder(
    output_dir: Path, model: RankDiTModel, scheduler: MaskedRankDiffusionScheduler, metrics: dict
) -> MaskedRankDiffusionPipeline:
    """Write the diffusers pipeline folder (`model_index.json`, pipeline code, `model/`, `scheduler/`) and
    `eval_results.json`; returns the pipeline.

    The model's code files are also copied to the root: transformers 5 looks for remote code at the repository
    root even with `subfolder="model"`.
    """
    pipeline = MaskedRankDiffusionPipeline(model=model, scheduler=scheduler)
    pipeline.save_pretrained(output_dir)
    for code_file in (output_dir / "model").glob("*.py"):
        shutil.copy(code_file, output_dir / code_file.name)
    (output_dir / "eval_results.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return pipeline


@dataclass
class PreparedData:
    """The data side of a run: rows, held-out split, and what is fitted on the training split alone."""

    source: ExpressionSource
    train_rows: datasets.Dataset | datasets.IterableDataset
    eval_rows: datasets.Dataset | datasets.IterableDataset
    baseline: PerGeneMarginal
    gene_pool: np.ndarray
    panel: np.ndarray


def prepare_data(data_args: DataArguments, num_bins: int) -> PreparedData:
    """Open the data, hold out cells by a hash of their id, and fit the per-gene marginal, the pool of genes seen
    and the evaluation panel (the most often detected genes) on the training split only."""
    source = load_expression_data(
        data_args.data,
        config_name=data_args.data_config,
        gene_vocab=data_args.gene_vocab,
        layer=data_args.layer,
        gene_column=data_args.gene_column,
        obs_columns=tuple(data_args.obs_columns),
    )
    train_rows, eval_rows = split_by_cell_id(source.rows, data_args.validation_share, seed=data_args.split_seed)
    eval_rows = eval_rows.take(data_args.max_eval_cells)
    logger.info("data: %s, %d genes in the vocabulary", source.name, len(source.vocab))
    baseline = PerGeneMarginal(num_bins, source.vocab.size)
    baseline.fit(full_cell_tokens(train_rows, num_bins, data_args.baseline_cells))
    detection = baseline.detection_counts
    gene_pool = np.flatnonzero(detection > 0)
    panel_size = data_args.panel_size or data_args.max_length
    panel = np.argsort(-detection, kind="stable")[: min(panel_size, len(gene_pool))]
    logger.info(
        "per-gene marginal fitted on %d training cells; %d genes seen, panel of %d",
        baseline.num_cells,
        len(gene_pool),
        len(panel),
    )
    return PreparedData(source, train_rows, eval_rows, baseline, gene_pool, panel)


def build_parser() -> HfArgumentParser:
    """The command line: model, data, diffusion and `TrainingArguments` flags."""
    return HfArgumentParser(
        (ModelArguments, DataArguments, DiffusionArguments, RankDiffTrainingArguments), description=__doc__
    )


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    diffusion_args: DiffusionArguments,
    training_args: RankDiffTrainingArguments,
) -> tuple[RankDiffusionTrainer, dict[str, float]]:
    """Fit the baseline, train, evaluate and write the pipeline folder; returns the trainer and its final
    evaluation metrics."""
    set_seed(training_args.seed)
    num_bins = model_args.num_rank_bins
    data = prepare_data(data_args, num_bins)
    source, train_rows, eval_rows = data.source, data.train_rows, data.eval_rows
    baseline, gene_pool, panel = data.baseline, data.gene_pool, data.panel

    tokenizer = CellTokenizer(
        num_bins=num_bins,
        max_length=data_args.max_length,
        zero_share=data_args.zero_share,
        panel_share=data_args.panel_share,
        seed=training_args.seed,
        gene_pool=gene_pool,
        panel=panel,
    )
    collator = RankDiffusionCollator(tokenizer)
    config = RankDiTConfig.from_preset(
        model_args.preset,
        num_rank_bins=num_bins,
        gene_vocab_size=source.vocab.size,
        max_length=data_args.max_length,
        time_conditioning=model_args.time_conditioning,
    )
    model = RankDiTModel(config)
    model.gene_vocab = source.vocab
    logger.info("RankDiT %s: %.2fM parameters", model_args.preset, model.num_parameters() / 1e6)
    scheduler = MaskedRankDiffusionScheduler(
        num_rank_bins=num_bins, noise_schedule=diffusion_args.noise_schedule, eps=diffusion_args.eps
    )

    trainer = RankDiffusionTrainer(
        model=model,
        args=training_args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        data_collator=collator,
        callbacks=[EpochCallback(collator)],
        noise_scheduler=scheduler,
        eval_collator=RankDiffusionCollator(tokenizer, rule="panel"),
        baseline=baseline,
        eval_time_grid=diffusion_args.eval_time_grid,
        eval_mask_ratio=diffusion_args.eval_mask_ratio,
        ordinal_term=diffusion_args.ordinal_term,
        ordinal_weight=diffusion_args.ordinal_weight,
        ordinal_time_weighting=diffusion_args.ordinal_time_weighting,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        export_pipeline_folder(Path(training_args.output_dir), model, scheduler, metrics)
        logger.info("pipeline folder written to %s", training_args.output_dir)
    return trainer, metrics


def main(argv: list[str] | None = None) -> tuple[RankDiffusionTrainer, dict[str, float]]:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return train(*build_parser().parse_args_into_dataclasses(args=argv))


if __name__ == "__main__":
    main(sys.argv[1:])
