"""Train a RankDiT denoiser as an MDLM-style masked diffusion model with the Hugging Face Trainer.

With no arguments it trains the tiny preset on the embedded real sample (559 cells) on the CPU in a few minutes,
evaluates it on validation cells during training and on test cells beside four baselines at the end, and writes a
diffusers pipeline folder that `DiffusionPipeline.from_pretrained(OUTPUT_DIR, trust_remote_code=True)` loads:

    OUTPUT_DIR/model_index.json, pipeline_masked_rank_diffusion.py, eval_results.json
    OUTPUT_DIR/README.md       the model card, with plots/ and imputation_results.json
    OUTPUT_DIR/train_args.json every argument of the run (`python train_hf.py OUTPUT_DIR/train_args.json` reruns it)
    OUTPUT_DIR/model/          config.json, model.safetensors, modeling code, the processor and the transformers task
    OUTPUT_DIR/scheduler/      scheduler_config.json, scheduler code
    OUTPUT_DIR/processor/      preprocessor_config.json (with the gene vocabulary), processor code

The folder is written by `MaskedRankDiffusionPipeline.save_pretrained`, the one export.

With `--push_to_hub --hub_model_id owner/name` the finished folder is uploaded to the Hub (checkpoints are not).

Examples:
    python train_hf.py
    python train_hf.py --data /data/tahoe/ --preset base --max_steps 100000 --bf16 --output_dir outputs/base
    python train_hf.py outputs/demo/train_args.json
    python train_hf.py --help
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from huggingface_hub import HfApi
from transformers import HfArgumentParser, TrainingArguments

import modeling
import pipelines
from dataset_scripts import is_hub_dataset_id
from training import (
    CardArguments,
    DataArguments,
    DiffusionArguments,
    ModelArguments,
    RankDiffTrainingArguments,
    RankDiffusionTrainer,
)
from training.model_card import TrainingSummary
from training.outputs import MANIFEST, RunOutputs
from training.recipe import RUN_CONFIG
from training.report import EVAL_RESULTS, IMPUTATION_RESULTS, PLOTS_DIR, write_model_card
from training.run import TrainingSetup, build_training

logger = logging.getLogger("train_hf")
TRAIN_ARGS = "train_args.json"


def build_parser() -> HfArgumentParser:
    """The command line: model, data, diffusion and `TrainingArguments` flags."""
    return HfArgumentParser(
        (ModelArguments, DataArguments, DiffusionArguments, RankDiffTrainingArguments, CardArguments),
        description=__doc__,
    )


def parse_arguments(argv: list[str]) -> tuple:
    """The run's arguments from command-line flags, or from one JSON file of them (a run's `train_args.json`)."""
    parser = build_parser()
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    return parser.parse_args_into_dataclasses(args=argv)


def arguments_record(*arguments) -> dict:
    """Every argument of a run by its flag's name, as [`parse_arguments`] reads a JSON file back; tokens left out."""
    record = {}
    for args in arguments:
        record.update(args.to_dict() if isinstance(args, TrainingArguments) else dataclasses.asdict(args))
    return {name: value for name, value in record.items() if not name.endswith("_token")}


def fit(run: TrainingSetup) -> dict[str, float]:
    """Train (or resume), put the EMA weights in the model, and evaluate it on validation cells."""
    trainer = run.trainer
    trainer.train(resume_from_checkpoint=resume_argument(trainer.args.resume_from_checkpoint))
    if trainer.ema is not None:
        trainer.ema.copy_to(trainer.model)  # the EMA weights are the final model
    return trainer.evaluate()


