"""Training in several processes (gloo on the CPU) and exact resume after a SIGKILL."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dataset_scripts.tahoe_standin import write_standin_corpus
from training.checkpoints import COMPLETE_MARKER, last_complete_checkpoint

REPO = Path(__file__).resolve().parent.parent
SMALL_RUN = ["--max_length", "48", "--per_device_train_batch_size", "4", "--max_eval_cells", "8",
             "--eval_time_grid", "2", "--model_card", "false", "--use_cpu", "--disable_tqdm", "true"]  # fmt: skip

RECORDING_SCRIPT = """
import json, sys
import torch
sys.path.insert(0, {repo!r})
import train_hf
from dataset_scripts import RankDiffusionCollator

seen, collate = [], RankDiffusionCollator.__call__

def recording(self, batch):
    if self.rule is None:  # the training collator (evaluation uses the panel rule); a batch of rows or columns
        cells = batch["BARCODE_SUB_LIB_ID"] if isinstance(batch, dict) else [r["BARCODE_SUB_LIB_ID"] for r in batch]
        seen.extend(str(cell) for cell in cells)
    return collate(self, batch)

RankDiffusionCollator.__call__ = recording
trainer, metrics = train_hf.main(sys.argv[1:])
rank = trainer.args.process_index
out = trainer.args.output_dir
weights = {{name: tensor.detach().cpu() for name, tensor in trainer.model.state_dict().items()}}
torch.save(weights, f"{{out}}/weights_rank{{rank}}.pt")
with open(f"{{out}}/seen_rank{{rank}}.json", "w") as f:
    json.dump({{"seen": seen, "metrics": metrics, "world_size": trainer.args.world_size,
               "log_history": trainer.state.log_history}}, f)
"""


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"  # two processes on a small machine
    return env


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """A small Tahoe stand-in corpus: 8 plate-grouped files."""
    root = tmp_path_factory.mktemp("standin") / "tahoe"
    return write_standin_corpus(root, num_files=8, cells_per_file=40, num_plates=4, wells_per_file=2, num_lines=8)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["embedded sample", "stand-in corpus"])
def test_two_processes_see_disjoint_cells_and_end_with_identical_weights(tmp_path, source, request):
    """On the embedded sample (one shard: each process takes its share of every global batch) and on a corpus of
    4 shards (each process reads its own shards, after the same seeded shuffle of their order on both)."""
    script = tmp_path / "record.py"
    script.write_text(RECORDING_SCRIPT.format(repo=str(REPO)))
    out = tmp_path / "run"
    # The README's command: on a machine without GPUs the config's torchrun launch talks over gloo.
    config = REPO / "configs" / "accelerate" / "cpu_2_processes.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    args = ["--output_dir", str(out), "--max_steps", "4", "--eval_steps", "2", "--logging_steps", "1", *SMALL_RUN]
    if source == "stand-in corpus":
        args += ["--data", str(request.getfixturevalue("standin")), "--interleave_files", "2"]
    subprocess.run([*launch, str(script), *args], cwd=tmp_path, env=_env(), check=True, timeout=600)

    ranks = [json.loads((out / f"seen_rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    seen = [r["seen"] for r in ranks]
    # 4 steps of 4 cells each, and the batch the data loader fetched ahead to find the end
    assert 4 * 4 <= len(seen[0]) == len(seen[1]) <= 5 * 4
    assert len(set(seen[0])) == len(seen[0]) and not set(seen[0]) & set(seen[1])  # none twice, disjoint ranks
    first, second = (torch.load(out / f"weights_rank{r}.pt") for r in range(2))
    for name in first:
        assert torch.equal(first[name], second[name]), name
    # Evaluation: each process scored its half of the held-out cells, the totals were summed over processes.
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    assert ranks[0]["metrics"]["eval_tokens"] == 8 * 48
    # The logged loss parts are reduced over processes like the loss itself: they add up to it.
    logs = [entry for entry in ranks[0]["log_history"] if "loss" in entry]
    assert len(logs) == 4
    for entry in logs:
        assert entry["nelbo"] + entry["ordinal"] == pytest.approx(entry["loss"], abs=2e-3), entry
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["eval_nelbo"] == pytest.approx(ranks[0]["metrics"]["eval_nelbo"])


def _train(out: Path, *extra: str) -> subprocess.Popen:
    args = ["--output_dir", str(out), "--max_steps", "18", "--save_strategy", "steps", "--save_steps", "3",
            "--logging_steps", "1", "--eval_strategy", "no", "--ema_decay", "0.9", *SMALL_RUN, *extra]  # fmt: skip
    return subprocess.Popen([sys.executable, str(REPO / "train_hf.py"), *args], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


def _losses(checkpoint: Path) -> dict[int, float]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_losses_and_weights(tmp_path, standin):
    """On a Tahoe stand-in corpus streamed through Tahoe100MTokenized (4 files read side by side per shard)."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    data = ["--data", str(standin), "--interleave_files", "4"]
    first = _train(whole, *data)
    assert first.wait(timeout=600) == 0, first.stderr.read().decode()[-3000:]

    run = _train(killed, *data)
    deadline = time.time() + 600
    while not (killed / "checkpoint-6" / COMPLETE_MARKER).exists():
        assert run.poll() is None, run.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not (killed / "model").exists()  # it did not get to the end

    # A checkpoint folder left half-written (no marker) is never resumed from.
    partial = killed / "checkpoint-15"
    shutil.copytree(killed / "checkpoint-6", partial)
    (partial / COMPLETE_MARKER).unlink()
    (partial / "trainer_state.json").unlink()
    resume_from = last_complete_checkpoint(killed)
    assert resume_from is not None and int(resume_from.rsplit("-", 1)[1]) >= 6 and resume_from != str(partial)
    bad = _train(killed, *data, "--resume_from_checkpoint", str(partial))
    assert bad.wait(timeout=600) != 0 and b"not a complete checkpoint" in bad.stderr.read()
    shutil.rmtree(partial)

    (killed / "my_notes.py").write_text("# a user's own file in the output folder\n")
    resumed = _train(killed, *data, "--resume_from_checkpoint", "true")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-3000:]
    assert (killed / "my_notes.py").exists()  # finishing a resumed run replaces only the run's own outputs

    expected, got = _losses(whole / "checkpoint-18"), _losses(killed / "checkpoint-18")
    assert sorted(got) == list(range(1, 19))
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-6, abs=1e-6), step
    for name in ("model/model.safetensors", "checkpoint-18/ema.safetensors"):
        a, b = load_file(whole / name), load_file(killed / name)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["single_gpu", "multi_gpu", "multi_node", "fsdp", "cpu_2_processes"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.num_processes >= 1 and config.num_machines >= 1
    if name == "fsdp":
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "RankDiTBlock"
