# Copyright 2026 The RankDiff authors. Licensed under the Apache License, Version 2.0.
"""`MaskedRankDiffusionPipeline`: impute, denoise and generate cells' rank tokens with a RankDiT denoiser.

This file holds the sampling; AnnData in and out is `anndata_io.py`'s, the export `export.py`'s, the reference cells
`reference_cells.py`'s. They import only torch, numpy, tqdm, huggingface_hub and diffusers (scipy, scikit-learn,
pandas and anndata on demand), so a saved pipeline folder carries them as remote code:
`DiffusionPipeline.from_pretrained(path, trust_remote_code=True)`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput, logging, replace_example_docstring
from torch.nn import functional as F

from .anndata_io import read_reference, run_generation, run_imputation
from .export import save_pipeline_folder
from .reference_cells import ReferenceCells
from .scheduling_masked_rank_diffusion import is_positive_int, is_real_number

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("ranks", "probs", "expected")
# One cell's genes (token ids, Ensembl ids or symbols; a list, an array, a tensor or a pandas Index), or per-gene
# values; a batch is a sequence of them or a 2-D array.
CellValues = Sequence | np.ndarray | torch.Tensor

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers import DiffusionPipeline

        >>> pipe = DiffusionPipeline.from_pretrained("outputs/demo", trust_remote_code=True)
        >>> out = pipe(
        ...     gene_ids=[["CD3E", "MS4A1", "LYZ", "NKG7"]],
        ...     ranks=[[12, 0, 50, 3]],
        ...     mask=[[False, True, True, False]],
        ...     generator=torch.Generator().manual_seed(0),
        ... )
        >>> out.ranks  # the masked positions sampled, the others as given

        >>> # A perturbation-conditioned checkpoint: generate whole cells of a gene list for a condition
        >>> out = pipe(
        ...     gene_ids=[genes] * 100,
        ...     conditions={"cell_line_id": "CVCL_0480", "drug": "Bortezomib", "dose": 0.5},
        ...     guidance_scale=2.0,
        ... )
        ```
"""


TRANSLATION_BLOCKS = 2  # blocks of genes translated in turn (validation pairs: 2, 4 and 64 alike)


