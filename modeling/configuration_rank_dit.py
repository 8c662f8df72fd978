"""RankDiT configuration."""

from __future__ import annotations

import dataclasses
import difflib

from transformers import PreTrainedConfig

# Sizes of the named presets; every other field keeps its default. With the Tahoe-100M vocabulary (62,713 ids):
# tiny 4.2M, small 23M, base 89M (MosaicFM-70M's d512 x 12 backbone plus 19M of adaLN modulation), large 177M.
RANK_DIT_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    "small": {"hidden_size": 256, "num_hidden_layers": 6, "num_attention_heads": 4},
    "base": {"hidden_size": 512, "num_hidden_layers": 12, "num_attention_heads": 8},
    "large": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
}

RANK_SCHEMES = ("mosaicfm_quantile",)
# The transformers task every checkpoint offers (`pipeline(model=folder, trust_remote_code=True)`); its code,
# `imputation_task.py`, travels with the processor saved beside the model.
IMPUTATION_TASK = "rank-imputation"
TASK_PIPELINES = {
    IMPUTATION_TASK: {"impl": "imputation_task.RankDiTImputationPipeline", "pt": ["AutoModel"], "type": "multimodal"}
}


class RankDiTConfig(PreTrainedConfig):
    r"""
    Configuration of a [`RankDiTModel`], the denoiser of RankDiff's masked discrete diffusion over per-cell rank
    tokens. A cell is a set of (gene id, rank token) pairs; rank token 0 means "not expressed", 1..B are per-cell
    quantile bins of the non-zero counts and B + 1 is `[MASK]`. `cell_profile`, `gene_prior` and `copy_head` default
    to off, so a checkpoint saved without them loads as it was trained; `train_hf.py` turns all three on.

    Args:
        num_rank_bins (`int`, *optional*, defaults to 50):
            B, the number of quantile bins for expressed genes. The model predicts over the B + 1 classes 0..B.
        mask_token_id (`int`, *optional*):
            Id of the `[MASK]` rank token. Must be `num_rank_bins + 1` (the default when left unset).
        rank_scheme (`str`, *optional*, defaults to `"mosaicfm_quantile"`):
            How counts become rank tokens: `"mosaicfm_quantile"` bins each cell's non-zero counts at the quantiles
            `linspace(0, 1, B)` (MosaicFM / Tahoe-x1 rule). Saved so a checkpoint tokenizes as it was trained.
        gene_vocab_size (`int`, *optional*, defaults to 62713):
            Number of gene ids (ids 0..2 are special, genes start at 3 as in Tahoe-100M's `gene_metadata`).
        hidden_size (`int`, *optional*, defaults to 512):
            Width of the embeddings and of every DiT block.
        num_hidden_layers (`int`, *optional*, defaults to 12):
            Number of DiT blocks.
        num_attention_heads (`int`, *optional*, defaults to 8):
            Attention heads per block; must divide `hidden_size`.
        intermediate_size (`int`, *optional*):
            Width of the MLP; `4 * hidden_size` when unset.
        hidden_act (`str`, *optional*, defaults to `"gelu_pytorch_tanh"`):
            Activation of the MLP.
        max_length (`int`, *optional*, defaults to 1024):
            Number of (gene, token) pairs in a training sequence. The model has no positional encoding, so this is
            the tokenizer's length, not a hard limit of the network.
        time_conditioning (`bool`, *optional*, defaults to `False`):
            Condition the blocks on the diffusion time. Masked diffusion does not need it (MDLM, RADD), and
            without it samplers may reuse model outputs between steps.
        cell_profile (`bool`, *optional*, defaults to `False`):
            Add an embedding of the cell's visible token profile (the share of each token among the visible
            positions, which tokens occur, the share of positions visible) to the conditioning vector of every
            block. Ties make a cell use few tokens, and which ones can be read off its visible genes; so can its
            depth. Computed from the input tokens alone, so sampling may still reuse outputs.
        gene_prior (`bool`, *optional*, defaults to `False`):
            Add a learned per-gene bias over the rank tokens to the logits (zero at initialisation; training can
            start it at the per-gene marginal of the training cells with [`~RankDiTModel.init_gene_prior`]).
        copy_head (`bool`, *optional*, defaults to `False`):
            Predict each position as a mixture of the tokens of the cell's visible positions (a pointer over them,
            weighted by learned similarity) and the generated distribution, the weights from one softmax over the
            visible positions and a "generate" slot. A masked gene then takes the tokens the cell uses at similar
            genes. The logits are then log-probabilities.
        reference_context (`bool`, *optional*, defaults to `False`):
            Read reference cells beside the cell: the model takes `reference_tokens`, the tokens of the cell's
            nearest reference cells at each of its genes (in the cell's own token scale, from a
            `ReferenceCells` index), embeds their distribution at every position and offers it to the copy head
            as one more slot to draw from. Cells without references (`reference_tokens` None, or -1) work too.
        conditions (`dict[str, list[str]]`, *optional*):
            The categorical perturbation conditions the model is told (Tahoe: `cell_line_id`, `drug`; AnnData: `obs`
            columns) and each one's values, in id order: value i has id i + 1, id 0 is the condition's learned null
            value (unknown, or dropped for classifier-free guidance). Each gets an embedding table summed into the
            conditioning vector of every block.
        dose_condition (`bool`, *optional*, defaults to `False`):
            Also tell the model the dose (uM) through a smooth function of log dose, with a learned null vector for an
            unknown dose (NaN).
        control_drug (`str`, *optional*):
            With a `drug` condition and `dose_condition`, the control (vehicle) drug of the screen (Tahoe: `DMSO_TF`):
            told with a dose above 0, a cell is refused (a control has none).
        gene_condition (`str`, *optional*):
            With conditions, also let them reach single genes: each position adds a projection of its gene's
            embedding times the cell's condition vector (a gene x condition FiLM), so a drug can move its own genes
            rather than the whole cell through the shared conditioning vector: `"hidden"` adds it to the input
            hidden states, `"logits"` to the output log-probabilities (after the copy head). None: neither.
        perturbation_effect_rank (`int`, *optional*, defaults to 0):
            With a `drug` condition, the rank of an explicit drug effect on the output: each gene's tokens move up or
            down the rank axis by a gene x drug product (modulated by the context conditions, gated by a Hill curve
            of the dose per drug); the control drug moves nothing. 0: none.
        drug_feature_size (`int`, *optional*, defaults to 0):
            With a `drug` condition, each drug's structure as this many features (the model's `drug_features`
            buffer, a row per drug id: its Morgan fingerprint bits, scaled to unit norm, from
            [`~RankDiTModel.init_drug_features`]), projected into the drug's condition vector and into its explicit
            effect beside the drug's own learned parameters (its residual: table row, effect factors, gene shifts,
            dose response), which start at zero (the gene shifts at the training cells' estimate, zero for a drug
            without cells). A drug no training cell received keeps a zero residual and is predicted from its
            structure. 0: drugs are ids only.
        drug_residual_dropout (`float`, *optional*, defaults to 0.0):
            With `drug_feature_size`, the share of training cells whose drug is told by its structure alone (its
            residual dropped), so that the features alone must carry a drug's effect. The null drug, the control
            and a drug without structure are never dropped.
        factorized_guidance (`bool`, *optional*, defaults to `False`):
            The model was trained dropping the perturbation (`drug`, dose) apart from the context (the other
            conditions, e.g. the cell line), so classifier-free guidance contrasts `p(x | line, drug, dose)` with
            `p(x | line)` and pushes along the drug's effect, not along the line's identity.
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on attention probabilities.
        hidden_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the residual branches.
        norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of the (non-affine) LayerNorms.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of weights.

    Examples:

    ```python
    >>> from modeling import RankDiTConfig, RankDiTModel

    >>> config = RankDiTConfig.from_preset("tiny", gene_vocab_size=1000)
    >>> model = RankDiTModel(config)
    >>> config.num_rank_tokens
    51
    ```"""

    model_type = "rank_dit"

    num_rank_bins: int = 50
    mask_token_id: int | None = None
    rank_scheme: str = "mosaicfm_quantile"
    gene_vocab_size: int = 62713
    hidden_size: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    intermediate_size: int | None = None
    hidden_act: str = "gelu_pytorch_tanh"
    max_length: int = 1024
    time_conditioning: bool = False
    cell_profile: bool = False
    gene_prior: bool = False
    copy_head: bool = False
    reference_context: bool = False
    conditions: dict[str, list[str]] | None = None
    dose_condition: bool = False
    control_drug: str | None = None
    gene_condition: str | None = None
    perturbation_effect_rank: int = 0
    drug_feature_size: int = 0
    drug_residual_dropout: float = 0.0
    factorized_guidance: bool = False
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    norm_eps: float = 1e-6
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.num_rank_bins < 1:
            raise ValueError(f"num_rank_bins must be at least 1, got {self.num_rank_bins}")
        if self.mask_token_id is None:
            self.mask_token_id = self.num_rank_bins + 1
        if self.mask_token_id != self.num_rank_bins + 1:
            raise ValueError(
                f"mask_token_id must be num_rank_bins + 1 = {self.num_rank_bins + 1}, got {self.mask_token_id}"
            )
        if self.rank_scheme not in RANK_SCHEMES:
            raise ValueError(f"rank_scheme must be one of {RANK_SCHEMES}, got {self.rank_scheme!r}")
        for name in ("gene_vocab_size", "max_length", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if isinstance(self.gene_condition, bool):  # a config written while it was a flag: on meant "hidden"
            self.gene_condition = "hidden" if self.gene_condition else None
        if self.gene_condition not in (None, "hidden", "logits"):
            raise ValueError(f"gene_condition must be None, 'hidden' or 'logits', got {self.gene_condition!r}")
        rank, conditions = self.perturbation_effect_rank, list(self.conditions or {})
        if rank < 0 or (rank and "drug" not in conditions):
            raise ValueError(f"perturbation_effect_rank ({rank}) must be 0, or positive with a drug condition "
                             f"(conditions: {conditions})")  # fmt: skip
        if self.drug_feature_size < 0 or (self.drug_feature_size and "drug" not in conditions):
            raise ValueError(f"drug_feature_size ({self.drug_feature_size}) must be 0, or positive with a drug "
                             f"condition (conditions: {conditions})")  # fmt: skip
        if not 0.0 <= self.drug_residual_dropout < 1.0:
            raise ValueError(f"drug_residual_dropout must be in [0, 1), got {self.drug_residual_dropout}")
        for name, values in (self.conditions or {}).items():
            if name == "dose" or not values or len(set(values)) != len(values):
                raise ValueError(
                    f"conditions[{name!r}] must list distinct values (the dose is dose_condition), got {values!r}"
                )
        # Unknown keys are kept (the base class stores them), but a near-miss of a field is a typo, not metadata.
        fields = [f.name for f in dataclasses.fields(self)]
        for key in kwargs:
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.85)
            if key not in fields and close:
                raise ValueError(f"unknown RankDiTConfig argument {key!r}; did you mean {close[0]!r}?")
        super().__post_init__(**kwargs)
        if not getattr(self, "custom_pipelines", None):
            self.custom_pipelines = TASK_PIPELINES

    @property
    def num_rank_tokens(self) -> int:
        """Number of classes the model predicts: rank tokens 0..B (the mask class is never predicted)."""
        return self.num_rank_bins + 1

    @classmethod
    def from_preset(cls, name: str, **overrides) -> RankDiTConfig:
        """Build the config of a named size (`tiny`, `small`, `base`, `large`), with any field overridden."""
        if name not in RANK_DIT_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(RANK_DIT_PRESETS)}")
        return cls(**{**RANK_DIT_PRESETS[name], **overrides})
