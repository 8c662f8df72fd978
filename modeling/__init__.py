"""The RankDiff model: config, DiT denoiser, processor (gene vocabulary, rank rule, windows) and the transformers task.

The files of this package import only each other (relatively), torch, numpy and transformers, so that a saved
checkpoint carries them as Hub remote code.
"""

from transformers import AutoConfig, AutoFeatureExtractor, AutoModel
from transformers.pipelines import PIPELINE_REGISTRY

from .cell_batch import CellBatch, CellWindows, RaggedCells
from .configuration_rank_dit import IMPUTATION_TASK, RANK_DIT_PRESETS, RankDiTConfig
from .gene_vocab import GeneVocab
from .imputation_task import RankDiTImputationPipeline
from .modeling_rank_dit import RankDiTModel, RankDiTOutput, RankDiTPreTrainedModel
from .processing_rank_dit import RankDiTProcessor
from .rank_tokenizer import CellTokenizer, rank_tokens

# In-process Auto classes, and `auto_map` + code files in every checkpoint for `trust_remote_code` loading.
AutoConfig.register(RankDiTConfig.model_type, RankDiTConfig)
AutoModel.register(RankDiTConfig, RankDiTModel)
AutoFeatureExtractor.register(RankDiTConfig, RankDiTProcessor)
RankDiTConfig.register_for_auto_class()
RankDiTModel.register_for_auto_class("AutoModel")
PIPELINE_REGISTRY.register_pipeline(
    IMPUTATION_TASK, pipeline_class=RankDiTImputationPipeline, pt_model=AutoModel, type="multimodal"
)

__all__ = [
    "RANK_DIT_PRESETS",
    "IMPUTATION_TASK",
    "CellBatch",
    "CellTokenizer",
    "CellWindows",
    "GeneVocab",
    "RankDiTImputationPipeline",
    "RankDiTConfig",
    "RankDiTModel",
    "RankDiTOutput",
    "RankDiTPreTrainedModel",
    "RankDiTProcessor",
    "RaggedCells",
    "rank_tokens",
]
