"""Training of RankDiff with the Hugging Face Trainer: arguments, the MDLM loss and its evaluation."""

from .arguments import (
    CardArguments,
    DataArguments,
    DiffusionArguments,
    ModelArguments,
    RankDiffTrainingArguments,
    ema_decay_for,
)
from .ema import EMACallback
from .evaluation import evaluate_masked_diffusion
from .loss import masked_nelbo
from .trainer import RankDiffusionTrainer

__all__ = [
    "CardArguments",
    "DataArguments",
    "DiffusionArguments",
    "EMACallback",
    "ModelArguments",
    "RankDiffTrainingArguments",
    "RankDiffusionTrainer",
    "ema_decay_for",
    "evaluate_masked_diffusion",
    "masked_nelbo",
]
