"""Translating control cells: a grouped reference (a screen's control cells by line), quantile coupling of control
tokens to a condition, factorised condition dropout and guidance, and conditions that reach single genes."""

import math

import numpy as np
import pytest
import scipy.sparse
import torch
from conftest import randomize_zero_init
from test_conditioning import CONDITIONS, _cells, _model, _pipe
from torch.nn import functional as F

from modeling import RankDiTConfig, RankDiTModel
from modeling.conditions import ConditionEncoder
from pipelines import ReferenceCells

B = 50
MASK = B + 1


def _grouped_reference(k: int = 3) -> ReferenceCells:
    """12 cells over genes 3..22: group 1 expresses genes 3..12 (token 1..10), group 2 genes 13..22; 6 cells each."""
    rng = np.random.default_rng(0)
    dense = np.zeros((12, 30), dtype=np.int64)
    for cell in range(12):
        genes = np.arange(3, 13) if cell < 6 else np.arange(13, 23)
        dense[cell, genes] = rng.integers(1, B + 1, size=10)
    groups = np.array([1] * 6 + [2] * 6)
    reference, rows = ReferenceCells.from_tokens(scipy.sparse.csr_matrix(dense), B, num_neighbours=k, groups=groups,
                                                 group_condition="cell_line_id", num_components=4)  # fmt: skip
    assert rows.tolist() == list(range(12)) and reference.groups.tolist() == groups.tolist()
    return reference