def finalize(
    run: TrainingSetup,
    metrics: dict[str, float],
    model_args: ModelArguments,
    diffusion_args: DiffusionArguments,
    card_args: CardArguments,
    repo_id: str | None,
    arguments: dict,
) -> None:
    """On the main process: write the pipeline folder, `eval_results.json`, the data recipe (`run_config.json`), the
    run's arguments (`train_args.json`, an [`arguments_record`]) and the model card, recording each file in the
    folder's manifest; then push those files.

    Everything is written to a staging folder inside `output_dir` first and moved into place at the end: a run that
    fails while writing (the card scores test cells and draws plots) leaves the earlier outputs as they were and no
    half-written folder."""
    output_dir = Path(run.trainer.args.output_dir)
    outputs = RunOutputs(output_dir)
    staging = output_dir / f".partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        run.pipe.save_pretrained(staging)
        (staging / EVAL_RESULTS).write_text(json.dumps(metrics, indent=2) + "\n")
        run.data.recipe.save(staging)
        (staging / TRAIN_ARGS).write_text(json.dumps(arguments, indent=2) + "\n")
        if card_args.model_card:
            run.pipe.set_progress_bar_config(disable=True)
            source = run.data.source.name
            data_name = source if is_hub_dataset_id(source) else Path(source).name
            summary = TrainingSummary.of(
                run.trainer,
                preset=model_args.preset,
                data_name=data_name,
                dataset=card_args.dataset_name,
                loss=diffusion_args.loss_description(),
                noise_schedule=diffusion_args.noise_schedule,
                ema_decay=run.ema_decay,
                metrics=metrics,
                repo_id=repo_id or str(output_dir),
            )
            write_model_card(staging, pipe=run.pipe, data=run.data, trainer=run.trainer, summary=summary,
                             mask_ratios=card_args.card_mask_ratios, gif_steps=card_args.card_gif_steps)  # fmt: skip
        outputs.clear()  # a resumed run's earlier outputs, if any: nothing of two runs mixes
        with outputs.recording():
            for entry in sorted(staging.iterdir()):
                os.replace(entry, output_dir / entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("pipeline folder written to %s", output_dir)
    if repo_id is not None:  # the run's files: card, plots, model, scheduler, processor, code (not a user's own)
        HfApi(token=run.trainer.args.hub_token).upload_folder(
            repo_id=repo_id, folder_path=output_dir, allow_patterns=[*outputs.paths, MANIFEST],
            commit_message="Upload RankDiff pipeline",
        )  # fmt: skip
        logger.info("pipeline folder pushed to %s", repo_id)


def run_output_names() -> set[str]:
    """The names a finished run writes at the top of its folder: the pipeline folder's (with every code file it may
    copy), the card and its plots, the results."""
    code = {p.name for package in (modeling, pipelines) for p in Path(package.__file__).parent.glob("*.py")}
    fixed = {
        "model_index.json",
        "model",
        "scheduler",
        "processor",
        "reference",
        "preprocessor_config.json",
        "README.md",
    }
    return fixed | code | {PLOTS_DIR, EVAL_RESULTS, IMPUTATION_RESULTS, RUN_CONFIG, TRAIN_ARGS}


def resume_argument(value: str | bool | None) -> str | bool | None:
    """`--resume_from_checkpoint` as the trainer takes it: "true" is the output folder's last complete checkpoint,
    "false" (or nothing) is none, anything else a checkpoint folder."""
    if value is None or str(value).lower() in ("false", ""):
        return None
    return True if str(value).lower() == "true" else value


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    diffusion_args: DiffusionArguments,
    training_args: RankDiffTrainingArguments,
    card_args: CardArguments | None = None,
) -> tuple[RankDiffusionTrainer, dict[str, float]]:
    """Build, fit and finalize a run; returns the trainer and its final evaluation metrics."""
    card_args = card_args or CardArguments()
    arguments = arguments_record(model_args, data_args, diffusion_args, training_args, card_args)
    if card_args.model_card and not data_args.holds_out_test_cells:  # before training: the card reports test cells
        raise ValueError("the model card scores test cells: hold some out (--test_share > 0, --test_plates or "
                         "--test_files), or --model_card false")  # fmt: skip
    # The run replaces a finished run's outputs when it ends (finalize), never a user's files: checked now, before
    # training; the old outputs stay until then, so a run that fails loses nothing.
    outputs = RunOutputs(training_args.output_dir)
    outputs.check_clearable()
    outputs.check_no_clash(run_output_names())
    if outputs.finished() and resume_argument(training_args.resume_from_checkpoint) is None:
        if not training_args.overwrite_output_dir:
            raise FileExistsError(
                f"{training_args.output_dir} holds a finished run: give another --output_dir, --overwrite_output_dir "
                "to replace its outputs (only the files the run wrote), or --resume_from_checkpoint"
            )
    # The Trainer would push its own checkpoints into the repo root; the finished pipeline folder goes up instead.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    repo_id = None
    if push_to_hub and training_args.process_index == 0:  # first, so a bad token or name fails before training
        repo_id = (
            HfApi(token=training_args.hub_token)
            .create_repo(
                training_args.hub_model_id or Path(training_args.output_dir).absolute().name,
                private=training_args.hub_private_repo,
                exist_ok=True,
            )
            .repo_id
        )
    run = build_training(model_args, data_args, diffusion_args, training_args)
    metrics = fit(run)
    if run.trainer.is_world_process_zero():
        finalize(run, metrics, model_args, diffusion_args, card_args, repo_id, arguments)
    return run.trainer, metrics


def main(argv: list[str] | None = None) -> tuple[RankDiffusionTrainer, dict[str, float]]:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return train(*parse_arguments(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main(sys.argv[1:])
