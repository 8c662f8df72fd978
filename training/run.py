"""A training run's parts, built from its arguments: the data, the pipeline being trained and its trainer.

`train_hf.py` builds, fits and finalizes a run; benchmarks build one to read its data exactly as training does.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import sparse
from transformers import set_seed

if TYPE_CHECKING:
    import datasets

    from .recipe import ConditionSetup

from dataset_scripts import EpochCallback, RankDiffusionCollator
from dataset_scripts.molecules import MORGAN_BITS, morgan_fingerprints
from dataset_scripts.schema import CELL_ID_COLUMN
from modeling import CellTokenizer, RankDiTConfig, RankDiTModel, RankDiTProcessor
from modeling.conditions import PERTURBATION, condition_value
from pipelines import MaskedRankDiffusionPipeline, MaskedRankDiffusionScheduler, ReferenceCells

from .arguments import DataArguments, DiffusionArguments, ModelArguments, RankDiffTrainingArguments, ema_decay_for
from .data import PreparedData, TrainingCells, prepare_data
from .trainer import RankDiffusionTrainer

logger = logging.getLogger(__name__)


@dataclass
class TrainingSetup:
    """What [`build_training`] makes: the data, the pipeline being trained, its trainer and the EMA decay in use."""

    data: PreparedData
    pipe: MaskedRankDiffusionPipeline
    trainer: RankDiffusionTrainer
    ema_decay: float


def build_training(
    model_args: ModelArguments,
    data_args: DataArguments,
    diffusion_args: DiffusionArguments,
    training_args: RankDiffTrainingArguments,
) -> TrainingSetup:
    """Prepare the data (splits, baselines, panels), the model, its processor and scheduler, and the trainer."""
    fsdp = bool(training_args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    ema_decay = ema_decay_for(training_args.ema_decay, fsdp=fsdp, preset=model_args.preset)
    set_seed(training_args.seed)
    if training_args.train_sampling_strategy == "group_by_length":
        raise ValueError("group_by_length needs a map-style dataset; training data is a stream (use random)")
    workers = max(1, training_args.dataloader_num_workers)
    data = prepare_data(
        data_args, model_args.num_rank_bins, seed=training_args.seed,
        shard_multiple=training_args.world_size * workers,
    )  # fmt: skip
    # Each process reads the stream itself (its own files when there are enough, else its share of each global
    # batch) rather than process 0 reading everything and sending slices.
    training_args.accelerator_config.dispatch_batches = False
    model = build_model(model_args, data_args, data, seed=training_args.seed)
    scheduler = MaskedRankDiffusionScheduler(
        num_rank_bins=model_args.num_rank_bins, noise_schedule=diffusion_args.noise_schedule, eps=diffusion_args.eps
    )
    processor = RankDiTProcessor.from_model_config(model.config, gene_vocab=data.source.vocab)
    collator, eval_collator = build_collators(processor, data_args, data, seed=training_args.seed)
    reference = None
    if model.config.reference_context:
        reference, rows = build_reference(model_args, data, control_groups(data), seed=training_args.seed)
        collator.reference_rows = {data.training_cells.cell_ids[row]: i for i, row in enumerate(rows)}
        group = reference.config.group_condition
        for each in (collator, eval_collator):
            each.reference_group = group
        logger.info("reference: %d training cells%s, %d genes, %d neighbours read per cell",
                    reference.tokens.shape[0], f" (control cells, by {group})" if group else "",
                    reference.tokens.shape[1], model_args.reference_neighbours)  # fmt: skip
    trainer = RankDiffusionTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train_rows,
        eval_dataset=data.validation_rows,
        data_collator=collator,
        callbacks=[EpochCallback(collator, data.source.builder)],
        noise_scheduler=scheduler,
        eval_collator=eval_collator,
        baseline=data.baseline,
        eval_time_grid=diffusion_args.eval_time_grid,
        eval_mask_ratio=diffusion_args.eval_mask_ratio,
        ordinal_term=diffusion_args.ordinal_term,
        ordinal_weight=diffusion_args.ordinal_weight,
        ordinal_time_weighting=diffusion_args.ordinal_time_weighting,
        ema_decay=ema_decay,
        reference=reference,
        reference_dropout=model_args.reference_dropout,
        group_batches_by=group_batches_by(data_args, data),
    )
    pipe = MaskedRankDiffusionPipeline(model=model, scheduler=scheduler, processor=processor, reference=reference)
    return TrainingSetup(data=data, pipe=pipe, trainer=trainer, ema_decay=ema_decay)


def group_batches_by(data_args: DataArguments, data: PreparedData) -> tuple[str, int] | None:
    """`--group_batches_by` and the number of its values (the trainer's blocks grow with it), or None."""
    name = data_args.group_batches_by
    return None if name is None else (name, len(data.conditions.values[name]))


def has_context(setup) -> bool:
    """Whether conditions hold a drug and something else (the line): a perturbation to drop apart from its context."""
    return setup is not None and "drug" in setup.values and any(name not in PERTURBATION for name in setup.values)


def control_groups(data: PreparedData) -> tuple[str, list[int], list[int]] | None:
    """For a screen (a drug condition with its control, and a context condition such as the line): the context
    condition, and the rows of the training cells that are control cells with their ids of it. None otherwise."""
    setup = data.conditions
    if not has_context(setup) or setup.control_drug not in setup.values["drug"]:
        return None
    context = [name for name in setup.values if name not in PERTURBATION]
    group = "cell_line_id" if "cell_line_id" in context else context[0]
    columns = training_cell_columns(data.training_rows, data.training_cells, ["drug", group])
    control = condition_value("drug", setup.control_drug)
    rows = [i for i, drug in enumerate(columns["drug"]) if condition_value("drug", drug) == control]
    ids = setup.encoder.ids(group, [columns[group][i] for i in rows])
    told = ids > 0  # a control cell whose line is not known reads as no line's
    return group, [row for row, kept in zip(rows, told) if kept], ids[told].tolist()


def build_reference(
    model_args: ModelArguments, data: PreparedData, controls: tuple | None, seed: int
) -> tuple[ReferenceCells, list[int]]:
    """The reference cells a model reads and the rows of the training cells they are: on a screen (`controls`, see
    [`control_groups`]), its control cells grouped by line, so a perturbed cell reads the control cells of its line
    it looks most like; otherwise a seeded draw of the training cells."""
    tokens, groups, group = data.training_cells.tokens, None, None
    if controls is not None and len(controls[1]) >= 2:
        group, control_rows, groups = controls
        tokens = tokens[control_rows]
    reference, rows = ReferenceCells.from_tokens(
        tokens, model_args.num_rank_bins, max_cells=model_args.reference_cells,
        num_neighbours=model_args.reference_neighbours, num_components=model_args.reference_components, seed=seed,
        groups=groups, group_condition=group,
    )  # fmt: skip
    if group is not None:
        rows = [control_rows[row] for row in rows]
    return reference, rows


def training_cell_columns(rows: datasets.Dataset, cells: TrainingCells, names: list[str]) -> dict[str, list]:
    """Columns `names` of the training `rows`, in the order of their `cells` (rows the tokenizer kept)."""
    columns = rows.select_columns([CELL_ID_COLUMN, *names]).to_dict()
    row_of = {cell: i for i, cell in enumerate(columns[CELL_ID_COLUMN])}
    found = [row_of[cell] for cell in cells.cell_ids]
    return {name: [columns[name][i] for i in found] for name in names}


def training_conditions(
    setup: ConditionSetup, rows: datasets.Dataset, cells: TrainingCells
) -> dict[str, torch.Tensor]:
    """The conditions of training `cells` (read from their `rows`), as the model takes them."""
    names = [name for name in (*setup.values, "sample", "dose") if name in rows.column_names]
    columns = training_cell_columns(rows, cells, names)
    return setup.encoder.encode_rows(columns, cells.cell_ids, dose_of_sample=setup.dose_of_sample)


def drug_shifts(data: PreparedData, model: RankDiTModel, ridge: float = 4.0) -> np.ndarray:
    """Each drug's shift of each gene along the rank axis (`model.perturbation_effect`'s table), estimated from the
    training cells of [`PreparedData.effect_cells`] (`--effect_cells` of them): the ridge fit of `gate x shift x
    variance` to each treated cell's position on the axis (token / B) minus the mean of the control cells of its
    context (its line; with a plate condition, its line and plate), the gate being the effect's own dose curve at its
    start, the variance the gene's on the axis (a small tilt s moves a gene's mean by s x its variance), `ridge` the
    number of fully gated cells' worth of shrinkage toward no effect. The gated shift sums (the fit's numerator) are
    first projected on the drug's one direction, the first right singular vector of its mean shifts in each
    (context, dose): a drug moves the same genes in every line and at every dose, more or less strongly, and what
    lies off that direction is mostly noise (B5's rule in `metrics/perturbation.py`). Cells of a context without
    control cells, and genes no treated cell was seen at, get none; without a control drug there is nothing to
    measure against and every shift is 0."""
    effect = model.perturbation_effect
    if effect.control_id == 0:
        return np.zeros(tuple(effect.drug_genes.shape))
    rows, cells = data.effect_cells()
    told = training_conditions(data.conditions, rows, cells)
    drug_ids = told["condition_ids"][:, effect.drug_column]
    with torch.no_grad():
        gate = effect.gate(drug_ids, told.get("doses")).double().numpy()
    drug = drug_ids.numpy()
    _, line = np.unique(told["condition_ids"][:, effect.context_columns].numpy(), axis=0, return_inverse=True)
    line = line.ravel()  # each cell's context, numbered 0..lines - 1
    lines = int(line.max()) + 1
    position = cells.tokens.astype(np.float64) / model.config.num_rank_bins  # token 0 (not expressed) sits at 0
    control = drug == effect.control_id

    def indicator(groups: np.ndarray, size: int, weights: np.ndarray) -> sparse.csr_matrix:
        return sparse.csr_matrix((weights, (groups, np.arange(len(groups)))), shape=(size, len(groups)))

    controls = np.bincount(line[control], minlength=lines).astype(np.float64)
    control_mean = (indicator(line, lines, control.astype(np.float64)) @ position).toarray()
    control_mean /= np.maximum(controls, 1)[:, None]
    gate = np.where(controls[line] > 0, gate, 0.0)  # a cell needs its line's controls
    drugs = effect.drug_genes.shape[0]
    by_drug = indicator(drug, drugs, gate)
    weighted = (by_drug @ position).toarray()
    weighted -= by_drug @ indicator(line, lines, np.ones(len(line))).T @ control_mean
    weighted = along_main_direction(weighted, drug, line, told.get("doses"), position, control_mean, gate > 0)
    mean = np.asarray(position.mean(axis=0)).ravel()
    variance = np.asarray(position.multiply(position).mean(axis=0)).ravel() - mean**2
    squares = np.bincount(drug, weights=gate**2, minlength=drugs)
    seen = (by_drug @ (position > 0).astype(np.float64)).toarray() > 0
    denominator = (squares[:, None] + ridge) * np.maximum(variance, 1e-3)[None, :]
    return np.where(seen, weighted / denominator, 0.0).clip(-8.0, 8.0)


def along_main_direction(shift_sums: np.ndarray, drug: np.ndarray, line: np.ndarray, doses, position,
                         control_mean, treated: np.ndarray) -> np.ndarray:  # fmt: skip
    """Each drug's row of `shift_sums` `(drugs, genes)` projected on the first right singular vector of the drug's
    mean shifts (position minus its context's control mean) over its `treated` cells in each (context, dose); one
    drug's groups at a time, so memory holds one drug's `(groups, genes)`."""
    dose = np.zeros(len(drug)) if doses is None else np.nan_to_num(doses.numpy().astype(np.float64))
    _, group = np.unique(np.stack([drug, line, dose]), axis=1, return_inverse=True)
    group = np.where(treated, group.ravel(), -1)
    kept = np.unique(group[group >= 0])
    index = np.searchsorted(kept, group[treated])
    sizes = np.bincount(index, minlength=len(kept)).astype(np.float64)
    members = sparse.csr_matrix((np.ones(len(index)), (index, np.flatnonzero(treated))), shape=(len(kept), len(drug)))
    group_line = np.zeros(len(kept), dtype=np.int64)
    group_line[index] = line[treated]
    group_drug = np.zeros(len(kept), dtype=np.int64)
    group_drug[index] = drug[treated]
    projected = shift_sums.copy()
    for d in np.unique(group_drug):
        rows = group_drug == d
        shifts = (members[rows] @ position).toarray() / sizes[rows, None] - control_mean[group_line[rows]]
        direction = np.linalg.svd(shifts, full_matrices=False)[2][0]
        projected[d] = direction * (direction @ shift_sums[d])
    return projected


def drug_structures(conditions) -> np.ndarray | None:
    """Each drug's Morgan fingerprint, `(len(drugs), MORGAN_BITS)` in vocabulary order (zeros for a drug whose
    SMILES the data lacks or RDKit cannot read); None without a drug condition or any SMILES."""
    if conditions is None or "drug" not in conditions.values or not conditions.drug_smiles:
        return None
    drugs, smiles = conditions.values["drug"], conditions.drug_smiles
    bits = np.zeros((len(drugs), MORGAN_BITS), dtype=np.uint8)
    missing, unread = [drug for drug in drugs if drug not in smiles], []
    for row, drug in enumerate(drugs):
        try:
            if drug in smiles:
                bits[row] = morgan_fingerprints([smiles[drug]])[0]
        except ValueError:
            unread.append(drug)
    if missing or unread:
        logger.warning("%d of %d drugs have no structure (no SMILES: %s; unreadable: %s): known by their id alone",
                       len(missing) + len(unread), len(drugs), missing[:5], unread[:5])  # fmt: skip
    return bits


def build_model(model_args: ModelArguments, data_args: DataArguments, data: PreparedData, seed: int) -> RankDiTModel:
    """The RankDiT of the preset, for the data's genes and conditions, its gene prior started at the training cells'
    per-gene marginal and its gene embeddings at their principal axes (as the arguments ask)."""
    conditions = data.conditions
    overrides = model_args.config_overrides()
    if conditions is None:  # nothing for conditions to reach
        overrides["gene_condition"] = None
    if conditions is None or "drug" not in conditions.values:  # no drug to have an effect
        overrides["perturbation_effect_rank"] = 0
    structures = drug_structures(conditions) if model_args.drug_features else None
    if model_args.drug_features and structures is None:
        logger.warning("--drug_features: no drug condition with SMILES in the data (metadata/drug_metadata.parquet's "
                       "canonical_smiles): drugs are known by their ids alone")  # fmt: skip
    if structures is not None:
        overrides.update(drug_feature_size=structures.shape[1], drug_residual_dropout=model_args.drug_residual_dropout)
    config = RankDiTConfig.from_preset(
        model_args.preset,
        gene_vocab_size=data.source.vocab.size,
        max_length=data_args.max_length,
        conditions=(conditions.values or None) if conditions is not None else None,
        dose_condition=conditions is not None and conditions.dose,
        control_drug=conditions.control_drug if conditions is not None and "drug" in conditions.values else None,
        factorized_guidance=data_args.perturbation_dropout > 0 and has_context(conditions),
        **overrides,
    )
    model = RankDiTModel(config)
    if config.gene_prior:
        model.init_gene_prior(data.baseline.probabilities())
    if model.perturbation_effect is not None:
        model.init_drug_shifts(drug_shifts(data, model))
        # Adam moves every gene's entry of the table by about the learning rate per step, however weak its gradient:
        # the estimate from many cells is better than what a few thousand noisy steps make of it.
        effect = model.perturbation_effect
        effect.drug_genes.requires_grad_(model_args.learn_drug_shifts)
        # The same for the rest of the effect: trained, its drug factors, line modulation and dose curves lost
        # held-out pairs what the table alone predicts (with drug structure, its own factors still train).
        for modulation in (effect.drug_factors, *effect.context_factors, effect.dose_response):
            modulation.requires_grad_(model_args.learn_effect_modulation)
        # The gene factors reach the logits only through drug factors that are learned or drawn from structure:
        # otherwise their gradient is zero, and weight decay alone would move them.
        effect.gene_factors.requires_grad_(model_args.learn_effect_modulation or structures is not None)
    if structures is not None:
        model.init_drug_features(structures)
        logger.info("drugs known by structure: %d of %d (Morgan fingerprints; residual dropout %g)",
                    int(structures.any(axis=1).sum()), len(structures), config.drug_residual_dropout)  # fmt: skip
    if model_args.gene_embedding_init == "pca":
        model.init_gene_embedding(*data.training_cells.gene_loadings(config.hidden_size, seed=seed))
    logger.info("RankDiT %s: %.2fM parameters", model_args.preset, model.num_parameters() / 1e6)
    return model


def build_collators(
    processor: RankDiTProcessor, data_args: DataArguments, data: PreparedData, seed: int
) -> tuple[RankDiffusionCollator, RankDiffusionCollator]:
    """The training collator (the selection rules drawn per cell and epoch, condition dropout) and the evaluation's
    (the training panel, no dropout)."""
    tokenizer = CellTokenizer(
        num_bins=processor.num_rank_bins,
        max_length=data_args.max_length,
        zero_share=data_args.zero_share,
        panel_share=data_args.panel_share,
        random_share=data_args.random_share,
        seed=seed,
        gene_pool=data.gene_pool,
        panel=data.panel,
    )
    collator = RankDiffusionCollator(processor, tokenizer)
    eval_collator = RankDiffusionCollator(processor, tokenizer, rule="panel")
    conditions = data.conditions
    if conditions is not None:
        for each in (collator, eval_collator):
            each.conditions, each.dose_of_sample, each.seed = conditions.encoder, conditions.dose_of_sample, seed
        collator.condition_dropout = data_args.condition_dropout
        collator.perturbation_dropout = data_args.perturbation_dropout if has_context(conditions) else 0.0
        logger.info("conditioned on %s (condition dropout %g)", ", ".join(
            [*(f"{name} ({len(values)} values)" for name, values in conditions.values.items()),
             *(["dose"] if conditions.dose else [])]), data_args.condition_dropout)  # fmt: skip
    return collator, eval_collator