def test_a_grouped_reference_gives_each_cell_its_own_groups_cells_and_random_ones_to_a_cell_showing_nothing():
    reference = _grouped_reference()
    genes = torch.arange(3, 23)[None].expand(4, -1)
    tokens = torch.full((4, 20), MASK)
    tokens[:2, :10] = 5  # cells 0 and 1 look like group 1 (genes 3..12 expressed); cells 2 and 3 show nothing
    real = torch.ones_like(tokens, dtype=torch.bool)
    groups = torch.tensor([2, 1, 2, 1])
    found = reference.context(genes, tokens, real, mask_token_id=MASK, groups=groups,
                              generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert found.shape == (4, 20, 3)
    # Whatever it looks like, a cell reads cells of its own group only: group 2 expresses genes 13..22 alone.
    for cell, group in enumerate(groups.tolist()):
        expressed = (found[cell] > 0).any(dim=1)
        assert expressed[:10].any() == (group == 1) and expressed[10:].any() == (group == 2)
    # A cell showing nothing reads k distinct cells of its group drawn by the generator, another draw others.
    again = reference.context(genes, tokens, real, mask_token_id=MASK, groups=groups,
                              generator=torch.Generator().manual_seed(0))  # fmt: skip
    torch.testing.assert_close(found, again)
    draws = {
        tuple(reference.context(genes, tokens, real, mask_token_id=MASK, groups=groups,
                                generator=torch.Generator().manual_seed(seed))[3, :10].flatten().tolist())
        for seed in range(6)
    }  # fmt: skip
    assert len(draws) > 1
    # Never itself (a training cell): reference row 0 is excluded from cell 1's group-1 neighbours.
    excluded = reference.context(genes, tokens, real, mask_token_id=MASK, groups=groups, k=5,
                                 exclude=torch.tensor([-1, 0, -1, -1]))  # fmt: skip
    rows = reference._found_rows(reference.embed(genes[1:2], tokens[1:2].masked_fill(tokens[1:2] == MASK, 0),
                                                 tokens[1:2] != MASK), tokens[1:2] != MASK, 5, torch.tensor([0]),
                                 torch.tensor([1]), None)  # fmt: skip
    assert 0 not in rows.tolist()[0] and set(rows.tolist()[0]) <= set(range(6)) and excluded.shape[-1] == 5
    # Group id 0 (the line not told) reads any cell; an ungrouped reference ignores groups.
    anyone = reference.context(genes, tokens, real, mask_token_id=MASK, groups=torch.tensor([0, 0, 0, 0]))
    assert anyone.shape == (4, 20, 3)
    # A group with too few reference cells (or none) reads any cell, so every cell reads k of them: k + 1 are
    # needed, as a cell may be one of them (found and dropped).
    unknown = reference.context(genes, tokens, real, mask_token_id=MASK, groups=torch.tensor([7, 1, 1, 1]), k=5)
    assert unknown.shape == (4, 20, 5) and (unknown[1:, 10:] == 0).all()
    too_few = reference.context(genes, tokens, real, mask_token_id=MASK, groups=torch.tensor([1, 1, 1, 1]), k=6)
    assert (too_few > 0).any(dim=2)[:, 10:].any()  # group 1's 6 cells are too few for 6 and a dropped one
    assert (unknown[0] > 0).any(dim=1)[10:].any()  # cell 0 (group 7, unknown) reads group 2's cells too
    with pytest.raises(ValueError, match="groups and group_condition together"):
        ReferenceCells.from_tokens(scipy.sparse.csr_matrix(np.ones((3, 5), dtype=np.int64)), B, groups=[1, 1, 2])


def test_perturbation_dropout_nulls_the_drug_and_dose_and_keeps_the_line_drawn_apart_from_full_dropout():
    encoder = ConditionEncoder({"cell_line_id": ["L1", "L2"], "drug": ["A", "DMSO_TF"]}, dose_condition=True)
    cells = [f"c{i}" for i in range(2000)]
    columns = {"cell_line_id": ["L2"] * 2000, "drug": ["A"] * 2000, "dose": [1.0] * 2000}
    out = encoder.encode_rows(columns, cells, dropout=0.1, perturbation_dropout=0.2, seed=3)
    ids, doses = out["condition_ids"].numpy(), out["doses"].numpy()
    everything = (ids == 0).all(axis=1)
    perturbation = (ids[:, 0] == 2) & (ids[:, 1] == 0)
    assert 0.07 < everything.mean() < 0.13 and 0.15 < perturbation.mean() < 0.25
    assert np.isnan(doses[everything | perturbation]).all() and (doses[~(everything | perturbation)] == 1.0).all()
    assert ((ids[:, 1] == 0) == (everything | perturbation)).all()  # the line is never dropped alone
    # A resumed run draws the same cells; another epoch others.
    again = encoder.encode_rows(columns, cells, dropout=0.1, perturbation_dropout=0.2, seed=3)
    torch.testing.assert_close(again, out, equal_nan=True)
    later = encoder.encode_rows(columns, cells, dropout=0.1, perturbation_dropout=0.2, seed=3, epoch=1)
    assert not torch.equal(later["condition_ids"], out["condition_ids"])


def test_factorised_guidance_contrasts_the_perturbation_with_the_line_alone():
    model = _model(factorized_guidance=True)
    pipe = _pipe(model)
    genes = [[f"G{i}" for i in range(10, 40)]] * 2
    ranks, mask = [[1] * 30] * 2, [[i % 3 == 0 for i in range(30)]] * 2

    def probs(conditions, scale=1.0):
        return pipe(gene_ids=genes, ranks=ranks, mask=mask, output_type="probs", conditions=conditions,
                    guidance_scale=scale).probs  # fmt: skip

    told = {"cell_line_id": "CVCL_0480", "drug": "Aspirin", "dose": 0.5}
    conditional, line_only = probs(told), probs({"cell_line_id": "CVCL_0480"})
    masked = pipe.processor(genes, ranks=ranks, mask=mask).mask.numpy()
    guided = probs(told, 3.0)[masked]
    expected = np.log(line_only[masked]) + 3.0 * (np.log(conditional[masked]) - np.log(line_only[masked]))
    expected = np.exp(expected - expected.max(-1, keepdims=True))
    np.testing.assert_allclose(guided, expected / expected.sum(-1, keepdims=True), atol=1e-4)
    np.testing.assert_allclose(probs(told, 0.0), line_only, atol=1e-5)  # w = 0: the line alone, not the null
    assert not np.allclose(line_only, probs(None), atol=1e-4)


def test_conditions_reach_single_genes_through_the_gene_condition():
    model, cells = _model(gene_condition="hidden"), _cells(batch=2)
    told = {"condition_ids": torch.tensor([[1, 1], [2, 2]]), "doses": torch.tensor([0.5, 0.5])}
    assert _model().gene_condition is None  # only when asked for
    for where in ("hidden", "logits"):  # in the hidden states, or on the output log-probabilities
        placed = _model(gene_condition=where)
        with torch.no_grad():
            before = placed(**cells, **told).logits
            placed.gene_condition.out.weight.zero_()
            placed.gene_condition.out.bias.zero_()
            assert not torch.allclose(placed(**cells, **told).logits, before, atol=1e-5)
    with torch.no_grad():
        logits = model(**cells, **told).logits
        genes = model.gene_embedding(cells["gene_ids"])
        vector = model.condition_embedding(told["condition_ids"], told["doses"], genes[:, 0])
        film = model.gene_condition
        torch.testing.assert_close(
            film(genes, vector), film.out(film.norm(genes) * film.norm(film.condition(vector))[:, None])
        )
        model.gene_condition.out.weight.zero_()
        model.gene_condition.out.bias.zero_()
        assert not torch.allclose(model(**cells, **told).logits, logits, atol=1e-5)  # it reaches the output
    # Zero at initialisation: a new model starts as one without it.
    fresh = type(model)(model.config).eval()
    torch.testing.assert_close(fresh.gene_condition(torch.randn(2, 5, fresh.config.hidden_size),
                                                    torch.randn(2, fresh.config.hidden_size)),
                               torch.zeros(2, 5, fresh.config.hidden_size))  # fmt: skip


def test_the_perturbation_effect_moves_each_gene_along_the_rank_axis_by_drug_line_and_dose(tmp_path):
    model, cells = _model(perturbation_effect_rank=4, control_drug="DMSO_TF"), _cells(batch=4)
    assert _model().perturbation_effect is None  # only when asked for
    effect = model.perturbation_effect
    zero = {name: parameter.detach().clone() for name, parameter in effect.named_parameters()}
    assert not any(zero[name].any() for name in ("drug_factors", "drug_genes", "context_factors.0"))  # none at start
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in effect.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    aspirin, dmso = 1, 2
    ids = torch.tensor([[1, aspirin], [1, aspirin], [1, dmso], [2, aspirin]])
    doses = torch.tensor([0.05, 5.0, 0.0, 5.0])
    with torch.no_grad():
        with_effect = model(**cells, condition_ids=ids, doses=doses).logits
        model.perturbation_effect = None
        without = model(**cells, condition_ids=ids, doses=doses).logits
        model.perturbation_effect = effect
    change = with_effect - without
    torch.testing.assert_close(change[2], torch.zeros_like(change[2]))  # the control drug moves nothing
    steps = change.diff(dim=-1)  # one number per gene: linear in the token
    torch.testing.assert_close(steps, steps[..., :1].expand_as(steps), atol=1e-5, rtol=1e-4)
    # The shift by hand: gate (Hill curve of the dose) x <gene factor, drug factor x (1 + line factor)>.
    log_ec50, log_slope = effect.dose_response[aspirin].tolist()
    for cell in (0, 1, 3):
        line = ids[cell, 0]
        vector = effect.drug_factors[aspirin] * (1 + effect.context_factors[0][line])
        gate = 1 / (1 + math.exp(-math.exp(log_slope) * (math.log(doses[cell]) - math.log(0.5) - log_ec50)))
        genes = cells["gene_ids"][cell]
        shift = gate * (effect.gene_factors[genes] @ vector + effect.drug_genes[aspirin, genes])
        axis = torch.arange(model.config.num_rank_tokens) / model.config.num_rank_bins - 0.5
        torch.testing.assert_close(change[cell], shift.detach()[:, None] * axis, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(change[1], change[3], atol=1e-3)  # the line modulates the drug's effect
    # Null conditions, a null drug or an unknown dose move nothing.
    with torch.no_grad():
        nothing = effect(cells["gene_ids"], torch.tensor([[1, 0], [1, aspirin], [0, 0], [3, aspirin]]),
                         torch.tensor([0.5, float("nan"), 0.5, 0.0]))  # fmt: skip
    torch.testing.assert_close(nothing, torch.zeros_like(nothing))
    # Without a dose condition the gate is 1 for every drug but the control.
    undosed = RankDiTModel(RankDiTConfig.from_preset("tiny", gene_vocab_size=300, conditions=CONDITIONS,
                                                     control_drug="DMSO_TF", perturbation_effect_rank=4))  # fmt: skip
    with torch.no_grad():
        for parameter in undosed.perturbation_effect.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
        moved = undosed.perturbation_effect(cells["gene_ids"][:2], torch.tensor([[1, aspirin], [1, dmso]]), None)
    assert moved[0].abs().sum() > 0 and not moved[1].any()
    model.save_pretrained(tmp_path)  # every part of the effect saved and loaded
    loaded = RankDiTModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**cells, condition_ids=ids, doses=doses).logits, with_effect)
    with pytest.raises(ValueError, match="drug condition"):
        RankDiTModel(RankDiTConfig.from_preset("tiny", gene_vocab_size=300, perturbation_effect_rank=4))


