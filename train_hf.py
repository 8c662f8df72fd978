"""Train a RankDiT denoiser as an MDLM-style masked diffusion model with the Hugging Face Trainer.

With no arguments it trains the tiny preset on the embedded real sample (559 cells) on the CPU in a few minutes,
evaluates it on validation cells during training and on test cells beside four baselines at the end, and writes a
diffusers pipeline folder that `DiffusionPipeline.from_pretrained(OUTPUT_DIR, trust_remote_code=True)` loads:

    OUTPUT_DIR/model_index.json, pipeline_masked_rank_diffusion.py, eval_results.json
    OUTPUT_DIR/README.md       the model card, with plots/ and imputation_results.json
    OUTPUT_DIR/model/          config.json, model.safetensors, modeling code, gene_vocab.json
    OUTPUT_DIR/scheduler/      scheduler_config.json, scheduler code

With `--push_to_hub --hub_model_id owner/name` the finished folder is uploaded to the Hub (checkpoints are not).

Examples:
    python train_hf.py
    python train_hf.py --data /data/tahoe/ --preset base --max_steps 100000 --bf16 --output_dir outputs/base
    python train_hf.py --help
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import datasets
from huggingface_hub import HfApi
from transformers import HfArgumentParser, set_seed

from dataset_scripts import EpochCallback, RankDiffusionCollator, is_hub_dataset_id, with_length_column
from modeling import CellTokenizer, RankDiTConfig, RankDiTModel
from pipelines import MaskedRankDiffusionPipeline, MaskedRankDiffusionScheduler
from training import (
    CardArguments,
    DataArguments,
    DiffusionArguments,
    ModelArguments,
    RankDiffTrainingArguments,
    RankDiffusionTrainer,
    default_ema_decay,
)
from training.data import prepare_data
from training.report import hardware_name, write_model_card

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


def create_hub_repo(repo_id: str, *, token: str | None = None, private: bool | None = None) -> str:
    """Create the Hub model repo (if needed) and return its full id (`owner/name`)."""
    return HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True).repo_id


def upload_pipeline_folder(output_dir: Path, repo_id: str, *, token: str | None = None) -> str:
    """Upload the finished pipeline folder (card, plots, model, scheduler, code; no checkpoints) to the Hub model
    repo `repo_id`; returns the commit URL."""
    commit = HfApi(token=token).upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        commit_message="Upload RankDiff pipeline folder",
        ignore_patterns=["checkpoint-*", "runs/*"],
    )
    return str(commit)


def build_parser() -> HfArgumentParser:
    """The command line: model, data, diffusion and `TrainingArguments` flags."""
    return HfArgumentParser(
        (ModelArguments, DataArguments, DiffusionArguments, RankDiffTrainingArguments, CardArguments),
        description=__doc__,
    )


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    diffusion_args: DiffusionArguments,
    training_args: RankDiffTrainingArguments,
    card_args: CardArguments | None = None,
) -> tuple[RankDiffusionTrainer, dict[str, float]]:
    """Fit the baseline, train, evaluate, write the pipeline folder and its model card, and push it to the Hub if
    asked; returns the trainer and its final evaluation metrics."""
    card_args = card_args or CardArguments()
    if card_args.model_card and data_args.test_share <= 0:  # before training: the card reports test cells
        raise ValueError("the model card scores test cells: give --test_share > 0, or --model_card false")
    # The Trainer would push its own checkpoints into the repo root; the finished pipeline folder goes up instead.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    repo_id = None
    if push_to_hub and training_args.process_index == 0:  # first, so a bad token or name fails before training
        repo_id = create_hub_repo(
            training_args.hub_model_id or Path(training_args.output_dir).absolute().name,
            token=training_args.hub_token,
            private=training_args.hub_private_repo,
        )
    ema_decay = training_args.ema_decay
    if ema_decay is None:
        fsdp = bool(training_args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        ema_decay = 0.0 if fsdp else default_ema_decay(model_args.preset)  # no EMA of sharded weights yet
    set_seed(training_args.seed)
    num_bins = model_args.num_rank_bins
    data = prepare_data(data_args, num_bins)
    source, train_rows, eval_rows = data.source, data.train_rows, data.validation_rows
    baseline, gene_pool, panel = data.baseline, data.gene_pool, data.panel

    if training_args.train_sampling_strategy == "group_by_length" and isinstance(train_rows, datasets.Dataset):
        # Batches of cells of similar length: padded to their longest cell, they waste little compute.
        train_rows = with_length_column(train_rows, data_args.max_length, training_args.length_column_name)
    if isinstance(train_rows, datasets.IterableDataset):
        # Each process reads the stream itself (its own files when there are enough, else its share of each global
        # batch) rather than process 0 reading everything and sending slices.
        training_args.accelerator_config.dispatch_batches = False

    tokenizer = CellTokenizer(
        num_bins=num_bins,
        max_length=data_args.max_length,
        zero_share=data_args.zero_share,
        panel_share=data_args.panel_share,
        random_share=data_args.random_share,
        seed=training_args.seed,
        gene_pool=gene_pool,
        panel=panel,
    )
    collator = RankDiffusionCollator(tokenizer)
    config = RankDiTConfig.from_preset(
        model_args.preset,
        gene_vocab_size=source.vocab.size,
        max_length=data_args.max_length,
        **model_args.config_overrides(),
    )
    model = RankDiTModel(config)
    model.gene_vocab = source.vocab
    if config.gene_prior:
        model.init_gene_prior(baseline.probabilities())
    if model_args.gene_embedding_init == "pca":
        model.init_gene_embedding(*data.reference.gene_loadings(config.hidden_size, seed=training_args.seed))
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
        ema_decay=ema_decay,
    )
    resume = training_args.resume_from_checkpoint
    # `--resume_from_checkpoint true`: the last complete checkpoint of the output folder; else a checkpoint folder.
    trainer.train(resume_from_checkpoint=True if str(resume).lower() == "true" else resume)
    if trainer.ema is not None:
        trainer.ema.copy_to(model)  # the EMA weights are the final model
    metrics = trainer.evaluate()
    if not trainer.is_world_process_zero():
        return trainer, metrics
    output_dir = Path(training_args.output_dir)
    pipe = export_pipeline_folder(output_dir, model, scheduler, metrics)
    logger.info("pipeline folder written to %s", output_dir)
    if card_args.model_card:
        pipe.set_progress_bar_config(disable=True)
        data_name = source.name if is_hub_dataset_id(source.name) else Path(source.name).name
        write_model_card(
            output_dir,
            pipe=pipe,
            data=data,
            trainer=trainer,
            run=dict(
                preset=model_args.preset,
                data_name=data_name,
                dataset=card_args.dataset_name or data_name,
                steps=trainer.state.global_step,
                batch_size=training_args.per_device_train_batch_size
                * training_args.world_size
                * training_args.gradient_accumulation_steps,
                learning_rate=training_args.learning_rate,
                loss=loss_description(diffusion_args),
                noise_schedule=diffusion_args.noise_schedule,
                ema_decay=ema_decay,
                runtime_s=next((e["train_runtime"] for e in trainer.state.log_history if "train_runtime" in e), None),
                hardware=hardware_name(),
                metrics=metrics,
                repo_id=repo_id or str(output_dir),
            ),
            mask_ratios=card_args.card_mask_ratios,
            gif_steps=card_args.card_gif_steps,
        )
    if repo_id is not None:
        url = upload_pipeline_folder(output_dir, repo_id, token=training_args.hub_token)
        logger.info("pipeline folder pushed to %s", url)
    return trainer, metrics


def loss_description(diffusion_args: DiffusionArguments) -> str:
    nelbo = f"MDLM NELBO (masked cross-entropy weighted by the {diffusion_args.noise_schedule} schedule)"
    if diffusion_args.ordinal_term == "none" or diffusion_args.ordinal_weight == 0:
        return nelbo
    return f"{nelbo} + {diffusion_args.ordinal_weight:g} x the `{diffusion_args.ordinal_term}` ordinal term"


def main(argv: list[str] | None = None) -> tuple[RankDiffusionTrainer, dict[str, float]]:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return train(*build_parser().parse_args_into_dataclasses(args=argv))


if __name__ == "__main__":
    main(sys.argv[1:])
