"""RankDiT told a cell's perturbation conditions: embeddings in the conditioning, null values, save and load."""

import pytest
import torch
from conftest import randomize_zero_init

from modeling import RankDiTConfig, RankDiTModel

CONDITIONS = {"cell_line_id": ["CVCL_0023", "CVCL_0480", "CVCL_1097"], "drug": ["Aspirin", "DMSO_TF"]}


def _model(**overrides):
    config = RankDiTConfig.from_preset("tiny", gene_vocab_size=300, conditions=CONDITIONS, dose_condition=True,
                                       **overrides)  # fmt: skip
    return randomize_zero_init(RankDiTModel(config)).eval()


def _cells(batch=3, length=20):
    generator = torch.Generator().manual_seed(0)
    return {
        "gene_ids": torch.randint(3, 300, (batch, length), generator=generator),
        "input_ids": torch.randint(0, 52, (batch, length), generator=generator),
    }


def test_conditions_change_the_prediction_and_null_is_the_default():
    model, cells = _model(), _cells()
    with torch.no_grad():
        unconditional = model(**cells).logits
        null = model(**cells, condition_ids=torch.zeros(3, 2, dtype=torch.long), doses=torch.full((3,), torch.nan))
        told = model(**cells, condition_ids=torch.tensor([[1, 2], [2, 1], [3, 2]]), doses=torch.tensor([0.5, 5.0, 0]))
        other_dose = model(**cells, condition_ids=torch.tensor([[1, 2], [2, 1], [3, 2]]), doses=torch.zeros(3))
    torch.testing.assert_close(null.logits, unconditional)
    assert not torch.allclose(told.logits, unconditional)
    assert not torch.allclose(told.logits[:2], other_dose.logits[:2])
    torch.testing.assert_close(told.logits[2], other_dose.logits[2])  # the same dose, 0


def test_conditions_round_trip_through_save_and_load(tmp_path):
    model, cells = _model(), _cells()
    model.save_pretrained(tmp_path)
    loaded = RankDiTModel.from_pretrained(tmp_path).eval()
    assert loaded.config.conditions == CONDITIONS and loaded.config.dose_condition
    ids, doses = torch.tensor([[1, 2], [0, 1], [3, 0]]), torch.tensor([0.05, float("nan"), 5.0])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(**cells, condition_ids=ids, doses=doses).logits,
            model(**cells, condition_ids=ids, doses=doses).logits,
        )


def test_bad_conditions_are_named():
    model, cells = _model(), _cells()
    with pytest.raises(ValueError, match="condition_ids of 'drug' must be in 0..2; got 3"):
        model(**cells, condition_ids=torch.tensor([[1, 3], [1, 1], [1, 1]]))
    with pytest.raises(ValueError, match=r"condition_ids must be \(batch, 2\)"):
        model(**cells, condition_ids=torch.ones(3, 1, dtype=torch.long))
    plain = RankDiTModel(RankDiTConfig.from_preset("tiny", gene_vocab_size=300))
    with pytest.raises(ValueError, match="this model has no conditions"):
        plain(**cells, doses=torch.zeros(3))
    with pytest.raises(ValueError, match="must list distinct values"):
        RankDiTConfig(conditions={"drug": ["Aspirin", "Aspirin"]})
