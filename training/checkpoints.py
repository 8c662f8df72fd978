"""Checkpoints that count only once completely written.

The Trainer writes `checkpoint-N/` file by file (weights, optimizer, scheduler, per-process RNG states, trainer
state; then the callbacks' own files, such as the EMA weights). A run killed in the middle leaves a folder that
looks like a checkpoint but is not one. [`CheckpointCompleteCallback`] writes a marker file last, after every
process has finished writing, and only then deletes checkpoints beyond `save_total_limit` (the Trainer would delete
them before: `RankDiffusionTrainer` leaves that to this callback); [`last_complete_checkpoint`] only picks folders
that have the marker. With `save_on_each_node` on disks that are not shared, only the first node's copy is marked.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from accelerate import PartialState
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

COMPLETE_MARKER = "checkpoint_complete"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class CheckpointCompleteCallback(TrainerCallback):
    """Marks `checkpoint-N/` complete once every process has written its part, then deletes the oldest
    checkpoints beyond `save_total_limit`. Register it after every callback that writes into checkpoints."""

    def on_save(self, args, state, control, **kwargs):
        PartialState().wait_for_everyone()
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            (folder / COMPLETE_MARKER).write_text(f"{state.global_step}\n")
            rotate_checkpoints(args.output_dir, args.save_total_limit, state.best_model_checkpoint)
        PartialState().wait_for_everyone()


# Config entries that record where or how a model was saved, not what it is.
_PROVENANCE = frozenset({"transformers_version", "_name_or_path", "architectures", "auto_map", "torch_dtype", "dtype"})


def check_resumable(folder: str | os.PathLike, model_config=None, max_steps: int = -1) -> None:
    """Raise, naming what is wrong, unless `folder` is a complete checkpoint a run can resume from exactly: it
    exists, is marked complete, holds the optimizer and learning-rate schedule (else training would silently restart
    them), its weights file reads, its model config is `model_config` (the run's flags built the same model) and
    its step is below `max_steps` (else nothing would be trained)."""
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {folder}: no such checkpoint folder")
    if not is_complete_checkpoint(folder):
        raise ValueError(
            f"{folder} is not a complete checkpoint (no {COMPLETE_MARKER} file): it was being written when the run "
            "stopped; resume from an earlier one"
        )
    names = {path.name for path in folder.iterdir()}
    missing = [name for name, found in (("optimizer.pt", any(n.startswith("optimizer") for n in names)),
                                        ("scheduler.pt", "scheduler.pt" in names)) if not found]  # fmt: skip
    if missing:
        raise ValueError(f"{folder} lacks {missing}: resuming would restart the optimizer and learning-rate schedule")
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt") as reader:
                for key in reader.keys():
                    reader.get_slice(key)
        except Exception as error:  # safetensors raises its own error types, naming no file
            raise ValueError(f"{weights} cannot be read ({error}): the checkpoint is damaged") from error
    if model_config is not None and (folder / "config.json").is_file():
        saved = json.loads((folder / "config.json").read_text())
        ours = model_config.to_dict()
        differ = sorted(k for k in saved.keys() & ours.keys() if k not in _PROVENANCE and saved[k] != ours[k])
        if differ:
            shown = ", ".join(f"{k}={saved[k]!r} there, {ours[k]!r} now" for k in differ[:5])
            raise ValueError(f"{folder} holds another model than this run's flags build ({shown}): resume with the "
                             "flags it was trained with, or start a new run in another --output_dir")  # fmt: skip
    state = folder / "trainer_state.json"
    if max_steps > 0 and state.is_file():
        step = json.loads(state.read_text()).get("global_step", 0)
        if step >= max_steps:
            raise ValueError(f"--max_steps {max_steps} is not beyond {folder.name}'s step {step}: nothing would be "
                             f"trained; give --max_steps above {step}")  # fmt: skip


def is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    return (Path(folder) / COMPLETE_MARKER).is_file()


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The complete `checkpoint-N` folder of `output_dir` with the largest N, or None; partial ones are skipped."""
    if not os.path.isdir(output_dir):
        return None
    steps = [
        (int(match.group(1)), name)
        for name in os.listdir(output_dir)
        if (match := _CHECKPOINT.match(name)) and is_complete_checkpoint(Path(output_dir) / name)
    ]
    return str(Path(output_dir) / max(steps)[1]) if steps else None