def test_quantile_coupling_carries_a_token_to_the_same_quantile_of_the_conditions_distribution():
    from pipelines.pipeline_masked_rank_diffusion import quantile_coupling

    vehicle = torch.tensor([[0.25, 0.25, 0.25, 0.25]] * 3)
    told = torch.tensor([[0.0, 0.5, 0.25, 0.25]] * 3)
    tokens = torch.tensor([0, 1, 3])
    coupled = quantile_coupling(told, vehicle, tokens)
    # Token 0 is the quantiles (0, 1/4] of the control's distribution; under the condition they all fall in token 1
    # (its step (0, 1/2]); token 1, (1/4, 1/2], too; token 3, (3/4, 1], is token 3 under both.
    torch.testing.assert_close(coupled, F.one_hot(torch.tensor([1, 1, 3]), 4).float())
    # A token whose quantiles straddle two steps of the condition's distribution splits by the overlap: token 2 is
    # (1/2, 3/4], of which (1/2, 0.6] is the condition's token 0 and (0.6, 3/4] its token 1.
    split = quantile_coupling(torch.tensor([[0.6, 0.4, 0.0, 0.0]]), vehicle[:1], torch.tensor([2]))
    torch.testing.assert_close(split, torch.tensor([[0.4, 0.6, 0.0, 0.0]]))
    halves = quantile_coupling(torch.tensor([[0.375, 0.625, 0.0, 0.0]]), vehicle[:1], torch.tensor([1]))
    torch.testing.assert_close(halves, torch.tensor([[0.5, 0.5, 0.0, 0.0]]))
    # The same distribution keeps every token; a token the control deems impossible takes the condition's own.
    rng = torch.Generator().manual_seed(0)
    same = torch.softmax(torch.randn(5, 7, 52, generator=rng), dim=-1)
    kept = torch.randint(0, 52, (5, 7), generator=rng)
    torch.testing.assert_close(quantile_coupling(same, same, kept), F.one_hot(kept, 52).float())
    impossible = quantile_coupling(told[:1], torch.tensor([[0.5, 0.5, 0.0, 0.0]]), torch.tensor([3]))
    torch.testing.assert_close(impossible, told[:1])
    # float32 sums just short of 1 cannot push the top token's sliver of quantiles past p's last step.
    short = torch.tensor([[0.5, 0.5 - 3e-7]])
    top = quantile_coupling(short, torch.tensor([[1.0 - 1e-8, 1e-8]]), torch.tensor([1]))
    torch.testing.assert_close(top, torch.tensor([[0.0, 1.0]]))


