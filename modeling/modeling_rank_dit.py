"""RankDiT: a DiT denoiser over sets of (gene id, rank token) pairs for masked discrete diffusion.

The model has no positional encoding (gene order carries no meaning, so it is permutation-equivariant), attends
bidirectionally with a key-padding mask, and modulates every block with adaLN-Zero from a conditioning vector: a
learned vector shared by all cells, plus an embedding of the cell's visible token profile (`config.cell_profile`)
and of the diffusion time (`config.time_conditioning`). The output adds a per-gene prior over the tokens
(`config.gene_prior`) and mixes in a pointer to the visible positions' tokens (`config.copy_head`). With
`config.reference_context` it also reads, at every position, the tokens of the cell's nearest reference cells there.
Told conditions (a screen's line, drug, dose) enter the conditioning and, for a drug, an explicit effect on each
gene's tokens; with `config.drug_feature_size` a drug is also known by its structure, so a drug without training
cells can be predicted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .conditions import PERTURBATION, condition_value
from .configuration_rank_dit import RankDiTConfig


@dataclass
class RankDiTOutput(ModelOutput):
    """
    Output of [`RankDiTModel`].

    Args:
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, num_rank_bins + 1)`):
            Float32 scores of the rank tokens 0..B at every position (the mask class is never predicted); their
            softmax is the predicted distribution (with `config.copy_head` they are its log-probabilities).
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
            Output of the last DiT block, before the final modulation and head.
    """

    logits: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention over `(batch, heads, length, head_dim)` tensors; returns `(batch, length, ...)`."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attn_weights = attn_weights.masked_fill(~attention_mask, torch.finfo(attn_weights.dtype).min)
        else:
            attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def key_padding_mask(attention_mask: torch.Tensor) -> torch.BoolTensor:
    """`(batch, 1, 1, length)`: True where a query may look, at every key that is not padding (broadcast over heads
    and queries): the boolean mask of the SDPA and eager attention functions."""
    return attention_mask.bool()[:, None, None, :]


def check_ids(name: str, ids: torch.Tensor, high: int, attended: torch.Tensor | None = None) -> None:
    """Refuse ids outside 0..`high` at the attended positions, on every device. On the host the error names the first
    (row, position) and value; on an accelerator the check is a device-side assertion, so the host does not wait for
    the device (it fails at the next synchronisation, as an out-of-range embedding lookup would)."""
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"{name} must be an integer tensor, got {got}")
    bad = (ids < 0) | (ids > high)
    if attended is not None:
        bad = bad & attended
    _refuse(bad, ids, f"{name} must be in 0..{high}")


def _refuse(bad: torch.Tensor, values: torch.Tensor, rule: str) -> None:
    """Raise naming the first `bad` entry of `values` and its place on the host; a device-side assertion elsewhere."""
    if values.device.type != "cpu" or torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), f"{rule} at every attended position")
    elif bad.any():
        where = [int(i) for i in bad.nonzero()[0]]
        place = f"(row {where[0]}, position {where[1]})" if len(where) == 2 else f"row {where[0]}"
        value = values[tuple(where)].item()
        raise ValueError(f"{rule}; got {value} at {place}")


def modulate(hidden_states: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: `x * (1 + scale) + shift` with per-sequence shift and scale."""
    return hidden_states * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def equal_head_sizes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Queries, keys and values padded with zeros to one head size, the widest: the scores are unchanged, and so is
    the attention's output up to the value's width."""
    size = max(t.shape[-1] for t in (query, key, value))
    return tuple(F.pad(t, (0, size - t.shape[-1])) for t in (query, key, value))


class RankDiTZeroLinear(nn.Linear):
    """A linear layer initialised to zero: adaLN-Zero modulations and the output head (training starts from
    identity blocks and uniform logits)."""


class RankDiTTimestepEmbedding(nn.Module):
    """Sinusoidal embedding of the diffusion time t in [0, 1], followed by a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.linear_1 = nn.Linear(frequency_size, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        exponent = -math.log(10000.0) * torch.arange(half, device=timesteps.device, dtype=torch.float32) / half
        # t in [0, 1] is scaled to [0, 1000] so the frequencies cover it as in DiT.
        angles = 1000.0 * timesteps.float()[:, None] * torch.exp(exponent)[None]
        frequencies = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        return self.linear_2(F.silu(self.linear_1(frequencies.to(self.linear_1.weight.dtype))))


class RankDiTGenePrior(nn.Embedding):
    """A per-gene bias over the rank tokens added to the logits, zero at initialisation."""


class RankDiTCellProfile(nn.Module):
    """Embedding of a cell's visible token profile: the share of each token 0..B among its visible positions, which
    tokens occur there, and the share (and log number) of its positions that are visible.

    Ties make a cell's tokens few and its own (count 1 is token 1, count 2 token 18 in one cell and 25 in another);
    the visible positions show which ones, and how deep the cell is.
    """

    def __init__(self, config: RankDiTConfig):
        super().__init__()
        self.num_rank_tokens = config.num_rank_tokens
        self.log_max_length = math.log1p(config.max_length)
        self.linear_1 = nn.Linear(2 * config.num_rank_tokens + 2, config.hidden_size)
        self.linear_2 = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor, visible: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        slots = torch.where(visible, input_ids, self.num_rank_tokens)  # masked and padding positions: a spare slot
        counts = torch.zeros(input_ids.shape[0], self.num_rank_tokens + 1, device=input_ids.device)
        counts = counts.scatter_add_(1, slots, torch.ones_like(slots, dtype=counts.dtype))[:, :-1]
        n_visible = counts.sum(dim=1, keepdim=True)
        n_real = real.sum(dim=1, keepdim=True).clamp(min=1).to(counts.dtype)
        features = torch.cat(
            [
                counts / n_visible.clamp(min=1),
                (counts > 0).to(counts.dtype),
                n_visible / n_real,
                torch.log1p(n_visible) / self.log_max_length,
            ],
            dim=1,
        )
        return self.linear_2(F.silu(self.linear_1(features.to(self.linear_1.weight.dtype))))


def control_drug_id(config: RankDiTConfig) -> int:
    """The id of the control drug among `config.conditions["drug"]`; 0 (the null drug) when there is none."""
    drugs = config.conditions["drug"]
    control = condition_value("drug", config.control_drug)
    return drugs.index(control) + 1 if control in drugs else 0


class RankDiTResidualEmbedding(nn.Embedding):
    """A table of per-value residuals beside shared features (a drug's own row beside its structure), zero at
    initialisation: a value never trained on stays at zero."""


@dataclass
class DrugStructure:
    """What a drug's structure tells the model, per cell (see [`RankDiTDrugStructure`])."""

    condition: torch.Tensor  # (batch, hidden): added to the drug's condition vector
    effect: torch.Tensor | None  # (batch, perturbation_effect_rank): added to the drug's effect factors
    residual: torch.Tensor  # (batch,) 1 where the drug's own parameters are read, 0 where dropped (training)


class RankDiTDrugStructure(nn.Module):
    """Drugs as molecules (`config.drug_feature_size`): each drug id's structure features (the `features` buffer,
    a row per id, zero for the null drug and a drug without structure), projected into the drug's condition vector
    and its explicit effect's factors (projections zero at initialisation). In training,
    `config.drug_residual_dropout` of the cells have their drug told by its structure alone; never the null drug
    (what guidance contrasts with), the control (what translation contrasts with) or a drug without structure."""

    def __init__(self, config: RankDiTConfig):
        super().__init__()
        self.control_id = control_drug_id(config)
        self.drug_column = list(config.conditions).index("drug")
        self.residual_dropout = config.drug_residual_dropout
        size, rank = config.drug_feature_size, config.perturbation_effect_rank
        self.register_buffer("features", torch.zeros(len(config.conditions["drug"]) + 1, size))
        self.to_condition = nn.Parameter(torch.zeros(size, config.hidden_size))
        self.to_effect = nn.Parameter(torch.zeros(size, rank)) if rank else None

    def forward(self, condition_ids: torch.Tensor) -> DrugStructure:
        drug = condition_ids[:, self.drug_column]
        features = self.features[drug].to(self.to_condition.dtype)
        residual = torch.ones(len(drug), device=drug.device)
        if self.training and self.residual_dropout > 0:
            droppable = (drug != 0) & (drug != self.control_id) & (self.features[drug] != 0).any(dim=1)
            dropped = droppable & (torch.rand(len(drug), device=drug.device) < self.residual_dropout)
            residual = residual.masked_fill(dropped, 0.0)
        effect = None if self.to_effect is None else features @ self.to_effect
        return DrugStructure(condition=features @ self.to_condition, effect=effect, residual=residual)


class RankDiTConditionEmbedding(nn.Module):
    """A cell's perturbation conditions as one vector added to the conditioning: a table per categorical condition
    of `config.conditions` (id 0: its learned null value) and, with `config.dose_condition`, a small MLP of
    (log10(dose + 1e-3), dose > 0), or a learned null vector where the dose is NaN (unknown or dropped). With drug
    structure, the drug's row is a residual (zero at the start) beside its structure's projection."""

    def __init__(self, config: RankDiTConfig):
        super().__init__()
        names = list(config.conditions or {})
        self.drug_column = names.index("drug") if config.drug_feature_size else None
        self.tables = nn.ModuleList(
            (RankDiTResidualEmbedding if column == self.drug_column else nn.Embedding)(
                len(config.conditions[name]) + 1, config.hidden_size
            )
            for column, name in enumerate(names)
        )
        self.dose = None
        if config.dose_condition:
            self.dose = nn.Sequential(
                nn.Linear(2, config.hidden_size), nn.SiLU(), nn.Linear(config.hidden_size, config.hidden_size)
            )
            self.dose_null = nn.Parameter(torch.zeros(config.hidden_size))

    def forward(
        self, condition_ids: torch.Tensor | None, doses: torch.Tensor | None, like: torch.Tensor,
        drug: DrugStructure | None = None,
    ):  # fmt: skip
        """`condition_ids` `(batch, n_conditions)` (None: all null), `doses` `(batch,)` in uM (None or NaN: null);
        `like` a `(batch, hidden)` tensor giving the batch size, device and dtype; `drug` the drug's structure."""
        vector = torch.zeros_like(like)
        if self.tables and condition_ids is None:
            condition_ids = torch.zeros(like.shape[0], len(self.tables), dtype=torch.long, device=like.device)
        for column, table in enumerate(self.tables):
            row = table(condition_ids[:, column])
            if drug is not None and column == self.drug_column:
                row = row * drug.residual[:, None].to(row.dtype) + drug.condition.to(row.dtype)
            vector = vector + row
        if self.dose is not None:
            if doses is None:
                doses = torch.full((like.shape[0],), float("nan"), device=like.device)
            known = torch.isfinite(doses)
            clean = torch.where(known, doses, torch.zeros_like(doses)).clamp(min=0)
            features = torch.stack([torch.log10(clean + 1e-3), (clean > 0).to(clean.dtype)], dim=-1)
            embedded = self.dose(features.to(like.dtype))
            vector = vector + torch.where(known[:, None], embedded, self.dose_null.to(like.dtype))
        return vector


class RankDiTGeneCondition(nn.Module):
    """Conditions that reach single genes (a gene x condition FiLM): position i gets `W (norm(gene_i) * norm(U c))`,
    its gene's embedding gating the cell's condition vector c, so a drug can move its own genes and not only the
    whole cell through the shared conditioning. Added to the hidden state (`"hidden"`) or to the output
    log-probabilities (`"logits"`, after the copy head: a shift of the gene's tokens the copied distributions cannot
    hide). The output layer starts at zero."""

    def __init__(self, config: RankDiTConfig):
        super().__init__()
        width = config.hidden_size if config.gene_condition == "hidden" else config.num_rank_tokens
        self.condition = nn.Linear(config.hidden_size, config.hidden_size)
        # Both factors normalised: embeddings start at std 0.02, and the product of two such would leave the
        # zero-initialised output layer with features of ~1e-4 to learn from.
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, elementwise_affine=False)
        self.out = RankDiTZeroLinear(config.hidden_size, width)

    def forward(self, genes: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """`genes` `(batch, length, hidden)` gene embeddings, `conditions` `(batch, hidden)` condition vectors."""
        return self.out(self.norm(genes) * self.norm(self.condition(conditions))[:, None, :])


# The dose (uM) a drug's Hill curve starts centred on: the middle of Tahoe-100M's doses.
REFERENCE_DOSE_UM = 0.5


class RankDiTPerturbationEffect(nn.Module):
    """A drug's effect as a move of each gene's tokens up or down the rank axis (`config.perturbation_effect_rank`).

    A cell told drug d at dose c, in context l (its other conditions together: the line, the plate), gets at gene g
    the shift `s = gate_d(c) (R_dg + <G_g, E_d * (1 + C_l)>)`, added to the output log-probabilities as
    `s (b / B - 1/2)` on token b (an exponential tilt: the gene's expected rank moves with the sign of s). R is a
    table of each drug's shift of each gene (its effect averaged over lines), G a free factor per gene, E one per
    drug, C one per context value (zero at the start, so an effect starts the same in every line), and gate_d a Hill
    curve of the dose, `c^n / (c^n + EC50^n)` with the drug's own EC50 and slope (1 without a dose condition). The
    control drug, the null drug and an unknown (or zero) dose move nothing, so a cell is its control plus the effect,
    and a dose-conditioned model told a drug without its dose gets the drug's effect only through the conditioning.
    Each drug's effect is learned from all its cells, every line and dose: one number per gene, where the whole
    distribution of a gene under every (line, drug, dose) is far more than a screen's cells pin down.
    """

    def __init__(self, config: RankDiTConfig):
        super().__init__()
        rank, names = config.perturbation_effect_rank, list(config.conditions)
        self.drug_column = names.index("drug")
        self.context_columns = [i for i, name in enumerate(names) if name not in PERTURBATION]
        drugs = config.conditions["drug"]
        self.control_id = control_drug_id(config)
        self.num_rank_bins, self.dose_condition = config.num_rank_bins, config.dose_condition
        self.gene_factors = nn.Parameter(torch.empty(config.gene_vocab_size, rank))
        self.drug_factors = nn.Parameter(torch.empty(len(drugs) + 1, rank))
        self.drug_genes = nn.Parameter(torch.empty(len(drugs) + 1, config.gene_vocab_size))
        self.context_factors = nn.ParameterList(
            nn.Parameter(torch.empty(len(config.conditions[names[i]]) + 1, rank)) for i in self.context_columns
        )
        # Per drug: log EC50 relative to REFERENCE_DOSE_UM and the log of the Hill slope.
        self.dose_response = nn.Parameter(torch.empty(len(drugs) + 1, 2))

    def reset_parameters(self) -> None:
        init.normal_(self.gene_factors, std=self.gene_factors.shape[1] ** -0.5)
        for factors in (self.drug_factors, self.drug_genes, *self.context_factors, self.dose_response):
            init.zeros_(factors)

    def gate(
        self, drug: torch.Tensor, doses: torch.Tensor | None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Each cell's share `(batch,)` of its drug's full effect, in float32: the Hill curve of its dose (1 without a
        dose condition), 0 for the control drug, the null drug and an unknown or zero dose. `residual` `(batch,)`:
        0 where the drug's own dose response is dropped (the curve it starts from)."""
        treated = ((drug != 0) & (drug != self.control_id)).float()
        if not self.dose_condition:
            return treated
        if doses is None:  # every dose unknown
            return torch.zeros_like(treated)
        known = torch.isfinite(doses) & (doses > 0)
        log_dose = torch.log(torch.where(known, doses, torch.ones_like(doses)).float())
        response = self.dose_response[drug].float()
        if residual is not None:
            response = response * residual[:, None]
        log_ec50, log_slope = response.unbind(dim=-1)
        hill = torch.sigmoid(log_slope.clamp(-5.0, 5.0).exp() * (log_dose - math.log(REFERENCE_DOSE_UM) - log_ec50))
        return treated * torch.where(known, hill, torch.zeros_like(hill))

    def forward(
        self, gene_ids: torch.Tensor, condition_ids: torch.Tensor, doses: torch.Tensor | None,
        structure: DrugStructure | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """The tilt `(batch, length, B + 1)`, in float32, to add to the output log-probabilities. With the drug's
        `structure`, E_d is its residual (dropped where `structure.residual` is 0, with R_d and the dose response)
        plus its structure's factors."""
        drug = condition_ids[:, self.drug_column]
        vector = self.drug_factors[drug].float()
        own_genes = self.drug_genes[drug[:, None], gene_ids].float()
        residual = None
        if structure is not None:
            residual = structure.residual
            vector = vector * residual[:, None] + structure.effect.float()
            own_genes = own_genes * residual[:, None]
        modulation = sum((factors[condition_ids[:, column]].float() for column, factors in
                          zip(self.context_columns, self.context_factors)), torch.zeros_like(vector))  # fmt: skip
        shift = torch.einsum("blr,br->bl", self.gene_factors[gene_ids].float(), vector * (1 + modulation))
        shift = (shift + own_genes) * self.gate(drug, doses, residual)[:, None]
        axis = torch.arange(self.num_rank_bins + 1, device=shift.device, dtype=torch.float32) / self.num_rank_bins
        return shift[..., None] * (axis - 0.5)


def reference_distribution(reference_tokens: torch.Tensor, num_rank_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(batch, length, k)` tokens of reference cells (-1: none) -> the share of each token 0..B among them at every
    position `(batch, length, B + 1)`, and where there is at least one `(batch, length)`."""
    valid = reference_tokens >= 0
    counts = torch.zeros(*reference_tokens.shape[:2], num_rank_tokens, device=reference_tokens.device)
    counts = counts.scatter_add_(-1, reference_tokens.long().clamp(min=0), valid.to(counts.dtype))
    present = valid.any(dim=-1)
    return counts / counts.sum(dim=-1, keepdim=True).clamp(min=1), present


class RankDiTReferenceEmbedding(nn.Module):
    """The distribution of the reference cells' tokens at a position, embedded and added to its hidden state
    (zero where the cell has no references; the output layer starts at zero, so training starts without them)."""

    def __init__(self, config: RankDiTConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.num_rank_tokens, config.hidden_size)
        self.linear_2 = RankDiTZeroLinear(config.hidden_size, config.hidden_size)

    def forward(self, distribution: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        hidden = self.linear_2(F.silu(self.linear_1(distribution.to(self.linear_1.weight.dtype))))
        return hidden * present[..., None].to(hidden.dtype)


class RankDiTCopyHead(nn.Module):
    """A pointer over the visible positions, mixed with the generated distribution.

    Position i puts weight on each visible position j (score q_i . k_j) and on a "generate" slot (score g . h_i),
    all under one softmax; its distribution is the weighted sum of the visible positions' one-hot tokens plus the
    generate weight times the softmax of the head's logits. A masked gene can so take the tokens the cell uses at
    genes the model finds similar. With reference cells, a "reference" slot (score r . h_i) adds the distribution
    of their tokens at the position. The query and the slot scores start at zero: at initialisation every visible
    position and every slot weigh the same.
    """

    def __init__(self, config: RankDiTConfig):
        super().__init__()
        self.num_rank_tokens = config.num_rank_tokens
        self.query = RankDiTZeroLinear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.generate_score = RankDiTZeroLinear(config.hidden_size, 1)
        self.reference_score = RankDiTZeroLinear(config.hidden_size, 1) if config.reference_context else None
        self.scaling = config.hidden_size**-0.5

    def forward(
        self,
        hidden_states: torch.Tensor,
        input_ids: torch.Tensor,
        visible: torch.Tensor,
        logits: torch.Tensor,
        reference: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        batch_size, length, hidden_size = hidden_states.shape
        n_tokens = self.num_rank_tokens
        # Slots beside the visible positions: each an extra key (a one-hot beyond the hidden size), scored by an
        # extra query feature, whose value is an extra channel: "generate", and "reference" with references.
        scores = [self.generate_score(hidden_states)]
        if reference is not None:
            scores.append(self.reference_score(hidden_states))
        n_slots = len(scores)
        # The projections run in the weights' dtype (or autocast's); the mixture is formed in float32.
        query = torch.cat([self.query(hidden_states), *(score / self.scaling for score in scores)], -1).float()
        key = F.pad(self.key(hidden_states).float(), (0, n_slots))
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            slot_keys = F.pad(torch.eye(n_slots, device=key.device), (hidden_size, 0)).expand(batch_size, -1, -1)
            # One-hot by scatter: F.one_hot checks its input's range on the host, a sync on an accelerator.
            tokens = input_ids.clamp(max=n_tokens - 1).unsqueeze(-1)
            value = key.new_zeros(batch_size, length, n_tokens + n_slots).scatter_(-1, tokens, 1.0)
            value = value * visible[..., None]
            slot_values = F.pad(torch.eye(n_slots, device=key.device), (n_tokens, 0)).expand(batch_size, -1, -1)
            allowed = [visible, visible.new_ones(batch_size, 1)]
            if reference is not None:  # a cell without references cannot draw from the slot
                allowed.append(reference[1].any(dim=1, keepdim=True))
            keys = torch.cat(allowed, dim=1)[:, None, None, :]
            # SDPA's fused kernels take one head size for queries, keys and values (else it falls back to the
            # slower math path, 1.5x on the CPU): the narrower side is padded with zeros, which change no score
            # and no mixture.
            query, key, value = equal_head_sizes(
                query, torch.cat([key, slot_keys], dim=1), torch.cat([value, slot_values], dim=1)
            )
            mixture = F.scaled_dot_product_attention(
                query[:, None], key[:, None], value[:, None], attn_mask=keys, scale=self.scaling
            )[:, 0, :, : n_tokens + n_slots]
            generated = F.softmax(logits.float(), dim=-1)
            probs = mixture[..., :n_tokens] + mixture[..., n_tokens : n_tokens + 1] * generated
            if reference is not None:
                distribution, present = reference
                # A position without references in a cell with some puts its slot weight on the generated tokens.
                drawn = torch.where(present[..., None], distribution.float(), generated)
                probs = probs + mixture[..., n_tokens + 1 :] * drawn
            return probs.clamp(min=1e-30).log()


class RankDiTAttention(nn.Module):
    """Bidirectional multi-head self-attention through the configured attention implementation."""

    is_causal = False

    def __init__(self, config: RankDiTConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        batch_size, length, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(batch_size, length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, _ = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.config.attention_dropout if self.training else 0.0,
        )
        return self.o_proj(attn_output.reshape(batch_size, length, -1))


class RankDiTMLP(nn.Module):
    def __init__(self, config: RankDiTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class RankDiTBlock(GradientCheckpointingLayer):
    """Pre-norm DiT block with adaLN-Zero modulation of attention and MLP."""

    def __init__(self, config: RankDiTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, elementwise_affine=False)
        self.attn = RankDiTAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, elementwise_affine=False)
        self.mlp = RankDiTMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.adaLN_modulation = RankDiTZeroLinear(config.hidden_size, 6 * config.hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, conditioning: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(
            F.silu(conditioning)
        ).chunk(6, dim=-1)
        attn_output = self.attn(modulate(self.norm1(hidden_states), shift_msa, scale_msa), attention_mask)
        hidden_states = hidden_states + gate_msa.unsqueeze(1) * self.dropout(attn_output)
        mlp_output = self.mlp(modulate(self.norm2(hidden_states), shift_mlp, scale_mlp))
        return hidden_states + gate_mlp.unsqueeze(1) * self.dropout(mlp_output)


class RankDiTPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading for RankDiT models."""

    config_class = RankDiTConfig
    config: RankDiTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RankDiTBlock"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        if isinstance(module, RankDiTZeroLinear):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, (RankDiTGenePrior, RankDiTResidualEmbedding)):
            init.zeros_(module.weight)
        elif isinstance(module, RankDiTDrugStructure):
            init.zeros_(module.features)
            init.zeros_(module.to_condition)
            if module.to_effect is not None:
                init.zeros_(module.to_effect)
        elif isinstance(module, RankDiTConditionEmbedding) and module.dose is not None:
            init.zeros_(module.dose_null)
        elif isinstance(module, RankDiTPerturbationEffect):
            module.reset_parameters()