def quantile_coupling(told: torch.Tensor, vehicle: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Carry control tokens to a condition, quantile to quantile: the distribution `(..., B + 1)` of the token a
    position takes under the condition, given its control token x (`tokens` `(...)`) and the model's distributions
    of the position under the condition (`told`, p) and under the control (`vehicle`, q).

    x is the quantile u of q for u uniform in (Q(x - 1), Q(x)] (Q: q's cumulative distribution); the new token is
    p's quantile at u, so its probability of b is the overlap of (P(b - 1), P(b)] with that interval, over its
    length. Where p = q the token stays x; the coupling keeps each cell's rank among cells, as the drug moves the
    distribution. Where q gives x no mass (a token the model deems impossible under the control), p itself.
    """
    # Each normalised in float64, so both cumulative distributions end at 1 and a float32 sum just short of it
    # cannot leave the top token's interval past the last step of p.
    told, vehicle = (d.double() / d.double().sum(dim=-1, keepdim=True).clamp(min=1e-300) for d in (told, vehicle))
    x = tokens.clamp(0, told.shape[-1] - 1).long()[..., None]
    high = vehicle.cumsum(dim=-1).gather(-1, x)
    low = high - vehicle.gather(-1, x)
    told_cdf = told.cumsum(dim=-1)
    told_cdf[..., -1] = high[..., 0].clamp(min=1.0)
    overlap = (torch.minimum(told_cdf, high) - torch.maximum(told_cdf - told, low)).clamp(min=0)
    mass = overlap.sum(dim=-1, keepdim=True)
    coupled = torch.where(mass > 1e-12, overlap / mass.clamp(min=1e-300), told)
    return coupled.float()


class Translation(NamedTuple):
    """Control cells carried to their conditions ([`MaskedRankDiffusionPipeline`] with `control_counts`)."""

    ranks: np.ndarray | None  # drawn tokens `(n_cells, width)` (-1 where the model saw nothing), for "ranks"
    probs: torch.Tensor | None  # else every position's distribution `(n_cells, width, B + 1)`
    calls: torch.Tensor  # denoiser calls per cell
    picks: np.ndarray  # one uniform draw per position, picking a moved gene's count (zeros but for "ranks")


@dataclass
class MaskedRankDiffusionPipelineOutput(BaseOutput):
    """Output of [`MaskedRankDiffusionPipeline`], padded to the longest cell (see `attention_mask`).

    Args:
        ranks (`np.ndarray` of shape `(n_cells, length)`, *optional*): rank tokens 0..B, the given ones kept and
            the masked ones sampled (`output_type="ranks"`); -1 at padding and at genes left out.
        probs (`np.ndarray` of shape `(n_cells, length, B + 1)`, *optional*): the model's predictive distribution
            over 0..B at every position given the visible tokens (one-hot where visible; `output_type="probs"`).
        expected (`np.ndarray` of shape `(n_cells, length)`, *optional*): the expected rank under `probs`
            (`output_type="probs"` or `"expected"`).
        mask (`np.ndarray` of shape `(n_cells, length)`): True at the positions that were predicted.
        gene_ids (`np.ndarray` of shape `(n_cells, length)`): the gene token ids of each position (0 at padding,
            -1 at genes outside the vocabulary left out with `unknown_genes="ignore"`).
        attention_mask (`np.ndarray` of shape `(n_cells, length)`): True at the positions the model saw.
        model_calls (`np.ndarray` of shape `(n_cells,)`): denoiser evaluations of each cell.
        counts (`np.ndarray` of shape `(n_cells, length)`, *optional*): with `control_counts` (and
            `output_type="ranks"`), the translated cells' raw counts: a gene that keeps its control token keeps its
            control count, one moved to token b takes a count its own cell holds at b (0 at b = 0); NaN where `ranks`
            is -1.
    """

    ranks: np.ndarray | None
    probs: np.ndarray | None
    expected: np.ndarray | None
    mask: np.ndarray
    gene_ids: np.ndarray
    attention_mask: np.ndarray
    model_calls: np.ndarray
    counts: np.ndarray | None = None


class MaskedRankDiffusionPipeline(DiffusionPipeline):
    r"""Fill masked rank tokens of cells, or generate whole cells, with a masked-diffusion denoiser.

    Components:
        model ([`RankDiTModel`]): the denoiser.
        scheduler ([`MaskedRankDiffusionScheduler`]): the noise schedule and samplers.
        processor ([`RankDiTProcessor`]): gene vocabulary, rank rule, checks, windows, distributions.
        reference ([`ReferenceCells`], *optional*): the cells a model with `config.reference_context` reads beside
            each cell (its nearest ones on its visible genes); saved with the pipeline.
    """

    model_cpu_offload_seq = "model"
    _optional_components = ["reference"]
    _callback_tensor_inputs = ["sample", "logits", "cell", "position"]

    def __init__(self, model, scheduler, processor, reference=None):
        super().__init__()
        scheduler.check_model_config(model.config)
        processor.check_model_config(model.config)
        self._check_reference(model.config, reference)
        self.register_modules(model=model, scheduler=scheduler, processor=processor, reference=reference)

    @staticmethod
    def _check_reference(config, reference) -> None:
        if reference is None:
            return
        if not config.reference_context:
            raise ValueError("this model reads no reference cells (config.reference_context is False)")
        if reference.config.num_rank_bins != config.num_rank_bins:
            raise ValueError(f"the reference's num_rank_bins ({reference.config.num_rank_bins}) is not the "
                             f"model's ({config.num_rank_bins})")  # fmt: skip
        if len(reference.gene_ids) and int(reference.gene_ids.max()) >= config.gene_vocab_size:
            raise ValueError("the reference's gene ids are outside the model's vocabulary")

    def make_reference(self, adata, *, layer: str | None = None, gene_column: str | None = None,
                       max_cells: int | None = 2048, seed: int = 0) -> ReferenceCells:  # fmt: skip
        """A [`ReferenceCells`] of a user's own cells, from an AnnData of raw counts (genes as symbols or Ensembl
        ids in `var_names` or `var[gene_column]`): up to `max_cells` of them, a seeded draw, each tokenized whole.
        Pass it (or the AnnData itself) as `reference=` to a call, or set `pipe.reference` to keep it."""
        if not self.model.config.reference_context:
            raise ValueError("reference: this model reads no reference cells (config.reference_context is False)")
        return read_reference(self, adata, layer=layer, gene_column=gene_column, max_cells=max_cells, seed=seed)

    def resolve_reference(self, reference) -> ReferenceCells | None:
        """The reference a call reads: `None` the pipeline's own, `False` none, an AnnData of raw counts through
        [`make_reference`], or a [`ReferenceCells`]."""
        if reference is None:
            return self.reference if self.model.config.reference_context else None
        if reference is False:
            return None
        if not self.model.config.reference_context:
            raise ValueError("reference: this model reads no reference cells (config.reference_context is False)")
        if hasattr(reference, "obs") and hasattr(reference, "var"):
            reference = self.make_reference(reference)
        # Duck-typed: remote code may load the class twice (the folder's root and `reference/`), as two classes.
        if not callable(getattr(reference, "context", None)):
            raise TypeError(f"reference must be an AnnData of raw counts, a ReferenceCells, False or None; got "
                            f"{type(reference).__name__}")  # fmt: skip
        self._check_reference(self.model.config, reference)
        return reference.to(self._execution_device)

    def check_inputs(
        self,
        mask,
        mask_ratio,
        num_inference_steps,
        temperature,
        top_p,
        batch_size,
        generator,
        output_type,
        callback_on_step_end_tensor_inputs,
        guidance_scale=1.0,
        use_cache=True,
        return_dict=True,
        callback_on_step_end=None,
    ) -> None:
        """Raise a clear error for any argument the call cannot use (the cells are checked by the processor)."""
        for name, value in (("use_cache", use_cache), ("return_dict", return_dict)):
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if mask_ratio is not None and mask is not None:
            raise ValueError("give mask or mask_ratio, not both")
        if mask_ratio is not None and not (is_real_number(mask_ratio) and 0.0 < mask_ratio <= 1.0):
            raise ValueError(f"mask_ratio must be a number in (0, 1], got {mask_ratio!r}")
        for name, value in (("num_inference_steps", num_inference_steps), ("batch_size", batch_size)):
            if not is_positive_int(value):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (is_real_number(temperature) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.processor.check_guidance_scale(guidance_scale)
        if not (is_real_number(top_p) and 0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), got "
                f"{type(generator).__name__}"
            )
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(f"callback_on_step_end must be callable, got {type(callback_on_step_end).__name__}")
        inputs = callback_on_step_end_tensor_inputs
        if not isinstance(inputs, (list, tuple)) or not all(isinstance(name, str) for name in inputs):
            raise TypeError(f"callback_on_step_end_tensor_inputs must be a list of names, got {inputs!r}")
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {sorted(unknown)} are not among {self._callback_tensor_inputs}"
            )

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        gene_ids: CellValues,
        ranks: CellValues | None = None,
        mask: CellValues | None = None,
        mask_ratio: float | None = None,
        counts: CellValues | None = None,
        context_counts: CellValues | None = None,
        control_counts: CellValues | None = None,
        unknown_genes: str = "raise",
        conditions: dict | list[dict] | None = None,
        guidance_scale: float = 1.0,
        reference=None,
        num_inference_steps: int | None = None,
        sampler: str | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        batch_size: int = 64,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        output_type: str = "ranks",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["sample"],  # noqa: B006 (diffusers' signature)
    ) -> MaskedRankDiffusionPipelineOutput | tuple:
        r"""Impute the masked positions of cells, denoise them, or generate whole cells.

        Args:
            gene_ids: the genes of one cell (a flat sequence) or of several (a sequence of sequences or a 2-D
                array): token ids, Ensembl ids or symbols of the checkpoint's vocabulary; a pandas `Index` works.
            ranks: rank tokens, integers in 0..B, at the same positions; None (and no `counts`) generates every
                position.
            mask: booleans, True at the positions to generate, False where the given rank is kept.
            mask_ratio (`float`, *optional*): instead of `mask`, mask this share of each cell's genes at random.
            counts: raw counts instead of `ranks`, tokenized with the checkpoint's own rule over each cell's visible
                counts (masked ones never shape the visible tokens). Give whole cells: any number of genes, shown
                to the model in windows of random genes when a cell is longer than the model's length.
            context_counts: with `counts` (or `control_counts`) of part of a cell, the counts of its other genes, so
                its quantile bins are those of the whole cell, as in training (a warning says when a cell looks like
                a part).
            control_counts: translate control cells: the raw counts of one control (vehicle) cell per output cell
                at `gene_ids` (whole cells, or part with `context_counts`), for a model conditioned on a drug with
                its control drug (`config.control_drug`); the output cells are those cells under `conditions`.
                Each cell's genes are dealt at random into `num_inference_steps` blocks (2 by default); with a
                block masked, the model gives each of its genes a distribution from the rest of the control cell
                twice, under `conditions` (p) and under the control drug in the same context (q), and the gene's
                control token is carried from its quantile of q to the same quantile of p ([`quantile_coupling`]):
                a gene the conditions do not move keeps its token, the others move as far as the conditions shift
                their distribution. The output's `counts` are the translated cells' raw counts (a gene keeps its
                count, or takes one its cell holds at its new token). Not with `ranks` / `counts` / `mask`, nor a
                callback (there are no steps).
            unknown_genes (`str`, defaults to `"raise"`): `"ignore"` leaves genes outside the vocabulary out of
                the model's input (gene id -1 in the output) instead of refusing the cell.
            conditions (`dict` or `list[dict]`, *optional*): for a perturbation-conditioned checkpoint
                (`model.config.conditions`), the cells' conditions: one dict for every cell, e.g.
                `{"cell_line_id": "CVCL_0480", "drug": "Bortezomib", "dose": 0.5}` (dose in uM), or a list of one
                dict per cell; a condition left out is unknown (its learned null). An unknown value is an error
                naming the known ones. None: unconditional.
            guidance_scale (`float`, defaults to 1.0): classifier-free guidance on the log-probabilities at every
                step, `log p(x | null) + w (log p(x | c) - log p(x | null))`: 1 is the conditional model, 0 the
                unconditional one, above 1 sharpens the conditions' effect (two denoiser passes per step).
            reference (*optional*): for a model that reads reference cells (`model.config.reference_context`), the
                cells each cell's nearest ones are found among (on its visible genes, once, before denoising): None
                the pipeline's own (`pipe.reference`, saved with it: a sample of the training cells, or a screen's
                control cells by line, of which a cell reads its line's), an AnnData of raw counts (a user's own
                cells, read by [`make_reference`]), a [`ReferenceCells`], or False for none.
            num_inference_steps (`int`, *optional*): denoising steps (first-hitting: one per masked token), 64 by
                default; with `control_counts`, the blocks of genes translated in turn, 2 by default.
            sampler (`str`, *optional*): `"ancestral"`, `"first-hitting"` or `"confidence"`; the scheduler's
                configured sampler by default.
            temperature (`float`, defaults to 1.0), top_p (`float`, defaults to 1.0): reshape the model's
                distribution before each draw.
            batch_size (`int`, defaults to 64): windows (cells, or parts of cells longer than the model's length)
                denoised together; the output does not depend on it.
            use_cache (`bool`, defaults to `True`): reuse a window's last model output while none of its tokens
                changed (only for models without time conditioning). Costs one host sync per step; turn it off on
                a GPU with many masked genes per step.
            generator (`torch.Generator`, *optional*): seeds every draw; the same seed gives the same output.
            output_type (`str`, defaults to `"ranks"`): `"ranks"` samples the masked tokens; `"probs"` returns the
                predictive distribution at every position from one denoiser pass (and the expected ranks);
                `"expected"` returns only the expected ranks.
            return_dict (`bool`, defaults to `True`): return a [`MaskedRankDiffusionPipelineOutput`], else a tuple.
            callback_on_step_end (`Callable`, *optional*): called as `fn(pipe, step, timestep, callback_kwargs)`
                after every step with the tensors named in `callback_on_step_end_tensor_inputs`, for up to
                `batch_size` windows; a returned `"sample"` replaces the tokens the next step starts from.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["sample"]`): among `"sample"` (the tokens
                after the step), `"logits"` (the model's output it drew from), `"cell"` (the cell of each window) and
                `"position"` (the cell position of each window position, -1 at padding).

        Examples:

        Returns:
            [`MaskedRankDiffusionPipelineOutput`] or `tuple`: the sampled ranks, or the distributions and expected
            ranks, with the mask, gene ids and attention mask of every cell, and the denoiser calls per cell.
        """
        translating = control_counts is not None
        if num_inference_steps is None:
            num_inference_steps = TRANSLATION_BLOCKS if translating else 64
        self.check_inputs(
            mask, mask_ratio, num_inference_steps, temperature, top_p, batch_size, generator, output_type,
            callback_on_step_end_tensor_inputs, guidance_scale, use_cache, return_dict, callback_on_step_end,
        )  # fmt: skip
        self.processor.warn_if_guidance_unused(guidance_scale, conditions, self.model.config)
        drawing = {"sampler": sampler, "temperature": temperature, "top_p": top_p}
        if translating or output_type != "ranks":  # nothing is drawn by the scheduler
            given = {**drawing, **({} if translating else {"num_inference_steps": num_inference_steps})}
            ignored = [name for name, value in given.items() if value != {"sampler": None, "temperature": 1.0,
                       "top_p": 1.0, "num_inference_steps": 64}[name]]  # fmt: skip
            if ignored:
                what = (
                    "control_counts translates without the scheduler"
                    if translating
                    else (f"output_type={output_type!r} is one denoiser pass")
                )
                logger.warning("%s: %s only shape sampling and are ignored", what, ignored)
        if translating:
            if callback_on_step_end is not None:
                raise ValueError("control_counts translates without denoising steps: callback_on_step_end has "
                                 "nothing to be called at")  # fmt: skip
            cells = self._control_cells(gene_ids, control_counts, context_counts, conditions, ranks, counts, mask,
                                        mask_ratio, unknown_genes)  # fmt: skip
            cells = self._add_reference(cells, self.resolve_reference(reference), generator)
        else:
            if mask_ratio is not None:  # drawn before the tokens are made: masked counts must not shape the bins
                mask = self._random_mask(gene_ids, ranks, counts, mask_ratio, unknown_genes, generator)
            cells = self.processor(gene_ids, ranks=ranks, counts=counts, mask=mask, context_counts=context_counts,
                                   unknown_genes=unknown_genes)  # fmt: skip
            self.processor.check_something_to_impute(ranks, counts, mask, mask_ratio)
            if not cells.mask.any():
                logger.warning("no known gene is masked: the cells come back as given, without a denoiser call")
            cells = self.processor.add_conditions(cells, conditions, self.model.config)
            cells = self._add_reference(cells, self.resolve_reference(reference), generator)
        ranks_out = probs_out = expected_out = counts_out = None
        if translating:
            ranks_out, probs, calls, picks = self._translate(cells, num_inference_steps, batch_size, guidance_scale,
                                                             generator, output_type)  # fmt: skip
            if ranks_out is not None:
                counts_out = self.processor.counts_at_tokens(ranks_out, control_counts, context_counts, picks)
        elif output_type == "ranks":
            ranks_out, calls = self._sample(
                cells, num_inference_steps, sampler, temperature, top_p, batch_size, use_cache, generator,
                callback_on_step_end, callback_on_step_end_tensor_inputs, guidance_scale,
            )  # fmt: skip
        else:
            probs = self.processor.predictive_distribution(self.model, cells, batch_size, guidance_scale)
            calls = torch.bincount(self.processor.windows(cells).cell, minlength=cells.num_cells)
        if output_type != "ranks":
            expected = (probs * torch.arange(probs.shape[-1], dtype=probs.dtype)).sum(dim=-1)
            expected_out = np.where(cells["attention_mask"].numpy(), expected.numpy(), np.nan)
            probs_out = probs.numpy() if output_type == "probs" else None
        output = MaskedRankDiffusionPipelineOutput(
            ranks=ranks_out,
            probs=probs_out,
            expected=expected_out,
            mask=(cells["attention_mask"] if translating else cells.mask).numpy(),
            gene_ids=cells["gene_ids"].numpy(),
            attention_mask=cells["attention_mask"].numpy(),
            model_calls=calls.numpy(),
            counts=counts_out,
        )
        self.maybe_free_model_hooks()
        return output if return_dict else output.to_tuple()

    def _add_reference(self, cells, reference, generator):
        """`cells` with the tokens of their nearest reference cells (none without a reference). A grouped
        reference (a screen's control cells by line) gives each cell its group's, by the group condition told."""
        if reference is None:
            return cells
        extra = {}
        groups = self._group_ids(cells, getattr(reference.config, "group_condition", None))
        if groups is not None:  # a grouped reference: its draws for cells showing nothing come from the generator
            seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device if generator else "cpu")
            extra = {"groups": groups, "generator": torch.Generator().manual_seed(int(seed))}
        found = reference.context(cells["gene_ids"], cells["input_ids"], cells["attention_mask"],
                                  mask_token_id=self.processor.mask_token_id, **extra)  # fmt: skip
        return cells.replace(reference_tokens=found)

    def _group_ids(self, cells, group_condition: str | None) -> torch.Tensor | None:
        """Each cell's id of the condition that groups reference cells (its line), None when there is none."""
        names = list(self.model.config.conditions or {})
        if group_condition not in names or "condition_ids" not in cells:
            return None
        return cells["condition_ids"][:, names.index(group_condition)]

    def _control_cells(self, gene_ids, control_counts, context_counts, conditions, ranks, counts, mask,
                       mask_ratio, unknown_genes):  # fmt: skip
        """Control cells to translate: their tokens at `gene_ids`, every position visible, told `conditions`."""
        given = {"ranks": ranks, "counts": counts, "mask": mask, "mask_ratio": mask_ratio}
        clashing = [name for name, value in given.items() if value is not None]
        if clashing:
            raise ValueError(f"control_counts generates every position from control cells; {clashing} cannot go "
                             "with it (impute a cell with counts= and mask=)")  # fmt: skip
        if conditions is None:
            raise ValueError("control_counts translates control cells under conditions: pass conditions= too")
        try:
            cells = self.processor(gene_ids, counts=control_counts, context_counts=context_counts,
                                   unknown_genes=unknown_genes)  # fmt: skip
        except (ValueError, TypeError) as error:
            raise type(error)(f"control_counts: {error}") from error
        return self.processor.add_conditions(cells, conditions, self.model.config)

    def _control_conditions(self, cells) -> dict:
        """The conditions of `cells` with their drug replaced by the control drug (dose 0; a cell told the control
        keeps its own, so it is translated to itself): the same context."""
        encoder = self.processor.condition_encoder(self.model.config)
        if "drug" not in encoder.values or encoder.control_drug not in encoder.values["drug"]:
            raise ValueError("control_counts translates control cells from the control drug to the conditions: the "
                             "model needs a drug condition and its control drug (config.control_drug)")  # fmt: skip
        ids, column = cells["condition_ids"].clone(), list(encoder.values).index("drug")
        control = int(encoder.ids("drug", [encoder.control_drug])[0])
        doses, told_control = cells.data.get("doses"), ids[:, column] == control
        ids[:, column] = control
        if doses is not None:
            doses = torch.where(told_control, doses, torch.zeros_like(doses))
        return {"condition_ids": ids, "doses": doses}

    def _translate(self, cells, num_blocks: int, batch_size: int, guidance_scale: float, generator,
                   output_type: str) -> Translation:  # fmt: skip
        """Control cells carried to their conditions, `batch_size` cells at a time ([`Translation`]): the drawn
        tokens for `output_type="ranks"`, else the distribution of every token. Each cell's genes are dealt at
        random into `num_blocks` blocks (a random order dealt round-robin); block by block, the block masked,
        the model gives its genes a distribution from the rest of the control cell under the conditions and under
        the control, coupled by quantile. A cell's blocks and draws come from its own seed, so they do not depend
        on the other cells of the call."""
        seed_device = generator.device if generator is not None else "cpu"
        seeds = torch.randint(-(2**63), 2**63 - 1, (cells.num_cells,), generator=generator, device=seed_device)
        width, size = cells["gene_ids"].shape[1], self.model.config.num_rank_tokens
        ranks = np.full((cells.num_cells, width), -1, dtype=np.int64) if output_type == "ranks" else None
        picks = np.zeros((cells.num_cells, width))
        probs = None if output_type == "ranks" else torch.zeros(cells.num_cells, width, size)
        calls = torch.zeros(cells.num_cells, dtype=torch.long)
        for start in range(0, cells.num_cells, batch_size):
            rows = slice(start, start + batch_size)
            chunk = cells.rows(rows)
            vehicle = self._control_conditions(chunk)  # refuses a model without a control drug before any pass
            windows = torch.bincount(self.processor.windows(chunk).cell, minlength=chunk.num_cells)
            length, real = chunk["gene_ids"].shape[1], chunk["attention_mask"].bool()
            draws = [torch.Generator().manual_seed(int(seed)) for seed in seeds[rows].tolist()]
            keys = torch.stack([torch.rand(width, generator=g, dtype=torch.float64) for g in draws])[:, :length]
            order = keys.masked_fill(~real, 2.0).argsort(dim=1).argsort(dim=1)  # each position's place in its cell
            blocks = (order % num_blocks).masked_fill(~real, -1)
            coupled = torch.zeros(*real.shape, size)
            for block in range(int(blocks.max()) + 1 if blocks.numel() else 0):
                hidden = blocks == block
                masked = chunk.replace(input_ids=chunk["input_ids"].masked_fill(hidden, self.processor.mask_token_id))
                told = self.processor.predictive_distribution(self.model, masked, batch_size, guidance_scale)
                untold = self.processor.predictive_distribution(self.model, masked.replace(**vehicle), batch_size,
                                                                guidance_scale)  # fmt: skip
                coupled = torch.where(hidden[..., None], quantile_coupling(told, untold, chunk["input_ids"]), coupled)
                calls[rows] += 2 * windows  # a cell's windows depend on its length alone
            if ranks is not None:
                uniforms = torch.stack([torch.rand(width, generator=g, dtype=torch.float64) for g in draws])
                cumulative = coupled.double().cumsum(dim=-1)
                below = cumulative < uniforms[:, :length, None] * cumulative[..., -1:]
                drawn = below.sum(dim=-1).clamp(max=size - 1).masked_fill(~real, -1)
                ranks[rows, :length] = drawn.numpy()
                picks[rows] = torch.stack([torch.rand(width, generator=g, dtype=torch.float64) for g in draws]).numpy()
            else:
                probs[rows, :length] = coupled
        return Translation(ranks, probs, calls, picks)

    def _random_mask(self, gene_ids, ranks, counts, mask_ratio, unknown_genes, generator) -> list[torch.Tensor]:
        """`mask_ratio` of each cell's known genes, drawn from the genes alone (before any count is binned)."""
        if ranks is None and counts is None:
            raise ValueError("mask_ratio needs the ranks (or counts) of the positions it keeps")
        genes_only = self.processor(gene_ids, unknown_genes=unknown_genes)
        drawn = self.scheduler.random_mask(genes_only["attention_mask"], mask_ratio, generator=generator)
        lengths = (genes_only["gene_ids"] != 0).sum(dim=1).tolist()  # 0 is padding; genes left out are -1
        return [drawn[i, :n] for i, n in enumerate(lengths)]

    def _sample(
        self, cells, num_inference_steps, sampler, temperature, top_p, batch_size, use_cache, generator,
        callback, callback_inputs, guidance_scale,
    ) -> tuple[np.ndarray, torch.Tensor]:  # fmt: skip
        """Sample the masked tokens of every window, `batch_size` windows at a time; returns the cells' tokens
        (-1 where the model saw nothing) and each cell's number of denoiser calls."""
        device = self._execution_device
        self.scheduler.set_timesteps(num_inference_steps, device=device, sampler=sampler)
        windows = self.processor.windows(cells)
        # One seed per window, drawn up front: a window draws the same values whatever batch it is in.
        seed_device = generator.device if generator is not None else "cpu"
        count = windows.inputs.num_cells
        seeds = torch.randint(-(2**63), 2**63 - 1, (count,), generator=generator, device=seed_device)
        samples, calls = [], []
        for start in range(0, windows.inputs.num_cells, batch_size):
            chunk = slice(start, start + batch_size)
            batch = windows.inputs.rows(chunk)
            length = batch["gene_ids"].shape[1]
            where = {"cell": windows.cell[chunk], "position": windows.position[chunk, :length]}
            where["position"] = where["position"].masked_fill(~batch["attention_mask"], -1)
            sample, batch_calls = self._denoise(
                batch, seeds[chunk], temperature, top_p, use_cache, callback, callback_inputs, where, guidance_scale
            )
            width = windows.inputs["gene_ids"].shape[1]
            samples.append(F.pad(sample.cpu(), (0, width - sample.shape[1])))
            calls.append(batch_calls.cpu())
        ranks = windows.to_cells(torch.cat(samples), fill=-1).numpy()
        calls = torch.zeros(cells.num_cells, dtype=torch.long).index_add_(0, windows.cell, torch.cat(calls))
        return ranks, calls

    def _denoise(
        self, batch, seeds, temperature, top_p, use_cache, callback, callback_inputs, where, guidance_scale
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the scheduler's loop on one batch of windows, on the model's device; returns the tokens and each
        window's number of denoiser calls. Without the cache nothing in the loop waits for the device."""
        scheduler, device = self.scheduler, self._execution_device
        mask_id = scheduler.config.mask_token_id
        inputs = batch.model_inputs(device)
        sample = inputs.pop("input_ids")
        calls = torch.zeros(batch.num_cells, dtype=torch.long, device=device)
        if not batch.mask.any():  # nothing to draw (a host tensor: no sync)
            return sample, calls
        time_conditioned = self.model.config.time_conditioning
        cached = use_cache and not time_conditioned
        scheduler.begin(sample, seeds=seeds)
        logits = torch.zeros(*sample.shape, self.model.config.num_rank_tokens, device=device) if cached else None
        changed = torch.ones(batch.num_cells, dtype=torch.bool, device=device)
        with self.progress_bar(total=len(scheduler)) as progress_bar:
            for step in range(len(scheduler)):
                timestep = scheduler.row_times
                unfinished = (sample == mask_id).any(dim=1)
                if cached:  # only windows whose tokens changed: the row choice is a host sync
                    rows = (unfinished & changed).nonzero().squeeze(1)
                    if len(rows):
                        logits[rows] = self._logits(inputs, sample, rows, None, guidance_scale)
                    calls[rows] += 1
                else:
                    logits = self._logits(inputs, sample, None, timestep if time_conditioned else None, guidance_scale)
                    calls += unfinished
                out = scheduler.step(logits, timestep, sample, temperature=temperature, top_p=top_p)
                if callback is not None:  # the sample it returns is the next step's (the other tensors are read-only)
                    tensors = {"sample": out.prev_sample, "logits": logits, **where}
                    callback_outputs = callback(self, step, timestep, {k: tensors[k] for k in callback_inputs})
                    out.prev_sample = self._checked_callback_sample(callback_outputs, out.prev_sample, step)
                changed = (out.prev_sample != sample).any(dim=1)
                sample = out.prev_sample
                progress_bar.update()
        return sample, calls

    def _checked_callback_sample(self, callback_outputs, sample: torch.Tensor, step: int) -> torch.Tensor:
        """The sample a callback returned (or `sample`), refused unless it is a tensor of `sample`'s shape holding
        tokens 0..B or [MASK] (one host sync per step, only with a callback)."""
        returned = (callback_outputs or {}).get("sample", sample)
        mask_id = self.scheduler.config.mask_token_id
        where = f"callback_on_step_end at step {step}: 'sample'"
        if not isinstance(returned, torch.Tensor) or returned.shape != sample.shape:
            got = getattr(returned, "shape", type(returned).__name__)
            raise ValueError(f"{where} must be a tensor of shape {tuple(sample.shape)}, got {got}")
        bad = (returned < 0) | (returned > mask_id)
        if bad.any():
            row, position = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{where} holds token {int(returned[row, position])} at (window {row}, position "
                             f"{position}); tokens are 0..{mask_id - 1}, or {mask_id} for [MASK]")  # fmt: skip
        return returned.to(sample.dtype)

    def _logits(
        self, inputs: dict, sample: torch.Tensor, rows: torch.Tensor | None, timesteps, guidance_scale: float
    ) -> torch.Tensor:
        """The model's float32 logits for the windows at `rows` (all when None), guided."""
        if rows is not None:
            inputs = {k: v[rows] for k, v in inputs.items() if v is not None}
            sample = sample[rows]
        inputs = {**inputs, "input_ids": sample, "timesteps": timesteps}
        return self.processor.logits(self.model, inputs, guidance_scale)

    def impute_anndata(
        self,
        adata,
        *,
        mask: np.ndarray | None = None,
        layer: str | None = None,
        gene_column: str | None = None,
        return_probs: bool = False,
        key_added: str = "rankdiff",
        cell_batch_size: int = 256,
        condition_columns: Sequence[str] | dict[str, str] | None = None,
        **call_kwargs,
    ):
        """Impute the masked (or missing) values of an AnnData of raw counts; returns an annotated copy (in memory,
        for a backed AnnData too).

        Cells are read `cell_batch_size` at a time (a sparse matrix is never densified whole; each block is, in
        memory `cell_batch_size x n_vars`) and only the *requested* genes, those
        masked in some cell, are scored. Each row is a whole cell as Tahoe-100M stores one: the model sees its
        expressed visible genes, its masked genes and the requested genes it does not express, and its tokens come
        from all its visible counts by the checkpoint's rule (genes outside the vocabulary included). Results:

        - `layers[key_added + "_ranks"]` (int16): the sampled rank token 0..B at masked entries, -1 elsewhere;
        - `layers[key_added + "_expected"]` (float32): the expected rank from one denoiser pass at masked entries,
          NaN elsewhere;
        - with `return_probs`, `obsm[key_added + "_probs"]`: `(n_obs, n_requested, B + 1)` float32 distributions,
          the requested genes' names in `uns[key_added]["genes"]` (meant for gene panels: it grows with them).

        Args:
            adata (`anndata.AnnData`): raw counts in `X` or `layers[layer]` (dense or sparse), genes as symbols or
                Ensembl ids in `var_names` or `var[gene_column]`.
            mask (`np.ndarray` or sparse matrix of shape `(n_obs, n_vars)`, *optional*): True where a value is to be
                imputed; by default the NaN entries.
            return_probs (`bool`, defaults to `False`): also store the requested genes' distributions.
            key_added (`str`, defaults to `"rankdiff"`): prefix of the new layers and keys.
            cell_batch_size (`int`, defaults to 256): cells read and imputed together.
            condition_columns (`list[str]` or `dict[str, str]`, *optional*): the `obs` columns that condition the
                imputation: their names, or condition -> column (`{"drug": "treatment"}`), see `conditions` of the
                call; by default every column named exactly like a condition of the model (`[]`: none).
            call_kwargs: passed to the pipeline call (`num_inference_steps`, `sampler`, `guidance_scale`,
                `generator`, ...).
        """
        return run_imputation(
            self, adata, mask=mask, layer=layer, gene_column=gene_column, return_probs=return_probs,
            key_added=key_added, cell_batch_size=cell_batch_size, condition_columns=condition_columns, **call_kwargs,
        )  # fmt: skip

    def generate_anndata(self, obs, genes: CellValues, *, condition_columns=None, control=None,
                         layer: str | None = None, gene_column: str | None = None, **call_kwargs):  # fmt: skip
        """Generate one whole cell per row of `obs` (a pandas DataFrame), told the conditions in its columns; with
        `control`, translate control cells instead: row i is control cell i under row i's conditions.

        Args:
            obs (`pandas.DataFrame`): one row per cell to generate; the columns named like the model's conditions
                (`model.config.conditions`, `"dose"`) condition it, the others are carried along.
            genes: the gene list every cell is generated on (token ids, Ensembl ids or symbols).
            condition_columns (`list[str]` or `dict[str, str]`, *optional*): the columns that condition (names, or
                condition -> column); by default every column named like a condition of the model.
            control (`anndata.AnnData`, *optional*): control cells of raw counts, one per row of `obs` (whole
                cells: their genes outside `genes` shape their bins), in `X` or `layers[layer]`, genes in
                `var_names` or `var[gene_column]`; see `control_counts` of the call.
            call_kwargs: passed to the pipeline call (`guidance_scale`, `num_inference_steps`, `generator`, ...).

        Returns:
            `anndata.AnnData`: `X` the sampled rank tokens 0..B (int16, cells x genes), `obs` as given, the genes as
            `var_names`; with `control`, `layers["counts"]` the translated cells' raw counts (see the call's output
            `counts`).
        """
        return run_generation(self, obs, genes, condition_columns=condition_columns, control=control, layer=layer,
                              gene_column=gene_column, **call_kwargs)  # fmt: skip

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """Write the complete pipeline folder, the one export of a RankDiff model, so that it loads every way
        ([`save_pipeline_folder`]); with `push_to_hub=True` (and `repo_id=`, `token=`, `private=`,
        `commit_message=`) the folder is uploaded."""
        save_pipeline_folder(self, save_directory, push_to_hub=push_to_hub, **kwargs)
