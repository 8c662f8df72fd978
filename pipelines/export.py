# Copyright 2026 The RankDiff authors. Licensed under the Apache License, Version 2.0.
"""The one export of a RankDiff model: the pipeline folder that loads every way, with each component's code."""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path

from diffusers import DiffusionPipeline
from diffusers.utils.dynamic_modules_utils import get_relative_import_files
from huggingface_hub import HfApi


def save_pipeline_folder(pipe, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
    """Write a [`MaskedRankDiffusionPipeline`]'s complete folder, so that it loads every way:

    `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`, `AutoModel.from_pretrained(folder,
    subfolder="model", trust_remote_code=True)` and `pipeline(model=folder + "/model", trust_remote_code=True)`.
    The folder holds `model_index.json` and the pipeline's code, `model/` (config, weights, the model's code, the
    processor and the transformers task beside it), `scheduler/`, `processor/` and, for a model that reads reference
    cells, `reference/` (the [`ReferenceCells`]), each with its code, and the
    model's code and the processor's config at the root too (transformers 5 looks there even with a `subfolder`).
    With `push_to_hub=True` (and `repo_id=`, `token=`, `private=`, `commit_message=`) the folder is uploaded.
    """
    hub = {key: kwargs.pop(key, None) for key in ("repo_id", "token", "private", "commit_message")}
    # Remote code classes loaded by diffusers are not registered with transformers' Auto classes; registering them
    # makes each `save_pretrained` write its code and `auto_map`.
    type(pipe.model).register_for_auto_class("AutoModel")
    type(pipe.model.config).register_for_auto_class()
    type(pipe.processor).register_for_auto_class("AutoFeatureExtractor")
    DiffusionPipeline.save_pretrained(pipe, save_directory, **kwargs)
    folder = Path(save_directory)
    pipe.processor.save_pretrained(folder / "model")  # for the transformers task, which loads it from there
    coded = [(folder, pipe), (folder / "scheduler", pipe.scheduler)]
    if getattr(pipe, "reference", None) is not None:
        coded.append((folder / "reference", pipe.reference))
    for target, obj in coded:
        module_file = Path(inspect.getfile(type(obj)))
        for code_file in [module_file, *map(Path, get_relative_import_files(str(module_file)))]:
            shutil.copy(code_file, target / code_file.name)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = [Path(inspect.getfile(type(pipe))).stem, type(pipe).__name__]
    for name in ("model", "scheduler", "processor", "reference"):
        component = getattr(pipe, name, None)
        if component is None:
            continue
        index[name] = [Path(inspect.getfile(type(component))).stem, type(component).__name__]
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    # transformers 5 looks at the root for remote code, and the transformers task for the processor's config, even
    # with `subfolder="model"`.
    for name in [*(p.name for p in (folder / "model").glob("*.py")), "preprocessor_config.json"]:
        if (folder / "model" / name).exists():
            shutil.copy(folder / "model" / name, folder / name)
    if push_to_hub:
        api = HfApi(token=hub["token"])
        repo_id = api.create_repo(hub["repo_id"] or folder.absolute().name, private=hub["private"],
                                  exist_ok=True).repo_id  # fmt: skip
        api.upload_folder(repo_id=repo_id, folder_path=folder, ignore_patterns=["checkpoint-*", "runs/*"],
                          commit_message=hub["commit_message"] or "Upload RankDiff pipeline")  # fmt: skip
