from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dataset_scripts import RankDiffusionCollator, load_expression_data
from metrics import PerGeneMarginal
from modeling import CellTokenizer, RankDiTConfig, RankDiTModel, RankDiTProcessor
from pipelines import MaskedRankDiffusionScheduler
from training import EMACallback, RankDiffTrainingArguments, RankDiffusionTrainer, ema_decay_for
from training.checkpoints import is_complete_checkpoint, last_complete_checkpoint
from training.ema import EMA_WEIGHTS_NAME


def _set(model: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(value)


def test_ema_update_follows_the_warmed_up_decay():
    model = torch.nn.Linear(3, 2)
    ema = EMACallback(decay=0.9)
    ema.on_train_begin(None, None, None, model=model)
    expected = None
    for step, value in enumerate([1.0, 2.0, 4.0, 8.0], start=1):
        _set(model, value)
        ema.on_step_end(None, None, None, model=model)
        decay = 0.0 if step == 1 else min(0.9, step / (9 + step))  # (1 + n) / (10 + n) with n = step - 1
        expected = value if expected is None else decay * expected + (1 - decay) * value
        for shadow in ema.shadow_state_dict().values():
            torch.testing.assert_close(shadow, torch.full_like(shadow, expected))
    assert ema.optimization_step == 4


def test_ema_keeps_float32_shadow_weights_of_a_bfloat16_model():
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    ema = EMACallback(decay=0.99)
    ema.on_train_begin(None, None, None, model=model)
    for _ in range(3):
        _set(model, 1.0 / 3.0)
        ema.on_step_end(None, None, None, model=model)
    assert all(t.dtype == torch.float32 for t in ema.shadow_state_dict().values())
    assert model.weight.dtype == torch.bfloat16


def test_averaged_weights_are_lent_and_given_back():
    model = torch.nn.Linear(3, 2)
    ema = EMACallback(decay=0.5)
    with ema.averaged_weights(model):  # no shadow yet: the model keeps its weights
        pass
    ema.on_train_begin(None, None, None, model=model)
    _set(model, 1.0)
    ema.on_step_end(None, None, None, model=model)
    _set(model, 3.0)
    ema.on_step_end(None, None, None, model=model)  # decay min(0.5, 2/11) -> shadow 1 * 2/11 + 3 * 9/11
    with ema.averaged_weights(model):
        torch.testing.assert_close(model.weight, torch.full_like(model.weight, (2 + 27) / 11))
    torch.testing.assert_close(model.weight, torch.full_like(model.weight, 3.0))
    ema.copy_to(model)
    torch.testing.assert_close(model.weight, torch.full_like(model.weight, (2 + 27) / 11))


def test_bad_decay_and_a_checkpoint_without_ema_weights_are_refused(tmp_path):
    with pytest.raises(ValueError, match="decay"):
        EMACallback(decay=1.0)
    with pytest.raises(FileNotFoundError, match=EMA_WEIGHTS_NAME):
        EMACallback(decay=0.9).load(tmp_path, torch.nn.Linear(2, 2))


def test_ema_decay_zero_is_off_and_unset_is_the_preset_default(tmp_path):
    import train_hf

    parsed = train_hf.build_parser().parse_args_into_dataclasses(["--preset", "small", "--ema_decay", "0"])
    assert parsed[3].ema_decay == 0.0
    assert ema_decay_for(parsed[3].ema_decay, fsdp=False, preset="small") == 0.0  # off, as asked
    assert (
        ema_decay_for(None, fsdp=False, preset="small") == 0.9999
        and ema_decay_for(None, fsdp=False, preset="tiny") == 0
    )
    assert ema_decay_for(0.5, fsdp=False, preset="tiny") == 0.5
    with pytest.raises(ValueError, match="FSDP"):
        ema_decay_for(0.9, fsdp=True)
    assert _trainer(tmp_path / "off", ema_decay=0.0).ema is None
    assert _trainer(tmp_path / "on", ema_decay=0.9).ema.decay == 0.9


def _trainer(output_dir, max_steps=12, save_total_limit=None, ema_decay=0.8) -> RankDiffusionTrainer:
    rows = load_expression_data().rows.select(range(40))
    config = RankDiTConfig.from_preset("tiny", gene_vocab_size=62757, max_length=32)
    torch.manual_seed(0)
    tokenizer = CellTokenizer(max_length=32)
    processor = RankDiTProcessor(num_rank_bins=tokenizer.num_bins)
    args = RankDiffTrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=4,
        save_strategy="steps",
        save_steps=6,
        save_total_limit=save_total_limit,
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    return RankDiffusionTrainer(
        model=RankDiTModel(config),
        args=args,
        train_dataset=rows.select(range(32)),
        eval_dataset=rows.select(range(32, 40)),
        data_collator=RankDiffusionCollator(processor, tokenizer),
        noise_scheduler=MaskedRankDiffusionScheduler(),
        eval_collator=RankDiffusionCollator(processor, tokenizer, rule="expressed"),
        baseline=PerGeneMarginal(50, 62757),
        ema_decay=ema_decay,
    )


@pytest.mark.slow
def test_ema_weights_are_saved_with_each_checkpoint_restored_on_resume_and_used_for_evaluation(tmp_path):
    run = _trainer(tmp_path / "run")
    run.train()
    final = run.ema.shadow_state_dict()
    saved = load_file(tmp_path / "run" / "checkpoint-6" / EMA_WEIGHTS_NAME)
    assert set(saved) == set(final) and all(t.dtype == torch.float32 for t in saved.values())
    assert any(not torch.equal(saved[name], final[name]) for name in final)  # it moved after step 6

    resumed = _trainer(tmp_path / "run")
    resumed.ema.load(tmp_path / "run" / "checkpoint-6", resumed.model)
    assert resumed.ema.optimization_step == 6
    for name, tensor in resumed.ema.shadow_state_dict().items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0)

    resumed = _trainer(tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))
    assert resumed.ema.optimization_step == 12
    for name, tensor in resumed.ema.shadow_state_dict().items():
        torch.testing.assert_close(tensor, final[name])

    raw = {name: p.detach().clone() for name, p in run.model.named_parameters()}
    with_ema = run.evaluate()
    for name, parameter in run.model.named_parameters():  # the model's own weights are back
        assert torch.equal(parameter, raw[name])
    run.ema.copy_to(run.model)
    run.ema = None
    assert run.evaluate()["eval_nelbo"] == pytest.approx(with_ema["eval_nelbo"], rel=1e-6)


@pytest.mark.slow
def test_old_checkpoints_are_deleted_only_once_the_new_one_is_complete(tmp_path, monkeypatch):
    import training.checkpoints

    rotate = training.checkpoints.rotate_checkpoints
    seen = []

    def checking_rotate(output_dir, save_total_limit, best_model_checkpoint=None):
        newest = last_complete_checkpoint(output_dir)
        seen.append(Path(newest).name)
        assert (Path(newest) / EMA_WEIGHTS_NAME).exists()  # every file, the marker last
        rotate(output_dir, save_total_limit, best_model_checkpoint)

    monkeypatch.setattr(training.checkpoints, "rotate_checkpoints", checking_rotate)
    run = _trainer(tmp_path / "run", save_total_limit=1)
    run.train()
    assert seen == ["checkpoint-6", "checkpoint-12"]
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-12"]
    assert is_complete_checkpoint(tmp_path / "run" / "checkpoint-12")
    assert run.args.save_total_limit == 1  # lent to the callback, not changed
