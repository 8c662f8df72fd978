"""Training of RankDiff with the Hugging Face Trainer: arguments, the MDLM loss and its evaluation."""

from .arguments import DataArguments, DiffusionArguments, ModelArguments, RankDiffTrainingArguments
from .evaluation import evaluate_masked_diffusion
from .loss import masked_nelbo
from .trainer import RankDiffusionTrainer

__all__ = [
    "DataArguments",
    "DiffusionArguments",
    "ModelArguments",
    "RankDiffTrainingArguments",
    "RankDiffusionTrainer",
    "evaluate_masked_diffusion",
    "masked_nelbo",
]
