"""What a run writes into its output folder, recorded in a manifest (`run_outputs.json`) so that only that is ever
deleted or uploaded: a user's own files in the folder (scripts, notes) are never touched, and nothing of two runs
mixes."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

MANIFEST = "run_outputs.json"
# Written by the Trainer during a run, not part of its finished outputs (kept for a resume, never uploaded).
_RUNNING = ("checkpoint-", "runs")


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` but the Trainer's checkpoints and logs: relative path -> (mtime_ns, size)."""
    found = {}
    for root, dirs, names in os.walk(folder):
        if Path(root) == folder:
            dirs[:] = [d for d in dirs if not d.startswith(_RUNNING)]
        for name in names:
            path = Path(root) / name
            stat = path.stat()
            found[path.relative_to(folder).as_posix()] = (stat.st_mtime_ns, stat.st_size)
    return found


class RunOutputs:
    """The finished outputs of the run in `output_dir`, as its manifest lists them."""

    def __init__(self, output_dir: str | os.PathLike):
        self.folder = Path(output_dir)
        self.manifest = self.folder / MANIFEST

    @property
    def paths(self) -> list[str]:
        """The files the run wrote, relative to its folder (none before it finished)."""
        return json.loads(self.manifest.read_text())["files"] if self.manifest.exists() else []

    def check_clearable(self) -> None:
        """Raise if the folder holds a pipeline folder without a manifest: which of its files are a run's is unknown,
        so none of them may be replaced (checked before training, not only at its end)."""
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"--output_dir {self.folder} is a file, not a folder: give another --output_dir")
        if not self.manifest.exists() and self.finished():
            raise FileExistsError(
                f"{self.folder} holds a pipeline folder without {MANIFEST}: which files are a run's is unknown; "
                "remove them yourself or give another --output_dir"
            )

    def check_no_clash(self, names: set[str]) -> None:
        """Raise if the folder holds a file or folder of one of these top-level `names` (what a run writes) that no
        earlier run wrote: the run would overwrite a user's own file, and a later overwrite would delete it."""
        ours = {Path(path).parts[0] for path in self.paths}
        clash = sorted(name for name in names if (self.folder / name).exists() and name not in ours)
        if clash:
            raise FileExistsError(
                f"{self.folder} holds {clash}, which a run writes and no run of this folder wrote: move them, or give "
                "another --output_dir"
            )

    def finished(self) -> bool:
        """Whether the folder holds a finished run: its manifest, or a pipeline folder written without one."""
        return self.manifest.exists() or (self.folder / "model_index.json").exists()

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Within the block, every file written (new or changed) under the folder is a run output, added to the
        manifest with those listed before."""
        before = _files(self.folder) if self.folder.exists() else {}
        try:
            yield
        finally:
            after = _files(self.folder)
            written = {path for path, stamp in after.items() if before.get(path) != stamp and path != MANIFEST}
            files = sorted(written | {path for path in self.paths if path in after})
            self.manifest.write_text(json.dumps({"files": files}, indent=2) + "\n")

    def clear(self) -> None:
        """Delete the run's outputs (its manifest's files, and the folders they leave empty); checkpoints and every
        file the run did not write stay.

        Raises:
            FileExistsError: the folder holds a pipeline folder without a manifest ([`check_clearable`]).
        """
        self.check_clearable()
        if not self.manifest.exists():
            return
        for relative in self.paths:
            path = self.folder / relative
            path.unlink(missing_ok=True)
            for parent in path.parents:
                if parent == self.folder or not parent.is_dir() or any(parent.iterdir()):
                    break
                parent.rmdir()
        self.manifest.unlink()