class RankDiTModel(RankDiTPreTrainedModel):
    """The RankDiff denoiser: logits over rank tokens 0..B at every (gene, token) position.

    The input embedding is the sum of a rank-token embedding (0..B and `[MASK]`) and a gene embedding; there is no
    positional encoding. Everything between a user's cells and these tensors (gene names, counts, windows, checks)
    is the [`RankDiTProcessor`]'s.

    Examples:

    ```python
    >>> import torch
    >>> from modeling import RankDiTConfig, RankDiTModel

    >>> model = RankDiTModel(RankDiTConfig.from_preset("tiny", gene_vocab_size=100))
    >>> gene_ids = torch.tensor([[5, 17, 42]])
    >>> input_ids = torch.tensor([[3, 51, 0]])  # 51 = [MASK]
    >>> model(gene_ids=gene_ids, input_ids=input_ids).logits.shape
    torch.Size([1, 3, 51])
    ```
    """

    def __init__(self, config: RankDiTConfig):
        super().__init__(config)
        self.rank_embedding = nn.Embedding(config.num_rank_bins + 2, config.hidden_size)
        self.gene_embedding = nn.Embedding(config.gene_vocab_size, config.hidden_size)
        # The conditioning every cell shares; the cell's profile, conditions and the time are added to it.
        self.base_conditioning = nn.Embedding(1, config.hidden_size)
        self.time_embedding = RankDiTTimestepEmbedding(config.hidden_size) if config.time_conditioning else None
        self.cell_profile = RankDiTCellProfile(config) if config.cell_profile else None
        conditioned = bool(config.conditions) or config.dose_condition
        self.condition_embedding = RankDiTConditionEmbedding(config) if conditioned else None
        self.gene_condition = RankDiTGeneCondition(config) if conditioned and config.gene_condition else None
        self.perturbation_effect = RankDiTPerturbationEffect(config) if config.perturbation_effect_rank else None
        self.drug_structure = RankDiTDrugStructure(config) if config.drug_feature_size else None
        self.blocks = nn.ModuleList(RankDiTBlock(config) for _ in range(config.num_hidden_layers))
        self.norm_out = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, elementwise_affine=False)
        self.adaLN_out = RankDiTZeroLinear(config.hidden_size, 2 * config.hidden_size)
        self.proj_out = RankDiTZeroLinear(config.hidden_size, config.num_rank_tokens)
        self.gene_prior = (
            RankDiTGenePrior(config.gene_vocab_size, config.num_rank_tokens) if config.gene_prior else None
        )
        self.copy_head = RankDiTCopyHead(config) if config.copy_head else None
        self.reference_embedding = RankDiTReferenceEmbedding(config) if config.reference_context else None
        self.post_init()

    def _check_conditions(self, condition_ids, doses, batch_size: int) -> None:
        config = self.config
        if self.condition_embedding is None:
            if condition_ids is not None or doses is not None:
                raise ValueError("this model has no conditions (config.conditions, config.dose_condition)")
            return
        if doses is not None and (not config.dose_condition or tuple(doses.shape) != (batch_size,)):
            raise ValueError(f"doses must be (batch,) = ({batch_size},) for a dose-conditioned model")
        if doses is not None:  # NaN: an unknown dose
            _refuse(doses.isinf() | (doses < 0), doses, "doses must be numbers >= 0 in uM (NaN: unknown)")
        if condition_ids is None:
            return
        names = list(config.conditions or {})
        if tuple(condition_ids.shape) != (batch_size, len(names)):
            raise ValueError(f"condition_ids must be (batch, {len(names)}) for the conditions {names}")
        for column, name in enumerate(names):
            values = condition_ids[:, column : column + 1]
            check_ids(f"condition_ids of {name!r}", values, len(config.conditions[name]))

    def _check_reference(self, reference_tokens, input_ids) -> None:
        if reference_tokens is None:
            return
        if self.reference_embedding is None:
            raise ValueError("this model reads no reference cells (config.reference_context is False)")
        if reference_tokens.dim() != 3 or reference_tokens.shape[:2] != input_ids.shape:
            raise ValueError(
                f"reference_tokens must be (batch, length, k) with (batch, length) = {tuple(input_ids.shape)}, got "
                f"{tuple(reference_tokens.shape)}"
            )
        check_ids(
            "reference_tokens",
            reference_tokens.flatten(1),
            self.config.num_rank_bins,
            reference_tokens.flatten(1) >= 0,
        )

    def _check_inputs(self, gene_ids, input_ids, attention_mask, timesteps):
        for name, ids in (("gene_ids", gene_ids), ("input_ids", input_ids)):
            if not isinstance(ids, torch.Tensor):
                raise TypeError(f"{name} must be a torch.LongTensor (batch, length), got {type(ids).__name__}")
        if gene_ids.dim() != 2 or gene_ids.shape != input_ids.shape:
            raise ValueError(
                f"gene_ids and input_ids must both be (batch, length); got {tuple(gene_ids.shape)} and "
                f"{tuple(input_ids.shape)}"
            )
        if gene_ids.numel() == 0:
            raise ValueError(f"gene_ids must hold at least one cell of at least one gene, got {tuple(gene_ids.shape)}")
        if timesteps is not None:
            shape = tuple(timesteps.shape) if isinstance(timesteps, torch.Tensor) else type(timesteps).__name__
            if shape != (gene_ids.shape[0],):
                raise ValueError(f"timesteps must be a tensor of shape (batch,) = ({gene_ids.shape[0]},), got {shape}")
            _refuse(~((timesteps >= 0) & (timesteps <= 1)), timesteps, "timesteps must be times in [0, 1]")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must match input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
            )
        if self.time_embedding is not None and timesteps is None:
            raise ValueError("this model is time-conditioned (config.time_conditioning): pass `timesteps`")
        attended = None if attention_mask is None else attention_mask.bool()
        check_ids("gene_ids", gene_ids, self.config.gene_vocab_size - 1, attended)
        check_ids("input_ids", input_ids, self.config.mask_token_id, attended)

    def forward(
        self,
        gene_ids: torch.LongTensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        condition_ids: torch.LongTensor | None = None,
        doses: torch.Tensor | None = None,
        reference_tokens: torch.LongTensor | None = None,
        return_dict: bool = True,
    ) -> RankDiTOutput | tuple[torch.Tensor, torch.Tensor]:
        r"""
        Args:
            gene_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Gene token ids of each position (ids of the model's gene vocabulary); any value (the processor puts
                0, or -1 for a gene left out) where `attention_mask` is 0.
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Rank tokens: 0 (not expressed), 1..B (quantile bins) or `config.mask_token_id` (`[MASK]`).
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for real positions, 0 for padding. Padding never changes the logits of real positions.
            timesteps (`torch.Tensor` of shape `(batch_size,)`, *optional*):
                Diffusion time in [0, 1]; required when `config.time_conditioning`, ignored otherwise.
            condition_ids (`torch.LongTensor` of shape `(batch_size, len(config.conditions))`, *optional*):
                Each cell's id of each condition of `config.conditions` (0: null). None: every condition null.
            doses (`torch.Tensor` of shape `(batch_size,)`, *optional*):
                Each cell's dose in uM, NaN for null (`config.dose_condition`). None: every dose null.
            reference_tokens (`torch.LongTensor` of shape `(batch_size, sequence_length, k)`, *optional*):
                With `config.reference_context`: at each position, the tokens of the cell's k nearest reference
                cells at its gene, in the cell's own token scale, -1 for none (a `ReferenceCells` index gives them).
                None: no references.
            return_dict (`bool`, *optional*, defaults to `True`):
                Return a [`RankDiTOutput`] instead of a tuple.

        Returns:
            [`RankDiTOutput`] with `logits` of shape `(batch_size, sequence_length, num_rank_bins + 1)`.
        """
        self._check_inputs(gene_ids, input_ids, attention_mask, timesteps)
        self._check_conditions(condition_ids, doses, input_ids.shape[0])
        self._check_reference(reference_tokens, input_ids)
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if attention_mask is not None:  # unattended positions may hold anything (-1: a gene left out): read them as 0
            gene_ids, input_ids = gene_ids.masked_fill(~real, 0), input_ids.masked_fill(~real, 0)
        genes = self.gene_embedding(gene_ids)
        hidden_states = self.rank_embedding(input_ids) + genes
        reference = None
        if reference_tokens is not None:
            reference = reference_distribution(reference_tokens.masked_fill(~real[..., None], -1),
                                               self.config.num_rank_tokens)  # fmt: skip
            hidden_states = hidden_states + self.reference_embedding(*reference)
        visible = real & (input_ids != self.config.mask_token_id)
        conditioning = self.base_conditioning.weight.expand(input_ids.shape[0], -1)
        condition_vector = None
        if self.cell_profile is not None:
            conditioning = conditioning + self.cell_profile(input_ids, visible, real)
        structure = None
        if self.drug_structure is not None and condition_ids is not None:
            structure = self.drug_structure(condition_ids)
        if self.condition_embedding is not None:
            condition_vector = self.condition_embedding(condition_ids, doses, conditioning, structure)
            conditioning = conditioning + condition_vector
            if self.gene_condition is not None and self.config.gene_condition == "hidden":
                hidden_states = hidden_states + self.gene_condition(genes, condition_vector)
        if self.time_embedding is not None:
            conditioning = conditioning + self.time_embedding(
                timesteps.to(hidden_states.device).expand(input_ids.shape[0])
            )
        if attention_mask is None or self.config._attn_implementation in ("sdpa", "eager"):
            # The key-padding mask as given, on every device: transformers would first check it for padding on the
            # host (a sync); callers pass attention_mask=None for a batch without padding (the processor knows).
            mask = None if attention_mask is None else key_padding_mask(real)
        else:
            mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask
            )
        for block in self.blocks:
            hidden_states = block(hidden_states, conditioning, mask)
        shift, scale = self.adaLN_out(F.silu(conditioning)).chunk(2, dim=-1)
        output_states = modulate(self.norm_out(hidden_states), shift, scale)
        logits = self.proj_out(output_states).float()
        if self.gene_prior is not None:
            logits = logits + self.gene_prior(gene_ids).float()
        if self.copy_head is not None:
            logits = self.copy_head(output_states, input_ids, visible, logits, reference)
        if self.gene_condition is not None and self.config.gene_condition == "logits":
            logits = logits + self.gene_condition(genes, condition_vector).float()
        if self.perturbation_effect is not None and condition_ids is not None:
            logits = logits + self.perturbation_effect(gene_ids, condition_ids, doses, structure)
        if not return_dict:
            return logits, hidden_states
        return RankDiTOutput(logits=logits, last_hidden_state=hidden_states)

    @torch.no_grad()
    def init_gene_prior(self, probabilities: np.ndarray | torch.Tensor) -> None:
        """Start the per-gene prior at given per-gene token probabilities (`(gene_vocab_size, B + 1)`, e.g. the
        per-gene marginal of the training cells), so the generated distribution starts from them instead of
        uniform logits (with the copy head, mixed with the visible tokens)."""
        if self.gene_prior is None:
            raise ValueError("this model has no gene prior (config.gene_prior is False)")
        probabilities = torch.as_tensor(probabilities, dtype=torch.float64)
        expected = tuple(self.gene_prior.weight.shape)
        if tuple(probabilities.shape) != expected:
            raise ValueError(f"probabilities must have shape {expected}, got {tuple(probabilities.shape)}")
        log_probs = probabilities.clamp(min=1e-12).log()
        self.gene_prior.weight.copy_((log_probs - log_probs.mean(dim=1, keepdim=True)).to(self.gene_prior.weight))

    @torch.no_grad()
    def init_drug_shifts(self, shifts: np.ndarray | torch.Tensor) -> None:
        """Start each drug's per-gene shift of the perturbation effect at `shifts` (`(len(drugs) + 1,
        gene_vocab_size)`, e.g. estimated from the training cells), so the model starts from each drug's average
        effect."""
        if self.perturbation_effect is None:
            raise ValueError("this model has no perturbation effect (config.perturbation_effect_rank is 0)")
        table = self.perturbation_effect.drug_genes
        shifts = torch.as_tensor(np.asarray(shifts), dtype=table.dtype)
        if tuple(shifts.shape) != tuple(table.shape):
            raise ValueError(f"shifts must have shape {tuple(table.shape)}, got {tuple(shifts.shape)}")
        table.copy_(shifts)

    @torch.no_grad()
    def init_drug_features(self, features: np.ndarray | torch.Tensor) -> None:
        """Set each drug's structure features, `(len(drugs), drug_feature_size)` in the order of
        `config.conditions["drug"]` (e.g. Morgan fingerprint bits; all zero: a drug without structure), each row
        scaled to unit norm so that two drugs' dot product is their cosine similarity."""
        if self.drug_structure is None:
            raise ValueError("this model has no drug structure (config.drug_feature_size is 0)")
        buffer = self.drug_structure.features
        features = torch.as_tensor(np.asarray(features), dtype=torch.float32)
        if tuple(features.shape) != (buffer.shape[0] - 1, buffer.shape[1]):
            raise ValueError(f"features must have shape {(buffer.shape[0] - 1, buffer.shape[1])} (drug x feature), "
                             f"got {tuple(features.shape)}")  # fmt: skip
        buffer[1:] = (features / features.norm(dim=1, keepdim=True).clamp(min=1e-12)).to(buffer)

    @torch.no_grad()
    def init_gene_embedding(self, genes: np.ndarray, vectors: np.ndarray) -> None:
        """Start the embeddings of `genes` at `vectors` (`(len(genes), k)`, k <= hidden_size, e.g. principal-axis
        loadings of the training cells' expression, so co-varying genes start close), scaled to the initialiser's
        standard deviation; the other dimensions and genes keep their random start."""
        vectors = torch.as_tensor(np.asarray(vectors), dtype=torch.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(genes) or vectors.shape[1] > self.config.hidden_size:
            raise ValueError(
                f"vectors must be (len(genes), k <= {self.config.hidden_size}), got {tuple(vectors.shape)} for "
                f"{len(genes)} genes"
            )
        weight = self.gene_embedding.weight
        scaled = vectors / vectors.std().clamp(min=1e-12) * self.config.initializer_range
        weight[torch.as_tensor(np.asarray(genes)), : vectors.shape[1]] = scaled.to(weight)