def test_the_pipeline_translates_control_cells_and_names_what_cannot_go_with_them():
    model = randomize_zero_init(type(_model())(_model(reference_context=True, control_drug="DMSO_TF",
                                                      perturbation_effect_rank=4).config)).eval()  # fmt: skip
    with torch.no_grad():  # Aspirin moves every gene's tokens up the rank axis
        model.perturbation_effect.drug_genes[1] = 6.0
        model.perturbation_effect.dose_response[1] = torch.tensor([-3.0, 0.0])  # EC50 far below 0.5 uM
    pipe = _pipe(model)
    genes = [f"G{i}" for i in range(10, 40)]
    rng = np.random.default_rng(0)
    controls = rng.poisson(3.0, size=(6, 30))
    told = {"cell_line_id": "CVCL_0480", "drug": "Aspirin", "dose": 0.5}

    def translate(control_counts, seed=0, conditions=told, **kwargs):
        return pipe(gene_ids=[genes] * len(control_counts), control_counts=control_counts, conditions=conditions,
                    context_counts=[[]] * len(control_counts), generator=torch.Generator().manual_seed(seed),
                    **kwargs)  # fmt: skip

    out = translate(controls)
    assert out.ranks.shape == (6, 30) and out.mask.all() and (out.ranks >= 0).all() and (out.ranks <= B).all()
    np.testing.assert_array_equal(translate(controls).ranks, out.ranks)  # seeded
    assert (out.model_calls == 2 * 2).all()  # two blocks, each under the drug and under the control
    # Under the control drug a control cell is itself, token for token; the drug moves its tokens up.
    own = pipe.processor([genes] * 6, counts=controls, context_counts=[[]] * 6)["input_ids"].numpy()
    vehicle = {"cell_line_id": "CVCL_0480", "drug": "DMSO_TF", "dose": 0.0}
    np.testing.assert_array_equal(translate(controls, conditions=vehicle).ranks, own)
    # Its counts too; under the drug each gene keeps its count or takes one its cell holds at the new token (up).
    np.testing.assert_array_equal(translate(controls, conditions=vehicle).counts, controls)
    assert all(np.isin(out.counts[i], np.append(controls[i], 0)).all() for i in range(6))
    assert (out.counts[out.ranks == own] == controls[out.ranks == own]).all() and out.counts.mean() > controls.mean()
    ragged = pipe(gene_ids=[genes, genes[:20]], control_counts=[controls[0], controls[1, :20]],
                  context_counts=[[], controls[1, 20:]], conditions=vehicle)  # fmt: skip
    np.testing.assert_array_equal(ragged.counts[1, :20], controls[1, :20])  # a shorter cell, its context apart
    assert np.isnan(ragged.counts[1, 20:]).all() and (ragged.counts[0] == controls[0]).all()
    expected = translate(controls, output_type="expected").expected
    assert (expected >= own - 1e-4).all() and (expected - own).mean() > 1.0
    probs = translate(controls, output_type="probs").probs
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    silent = translate(np.zeros_like(controls) + np.arange(30) % 2, output_type="probs").probs
    assert not np.allclose(probs, silent, atol=1e-4)  # the control cells are read
    # Told the control without a dose, a cell is still itself; a cell's blocks and draws are its own (seeded per
    # cell), whatever else the call holds.
    np.testing.assert_array_equal(translate(controls, conditions={**vehicle, "dose": None}).ranks, own)
    np.testing.assert_array_equal(translate(controls[:2], batch_size=1).ranks, out.ranks[:2])
    with pytest.raises(ValueError, match=r"\['counts', 'mask'\] cannot go with it"):
        translate(controls, counts=controls, mask=[[True] * 30] * 6)
    with pytest.raises(ValueError, match="control_counts: counts must hold one cell per cell of gene_ids"):
        pipe(gene_ids=[genes] * 2, control_counts=controls[:3], conditions=told)
    with pytest.raises(ValueError, match="translates control cells under conditions: pass conditions="):
        pipe(gene_ids=[genes], control_counts=controls[:1])
    with pytest.raises(ValueError, match="callback_on_step_end has nothing to be called at"):
        translate(controls, callback_on_step_end=lambda *args: {})
    undosed = _pipe(randomize_zero_init(RankDiTModel(RankDiTConfig.from_preset(
        "tiny", gene_vocab_size=300, conditions=CONDITIONS, control_drug="DMSO_TF"))).eval())  # fmt: skip
    moved = undosed(gene_ids=[genes] * 2, control_counts=controls[:2], context_counts=[[]] * 2,
                    conditions={"cell_line_id": "CVCL_0480", "drug": "Aspirin"})  # fmt: skip
    assert moved.ranks.shape == (2, 30) and (moved.ranks >= 0).all()  # a model without a dose condition translates
    no_control = _pipe(_model())
    with pytest.raises(ValueError, match="needs a drug condition and its control drug"):
        no_control(gene_ids=[genes], control_counts=controls[:1], conditions=told)


