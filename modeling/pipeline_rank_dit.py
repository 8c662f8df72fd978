"""transformers pipeline task `"rank-imputation"`: a checkpoint's predictive distribution at masked genes.

>>> from transformers import pipeline
>>> pipe = pipeline(model="outputs/demo/model", trust_remote_code=True)
>>> pipe(gene_ids=["CD3E", "MS4A1", "LYZ"], ranks=[12, 0, 50], mask=[False, True, False])
"""

from __future__ import annotations

import torch
from transformers import Pipeline

IMPUTATION_TASK = "rank-imputation"


class RankDiTImputationPipeline(Pipeline):
    """One denoiser pass over cells with masked positions: per-position distributions over ranks 0..B.

    Call with `gene_ids=` (ids, Ensembl ids or symbols; one cell or a list of cells, any number of genes), `ranks=`
    or raw `counts=` (and `context_counts=`, the counts of a cell's other genes), and `mask=` (True = predict).
    Returns, per cell, a dict with `gene_ids`, `mask`, `probs` (`(length, B + 1)`, one-hot where visible) and
    `expected` (the expected rank). Sampling lives in the diffusers `MaskedRankDiffusionPipeline`.
    """

    def _sanitize_parameters(self, **kwargs):
        return {}, {}, {}

    def __call__(self, gene_ids=None, ranks=None, counts=None, mask=None, context_counts=None, **kwargs):
        if gene_ids is None:
            raise ValueError("call the pipeline with gene_ids=... (and ranks= or counts=, mask=)")
        inputs = dict(gene_ids=gene_ids, ranks=ranks, counts=counts, mask=mask, context_counts=context_counts)
        return super().__call__(inputs, **kwargs)

    def preprocess(self, inputs):
        return {"cells": self.model.prepare_inputs(**inputs)}

    def _forward(self, model_inputs):
        return {"cells": model_inputs["cells"], "probs": self.model.predictive_distribution(model_inputs["cells"])}

    def postprocess(self, model_outputs):
        cells, probs = model_outputs["cells"], model_outputs["probs"]
        expected = (probs * torch.arange(probs.shape[-1], dtype=probs.dtype)).sum(dim=-1)
        results = []
        for i in range(len(cells)):
            real = cells.attention_mask[i]
            results.append(
                {
                    "gene_ids": cells.gene_ids[i][real].tolist(),
                    "mask": cells.mask[i][real].tolist(),
                    "probs": probs[i][real].numpy(),
                    "expected": expected[i][real].numpy(),
                }
            )
        return results[0] if len(results) == 1 else results
