"""Exponential moving average (EMA) of the weights during training, as a `Trainer` callback.

The arithmetic is diffusers' [`~diffusers.training_utils.EMAModel`]: after optimizer step n the shadow weights
become `decay_n * shadow + (1 - decay_n) * weights` with `decay_n = min(decay, n / (9 + n))` for n > 1 (the shadow
copies the weights at the first step, then follows them less and less closely until `decay` is reached). The shadow
is kept in float32 whatever the training precision, written to every checkpoint as `ema.safetensors` (by parameter
name, so any safetensors reader can load it into the model) and read back on resume.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from diffusers.training_utils import EMAModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

EMA_WEIGHTS_NAME = "ema.safetensors"


class EMACallback(TrainerCallback):
    """Keeps float32 EMA shadow weights of the trained model, saved with every checkpoint.

    Args:
        decay (`float`): the largest per-step decay, in (0, 1) (0.9999 for long runs).

    The shadow is created from the model's weights when training begins, unless [`load`] restored it from a
    checkpoint first. [`averaged_weights`] lends the shadow to the model for evaluation; [`copy_to`] makes it the
    model's weights for good (the final saved model).
    """

    def __init__(self, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.ema: EMAModel | None = None
        self.names: list[str] = []

    def _start(self, model: torch.nn.Module) -> None:
        named = list(model.named_parameters())
        self.names = [name for name, _ in named]
        self.ema = EMAModel([p for _, p in named], decay=self.decay)
        self.ema.to(dtype=torch.float32)

    def _parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        named = dict(model.named_parameters())
        if list(named) != self.names:
            raise ValueError("the model's parameters are not the ones the EMA was started on")
        return list(named.values())

    @property
    def optimization_step(self) -> int:
        return self.ema.optimization_step if self.ema is not None else 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.ema is None:
            self._start(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.ema.step(self._parameters(model))

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.ema is not None:
            checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            self.save(checkpoint)

    def shadow_state_dict(self) -> dict[str, torch.Tensor]:
        """The float32 shadow weights by parameter name."""
        return {name: tensor.detach().cpu().contiguous() for name, tensor in zip(self.names, self.ema.shadow_params)}

    def save(self, directory: str | os.PathLike) -> None:
        """Write `ema.safetensors` (shadow weights by name; decay and step count in the metadata) to `directory`."""
        metadata = {"decay": str(self.decay), "optimization_step": str(self.ema.optimization_step)}
        save_file(self.shadow_state_dict(), os.path.join(directory, EMA_WEIGHTS_NAME), metadata=metadata)

    def load(self, directory: str | os.PathLike, model: torch.nn.Module) -> None:
        """Restore the shadow weights and the step count saved in `directory` (a checkpoint) for `model`."""
        path = os.path.join(directory, EMA_WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist: the checkpoint was saved without EMA weights")
        with safe_open(path, framework="pt") as handle:
            step = int(handle.metadata()["optimization_step"])
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        self._start(model)
        missing = [name for name in self.names if name not in tensors]
        if missing:
            raise ValueError(f"{path} lacks EMA weights for {missing[:5]}")
        state = self.ema.state_dict()
        parameters = dict(model.named_parameters())
        shadow = [tensors[name].to(parameters[name].device, torch.float32) for name in self.names]
        state.update(optimization_step=step, shadow_params=shadow)
        self.ema.load_state_dict(state)

    def copy_to(self, model: torch.nn.Module) -> None:
        """Make the shadow weights the model's weights."""
        self.ema.copy_to(self._parameters(model))

    @contextlib.contextmanager
    def averaged_weights(self, model: torch.nn.Module) -> Iterator[None]:
        """Within the block the model holds the shadow weights; its own come back afterwards. Before training has
        begun there is no shadow and the model keeps its weights."""
        if self.ema is None:
            yield
            return
        parameters = self._parameters(model)
        self.ema.store(parameters)
        self.ema.copy_to(parameters)
        try:
            yield
        finally:
            self.ema.restore(parameters)
