"""A run never loses or mixes results silently: finished folders, damaged checkpoints, wrong files and paths."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

import train_hf
from dataset_scripts import cell_counts, is_hub_dataset_id, load_expression_data
from dataset_scripts.fixtures import write_tahoe_fixture
from modeling import rank_tokens
from training.checkpoints import COMPLETE_MARKER, check_resumable
from training.outputs import MANIFEST, RunOutputs


def test_a_finished_run_is_replaced_only_when_asked_and_only_its_own_files_go(tmp_path):
    out = tmp_path / "run"
    (out / "plots").mkdir(parents=True)
    written = ["model_index.json", "README.md", "imputation_results.json", "modeling_rank_dit.py", "plots/a.png"]
    for name in written:
        (out / name).write_text("{}")
    (out / MANIFEST).write_text(json.dumps({"files": written}))
    (out / "checkpoint-2").mkdir()
    (out / "my_script.py").write_text("# a user's own script\n")  # never written by a run: never deleted
    (out / "notes").mkdir()
    (out / "notes" / "todo.txt").write_text("look at the plots\n")
    argv = ["--output_dir", str(out), "--max_steps", "1"]
    with pytest.raises(FileExistsError, match="holds a finished run: .*--overwrite_output_dir"):
        train_hf.main(argv)
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):  # outputs are kept for a resume
        train_hf.main([*argv, "--resume_from_checkpoint", str(tmp_path / "gone")])
    assert (out / "README.md").exists()
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    with pytest.raises(FileNotFoundError, match="nope does not exist"):
        train_hf.main([*argv, "--overwrite_output_dir", "--data", str(tmp_path / "nope")])
    # A failed run keeps the finished run it was to replace: outputs are replaced only when the new ones are written.
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    RunOutputs(out).clear()  # what a finishing run does first
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert left == ["checkpoint-2", "my_script.py", "notes", "notes/todo.txt"]  # the run's outputs went, nothing else


def test_a_users_file_of_a_name_a_run_writes_is_refused_before_training(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "README.md").write_text("my own notes on this folder\n")
    with pytest.raises(FileExistsError, match=r"holds \['README.md'\], which a run writes and no run of this folder"):
        train_hf.main(["--output_dir", str(out), "--max_steps", "1"])
    assert (out / "README.md").read_text() == "my own notes on this folder\n"


def test_a_pipeline_folder_without_a_manifest_is_never_cleared(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model_index.json").write_text("{}")
    (out / "pipeline_masked_rank_diffusion.py").write_text("")
    for flags in (["--overwrite_output_dir"], ["--resume_from_checkpoint", "true"]):  # refused before training
        with pytest.raises(FileExistsError, match=f"without {MANIFEST}"):
            train_hf.main(["--output_dir", str(out), "--max_steps", "1", *flags])
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "pipeline_masked_rank_diffusion.py"]


def test_the_manifest_records_what_was_written_and_clearing_removes_only_that(tmp_path):
    outputs = RunOutputs(tmp_path)
    (tmp_path / "mine.txt").write_text("kept")
    (tmp_path / "stale.json").write_text("old")
    with outputs.recording():
        (tmp_path / "model").mkdir()
        (tmp_path / "model" / "config.json").write_text("{}")
        (tmp_path / "stale.json").write_text("new")  # rewritten: the run's now
    assert outputs.paths == ["model/config.json", "stale.json"] and outputs.finished()
    outputs.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"] and not outputs.finished()


def _checkpoint(folder, *, complete=True, optimizer=True, weights_ok=True):
    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(64)}, str(folder / "model.safetensors"))
    if not weights_ok:
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) - 100])
    if optimizer:
        torch.save({}, folder / "optimizer.pt")
    torch.save({}, folder / "scheduler.pt")
    if complete:
        (folder / COMPLETE_MARKER).write_text("2\n")
    return folder


def test_only_a_whole_checkpoint_is_resumed(tmp_path):
    check_resumable(_checkpoint(tmp_path / "good"))
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        check_resumable(tmp_path / "deleted")
    with pytest.raises(ValueError, match="was being written when the run stopped"):
        check_resumable(_checkpoint(tmp_path / "partial", complete=False))
    with pytest.raises(ValueError, match="lacks \\['optimizer.pt'\\]: resuming would restart the optimizer"):
        check_resumable(_checkpoint(tmp_path / "no_optimizer", optimizer=False))
    with pytest.raises(ValueError, match="truncated.model.safetensors cannot be read"):
        check_resumable(_checkpoint(tmp_path / "truncated", weights_ok=False))
    assert train_hf.resume_argument("false") is None and train_hf.resume_argument("True") is True


def test_a_checkpoint_of_another_model_or_past_max_steps_is_not_resumed(tmp_path):
    from modeling import RankDiTConfig

    config = RankDiTConfig.from_preset("tiny", max_length=64)
    folder = _checkpoint(tmp_path / "checkpoint-2")
    config.save_pretrained(folder)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    check_resumable(folder, config, max_steps=3)
    longer = RankDiTConfig.from_preset("tiny", max_length=128)
    with pytest.raises(ValueError, match=r"another model than this run.s flags build \(max_length=64 there, 128 now"):
        check_resumable(folder, longer, max_steps=3)
    for steps in (1, 2):
        with pytest.raises(ValueError, match=f"--max_steps {steps} is not beyond checkpoint-2's step 2: nothing"):
            check_resumable(folder, config, max_steps=steps)


def test_wrong_files_and_mistyped_paths_are_named(tmp_path, monkeypatch):
    write_tahoe_fixture(tmp_path / "tahoe", num_shards=2, cells_per_shard=4, num_genes=200, expressed_range=(5, 50))
    table = pa.table({"genes": [[3, 4]], "expressions": [[1.0, 2.0]], "cell": ["a"]})
    pq.write_table(table, tmp_path / "tahoe" / "data" / "train-00002-of-00003.parquet")
    wrong = "train-00002-of-00003.parquet is not a Tahoe-layout .* \\['BARCODE_SUB_LIB_ID'\\]"
    with pytest.raises(ValueError, match=wrong):
        load_expression_data(tmp_path / "tahoe")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert not is_hub_dataset_id("data/celltypist_sampl") and is_hub_dataset_id("tahoebio/Tahoe-100M")
    with pytest.raises(FileNotFoundError, match="data/celltypist_sampl does not exist"):
        load_expression_data("data/celltypist_sampl")
    with pytest.raises(ValueError, match="counts must be non-negative"):
        genes, counts = cell_counts({"genes": [2, 5, 6], "expressions": [-2.0, 1.0, 3.0]})  # not the marker
        rank_tokens(counts, 10)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (dict(test_plates=["plate1"]), "--test_plates holds out plates: it needs --split_by plate, not barcode"),
        (dict(split_by="file", validation_plates=["plate1"]), "--validation_plates .* needs --split_by plate"),
        (dict(split_by="plate"), "--split_by plate needs the plates to hold out"),
        (dict(split_by="file"), "--split_by file needs the files to hold out"),
        (dict(split_by="plate", test_plates=["plate1"], test_share=0.2), "--test_share goes with --split_by barcode"),
        (dict(split_by="plate", validation_plates=["p1", "p2"], test_plates=["p2"]), r"\['p2'\] are in both"),
        (dict(split_by="lane"), "--split_by must be one of"),
    ],
)
def test_split_flags_without_their_split_are_refused_at_once(flags, message):
    from training import DataArguments

    with pytest.raises(ValueError, match=message):
        DataArguments(**flags)


def test_held_out_plates_and_files_must_be_in_the_data(tmp_path):
    write_tahoe_fixture(tmp_path / "tahoe", num_shards=2, cells_per_shard=4, num_genes=200, expressed_range=(5, 50))
    common = ["--data", str(tmp_path / "tahoe"), "--output_dir", str(tmp_path / "run"), "--max_steps", "1"]
    with pytest.raises(ValueError, match=r"--split_by plate: \['plateX'\] are not in the data; it holds plate"):
        train_hf.main([*common, "--split_by", "plate", "--test_plates", "plateX"])
    with pytest.raises(ValueError, match=r"--split_by file: \['nope.parquet'\] are not in the data; it holds train-"):
        train_hf.main([*common, "--split_by", "file", "--test_files", "nope.parquet"])
    with pytest.raises(ValueError, match="the model card scores test cells"):
        train_hf.main([*common, "--split_by", "plate", "--validation_plates", "plate1"])
    assert not (tmp_path / "run").exists()


def test_a_run_that_fails_while_writing_its_outputs_leaves_the_earlier_ones_whole(tmp_path, monkeypatch):
    from types import SimpleNamespace

    out = tmp_path / "run"
    out.mkdir()
    (out / "model_index.json").write_text("earlier")
    (out / MANIFEST).write_text(json.dumps({"files": ["model_index.json"]}))

    def save(folder):
        (folder / "model").mkdir(parents=True)
        (folder / "model" / "config.json").write_text("{}")
        (folder / "model_index.json").write_text("new")

    def card_that_fails(folder, **kwargs):
        (folder / "README.md").write_text("half a card")
        raise RuntimeError("the card's scoring failed")

    recipe = SimpleNamespace(save=lambda folder: (folder / "run_config.json").write_text("{}"))
    run = SimpleNamespace(
        trainer=SimpleNamespace(args=SimpleNamespace(output_dir=str(out), hub_token=None)),
        pipe=SimpleNamespace(save_pretrained=save, set_progress_bar_config=lambda **kwargs: None),
        data=SimpleNamespace(recipe=recipe, source=SimpleNamespace(name="data")),
        ema_decay=None,
    )
    monkeypatch.setattr(train_hf, "write_model_card", card_that_fails)
    monkeypatch.setattr(train_hf.TrainingSummary, "of", lambda *args, **kwargs: None)
    diffusion = SimpleNamespace(loss_description=lambda: "", noise_schedule="linear")
    card = SimpleNamespace(model_card=True, dataset_name=None, card_mask_ratios=[0.5], card_gif_steps=2)
    with pytest.raises(RuntimeError, match="the card's scoring failed"):
        train_hf.finalize(run, {}, SimpleNamespace(preset="tiny"), diffusion, card, None, {})
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", MANIFEST]  # no staging folder left
    assert (out / "model_index.json").read_text() == "earlier"
    card.model_card = False
    train_hf.finalize(run, {}, SimpleNamespace(preset="tiny"), diffusion, card, None, {"max_steps": 1})
    assert (out / "model_index.json").read_text() == "new"
    assert json.loads((out / train_hf.TRAIN_ARGS).read_text()) == {"max_steps": 1}
    assert RunOutputs(out).paths == [
        "eval_results.json",
        "model/config.json",
        "model_index.json",
        "run_config.json",
        "train_args.json",
    ]


def test_a_diverged_run_stops_naming_the_step():
    from types import SimpleNamespace

    from training.trainer import DivergenceCallback

    state = SimpleNamespace(global_step=25)
    DivergenceCallback().on_log(None, state, None, logs={"loss": 1.2, "learning_rate": 1e-3})
    for logs in ({"loss": float("nan")}, {"eval_loss": float("inf")}):
        with pytest.raises(RuntimeError, match="training diverged at step 25: .*lower --learning_rate"):
            DivergenceCallback().on_log(None, state, None, logs=logs)
