"""The model card of a training run: Hub metadata (YAML front matter written with `huggingface_hub.ModelCardData`)
and a README that says what the model is, how to call it, what it scored, on what, and shows the run's plots."""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass, field

import numpy as np
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from metrics.imputation import MODEL_METHOD, strongest_baseline
from modeling import GeneVocab

LICENSE = "apache-2.0"
TAGS = [
    "single-cell",
    "scRNA-seq",
    "gene-expression",
    "biology",
    "masked-diffusion",
    "discrete-diffusion",
    "imputation",
    "rankdiff",
    "custom_code",
]
CARD_METRICS = {  # rank_imputation key -> (model-index metric type, name)
    "nll_all": ("nll", "masked NLL (nats per gene)"),
    "accuracy_all": ("accuracy", "accuracy of the most likely rank"),
    "mae_level_all": ("mae", "MAE of the expected level (tie-aware)"),
    "spearman_level_all": ("spearmanr", "Spearman of expected vs true level, per cell"),
    "coverage_90_all": ("coverage", "coverage of the 90% interval"),
    "ece_all": ("ece", "expected calibration error"),
}


def hardware_name() -> str:
    """The accelerator (or CPU) this process trains on, in words."""
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


@dataclass
class TrainingSummary:
    """What a finished run was, for its model card: the [`CardContents`] fields the data and the model do not give.

    Args:
        preset: the model preset; data_name: the data source (a Hub id, or a local file or folder name); dataset:
            the Hub dataset id the card names as training data.
        steps, batch_size (global), learning_rate, loss (in words), noise_schedule, ema_decay, runtime_s, hardware:
            the training budget.
        metrics: the final `evaluate` metrics (`eval_*`); repo_id: where the model is (Hub id or local path).
    """

    preset: str
    data_name: str
    dataset: str
    steps: int
    batch_size: int
    learning_rate: float
    loss: str
    noise_schedule: str
    ema_decay: float
    runtime_s: float | None
    hardware: str
    metrics: dict[str, float]
    repo_id: str

    @classmethod
    def of(cls, trainer, *, preset: str, data_name: str, dataset: str | None, loss: str, noise_schedule: str,
           ema_decay: float, metrics: dict[str, float], repo_id: str) -> TrainingSummary:  # fmt: skip
        """The record of a finished `trainer`'s run."""
        args = trainer.args
        return cls(
            preset=preset,
            data_name=data_name,
            dataset=dataset or data_name,
            steps=trainer.state.global_step,
            batch_size=args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps,
            learning_rate=args.learning_rate,
            loss=loss,
            noise_schedule=noise_schedule,
            ema_decay=ema_decay,
            runtime_s=next((e["train_runtime"] for e in trainer.state.log_history if "train_runtime" in e), None),
            hardware=hardware_name(),
            metrics=metrics,
            repo_id=repo_id,
        )


@dataclass
class CardContents(TrainingSummary):
    """What a model card says about a run: its [`TrainingSummary`] and what the data and the model give.

    Args:
        config: the trained model's `RankDiTConfig`; num_parameters: its size.
        training_cells, test_cells, panel_sizes: cells behind the baselines and panels, test cells scored, genes of
            each evaluation panel.
        imputation: `results[panel][method][str(mask_ratio)]` of [`imputation_report`].
        baseline_choices: each baseline family's setting, chosen on validation cells.
        widgets: Hub widget examples (see [`widget_examples`]).
        plots: caption -> path relative to the card.
        conditions: the run's perturbation conditions ([`ConditionSetup.to_dict`]), None without.
    """

    config: object
    num_parameters: int
    training_cells: int
    test_cells: int
    panel_sizes: dict[str, int]
    imputation: dict[str, dict[str, dict[str, dict]]]
    baseline_choices: dict[str, str] = field(default_factory=dict)
    widgets: list[dict] = field(default_factory=list)
    plots: dict[str, str] = field(default_factory=dict)
    conditions: dict | None = None


def widget_examples(
    cells: list[tuple[np.ndarray, np.ndarray]],
    vocab: GeneVocab,
    *,
    num_genes: int = 12,
    num_masked: int = 4,
    seed: int = 0,
) -> list[dict]:
    """Hub widget examples from real cells: per cell, its first `num_genes` genes (Ensembl ids), their rank tokens
    and a mask hiding `num_masked` of them (drawn with `seed`); the arguments of `pipe(gene_ids=, ranks=, mask=)`.
    The ranks under the mask are the true ones, which the pipeline ignores: there to compare with its answer."""
    rng = np.random.default_rng(seed)
    examples = []
    for i, (genes, tokens) in enumerate(cells):
        count = min(num_genes, len(genes))
        if count < 2:
            continue
        mask = np.zeros(count, dtype=bool)
        mask[rng.choice(count, size=min(num_masked, count - 1), replace=False)] = True
        examples.append(
            {
                "example_title": f"Impute {int(mask.sum())} of {count} genes of training cell {i}",
                "structured_data": {
                    "gene_ids": vocab.decode(genes[:count]),
                    "ranks": [int(t) for t in tokens[:count]],
                    "mask": mask.tolist(),
                },
            }
        )
    return examples


