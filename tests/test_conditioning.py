"""RankDiT told a cell's perturbation conditions: embeddings in the conditioning, null values, save and load."""

import numpy as np
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


def test_the_dose_reaches_the_model_as_log10_of_dose_plus_1e_3_and_whether_it_is_above_zero():
    model, cells = _model(), _cells()
    seen = []
    model.condition_embedding.dose.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    doses = torch.tensor([0.05, 5.0, 0.0])
    with torch.no_grad():
        model(**cells, condition_ids=torch.ones(3, 2, dtype=torch.long), doses=doses)
    expected = torch.tensor([[np.log10(0.05 + 1e-3), 1], [np.log10(5.0 + 1e-3), 1], [np.log10(1e-3), 0]]).float()
    torch.testing.assert_close(seen[0], expected)


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


# Pipelines: conditions given by name, classifier-free guidance, AnnData in and out, the Hub-style folder.

B = 51 - 1  # the tiny preset's 50 bins


def _pipe(model):
    from modeling import GeneVocab, RankDiTProcessor
    from pipelines import MaskedRankDiffusionPipeline, MaskedRankDiffusionScheduler

    ids = range(3, 300)
    vocab = GeneVocab(list(ids), [f"ENSG{i:011d}" for i in ids], [f"G{i}" for i in ids])
    pipe = MaskedRankDiffusionPipeline(
        model=model,
        scheduler=MaskedRankDiffusionScheduler(num_rank_bins=model.config.num_rank_bins),
        processor=RankDiTProcessor.from_model_config(model.config, gene_vocab=vocab),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


TOLD = {"cell_line_id": "CVCL_0480", "drug": "Aspirin", "dose": 0.5}
GENES = [[f"G{i}" for i in range(10, 40)]] * 2


def _probs(pipe, **kwargs):
    ranks = [[1] * 30] * 2
    mask = [[i % 3 == 0 for i in range(30)]] * 2
    return pipe(gene_ids=GENES, ranks=ranks, mask=mask, output_type="probs", **kwargs).probs


def test_guidance_scale_one_is_the_conditional_model_and_zero_the_unconditional():
    model = _model()
    pipe = _pipe(model)
    conditional, unconditional = _probs(pipe, conditions=TOLD), _probs(pipe)
    assert not np.allclose(conditional, unconditional, atol=1e-4)
    cells = pipe.processor(GENES, ranks=[[1] * 30] * 2, mask=[[i % 3 == 0 for i in range(30)]] * 2)
    with torch.no_grad():  # the model told the ids by hand: what guidance scale 1 must be
        direct = model(**cells, condition_ids=torch.tensor([[2, 1]] * 2),
                       doses=torch.tensor([0.5, 0.5])).logits.softmax(-1)  # fmt: skip
    masked = cells.mask.numpy()
    np.testing.assert_allclose(conditional[masked], direct.numpy()[masked], atol=1e-5)
    np.testing.assert_allclose(_probs(pipe, conditions=TOLD, guidance_scale=0.0), unconditional, atol=1e-5)
    # Above 1: the log-probabilities extrapolated from the unconditional through the conditional.
    guided = _probs(pipe, conditions=TOLD, guidance_scale=3.0)
    expected = np.log(unconditional[masked]) + 3.0 * (np.log(conditional[masked]) - np.log(unconditional[masked]))
    expected = np.exp(expected - expected.max(-1, keepdims=True))
    np.testing.assert_allclose(guided[masked], expected / expected.sum(-1, keepdims=True), atol=1e-4)


def test_generation_with_conditions_per_cell_and_guidance_with_every_sampler_and_the_cache():
    pipe = _pipe(_model())
    per_cell = [TOLD, {"cell_line_id": "CVCL_0023", "drug": "DMSO_TF", "dose": 0.0}]
    for sampler in ("ancestral", "first-hitting", "confidence"):
        outs = [
            pipe(
                gene_ids=GENES,
                conditions=per_cell,
                guidance_scale=2.0,
                sampler=sampler,
                num_inference_steps=8,
                use_cache=cache,
                generator=torch.Generator().manual_seed(0),
            ).ranks  # fmt: skip
            for cache in (True, False)
        ]
        np.testing.assert_array_equal(outs[0], outs[1])
        assert ((outs[0] >= 0) & (outs[0] <= B)).all()
    told = pipe(gene_ids=GENES, conditions=TOLD, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    plain = pipe(gene_ids=GENES, generator=torch.Generator().manual_seed(0))
    assert (told.ranks != plain.ranks).any()


def test_unknown_condition_values_and_names_are_named():
    pipe = _pipe(_model())
    with pytest.raises(KeyError, match=r"unknown drug 'Bortezomib': the model knows 2 \(Aspirin, DMSO_TF\)"):
        pipe(gene_ids=GENES, conditions={"drug": "Bortezomib"})
    with pytest.raises(KeyError, match=r"unknown conditions \['plate'\]"):
        pipe(gene_ids=GENES, conditions={"plate": "p1"})
    with pytest.raises(ValueError, match="one dict or a list of 2 dicts"):
        pipe(gene_ids=GENES, conditions=[TOLD])
    with pytest.raises(ValueError, match="guidance_scale must be a number >= 0"):
        pipe(gene_ids=GENES, conditions=TOLD, guidance_scale=-1.0)
    plain = _pipe(RankDiTModel(RankDiTConfig.from_preset("tiny", gene_vocab_size=300)).eval())
    with pytest.raises(ValueError, match="this model has no conditions"):
        plain(gene_ids=GENES, conditions=TOLD)


def test_anndata_generation_and_imputation_conditioned_on_obs_columns():
    import anndata
    import pandas as pd

    pipe = _pipe(_model())
    obs = pd.DataFrame({"cell_line_id": ["CVCL_0480", "CVCL_1097", None], "drug": ["Aspirin"] * 3,
                        "dose": [0.5, 5.0, np.nan], "well": ["a", "b", "c"]})  # fmt: skip
    genes = [f"G{i}" for i in range(10, 30)]
    generated = pipe.generate_anndata(obs, genes, num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    assert generated.shape == (3, 20) and list(generated.obs["well"]) == ["a", "b", "c"]
    assert ((generated.X >= 0) & (generated.X <= B)).all() and list(generated.var_names) == genes
    counts = np.random.default_rng(0).poisson(2.0, (3, 20)).astype(np.float32)
    counts[:, :5] = np.nan
    adata = anndata.AnnData(counts, obs=obs.set_index("well"))
    adata.var_names = genes
    told = pipe.impute_anndata(adata, condition_columns=["cell_line_id", "drug", "dose"])
    plain = pipe.impute_anndata(adata, condition_columns=[])
    assert not np.allclose(told.layers["rankdiff_expected"][:, :5], plain.layers["rankdiff_expected"][:, :5])
    by_default = pipe.impute_anndata(adata)  # the obs columns named like the model's conditions
    np.testing.assert_array_equal(by_default.layers["rankdiff_expected"], told.layers["rankdiff_expected"])
    with pytest.raises(KeyError, match=r"condition columns \['treatment'\] are not in obs"):
        pipe.impute_anndata(adata, condition_columns={"drug": "treatment"})
    with pytest.raises(TypeError, match="condition_columns must be a list of obs column names .*, got 'drug'"):
        pipe.impute_anndata(adata, condition_columns="drug")
    calls = []
    pipe.model.register_forward_hook(lambda *args: calls.append(1))
    for column, value, error, message in (("dose", -1.0, ValueError, "the dose must be a number >= 0"),
                                          ("drug", "Aspirine", KeyError, "unknown drug 'Aspirine'")):  # fmt: skip
        bad = adata.copy()
        bad.obs[column] = bad.obs[column].astype(object)
        bad.obs.loc["c", column] = value  # the last cell of a later batch: refused before the first is imputed
        with pytest.raises(error, match=f"cell 'c' \\(obs\\): {message}"):
            pipe.impute_anndata(bad, cell_batch_size=2)
    assert not calls
    unknown = "genes outside the checkpoint's vocabulary: \\['NOPE'\\]"
    for genes, error, message in (("G10", TypeError, "genes must be a list of genes"),
                                  (["G10", "NOPE"], KeyError, unknown)):  # fmt: skip
        with pytest.raises(error, match=message):
            pipe.generate_anndata(obs, genes)
    assert not calls


def test_columns_and_arguments_that_would_be_ignored_are_named(caplog):
    import anndata
    import pandas as pd

    pipe = _pipe(_model())
    genes = [f"G{i}" for i in range(10, 20)]
    with pytest.raises(TypeError, match="obs must be a pandas DataFrame .*, got list"):
        pipe.generate_anndata([{"drug": "Aspirin"}], genes)
    obs = pd.DataFrame({"Drug": ["Aspirin"], "well": ["a"]})  # not the model's "drug"
    pipe.generate_anndata(obs, genes, num_inference_steps=2)
    assert "obs columns ['Drug'] are not conditions of this model" in caplog.text
    plain = _pipe(RankDiTModel(RankDiTConfig.from_preset("tiny", gene_vocab_size=300)).eval())
    plain.generate_anndata(pd.DataFrame({"drug": ["Aspirin"]}), genes, num_inference_steps=2)
    assert "obs columns ['drug'] are not conditions of this model (its conditions: none" in caplog.text
    caplog.clear()
    counts = np.where(np.eye(2, 10, dtype=bool), np.nan, 1.0)
    plain.impute_anndata(anndata.AnnData(counts, obs=pd.DataFrame({"Dose": [1.0, 2.0]}, index=["a", "b"]),
                                         var=pd.DataFrame(index=genes)), num_inference_steps=2)  # fmt: skip
    assert "impute_anndata: obs columns ['Dose'] are not conditions of this model" in caplog.text
    plain(gene_ids=GENES, guidance_scale=2.0, num_inference_steps=2)
    assert "guidance_scale=2.0 has no effect without conditions" in caplog.text


@pytest.mark.slow
def test_conditions_survive_the_hub_style_folder_and_the_transformers_task(tmp_path):
    from diffusers import DiffusionPipeline
    from transformers import pipeline

    pipe = _pipe(_model())
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe", trust_remote_code=True)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.model.config.conditions == CONDITIONS and loaded.model.config.dose_condition
    np.testing.assert_allclose(_probs(loaded, conditions=TOLD, guidance_scale=2.0),
                               _probs(pipe, conditions=TOLD, guidance_scale=2.0), atol=1e-5)  # fmt: skip
    task = pipeline(model=str(tmp_path / "pipe" / "model"), trust_remote_code=True)
    mask = [i % 3 == 0 for i in range(30)]
    out = task(gene_ids=GENES[0], ranks=[1] * 30, mask=mask, conditions=TOLD, guidance_scale=2.0)
    np.testing.assert_allclose(out["probs"], _probs(pipe, conditions=TOLD, guidance_scale=2.0)[0], atol=1e-5)