def test_generate_anndata_translates_an_anndata_of_control_cells_row_by_row():
    import anndata
    import pandas as pd

    model = _model(reference_context=True, control_drug="DMSO_TF")
    pipe = _pipe(model)
    genes = [f"G{i}" for i in range(10, 40)]
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, size=(4, 60)).astype(np.float32)  # whole cells: 30 more genes than generated
    control = anndata.AnnData(scipy.sparse.csr_matrix(counts), var=pd.DataFrame(index=[f"G{i}" for i in range(60)]))
    obs = pd.DataFrame({"cell_line_id": ["CVCL_0480"] * 4, "drug": ["Aspirin", "Aspirin", "DMSO_TF", "DMSO_TF"],
                        "dose": [0.5, 0.5, 0.0, 0.0]}, index=[f"c{i}" for i in range(4)])  # fmt: skip
    seeded = {"num_inference_steps": 4, "generator": torch.Generator().manual_seed(0)}
    out = pipe.generate_anndata(obs, genes, control=control, **seeded)
    direct = pipe(gene_ids=[genes] * 4, control_counts=counts[:, 10:40], conditions=obs.to_dict("records"),
                  context_counts=[np.delete(row, range(10, 40)) for row in counts], num_inference_steps=4,
                  generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.shape == (4, 30) and list(out.var_names) == genes
    np.testing.assert_array_equal(out.X, direct.ranks)  # the same call as control_counts with context_counts
    np.testing.assert_array_equal(out.layers["counts"], direct.counts)  # the translated cells' counts beside
    with pytest.raises(ValueError, match="control holds 3 cells; give one control cell per row of obs"):
        pipe.generate_anndata(obs, genes, control=control[:3], **seeded)
    with pytest.raises(ValueError, match="pass control= too"):
        pipe.generate_anndata(obs, genes, layer="counts", **seeded)
    # Genes meet through the vocabulary: the control's Ensembl ids, the symbols asked for.
    ensembl = control.copy()
    ensembl.var_names = [f"ENSG{i:011d}" for i in range(60)]
    again = pipe.generate_anndata(obs, genes, control=ensembl, num_inference_steps=4,
                                  generator=torch.Generator().manual_seed(0))  # fmt: skip
    np.testing.assert_array_equal(again.X, out.X)


def test_drug_shifts_start_each_drug_at_its_gated_least_squares_effect_along_its_one_direction():
    from types import SimpleNamespace

    import datasets
    from scipy import sparse

    from dataset_scripts.schema import CELL_ID_COLUMN
    from training.data import TrainingCells
    from training.recipe import ConditionSetup
    from training.run import drug_shifts

    rng, genes, bins, n = np.random.default_rng(0), 12, 10, 90
    lines = rng.choice(["L1", "L2", "L3"], n)
    drugs = rng.choice(["Aspirin", "DMSO_TF", "Ibuprofen"], n)
    drugs[lines == "L3"] = np.where(drugs[lines == "L3"] == "DMSO_TF", "Aspirin", drugs[lines == "L3"])  # no controls
    doses = np.where(drugs == "DMSO_TF", 0.0, rng.choice([0.05, 0.5, 5.0], n))
    tokens = rng.integers(0, bins + 1, (n, genes)) * (rng.random((n, genes)) < 0.6)
    tokens[:, 11] = 0  # a gene no cell shows
    ids = [f"c{i}" for i in range(n)]
    values = {"cell_line_id": ["L1", "L2", "L3"], "drug": ["Aspirin", "DMSO_TF", "Ibuprofen"]}
    data = SimpleNamespace(
        conditions=ConditionSetup(values, dose=True, control_drug="DMSO_TF"),
        training_rows=datasets.Dataset.from_dict(
            {CELL_ID_COLUMN: ids, "cell_line_id": list(lines), "drug": list(drugs), "dose": list(doses)}
        ),  # fmt: skip
        training_cells=TrainingCells(sparse.csr_matrix(tokens.astype(np.float32)), sparse.csr_matrix(tokens), ids),
    )
    data.effect_cells = lambda: (data.training_rows, data.training_cells)
    config = RankDiTConfig.from_preset("tiny", gene_vocab_size=genes, num_rank_bins=bins, conditions=values,
                                       dose_condition=True, control_drug="DMSO_TF",
                                       perturbation_effect_rank=2)  # fmt: skip
    shifts = drug_shifts(data, RankDiTModel(config))
    # By hand, dense: the Hill curve at its start (EC50 0.5 uM, slope 1) is dose / (dose + 0.5).
    position, expected = tokens / bins, np.zeros((4, genes))
    variance = np.maximum(position.var(axis=0), 1e-3)
    for drug_id, drug in ((1, "Aspirin"), (3, "Ibuprofen")):
        cells = np.flatnonzero((drugs == drug) & (lines != "L3"))
        gate = doses[cells] / (doses[cells] + 0.5)
        control = {line: position[(lines == line) & (drugs == "DMSO_TF")].mean(axis=0) for line in ("L1", "L2")}
        residual = position[cells] - np.stack([control[line] for line in lines[cells]])
        # On the drug's one direction: the first right singular vector of its mean shift in each (line, dose).
        groups = sorted(set(zip(lines[cells], doses[cells])))
        means = np.stack([residual[(lines[cells] == g[0]) & (doses[cells] == g[1])].mean(axis=0) for g in groups])
        direction = np.linalg.svd(means)[2][0]
        along = direction * (direction @ (gate[:, None] * residual).sum(axis=0))
        fit = along / (((gate**2).sum() + 4.0) * variance)  # ridge: 4 cells
        expected[drug_id] = np.where((position[cells] > 0).any(axis=0), fit, 0.0).clip(-8, 8)
    np.testing.assert_allclose(shifts, expected, atol=1e-6)
    assert not shifts[2].any() and not shifts[:, 11].any()  # the control drug and an unseen gene: none
    no_control = RankDiTModel(RankDiTConfig(**{**config.to_dict(), "control_drug": None}))
    assert not drug_shifts(data, no_control).any()  # nothing to measure an effect against