def _eval_results(run: CardContents) -> list[EvalResult]:
    """model-index entries: the model's test scores on every panel at every mask ratio."""
    results = []
    for panel, by_method in run.imputation.items():
        for ratio, scores in by_method.get(MODEL_METHOD, {}).items():
            for key, (metric_type, metric_name) in CARD_METRICS.items():
                if key in scores and math.isfinite(scores[key]):
                    results.append(
                        EvalResult(
                            task_type="other",
                            task_name="Rank imputation of masked genes",
                            dataset_type=run.dataset,
                            dataset_name=f"{run.dataset}, test cells, {panel}",
                            dataset_split="test",
                            metric_type=metric_type,
                            metric_name=f"{metric_name}, {panel}, {float(ratio):.0%} masked",
                            metric_value=round(float(scores[key]), 4),
                            metric_config=f"panel={panel}, mask_ratio={ratio}",
                        )
                    )
    return results


def card_data(run: CardContents, model_name: str) -> ModelCardData:
    """The YAML front matter."""
    return ModelCardData(
        model_name=model_name,
        library_name="diffusers",
        license=LICENSE,
        tags=TAGS,
        datasets=[run.dataset],
        pipeline_tag="other",
        widget=run.widgets,
        eval_results=_eval_results(run) or None,
    )


TABLE_COLUMNS = {
    "nll_all": "NLL",
    "accuracy_all": "accuracy",
    "mae_level_all": "MAE (levels)",
    "spearman_level_all": "Spearman / cell (levels)",
    "coverage_90_all": "90% cover",
    "ece_all": "ECE",
}


