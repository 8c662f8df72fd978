"""Command-line arguments of `train_hf.py`, parsed with `HfArgumentParser`."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

from dataset_scripts.splits import TEST_SHARE, VALIDATION_SHARE
from modeling import RANK_DIT_PRESETS
from modeling.conditions import DOSE
from pipelines import NOISE_SCHEDULES

from .loss import ORDINAL_TERMS, ORDINAL_TIME_WEIGHTINGS

BATCHES_PER_GROUP = 8  # --group_batches_by: a block holds about this many batches of each value

GENE_EMBEDDING_INITS = ("random", "pca")
SPLIT_BY = ("barcode", "plate", "file")


def _check_positive_int(name: str, value, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"--{name} must be a positive integer, got {value!r}")


def _check_share(name: str, value: float, below_one: bool = False) -> None:
    if not (math.isfinite(value) and 0 <= value and (value < 1 if below_one else value <= 1)):
        raise ValueError(f"--{name} must be a share in [0, {'1)' if below_one else '1]'}, got {value}")


@dataclass
class ModelArguments:
    preset: str = field(default="tiny", metadata={"help": f"model size, one of {sorted(RANK_DIT_PRESETS)}"})
    hidden_size: int | None = field(default=None, metadata={"help": "width, overriding the preset's"})
    num_hidden_layers: int | None = field(default=None, metadata={"help": "DiT blocks, overriding the preset's"})
    num_attention_heads: int | None = field(default=None, metadata={"help": "heads, overriding the preset's"})
    num_rank_bins: int = field(default=50, metadata={"help": "B: quantile bins of expressed genes (tokens 1..B)"})
    time_conditioning: bool = field(default=False, metadata={"help": "condition the denoiser on diffusion time"})
    cell_profile: bool = field(
        default=True, metadata={"help": "condition every block on the cell's visible token profile"}
    )
    gene_prior: bool = field(
        default=True,
        metadata={"help": "a learned per-gene bias over the tokens, started at the training cells' per-gene marginal"},
    )
    copy_head: bool = field(
        default=True, metadata={"help": "mix a pointer to the visible positions' tokens into the prediction"}
    )
    reference_context: bool = field(
        default=True,
        metadata={
            "help": "read each cell's nearest training cells (found on its visible genes) beside it, as MAGIC reads "
            "neighbouring cells; saved with the pipeline as its reference"
        },
    )
    gene_condition: str = field(
        default="none",
        metadata={
            "help": "with --conditions, let the conditions reach single genes (a gene x condition FiLM) in the "
            "hidden states (hidden) or the output log-probabilities (logits); none (the default: neither bought "
            "anything on validation pairs yet, docs/PERFORMANCE.md)"
        },
    )
    perturbation_effect_rank: int = field(
        default=32,
        metadata={
            "help": "with a drug condition, an explicit drug effect on each gene's tokens (a per-drug table set to "
            "each drug's average effect in the training cells, plus a gene x drug product of this rank that the "
            "line modulates, gated by a Hill curve of the dose per drug); 0: none"
        },
    )
    learn_drug_shifts: bool = field(
        default=False,
        metadata={
            "help": "train the perturbation effect's per-drug table; off by default: it stays at its estimate from "
            "--effect_cells training cells, since training walked it away from that estimate and held-out pairs "
            "lost (docs/PERFORMANCE.md)"
        },
    )
    learn_effect_modulation: bool = field(
        default=False,
        metadata={
            "help": "train the perturbation effect's gene x drug factors, their modulation by the line and each "
            "drug's Hill curve of the dose; off by default: each drug's effect is then its table's, gated by the "
            "Hill curve it starts from, which predicted held-out pairs better (docs/PERFORMANCE.md)"
        },
    )
    drug_features: bool = field(
        default=False,
        metadata={
            "help": "with a drug condition and the data's drug SMILES (metadata/drug_metadata.parquet), also know "
            "each drug by its Morgan fingerprint (radius 2, 2,048 bits), beside its own learned parameters, so a drug "
            "without training cells is predicted from its structure (off by default: on the stand-in screen it "
            "bought nothing measurable on unseen drugs, docs/PERFORMANCE.md)"
        },
    )
    drug_residual_dropout: float = field(
        default=0.5,
        metadata={"help": "with --drug_features, the share of training cells told their drug by its structure alone"},
    )
    reference_cells: int = field(
        default=2048, metadata={"help": "reference cells: a seeded draw of the training cells read for the baselines"}
    )
    reference_neighbours: int = field(default=32, metadata={"help": "reference cells read per cell"})
    reference_components: int = field(
        default=16, metadata={"help": "principal components of the reference cells the neighbours are found in"}
    )
    reference_dropout: float = field(
        default=0.2, metadata={"help": "share of training cells shown without references, so the model works alone"}
    )
    gene_embedding_init: str = field(
        default="pca",
        metadata={
            "help": "start of the gene embeddings: random, or pca (loadings of the training cells' principal axes, "
            "so genes that vary together start close)"
        },
    )

    def __post_init__(self):
        for name in ("num_rank_bins", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            _check_positive_int(name, getattr(self, name), optional=name != "num_rank_bins")
        if self.preset not in RANK_DIT_PRESETS:
            raise ValueError(f"preset must be one of {sorted(RANK_DIT_PRESETS)}, got {self.preset!r}")
        sizes = {**RANK_DIT_PRESETS[self.preset], **self.config_overrides()}
        if sizes["hidden_size"] % sizes["num_attention_heads"]:
            raise ValueError(f"--hidden_size ({sizes['hidden_size']}) must be divisible by --num_attention_heads "
                             f"({sizes['num_attention_heads']})")  # fmt: skip
        if self.gene_condition not in ("hidden", "logits", "none"):
            raise ValueError(f"--gene_condition must be hidden, logits or none, got {self.gene_condition!r}")
        if not 0.0 <= self.drug_residual_dropout < 1.0:
            raise ValueError(f"--drug_residual_dropout must be in [0, 1), got {self.drug_residual_dropout}")
        if self.perturbation_effect_rank < 0:
            raise ValueError(f"--perturbation_effect_rank must be 0 or more, got {self.perturbation_effect_rank}")
        if self.reference_context and self.num_rank_bins > 255:
            raise ValueError(f"--num_rank_bins must be at most 255 with --reference_context (reference tokens are "
                             f"bytes), got {self.num_rank_bins}")  # fmt: skip
        if self.reference_neighbours < 1 or self.reference_cells <= self.reference_neighbours:
            raise ValueError(
                f"--reference_neighbours must be at least 1 and below --reference_cells, got "
                f"{self.reference_neighbours} and {self.reference_cells}"
            )
        if self.reference_components < 1:
            raise ValueError(f"--reference_components must be at least 1, got {self.reference_components}")
        if not 0.0 <= self.reference_dropout < 1.0:
            raise ValueError(f"--reference_dropout must be in [0, 1), got {self.reference_dropout}")
        if self.gene_embedding_init not in GENE_EMBEDDING_INITS:
            raise ValueError(
                f"gene_embedding_init must be one of {GENE_EMBEDDING_INITS}, got {self.gene_embedding_init!r}"
            )

    def config_overrides(self) -> dict:
        """The `RankDiTConfig` fields these arguments set besides the preset."""
        sizes = ("hidden_size", "num_hidden_layers", "num_attention_heads")
        overrides = {name: getattr(self, name) for name in sizes if getattr(self, name) is not None}
        flags = ("num_rank_bins", "time_conditioning", "cell_profile", "gene_prior", "copy_head", "reference_context",
                 "perturbation_effect_rank")  # fmt: skip
        gene_condition = None if self.gene_condition == "none" else self.gene_condition
        return {**overrides, **{name: getattr(self, name) for name in flags}, "gene_condition": gene_condition}


@dataclass
class DataArguments:
    data: str | None = field(
        default=None,
        metadata={
            "help": "the embedded real sample when unset; a local folder or parquet file in the Tahoe-100M "
            "schema (Hub layout data/*.parquet + metadata/gene_metadata.parquet); an .h5ad file of raw counts; "
            "or a Hub dataset id such as tahoebio/Tahoe-100M (streamed)"
        },
    )
    data_config: str | None = field(default=None, metadata={"help": "dataset config of a Hub id"})
    gene_vocab: str | None = field(
        default=None,
        metadata={
            "help": "vocabulary of an .h5ad (a gene_metadata parquet or a checkpoint's preprocessor_config.json); "
            "default GENCODE v44"
        },
    )
    layer: str | None = field(default=None, metadata={"help": "h5ad layer with raw counts (default X)"})
    gene_column: str | None = field(default=None, metadata={"help": "h5ad var column with gene names (default index)"})
    obs_columns: list[str] = field(default_factory=list, metadata={"help": "h5ad obs columns to keep"})
    max_length: int = field(default=1024, metadata={"help": "L: most (gene, token) pairs in a sequence"})
    zero_share: float = field(
        default=0.1, metadata={"help": "share of an expressed-gene sequence filled with unexpressed genes (token 0)"}
    )
    panel_share: float = field(
        default=0.34,
        metadata={
            "help": "share of training sequences built from the training panel without looking at the counts (the "
            "rule the trainer's evaluation uses)"
        },
    )
    random_share: float = field(
        default=0.33,
        metadata={
            "help": "share of training sequences of L genes drawn at random from the genes seen in training, "
            "without looking at the counts (like the gene lists users bring); the rest hold expressed genes plus the "
            "zero share"
        },
    )
    panel_size: int | None = field(
        default=None,
        metadata={"help": "genes in the panel: the most often detected genes of the training split (default L)"},
    )
    validation_share: float | None = field(
        default=None,
        metadata={
            "help": f"share of cells held out for validation (by a hash of BARCODE_SUB_LIB_ID; default "
            f"{VALIDATION_SHARE}, --split_by barcode only): the evaluations during training and every choice of "
            "setting are made on them"
        },
    )
    test_share: float | None = field(
        default=None,
        metadata={
            "help": f"share of cells held out for testing (the next slice of the hash; default {TEST_SHARE}, "
            "--split_by barcode only): the reported numbers"
        },
    )
    split_seed: int = field(
        default=0, metadata={"help": "salt of that hash; unlike --seed it keeps the held-out cells across runs"}
    )
    split_by: str = field(
        default="barcode",
        metadata={
            "help": "how held-out cells are chosen: barcode (the hash above: same wells on both sides), plate "
            "(--validation_plates / --test_plates) or file (--validation_files / --test_files); a plate or file "
            "hold-out reads only the files that can hold it"
        },
    )
    validation_plates: list[str] = field(default_factory=list, metadata={"help": "plates held out for validation"})
    test_plates: list[str] = field(default_factory=list, metadata={"help": "plates held out for testing"})
    validation_files: list[str] = field(default_factory=list, metadata={"help": "file names held out for validation"})
    test_files: list[str] = field(default_factory=list, metadata={"help": "file names held out for testing"})
    interleave_files: int = field(
        default=16,
        metadata={"help": "Tahoe-layout files each stream shard reads side by side (cells of a batch mix them)"},
    )
    sample_files: int = field(
        default=64,
        metadata={
            "help": "files (one per stratum of the file order) the baseline and evaluation cells are drawn from"
        },
    )
    baseline_cells: int = field(
        default=20_000,
        metadata={"help": "training cells read to fit the baselines and choose the gene pool and the panels"},
    )
    effect_cells: int = field(
        default=200_000,
        metadata={"help": "training cells read to estimate each drug's effect from (the model's perturbation "
                          "effect), when the model is told a drug, drawn across --sample_files files as the "
                          "baselines' are; at most --baseline_cells: the baselines' own cells"},
    )  # fmt: skip
    max_eval_cells: int = field(default=512, metadata={"help": "validation (and test) cells scored at most"})
    conditions: str | None = field(
        default=None,
        metadata={
            "help": "comma-separated metadata columns the model is told, e.g. cell_line_id,drug,dose (dose: uM from "
            "metadata/sample_metadata.parquet joined on sample); AnnData: obs columns. Off when unset"
        },
    )
    heldout_pairs: str | None = field(
        default=None,
        metadata={
            "help": "CSV whose header names two of the conditions (e.g. cell_line_id,drug), whose rows are held-out "
            "pairs: every cell (every dose) of such a pair is a test cell, never trained or validated on; validation "
            "takes a --validation_share of the other perturbed pairs (drawn with --split_seed)"
        },
    )
    condition_dropout: float = field(
        default=0.1,
        metadata={"help": "share of training cells shown with every condition null (classifier-free guidance)"},
    )
    perturbation_dropout: float = field(
        default=0.1,
        metadata={
            "help": "share of training cells shown with their drug and dose null and their line kept, so guidance "
            "contrasts p(x | line, drug, dose) with p(x | line) (with a drug and another condition)"
        },
    )
    control_drug: str = field(
        default="DMSO_TF", metadata={"help": "the vehicle control's drug name (dose 0; never a validation pair)"}
    )
    group_batches_by: str | None = field(
        default=None,
        metadata={
            "help": f"a categorical condition (e.g. cell_line_id): blocks of {BATCHES_PER_GROUP} training batches per "
            "value of it are sorted by it before they are cut, so most batches hold one line's cells under several of "
            "its conditions (a streamed training set)"
        },
    )

    def __post_init__(self):
        for name in (
            "max_length",
            "panel_size",
            "interleave_files",
            "sample_files",
            "baseline_cells",
            "effect_cells",
            "max_eval_cells",
        ):
            _check_positive_int(name, getattr(self, name), optional=name == "panel_size")
        for name in ("zero_share", "panel_share", "random_share"):
            _check_share(name, getattr(self, name))
        if self.panel_share + self.random_share > 1:
            raise ValueError(f"--panel_share + --random_share must be at most 1, got {self.panel_share} + "
                             f"{self.random_share}")  # fmt: skip
        for name in ("validation_share", "test_share"):
            if getattr(self, name) is not None:
                _check_share(name, getattr(self, name), below_one=True)
        if self.conditions is not None:
            names = [name.strip() for name in self.conditions.split(",")]
            if not all(names):
                raise ValueError(f"--conditions must name columns, comma-separated, got {self.conditions!r}")
            repeated = sorted({name for name in names if names.count(name) > 1})
            if repeated:
                raise ValueError(f"--conditions names {repeated} more than once: {self.conditions!r}")
        for name in ("condition_dropout", "perturbation_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.condition_dropout + self.perturbation_dropout >= 1.0:
            raise ValueError(f"--condition_dropout + --perturbation_dropout must be below 1 (some cells keep their "
                             f"conditions), got {self.condition_dropout} + {self.perturbation_dropout}")  # fmt: skip
        if not (isinstance(self.split_seed, int) and self.split_seed >= 0):
            raise ValueError(f"--split_seed must be an integer >= 0, got {self.split_seed}")
        if self.group_batches_by is not None and (
            self.group_batches_by not in self.condition_names or self.group_batches_by == DOSE
        ):
            raise ValueError(f"--group_batches_by must be a categorical condition of --conditions "
                             f"{self.condition_names}, got {self.group_batches_by!r}")  # fmt: skip
        if self.heldout_pairs is not None and not self.conditions:
            raise ValueError("--heldout_pairs needs --conditions (the pair's columns among them)")
        if self.heldout_pairs is not None and self.split_by != "barcode":
            raise ValueError(f"--heldout_pairs is its own split: leave --split_by at barcode, not {self.split_by!r}")
        if self.gene_vocab is not None:
            if not str(self.data or "").endswith(".h5ad"):
                raise ValueError(f"--gene_vocab is the vocabulary of an .h5ad --data; --data {self.data} brings its "
                                 "own (metadata/gene_metadata.parquet)")  # fmt: skip
            if not os.path.isfile(self.gene_vocab):
                raise FileNotFoundError(f"--gene_vocab {self.gene_vocab}: no such file (a gene_metadata parquet or a "
                                        "preprocessor_config.json)")  # fmt: skip
        if self.heldout_pairs is not None:  # its form is checked now; its pairs against the data when it is opened
            from .recipe import read_heldout_pairs  # the recipe module imports this one

            if not os.path.isfile(self.heldout_pairs):
                raise FileNotFoundError(f"--heldout_pairs {self.heldout_pairs}: no such file")
            read_heldout_pairs(self.heldout_pairs, [name.strip() for name in self.conditions.split(",")])
        self._check_split()

    def _check_split(self) -> None:
        """Every split flag goes with its split, names something, and names it once (the data is checked for the
        plates and files it names when it is opened, before any cell is read)."""
        if self.split_by not in SPLIT_BY:
            raise ValueError(f"--split_by must be one of {SPLIT_BY}, got {self.split_by!r}")
        for kind in ("plate", "file"):
            flags = (f"validation_{kind}s", f"test_{kind}s")
            named = [flag for flag in flags if getattr(self, flag)]
            if named and self.split_by != kind:
                raise ValueError(f"--{named[0]} holds out {kind}s: it needs --split_by {kind}, not {self.split_by}")
            if self.split_by == kind and not named:
                raise ValueError(f"--split_by {kind} needs the {kind}s to hold out: --{flags[0]} and/or --{flags[1]}")
            both = sorted(set(getattr(self, flags[0])) & set(getattr(self, flags[1])))
            if both:
                raise ValueError(f"{both} are in both --{flags[0]} and --{flags[1]}")
        given = [name for name in ("validation_share", "test_share") if getattr(self, name) is not None]
        if given and self.split_by != "barcode":
            kind = self.split_by
            raise ValueError(f"--{given[0]} goes with --split_by barcode; a {kind} split holds out the {kind}s "
                             f"--validation_{kind}s / --test_{kind}s name")  # fmt: skip
        if self.split_by == "barcode":
            self.validation_share = VALIDATION_SHARE if self.validation_share is None else self.validation_share
            self.test_share = TEST_SHARE if self.test_share is None else self.test_share

    @property
    def holds_out_test_cells(self) -> bool:
        """Whether the split has test cells (what the model card scores)."""
        if self.split_by == "barcode":
            return self.test_share > 0 or self.heldout_pairs is not None
        return bool(self.test_plates if self.split_by == "plate" else self.test_files)

    @property
    def condition_names(self) -> list[str]:
        """The conditions of `--conditions`, in order."""
        return [name.strip() for name in (self.conditions or "").split(",") if name.strip()]


@dataclass
class DiffusionArguments:
    noise_schedule: str = field(default="log-linear", metadata={"help": f"one of {NOISE_SCHEDULES}"})
    eps: float = field(default=1e-3, metadata={"help": "alpha(1); training times lie in [eps, 1]"})
    eval_time_grid: int = field(
        default=8, metadata={"help": "fixed times (midpoints of [eps, 1]) averaged for the evaluation NELBO"}
    )
    eval_mask_ratio: float = field(default=0.5, metadata={"help": "share of positions masked for the masked NLL"})
    ordinal_term: str = field(
        default="rps",
        metadata={
            "help": f"ordinal term added to the NELBO, one of {ORDINAL_TERMS} (none: plain MDLM); rps won the "
            "loss ablation (benchmarks/loss_ablation.py)"
        },
    )
    ordinal_weight: float = field(default=1.0, metadata={"help": "lambda: weight of the ordinal term"})
    ordinal_time_weighting: str = field(
        default="nelbo",
        metadata={"help": f"one of {ORDINAL_TIME_WEIGHTINGS}: weight the ordinal term by time like the NELBO or not"},
    )

    def __post_init__(self):
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"--noise_schedule must be one of {NOISE_SCHEDULES}, got {self.noise_schedule!r}")
        if self.ordinal_term not in ORDINAL_TERMS:
            raise ValueError(f"ordinal_term must be one of {ORDINAL_TERMS}, got {self.ordinal_term!r}")
        if self.ordinal_time_weighting not in ORDINAL_TIME_WEIGHTINGS:
            raise ValueError(
                f"ordinal_time_weighting must be one of {ORDINAL_TIME_WEIGHTINGS}, got {self.ordinal_time_weighting!r}"
            )
        if not (math.isfinite(self.ordinal_weight) and 0 <= self.ordinal_weight <= 1e6):
            raise ValueError(f"--ordinal_weight must be a number in [0, 1e6] (larger ones overflow the loss), got "
                             f"{self.ordinal_weight}")  # fmt: skip
        if not (math.isfinite(self.eps) and 0 < self.eps < 1):
            raise ValueError(f"--eps must be in (0, 1), got {self.eps}")
        _check_positive_int("eval_time_grid", self.eval_time_grid)
        if not 0 < self.eval_mask_ratio < 1 - self.eps:
            raise ValueError(f"--eval_mask_ratio must be in (0, 1 - eps) = (0, {1 - self.eps}), got "
                             f"{self.eval_mask_ratio}")  # fmt: skip

    def loss_description(self) -> str:
        """The loss in words, for the model card."""
        nelbo = f"MDLM NELBO (masked cross-entropy weighted by the {self.noise_schedule} schedule)"
        if self.ordinal_term == "none" or self.ordinal_weight == 0:
            return nelbo
        return f"{nelbo} + {self.ordinal_weight:g} x the `{self.ordinal_term}` ordinal term"


@dataclass
class CardArguments:
    model_card: bool = field(
        default=True, metadata={"help": "write README.md (the model card) with plots into the output folder"}
    )
    card_mask_ratios: list[float] = field(
        default_factory=lambda: [0.2, 0.5, 0.8, 0.95],
        metadata={"help": "shares of genes masked in the card's evaluation table and plots"},
    )
    card_gif_steps: int = field(default=32, metadata={"help": "denoising steps of the card's two GIFs"})
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset id the card names as training data (e.g. tahoebio/Tahoe-100M for a local copy); "
            "default: --data when it is a Hub id, else its file or folder name"
        },
    )

    def __post_init__(self):
        bad = [ratio for ratio in self.card_mask_ratios if not 0 < ratio < 1]
        if not self.card_mask_ratios or bad:
            raise ValueError(f"--card_mask_ratios must be shares in (0, 1), got {self.card_mask_ratios}")
        _check_positive_int("card_gif_steps", self.card_gif_steps)


def ema_decay_for(requested: float | None, *, fsdp: bool, preset: str | None = None) -> float:
    """The decay of a run's EMA of the weights (0: none), the one place its policy lives.

    Not given (`--ema_decay` unset): none for the tiny preset (a few hundred steps) and under FSDP (sharded weights
    have no EMA yet), 0.9999 otherwise. Given: as given, but a non-zero decay under FSDP is an error.
    """
    if requested is None:
        return 0.0 if fsdp or preset == "tiny" else 0.9999
    if requested and fsdp:
        raise ValueError("EMA of the weights is not supported with FSDP yet (sharded parameters): --ema_decay 0")
    return requested


@dataclass
class RankDiffTrainingArguments(TrainingArguments):
    """`TrainingArguments` with defaults that train the tiny preset on the embedded sample on a CPU in minutes."""

    output_dir: str | None = field(default="outputs/demo", metadata={"help": "where the pipeline folder goes"})
    max_steps: int = field(default=600, metadata={"help": "optimizer steps (needed for streamed data)"})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "cells per device and step"})
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "cells per device at evaluation"})
    learning_rate: float = field(default=6e-3, metadata={"help": "peak AdamW learning rate"})
    warmup_steps: float = field(default=0.05, metadata={"help": "warm-up steps (a float < 1: share of max_steps)"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "learning-rate schedule"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    logging_steps: float = field(default=25, metadata={"help": "log every N steps"})
    eval_strategy: str = field(default="steps", metadata={"help": "evaluate validation cells: no, steps or epoch"})
    eval_steps: float = field(default=200, metadata={"help": "evaluate every N steps (the card's loss curves)"})
    save_strategy: str = field(default="no", metadata={"help": "Trainer checkpoints: no, steps or epoch"})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "experiment trackers"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep raw rows for the collator"})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "train into an --output_dir that holds a finished run: its model, card, plots and results are "
            "deleted first (without it such a folder is refused; resuming a run in its own folder is always allowed)"
        },
    )
    ema_decay: float | None = field(
        default=None,
        metadata={
            "help": "decay of the EMA of the weights, evaluated and saved as the final model (0: off); default: "
            "off for the tiny preset, 0.9999 for the others"
        },
    )

    def __post_init__(self):
        for name in ("max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps"):  # fmt: skip
            _check_positive_int(name, getattr(self, name))
        for name in ("learning_rate", "weight_decay", "max_grad_norm", "warmup_ratio", "warmup_steps", "seed"):
            value = getattr(self, name, 0)  # warmup_ratio: older transformers
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name} must be a finite number >= 0, got {value!r}")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning_rate must be above 0, got {self.learning_rate!r}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f"--ema_decay must be in [0, 1) (0: off), got {self.ema_decay!r}")
        super().__post_init__()
