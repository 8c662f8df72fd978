# Copyright 2026 The RankDiff authors. Licensed under the Apache License, Version 2.0.
"""`MaskedRankDiffusionPipeline`: impute, denoise and generate cells' rank tokens with a RankDiT denoiser.

This file imports only torch, numpy and diffusers (anndata on demand), so a saved pipeline folder carries it as
remote code: `DiffusionPipeline.from_pretrained(path, trust_remote_code=True)`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput, logging
from torch.nn import functional as F

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("ranks", "probs", "expected")


@dataclass
class MaskedRankDiffusionPipelineOutput(BaseOutput):
    """Output of [`MaskedRankDiffusionPipeline`], padded to the longest cell (see `attention_mask`).

    Args:
        ranks (`np.ndarray` of shape `(n_cells, length)`, *optional*): rank tokens 0..B, the given ones kept and
            the masked ones sampled (`output_type="ranks"`); -1 at padding.
        probs (`np.ndarray` of shape `(n_cells, length, B + 1)`, *optional*): the model's predictive distribution
            over 0..B at every position given the visible tokens (one-hot where visible; `output_type="probs"`).
        expected (`np.ndarray` of shape `(n_cells, length)`, *optional*): the expected rank under `probs`
            (`output_type="probs"` or `"expected"`).
        mask (`np.ndarray` of shape `(n_cells, length)`): True at the positions that were predicted.
        gene_ids (`np.ndarray` of shape `(n_cells, length)`): the gene token ids of each position.
        attention_mask (`np.ndarray` of shape `(n_cells, length)`): True at real (not padding) positions.
        model_calls (`np.ndarray` of shape `(n_cells,)`): denoiser evaluations of each cell.
    """

    ranks: np.ndarray | None
    probs: np.ndarray | None
    expected: np.ndarray | None
    mask: np.ndarray
    gene_ids: np.ndarray
    attention_mask: np.ndarray
    model_calls: np.ndarray


class MaskedRankDiffusionPipeline(DiffusionPipeline):
    r"""Fill masked rank tokens of cells, or generate whole cells, with a masked-diffusion denoiser.

    Components:
        model ([`RankDiTModel`]): the denoiser, with its gene vocabulary (`model.gene_vocab`).
        scheduler ([`MaskedRankDiffusionScheduler`]): the noise schedule and samplers.

    Examples:

    ```python
    >>> import torch
    >>> from diffusers import DiffusionPipeline

    >>> pipe = DiffusionPipeline.from_pretrained("outputs/demo", trust_remote_code=True)
    >>> out = pipe(gene_ids=[["CD3E", "MS4A1", "LYZ", "NKG7"]], ranks=[[12, 0, 50, 3]],
    ...            mask=[[False, True, True, False]], generator=torch.Generator().manual_seed(0))
    >>> out.ranks  # the masked positions sampled, the others as given
    ```
    """

    model_cpu_offload_seq = "model"

    def __init__(self, model, scheduler):
        super().__init__()
        scheduler.check_model_config(model.config)
        self.register_modules(model=model, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        gene_ids,
        ranks=None,
        mask=None,
        mask_ratio: float | None = None,
        counts=None,
        context_counts=None,
        num_inference_steps: int = 64,
        sampler: str | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        output_type: str = "ranks",
        return_dict: bool = True,
        batch_size: int = 64,
        use_cache: bool = True,
        callback_on_step_end: Callable | None = None,
    ) -> MaskedRankDiffusionPipelineOutput | tuple:
        r"""Impute the masked positions of cells, denoise them, or generate whole cells.

        Args:
            gene_ids: the genes of one cell (a flat sequence) or of several (a sequence of sequences or a 2-D
                array): token ids, Ensembl ids or symbols of the checkpoint's vocabulary.
            ranks: rank tokens 0..B at the same positions; None (and no `counts`) generates every position.
            mask: True at the positions to generate, False where the given rank is kept.
            mask_ratio (`float`, *optional*): instead of `mask`, mask this share of each cell's genes at random.
            counts: raw counts instead of `ranks`, tokenized with the checkpoint's own rule over each cell's visible
                counts (masked ones never shape the visible tokens). Give whole cells: any number of genes, shown
                to the model in windows of random genes when a cell is longer than `model.config.max_length`.
            context_counts: with `counts` of part of a cell, the counts of its other genes, so its quantile bins
                are those of the whole cell, as in training (a warning says when a cell looks like a part).
            num_inference_steps (`int`, defaults to 64): denoising steps (first-hitting: one per masked token).
            sampler (`str`, *optional*): `"ancestral"`, `"first-hitting"` or `"confidence"`; the scheduler's
                configured sampler by default.
            temperature (`float`, defaults to 1.0), top_p (`float`, defaults to 1.0): reshape the model's
                distribution before each draw.
            generator (`torch.Generator`, *optional*): a CPU generator; the same seed gives the same output.
            output_type (`str`, defaults to `"ranks"`): `"ranks"` samples the masked tokens; `"probs"` returns the
                predictive distribution at every position from one denoiser pass (and the expected ranks);
                `"expected"` returns only the expected ranks.
            return_dict (`bool`, defaults to `True`): return a [`MaskedRankDiffusionPipelineOutput`], else a tuple.
            batch_size (`int`, defaults to 64): windows (cells, or parts of cells longer than the model's length)
                denoised together.
            use_cache (`bool`, defaults to `True`): reuse a cell's last model output while none of its tokens
                changed (only for models without time conditioning, whose output depends on the tokens alone).
            callback_on_step_end (`Callable`, *optional*): called as `fn(pipe, step, timestep, {"sample": ...,
                "cell": ..., "position": ...})` after every step, for example to record the states of a run; the
                samples are those of up to `batch_size` windows, `cell` and `position` say where their positions
                belong (-1 at padding; a cell that fits the model's length is one window).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if mask_ratio is not None and mask is not None:
            raise ValueError("give mask or mask_ratio, not both")
        if mask_ratio is not None:  # drawn before the tokens are made: masked counts must not shape the bins
            if ranks is None and counts is None:
                raise ValueError("mask_ratio needs the ranks (or counts) of the positions it keeps")
            real = self.model.prepare_inputs(gene_ids).attention_mask
            drawn = self.scheduler.random_mask(real, mask_ratio, generator=generator)
            mask = [m[r].tolist() for m, r in zip(drawn, real)]
        cells = self.model.prepare_inputs(
            gene_ids, ranks=ranks, counts=counts, mask=mask, context_counts=context_counts
        )

        self.scheduler.set_timesteps(num_inference_steps, sampler=sampler)
        windows = cells.windows(self.model.config.max_length)
        results = []
        for start in range(0, len(windows.inputs), batch_size):  # `batch_size` windows at a time
            chunk = slice(start, start + batch_size)
            batch = windows.inputs.rows(chunk)
            if output_type == "ranks":
                step_callback = None
                if callback_on_step_end is not None:
                    where = {
                        "cell": windows.cell[chunk],
                        "position": windows.position[chunk, : batch.gene_ids.shape[1]].masked_fill(
                            ~batch.attention_mask, -1
                        ),
                    }

                    def step_callback(pipe, step, timestep, callback_kwargs, where=where):
                        return callback_on_step_end(pipe, step, timestep, {**callback_kwargs, **where})

                sample, calls = self._denoise(batch, temperature, top_p, generator, use_cache, step_callback)
                results.append((sample, calls))
            else:  # one pass; the (cells, length, B + 1) distributions are kept only when asked for
                probs = self.model.predictive_distribution(batch, batch_size=batch_size)
                results.append((probs, torch.ones(len(batch), dtype=torch.long)))
        calls = torch.zeros(len(cells), dtype=torch.long).index_add_(
            0, windows.cell, torch.cat([c for _, c in results])
        )
        width = windows.inputs.gene_ids.shape[1]
        per_window = torch.cat([F.pad(v, (0, 0) * (v.dim() - 2) + (0, width - v.shape[1])) for v, _ in results])

        real = cells.attention_mask.numpy()
        ranks_out = probs_out = expected_out = None
        if output_type == "ranks":
            ranks_out = windows.to_cells(per_window, fill=-1).numpy()
        else:
            probs = windows.to_cells(per_window)
            expected = (probs * torch.arange(probs.shape[-1], dtype=probs.dtype)).sum(dim=-1)
            expected_out = np.where(real, expected.numpy(), np.nan)
            probs_out = probs.numpy() if output_type == "probs" else None
        output = MaskedRankDiffusionPipelineOutput(
            ranks=ranks_out,
            probs=probs_out,
            expected=expected_out,
            mask=cells.mask.numpy(),
            gene_ids=cells.gene_ids.numpy(),
            attention_mask=real,
            model_calls=calls.numpy(),
        )
        self.maybe_free_model_hooks()
        return output if return_dict else output.to_tuple()

    def impute_anndata(
        self,
        adata,
        *,
        mask: np.ndarray | None = None,
        layer: str | None = None,
        gene_column: str | None = None,
        return_probs: bool = False,
        key_added: str = "rankdiff",
        **call_kwargs,
    ):
        """Impute the masked (or missing) values of an AnnData of raw counts; returns an annotated copy.

        Each row is a whole cell: its visible counts (at every gene, also those the checkpoint does not know) are
        turned into rank tokens with the checkpoint's rule; the masked ones are sampled (`layers[key_added +
        "_ranks"]`, rank tokens 0..B) and scored (`layers[key_added + "_expected"]`, the expected rank from one
        denoiser pass; `obsm[key_added + "_probs"]`, `(n_obs, n_vars, B + 1)`, with `return_probs`). Visible
        positions keep their own rank. Genes outside the checkpoint's vocabulary get -1 and NaN and are reported. A
        cell with more genes than the model's `max_length` is seen in windows of random genes. `obs`, `var` and the
        data are kept.

        Args:
            adata (`anndata.AnnData`): raw counts in `X` or `layers[layer]`, genes as symbols or Ensembl ids in
                `var_names` or `var[gene_column]`.
            mask (`np.ndarray` of shape `(n_obs, n_vars)`, *optional*): True where a value is to be imputed; by
                default the NaN entries.
            return_probs (`bool`, defaults to `False`): also store the per-gene distributions in `obsm`.
            key_added (`str`, defaults to `"rankdiff"`): prefix of the new layers and `obsm` key.
            call_kwargs: passed to the pipeline call (`num_inference_steps`, `sampler`, `generator`, ...).
        """
        reserved = {"gene_ids", "ranks", "counts", "context_counts", "mask", "mask_ratio", "output_type"}
        if reserved & set(call_kwargs):
            raise ValueError(f"impute_anndata sets {sorted(reserved & set(call_kwargs))} itself")
        counts = adata.layers[layer] if layer is not None else adata.X
        counts = np.asarray(counts.toarray() if hasattr(counts, "toarray") else counts, dtype=np.float64)
        mask = np.isnan(counts) if mask is None else np.asarray(mask, dtype=bool)
        if mask.shape != counts.shape:
            raise ValueError(f"mask must have the AnnData's shape {counts.shape}, got {mask.shape}")
        names = adata.var[gene_column] if gene_column is not None else adata.var_names
        if self.model.gene_vocab is None:
            raise ValueError("impute_anndata needs the checkpoint's gene vocabulary (model.gene_vocab is None)")
        gene_ids = self.model.gene_vocab.lookup([str(name) for name in names])
        known, unknown = np.flatnonzero(gene_ids >= 0), np.flatnonzero(gene_ids < 0)
        if len(unknown):
            logger.warning("%d of %d genes are not in the checkpoint's vocabulary and stay empty",
                           len(gene_ids) - len(known), len(gene_ids))  # fmt: skip
        if not len(known):
            raise ValueError("none of the AnnData's genes is in the checkpoint's vocabulary")
        inputs = {
            "gene_ids": np.tile(gene_ids[known], (adata.n_obs, 1)),
            "counts": np.where(mask[:, known], np.nan, counts[:, known]),
            "mask": mask[:, known],
            # Each row is a whole cell: its genes outside the vocabulary still shape its bins.
            "context_counts": [
                row[np.isfinite(row) & (row > 0)] for row in np.where(mask, np.nan, counts)[:, unknown]
            ],
        }
        out_ranks = np.full(counts.shape, -1, dtype=np.int64)
        out_expected = np.full(counts.shape, np.nan)
        out_ranks[:, known] = self(**inputs, **call_kwargs, output_type="ranks").ranks
        scored_as = "probs" if return_probs else "expected"
        scored = self(**inputs, output_type=scored_as, batch_size=call_kwargs.get("batch_size", 64))
        out_expected[:, known] = scored.expected
        result = adata.copy()
        result.layers[f"{key_added}_ranks"] = out_ranks
        result.layers[f"{key_added}_expected"] = out_expected
        if return_probs:
            out_probs = np.zeros((*counts.shape, self.model.config.num_rank_tokens), np.float32)
            out_probs[:, known] = scored.probs
            result.obsm[f"{key_added}_probs"] = out_probs
        return result

    def _model_logits(self, gene_ids, input_ids, attention_mask, timesteps=None) -> torch.Tensor:
        device = self._execution_device
        logits = self.model(
            gene_ids=gene_ids.to(device),
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            timesteps=None if timesteps is None else timesteps.float().to(device),
        ).logits
        return logits.float().cpu()

    def _denoise(self, batch, temperature, top_p, generator, use_cache, callback) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the sampler until no `[MASK]` is left; returns the tokens and each cell's number of model calls."""
        scheduler, mask_id = self.scheduler, self.scheduler.config.mask_token_id
        time_conditioned = self.model.config.time_conditioning
        sample = batch.ranks.clone()
        n_cells = len(batch)
        time = torch.ones(n_cells, dtype=torch.float64)
        calls = torch.zeros(n_cells, dtype=torch.long)
        logits = torch.zeros(*sample.shape, self.model.config.num_rank_tokens)
        stale = torch.ones(n_cells, dtype=torch.bool)
        first_hitting = scheduler.sampler == "first-hitting"
        num_steps = int(batch.mask.sum(dim=1).max()) if first_hitting else len(scheduler.timesteps)
        with self.progress_bar(total=num_steps) as progress_bar:
            for step in range(num_steps):
                masked_rows = (sample == mask_id).any(dim=1)
                if not masked_rows.any():
                    break
                rows = masked_rows & stale if use_cache and not time_conditioned else masked_rows
                if rows.any():
                    timesteps = time[rows] if time_conditioned else None
                    logits[rows] = self._model_logits(
                        batch.gene_ids[rows], sample[rows], batch.attention_mask[rows], timesteps
                    )
                    calls += rows
                timestep = time if first_hitting else scheduler.timesteps[step]
                out = scheduler.step(
                    logits, timestep, sample, temperature=temperature, top_p=top_p, generator=generator
                )
                stale = (out.prev_sample != sample).any(dim=1)
                sample, time = out.prev_sample, out.prev_timestep
                if callback is not None:
                    callback(self, step, timestep, {"sample": sample})
                progress_bar.update()
        return sample, calls

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save as diffusers does, with the code of the pipeline, model and scheduler, so that
        `DiffusionPipeline.from_pretrained(save_directory, trust_remote_code=True)` loads it in any process."""
        super().save_pretrained(save_directory, **kwargs)
        save_directory = Path(save_directory)
        index_path = save_directory / "model_index.json"
        index = json.loads(index_path.read_text())
        pipeline_file = Path(sys.modules[type(self).__module__].__file__)
        shutil.copy(pipeline_file, save_directory / pipeline_file.name)
        index["_class_name"] = [pipeline_file.stem, type(self).__name__]
        for name in ("model", "scheduler"):
            component = getattr(self, name)
            module_file = Path(sys.modules[type(component).__module__].__file__)
            if not (save_directory / name / module_file.name).exists():
                shutil.copy(module_file, save_directory / name / module_file.name)
            index[name] = [module_file.stem, type(component).__name__]
        index_path.write_text(json.dumps(index, indent=2) + "\n")