def _results_table(by_method: dict[str, dict[str, dict]]) -> str:
    header = "| mask ratio | method | " + " | ".join(TABLE_COLUMNS.values()) + " |"
    rows = [header, "|" + " --- |" * (len(TABLE_COLUMNS) + 2)]
    ratios = sorted({ratio for by_ratio in by_method.values() for ratio in by_ratio}, key=float)
    for ratio in ratios:
        for method, by_ratio in by_method.items():
            scores = by_ratio.get(ratio)
            if scores is None:
                continue
            cells = [f"{scores[k]:.3f}" if k in scores and math.isfinite(scores[k]) else "-" for k in TABLE_COLUMNS]
            name = f"**{method}**" if method == MODEL_METHOD else method
            rows.append(f"| {ratio} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def headline(run: CardContents) -> str:
    """Model NLL against the strongest baseline's, at the mask ratio closest to one half, per panel; the lower of
    the two in bold (both when they tie to the 3 decimals shown)."""
    parts = []
    for panel, by_method in run.imputation.items():
        ratio = min(by_method[MODEL_METHOD], key=lambda r: abs(float(r) - 0.5))
        name, nll = strongest_baseline(by_method, ratio)
        model = by_method[MODEL_METHOD][ratio]["nll_all"]
        lower = f"{min(model, nll):.3f}"
        model_text, baseline_text = (f"**{x:.3f}**" if f"{x:.3f}" == lower else f"{x:.3f}" for x in (model, nll))
        parts.append(f"{panel}: {model_text} vs {baseline_text} ({name}), {float(ratio):.0%} masked")
    return "; ".join(parts)


def _usage(run: CardContents) -> str:
    example = (
        run.widgets[0]["structured_data"] if run.widgets else {"gene_ids": ["CD3E"], "ranks": [0], "mask": [True]}
    )
    genes, ranks, mask = example["gene_ids"], example["ranks"], example["mask"]
    return f'''```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{run.repo_id}", trust_remote_code=True)
# One training cell: genes (Ensembl ids, symbols or token ids), their rank tokens, and the genes to impute.
gene_ids = {genes}
ranks = {ranks}
mask = {mask}
# The predictive distribution of each masked gene's rank, given the visible ones (one denoiser pass).
out = pipe(gene_ids=gene_ids, ranks=ranks, mask=mask, output_type="probs")
out.probs[0], out.expected[0]  # (genes, {run.config.num_rank_bins + 1}) probabilities, expected rank
# Draws: sampled ranks at the masked genes (ancestral sampler, {run.config.num_rank_bins + 1} classes).
generator = torch.Generator().manual_seed(0)
out = pipe(gene_ids=gene_ids, ranks=ranks, mask=mask, num_inference_steps=32, generator=generator)
out.ranks[0]
# AnnData of raw counts in and out (NaN entries are imputed):
# result = pipe.impute_anndata(adata, layer="counts")
```

The model alone, and the transformers pipeline task `rank-imputation`:

```python
from transformers import AutoModel, pipeline

model = AutoModel.from_pretrained("{run.repo_id}", subfolder="model", trust_remote_code=True)
imputer = pipeline(model="{run.repo_id}", model_kwargs={{"subfolder": "model"}}, trust_remote_code=True)
imputer(gene_ids=gene_ids, ranks=ranks, mask=mask)  # the cell above: probs, expected
```'''


def _shown(values: list, most: int = 12) -> str:
    return ", ".join(f"`{v}`" for v in values[:most]) + (f", ... ({len(values)} in all)" if len(values) > most else "")


def _reference_sentence(config) -> str:
    """What the card says about the reference cells a model reads (nothing when it reads none)."""
    if not getattr(config, "reference_context", False):
        return ""
    return (
        "\n\nBeside each cell the model reads its nearest training cells (found on its visible genes; the folder's"
        " `reference/`, used by default; `reference=False` for none, `reference=adata` for your own cells): the"
        ' tables show it both ways ("no reference cells").'
    )


def conditions_section(run: CardContents) -> str:
    """The card's `## Conditions` section: what the model is told, each vocabulary, guidance and the held-out pairs
    (empty for an unconditional model)."""
    if not run.conditions:
        return ""
    setup = run.conditions
    rows = [f"| `{name}` | {len(values)} | {_shown(values)} |" for name, values in setup["conditions"].items()]
    if setup["dose"]:
        rows.append("| `dose` | uM | a smooth function of log10(dose + 1e-3) and dose > 0 (control: 0) |")
    example = {name: values[0] for name, values in setup["conditions"].items()}
    if setup["dose"]:
        example["dose"] = 0.5
    pairs = ""
    if setup["test_pairs"]:
        columns = " x ".join(setup["pair_columns"])
        pairs = (
            f"\n\nHeld out ({columns}): every dose of {len(setup['test_pairs'])} pairs is a test cell and never "
            f"trained on ({_shown([' / '.join(p) for p in setup['test_pairs']], 8)}); validation pairs "
            f"({_shown([' / '.join(p) for p in setup['validation_pairs']], 8)}) choose the guidance scale."
        )
    config = run.config
    genes = ""
    if config.gene_condition:
        genes = f" and, per gene, a projection of its gene's embedding times them (into the {config.gene_condition})"
    if config.perturbation_effect_rank:
        genes += (
            "; a drug also moves each gene's tokens up or down the rank axis by its own amount (a per-drug table "
            "from the drug's average effect in the training cells, plus a rank-"
            f"{config.perturbation_effect_rank} part that the line modulates, gated by a Hill curve of the dose)"
        )
    guidance = "0 the unconditional one"
    if config.factorized_guidance:
        guidance = ("0 the model told the line alone (drug and dose were also dropped alone in training, so guidance "
                    "pushes along the drug's effect)")  # fmt: skip
    translate = ""
    if config.control_drug and "drug" in setup["conditions"]:
        translate = f"""
To translate your own control cells (raw counts at `genes`, one per output cell) to their counterfactuals under a
drug (each gene's control token carried to the same quantile of the model's distribution under the drug), pass them:

```python
out = pipe(gene_ids=[genes] * 100, control_counts=dmso_counts, conditions={example!r})
```
"""
    return f"""## Conditions

The model is told each cell's perturbation conditions: one learned embedding per value (id 0 is each condition's
learned null), summed into the adaLN conditioning of every block{genes}. During training all of a cell's conditions
are replaced by the nulls at a rate (condition dropout), so the same model is also unconditional, and sampling uses
classifier-free guidance on the log-probabilities at every step: `guidance_scale` 1 is the conditional model,
{guidance}, above 1 strengthens the conditions' effect. An unknown value is an error naming the known ones.

| condition | values | vocabulary (id order from 1) |
| --- | --- | --- |
{chr(10).join(rows)}{pairs}

```python
out = pipe(gene_ids=[genes] * 100, conditions={example!r}, guidance_scale=2.0)
```
{translate}"""


def _model_table(run: CardContents) -> str:
    config = run.config
    bins = config.num_rank_bins
    rows = {
        "task": f"masked-token prediction over rank tokens 0..{bins} (`[MASK]` = {config.mask_token_id}), MDLM",
        "tokenization": f"`{config.rank_scheme}`: per cell, quantiles of the non-zero raw counts at "
        f"`linspace(0, 1, {bins})`, bins 1..{bins}; 0 = not expressed",
        "sequence": f"trained on up to {config.max_length} (gene, rank) pairs per cell, no order (no positional "
        "encoding); longer cells are seen in windows of random genes",
        "gene vocabulary": f"{config.gene_vocab_size:,} ids (Tahoe-100M `gene_metadata` layout: Ensembl ids, symbols)",
        "architecture": f"DiT: {config.num_hidden_layers} blocks, width {config.hidden_size}, "
        f"{config.num_attention_heads} heads, adaLN {'with' if config.time_conditioning else 'without'} time input",
        "parameters": f"{run.num_parameters / 1e6:.2f}M (`{run.preset}` preset)",
    }
    return "| | |\n| --- | --- |\n" + "\n".join(f"| {name} | {value} |" for name, value in rows.items())


def model_card(run: CardContents, model_name: str = "RankDiT") -> ModelCard:
    """The model card of `run`: `ModelCard.load` parses it back; every plot it shows is a path of `run.plots`."""
    config = run.config
    runtime = f", {run.runtime_s / 60:.1f} minutes" if run.runtime_s else ""
    ema = f"EMA of the weights with decay {run.ema_decay} (evaluated and saved)" if run.ema_decay else "no EMA"
    plots = "\n\n".join(f"**{caption}**\n\n![{caption}]({path})" for caption, path in run.plots.items())
    panels = ", ".join(f"{name}: {size:,} genes" for name, size in run.panel_sizes.items())
    choices = "; ".join(f"{family}: {choice}" for family, choice in run.baseline_choices.items())
    tables = "\n\n".join(f"### {panel}\n\n{_results_table(by_method)}" for panel, by_method in run.imputation.items())
    body = f"""
# {model_name} ({run.preset}) for single-cell rank imputation

A masked discrete diffusion model over single-cell gene expression, trained with RankDiff. Each cell is a set of
(gene, rank token) pairs: rank 0 means the gene is not expressed, ranks 1..{config.num_rank_bins} are quantile bins
of the cell's own non-zero counts. The model predicts, for any masked gene of a cell and at any masking level, a
**distribution** over its rank given the visible genes; the pipeline samples from it (imputation, denoising, whole
cells) or returns it.{_reference_sentence(config)}

Masked NLL on {run.test_cells} test cells (nats per masked gene, lower is better), model vs the strongest
baseline on the same masks, per evaluation panel: {headline(run)}.

## Usage

{_usage(run)}

## Model

{_model_table(run)}

{conditions_section(run)}
## Training

- Data: `{run.data_name}`; cells are split into train / validation / test by a hash of their barcode. The
  baselines, the gene pool and the evaluation panels were fitted on {run.training_cells:,} training cells;
  settings were chosen on validation cells; every number below is on test cells.
- Budget: {run.steps} optimizer steps of {run.batch_size} cells, peak learning rate {run.learning_rate:g},
  {run.noise_schedule} noise schedule, {ema}; on {run.hardware}{runtime}.
- Loss: {run.loss}.
- Every argument of the run: `train_args.json` (`python train_hf.py train_args.json` reads them back).

## Evaluation

Test cells, on three gene panels chosen on training cells without looking at the test counts
({panels}), a share of each cell's panel genes masked (masks drawn once per ratio and shared by every method);
**masked positions only**. NLL on rank tokens; the ordinal metrics also on the tie-aware level scale (level j =
the cell's j-th smallest distinct token, in effect its j-th smallest distinct count, so a count 1 / count 2 mix-up
costs one level, not the many bins between their tokens).
Baselines, each fitted on the training cells with its setting chosen on validation cells ({choices}): the per-gene
marginal; the cell-aware marginal (the per-gene marginal told which tokens the cell's visible genes use and how
deep the cell is); the nearest training cells on the visible genes; MAGIC (`magic-impute`), its imputed values
read as the tokens the cell uses at similarly imputed visible genes; the nearest training cells' rates (their
counts at a masked gene on the cell's depth, a mixture of Poissons read as the tokens the cell gives those counts).

{tables}

## Plots

{plots}

## Limitations

- Trained on `{run.data_name}` only: other tissues, species, assays or gene panels are out of distribution.
- Ranks are per-cell quantile bins, so the model says nothing about library size or absolute counts; many
  genes share bin 1 (count 1) and ties make the middle bins coarse.
- A single sampled imputation is a draw, not a best guess: use `output_type="probs"` / `"expected"` for point
  estimates, samples for populations.
- The scores above come from one training run and one set of masks; small gaps between methods are within noise.
"""
    return ModelCard(f"---\n{card_data(run, model_name).to_yaml()}\n---\n{body}")
