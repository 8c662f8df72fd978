"""Drugs as molecules: Morgan fingerprints and Tanimoto similarity, a screen's SMILES, and a model that knows a drug
by its structure beside its own parameters (so a drug without training cells is predicted from its structure)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import randomize_zero_init

from dataset_scripts.molecules import MORGAN_BITS, morgan_fingerprints, tanimoto_similarity
from dataset_scripts.tahoe_metadata import drug_smiles
from modeling import RankDiTConfig, RankDiTModel

SMILES = {
    "Aspirin": "CC(=O)OC1=CC=CC=C1C(=O)O",
    "DMSO_TF": "CS(C)=O",
    "Ibuprofen": "CC(C)CC1=CC=C(C=C1)C(C)C(=O)O",
    "Metformin": "CN(C)C(=N)N=C(N)N",
}
CONDITIONS = {"cell_line_id": ["L1", "L2"], "drug": list(SMILES)}


def test_fingerprints_and_their_tanimoto_similarity_follow_rdkit():
    from rdkit import Chem, DataStructs
    from rdkit.Chem import rdFingerprintGenerator

    smiles = list(SMILES.values())
    bits = morgan_fingerprints(smiles)
    assert bits.shape == (4, MORGAN_BITS) and bits.dtype == np.uint8 and set(np.unique(bits)) == {0, 1}
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=MORGAN_BITS)
    prints = [generator.GetFingerprint(Chem.MolFromSmiles(s)) for s in smiles]
    expected = np.array([DataStructs.BulkTanimotoSimilarity(p, prints) for p in prints])
    np.testing.assert_allclose(tanimoto_similarity(smiles), expected, rtol=0, atol=1e-12)
    assert np.allclose(np.diag(expected), 1.0) and expected[0, 2] > expected[0, 3]  # two NSAIDs, then metformin
    with pytest.raises(ValueError, match="C1CC"):
        morgan_fingerprints(["CCO", "C1CC"])


def test_a_screens_smiles_are_read_by_drug_key_and_missing_ones_are_left_out(tmp_path):
    assert drug_smiles(tmp_path) == {}  # no metadata: drugs are known by id alone
    (tmp_path / "metadata").mkdir()
    table = pa.table({"drug": ["Metformin (DMSO_TF solvate)", "Aspirin ", "Unknown"],
                      "canonical_smiles": [SMILES["Metformin"], SMILES["Aspirin"], None]})  # fmt: skip
    pq.write_table(table, tmp_path / "metadata" / "drug_metadata.parquet")
    assert drug_smiles(tmp_path) == {"Metformin": SMILES["Metformin"], "Aspirin": SMILES["Aspirin"]}
    pq.write_table(table.drop(["canonical_smiles"]), tmp_path / "metadata" / "drug_metadata.parquet")
    assert drug_smiles(tmp_path) == {}


def _model(dropout: float = 0.5) -> RankDiTModel:
    config = RankDiTConfig.from_preset("tiny", gene_vocab_size=300, conditions=CONDITIONS, dose_condition=True,
                                       control_drug="DMSO_TF", perturbation_effect_rank=4,
                                       drug_feature_size=MORGAN_BITS, drug_residual_dropout=dropout)  # fmt: skip
    model = randomize_zero_init(RankDiTModel(config))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for weight in (model.drug_structure.to_condition, model.drug_structure.to_effect):
            weight.copy_(torch.randn(weight.shape, generator=generator))
    model.init_drug_features(morgan_fingerprints(list(SMILES.values())))
    return model.eval()


def _logits(model, drug: int, dose: float = 2.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    cells = {"gene_ids": torch.randint(3, 300, (2, 20), generator=generator),
             "input_ids": torch.randint(0, 52, (2, 20), generator=generator)}  # fmt: skip
    with torch.no_grad():
        return model(**cells, condition_ids=torch.tensor([[1, drug], [2, drug]]), doses=torch.full((2,), dose)).logits


def _give_residuals(model) -> None:
    """Random own parameters for every drug (as training gives the drugs it sees)."""
    generator = torch.Generator().manual_seed(3)
    effect = model.perturbation_effect
    with torch.no_grad():
        for weight in (model.condition_embedding.tables[1].weight, effect.drug_factors, effect.drug_genes,
                       effect.dose_response):  # fmt: skip
            weight.copy_(0.5 * torch.randn(weight.shape, generator=generator))


def test_a_drug_without_its_own_parameters_is_known_by_its_structure():
    model = _model()
    # Own parameters start at zero (a drug no training cell received keeps them), the null drug's features are zero.
    assert not model.condition_embedding.tables[1].weight.any() and not model.drug_structure.features[0].any()
    aspirin, ibuprofen = _logits(model, 1), _logits(model, 3)
    assert not torch.allclose(aspirin, ibuprofen)  # told apart by structure alone
    # ... through both paths: the explicit effect, and the conditioning (the control's effect is gated off)
    genes, doses = torch.randint(3, 300, (1, 20)), torch.full((1,), 2.0)
    tilts = [model.perturbation_effect(genes, ids, doses, model.drug_structure(ids))
             for ids in (torch.tensor([[1, 1]]), torch.tensor([[1, 3]]))]  # fmt: skip
    assert tilts[0].abs().max() > 0 and not torch.allclose(*tilts)
    control = _logits(model, 2)
    with torch.no_grad():
        model.drug_structure.features[2] = model.drug_structure.features[1]
    assert not torch.allclose(_logits(model, 2), control)
    with torch.no_grad():
        model.drug_structure.features[3] = model.drug_structure.features[1]
    torch.testing.assert_close(_logits(model, 3), aspirin)  # the same structure, the same prediction
    _give_residuals(model)
    assert not torch.allclose(_logits(model, 3), _logits(model, 1))  # their own parameters tell them apart again


def test_training_drops_the_residual_of_a_share_of_cells_never_the_null_drug_the_control_or_a_drug_without_one():
    model = _model(dropout=0.5).train()
    with torch.no_grad():
        model.drug_structure.features[4] = 0.0  # Metformin: no structure known
    drugs = torch.arange(5).repeat(400)  # null, Aspirin, DMSO_TF (the control), Ibuprofen, Metformin
    torch.manual_seed(0)
    residual = model.drug_structure(torch.stack([torch.ones_like(drugs), drugs], dim=1)).residual
    kept = [residual[drugs == d].mean().item() for d in range(5)]
    assert kept[0] == kept[2] == kept[4] == 1.0
    assert 0.4 < kept[1] < 0.6 and 0.4 < kept[3] < 0.6  # each cell drawn apart
    assert model.eval().drug_structure(torch.stack([torch.ones_like(drugs), drugs], dim=1)).residual.eq(1).all()


def test_training_drops_a_share_of_cells_drug_residuals_and_evaluation_none():
    model = _model(dropout=0.999)
    _give_residuals(model)
    told = _logits(model, 1)
    model.train()
    torch.manual_seed(0)
    structure_only = _logits(model, 1)
    model.eval()
    torch.testing.assert_close(_logits(model, 1), told)  # evaluation reads every residual
    effect = model.perturbation_effect
    with torch.no_grad():
        for weight in (model.condition_embedding.tables[1].weight, effect.drug_factors, effect.drug_genes,
                       effect.dose_response):  # fmt: skip
            weight.zero_()
    torch.testing.assert_close(structure_only, _logits(model, 1))  # dropped: as if the drug had none
    assert not torch.allclose(structure_only, told)


def test_drug_structure_survives_save_and_load_and_bad_settings_are_named(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    loaded = RankDiTModel.from_pretrained(tmp_path).eval()
    assert loaded.config.drug_feature_size == MORGAN_BITS and loaded.config.drug_residual_dropout == 0.5
    torch.testing.assert_close(loaded.drug_structure.features, model.drug_structure.features)
    assert not loaded.drug_structure.features[0].any() and loaded.drug_structure.features[1:].any(dim=1).all()
    torch.testing.assert_close(_logits(loaded, 3), _logits(model, 3))
    with pytest.raises(ValueError, match="drug_feature_size"):
        RankDiTConfig.from_preset(
            "tiny", gene_vocab_size=300, conditions={"cell_line_id": ["L1"]}, drug_feature_size=8
        )
    with pytest.raises(ValueError, match="drug_residual_dropout"):
        RankDiTConfig.from_preset("tiny", gene_vocab_size=300, conditions=CONDITIONS, drug_feature_size=8,
                                  drug_residual_dropout=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="shape"):
        model.init_drug_features(np.ones((3, MORGAN_BITS)))
    with pytest.raises(ValueError, match="no drug structure"):
        RankDiTModel(RankDiTConfig.from_preset("tiny", gene_vocab_size=300, conditions=CONDITIONS)).init_drug_features(
            np.ones((4, 8))
        )
