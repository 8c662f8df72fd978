"""transformers pipeline task `"rank-imputation"`: a checkpoint's predictive distribution at masked genes.

>>> from transformers import pipeline
>>> pipe = pipeline(model="outputs/demo/model", trust_remote_code=True)
>>> pipe(gene_ids=["CD3E", "MS4A1", "LYZ"], ranks=[12, 0, 50], mask=[False, True, False])
>>> pipe(gene_ids=genes, ranks=ranks, mask=mask, conditions={"drug": "Bortezomib", "dose": 0.5}, guidance_scale=2.0)
"""

from __future__ import annotations

import numbers

import torch
from transformers import Pipeline

from .conditions import check_guidance_scale, warn_if_guidance_unused
from .configuration_rank_dit import IMPUTATION_TASK

PREPROCESS_PARAMETERS = ("unknown_genes", "conditions")
FORWARD_PARAMETERS = ("window_batch_size", "guidance_scale")


class RankDiTImputationPipeline(Pipeline):
    """One denoiser pass over cells with masked positions: per-position distributions over ranks 0..B.

    Call with `gene_ids=` (ids, Ensembl ids or symbols; one cell or a list of cells, any number of genes), `ranks=`
    or raw `counts=` (and `context_counts=`, the counts of a cell's other genes), and `mask=` (True = predict);
    `unknown_genes="ignore"` leaves genes outside the vocabulary out, `window_batch_size=` sets how many windows of
    long cells go through the model at a time. A perturbation-conditioned checkpoint takes `conditions=` (one dict
    for every cell or one per cell, e.g. `{"cell_line_id": "CVCL_0480", "drug": "Bortezomib", "dose": 0.5}`) and
    `guidance_scale=` (classifier-free guidance; 1 is the conditional model). Returns, per cell, a dict with
    `gene_ids`, `mask`, `probs` (`(length, B + 1)`, one-hot where visible) and `expected` (the expected rank). The
    checkpoint's
    `RankDiTProcessor`, saved beside the model, is loaded as the pipeline's `feature_extractor`. Sampling lives in
    the diffusers `MaskedRankDiffusionPipeline`.
    """

    _load_feature_extractor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_processor = False

    def _sanitize_parameters(self, **kwargs):
        unknown = sorted(set(kwargs) - set(PREPROCESS_PARAMETERS) - set(FORWARD_PARAMETERS))
        if unknown:
            raise TypeError(
                f"the {IMPUTATION_TASK} pipeline got unknown arguments {unknown}; it takes gene_ids, ranks, counts, "
                f"mask, context_counts, {', '.join(PREPROCESS_PARAMETERS + FORWARD_PARAMETERS)} (sampling with "
                "temperature or mask_ratio lives in the diffusers MaskedRankDiffusionPipeline)"
            )
        preprocess = {key: kwargs[key] for key in PREPROCESS_PARAMETERS if key in kwargs}
        forward = {key: kwargs[key] for key in FORWARD_PARAMETERS if key in kwargs}
        if "guidance_scale" in forward:  # checked before any cell is read
            check_guidance_scale(forward["guidance_scale"])
            warn_if_guidance_unused(forward["guidance_scale"], preprocess.get("conditions"), self.model.config)
        size = forward.get("window_batch_size", 1)
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ValueError(f"window_batch_size must be a positive integer, got {size!r}")
        return preprocess, forward, {}

    def __call__(self, gene_ids=None, ranks=None, counts=None, mask=None, context_counts=None, **kwargs):
        if gene_ids is None:
            raise ValueError("call the pipeline with gene_ids=... (and ranks= or counts=, mask=)")
        if self.feature_extractor is None:
            raise ValueError("this pipeline needs the checkpoint's RankDiTProcessor as its feature_extractor")
        inputs = dict(gene_ids=gene_ids, ranks=ranks, counts=counts, mask=mask, context_counts=context_counts)
        return super().__call__(inputs, **kwargs)

    def _ensure_tensor_on_device(self, inputs, device):
        # The cells stay on the host as a whole: the processor moves each window to the model's device itself.
        return inputs

    def preprocess(self, inputs, unknown_genes: str = "raise", conditions=None):
        cells = self.feature_extractor(**inputs, unknown_genes=unknown_genes)
        self.feature_extractor.check_something_to_impute(inputs["ranks"], inputs["counts"], inputs["mask"])
        return {"cells": self.feature_extractor.add_conditions(cells, conditions, self.model.config)}

    def _forward(self, model_inputs, window_batch_size: int = 64, guidance_scale: float = 1.0):
        cells = model_inputs["cells"]
        probs = self.feature_extractor.predictive_distribution(self.model, cells, window_batch_size, guidance_scale)
        return {"cells": cells, "probs": probs}

    def postprocess(self, model_outputs):
        cells, probs = model_outputs["cells"], model_outputs["probs"]
        expected = (probs * torch.arange(probs.shape[-1], dtype=probs.dtype)).sum(dim=-1)
        expected = expected.masked_fill(~cells["attention_mask"].bool(), float("nan"))
        gene_ids, mask = cells["gene_ids"], cells.mask
        results = []
        for i in range(cells.num_cells):
            given = gene_ids[i] != 0  # the cell's positions, ignored genes (-1) included
            results.append(
                {
                    "gene_ids": gene_ids[i][given].tolist(),
                    "mask": mask[i][given].tolist(),
                    "probs": probs[i][given].numpy(),
                    "expected": expected[i][given].numpy(),
                }
            )
        return results[0] if len(results) == 1 else results
