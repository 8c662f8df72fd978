import json
import subprocess
import sys

import anndata
import numpy as np
import pytest
import scipy.sparse
import torch
from conftest import exact_tokens, randomize_zero_init

from modeling import GeneVocab, RankDiTConfig, RankDiTModel, RankDiTProcessor
from pipelines import MaskedRankDiffusionPipeline, MaskedRankDiffusionScheduler

B = 10
MASK = B + 1


def _vocab(size: int = 200) -> GeneVocab:
    ids = range(3, size)
    return GeneVocab(list(ids), [f"ENSG{i:011d}" for i in ids], [f"G{i}" for i in ids])


class StubDenoiser(RankDiTModel):
    """A known per-gene distribution over 0..B; with `feedback`, rank 0 gains weight as the row fills in, so a
    row's output changes when its tokens do. Counts the rows it is called on."""

    def __init__(self, config, feedback: float = 0.0):
        super().__init__(config)
        generator = torch.Generator().manual_seed(0)
        table = torch.rand(config.gene_vocab_size, config.num_rank_tokens, generator=generator) ** 3 + 0.01
        self.register_buffer("log_table", (table / table.sum(-1, keepdim=True)).log())
        self.feedback = feedback
        self.rows_seen = 0
        self.inputs_seen = []  # per call, each row's (gene ids, tokens) at its attended positions

    def forward(self, gene_ids, input_ids, attention_mask=None, timesteps=None, return_dict=True):
        self.rows_seen += gene_ids.shape[0]
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        self.inputs_seen.append([(g[r].tolist(), t[r].tolist()) for g, t, r in zip(gene_ids, input_ids, real)])
        logits = self.log_table[gene_ids].clone()
        visible_share = (input_ids != self.config.mask_token_id).float().mean(dim=1)
        logits[..., 0] += self.feedback * visible_share[:, None]
        return type("Output", (), {"logits": logits})()


def _processor(config) -> RankDiTProcessor:
    return RankDiTProcessor.from_model_config(config, gene_vocab=_vocab())


def _pipe(model, sampler="ancestral") -> MaskedRankDiffusionPipeline:
    pipe = MaskedRankDiffusionPipeline(
        model=model,
        scheduler=MaskedRankDiffusionScheduler(num_rank_bins=B, sampler=sampler),
        processor=_processor(model.config),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def config():
    return RankDiTConfig.from_preset("tiny", num_rank_bins=B, gene_vocab_size=200, max_length=64)


def _cells(n_cells=6, length=30, seed=0):
    rng = np.random.default_rng(seed)
    gene_ids = np.stack([rng.choice(np.arange(3, 200), length, replace=False) for _ in range(n_cells)])
    ranks = rng.integers(0, B + 1, (n_cells, length))
    mask = rng.random((n_cells, length)) < 0.5
    return gene_ids, ranks, mask


@pytest.mark.parametrize("sampler", ["ancestral", "first-hitting", "confidence"])
def test_visible_positions_never_change_and_masked_ones_get_valid_ranks(config, sampler):
    gene_ids, ranks, mask = _cells()
    out = _pipe(StubDenoiser(config), sampler)(gene_ids, ranks=ranks, mask=mask, num_inference_steps=8,
                                                generator=torch.Generator().manual_seed(0))  # fmt: skip
    np.testing.assert_array_equal(out.ranks[~mask], ranks[~mask])
    assert out.ranks[mask].min() >= 0 and out.ranks[mask].max() <= B
    np.testing.assert_array_equal(out.mask, mask)


def test_same_seed_same_output_and_other_seeds_differ(config):
    gene_ids, ranks, mask = _cells()
    pipe = _pipe(StubDenoiser(config))

    def run(seed):
        return pipe(gene_ids, ranks=ranks, mask=mask, generator=torch.Generator().manual_seed(seed)).ranks

    np.testing.assert_array_equal(run(0), run(0))
    assert not np.array_equal(run(0), run(1))


@pytest.mark.parametrize("sampler", ["ancestral", "first-hitting"])
def test_samples_follow_the_model_distribution(config, sampler):
    model = StubDenoiser(config)
    genes = np.array([5, 17, 42, 99])
    out = _pipe(model, sampler)(np.tile(genes, (3000, 1)), num_inference_steps=6,
                                generator=torch.Generator().manual_seed(0))  # fmt: skip
    for j, gene in enumerate(genes):
        observed = np.bincount(out.ranks[:, j], minlength=B + 1)
        expected = 3000 * model.log_table[gene].exp().numpy()
        chi2 = ((observed - expected) ** 2 / expected).sum()
        assert chi2 < 35, (gene, chi2)  # chi-square with 10 degrees of freedom: p = 1e-4 at 35.6


def test_cache_gives_the_same_samples_with_fewer_model_calls(config):
    gene_ids, ranks, mask = _cells(n_cells=8, length=40)
    results = {}
    for use_cache in (True, False):
        model = StubDenoiser(config, feedback=2.0)
        out = _pipe(model)(gene_ids, ranks=ranks, mask=mask, num_inference_steps=64, use_cache=use_cache,
                           generator=torch.Generator().manual_seed(3))  # fmt: skip
        results[use_cache] = (out.ranks, model.rows_seen, out.model_calls)
    np.testing.assert_array_equal(results[True][0], results[False][0])
    assert results[True][1] < results[False][1] / 2
    assert results[True][2].sum() == results[True][1]


def test_all_visible_input_comes_back_unchanged_without_model_calls_and_with_a_word(config, caplog):
    gene_ids, ranks, mask = _cells()
    model = StubDenoiser(config)
    out = _pipe(model)(gene_ids, ranks=ranks, mask=np.zeros_like(mask))
    np.testing.assert_array_equal(out.ranks, ranks)
    assert model.rows_seen == 0 and not out.model_calls.any()
    assert "no known gene is masked: the cells come back as given" in caplog.text
    for values in ("ranks", "counts"):  # no mask at all is a mistake, not a request for the input back
        with pytest.raises(ValueError, match=f"{values} without mask or mask_ratio: nothing to impute"):
            _pipe(model)(gene_ids, **{values: ranks})


def test_probs_are_one_hot_where_visible_and_the_model_where_masked(config):
    gene_ids, ranks, mask = _cells()
    model = StubDenoiser(config)
    out = _pipe(model)(gene_ids, ranks=ranks, mask=mask, output_type="probs")
    assert out.ranks is None and model.rows_seen == len(gene_ids)
    np.testing.assert_allclose(out.probs.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(out.probs[~mask].argmax(-1), ranks[~mask])
    np.testing.assert_allclose(out.probs[mask], model.log_table[gene_ids[mask]].exp().numpy(), rtol=1e-5)
    np.testing.assert_allclose(out.expected, (out.probs * np.arange(B + 1)).sum(-1), rtol=1e-5)
    expected_only = _pipe(model)(gene_ids, ranks=ranks, mask=mask, output_type="expected")
    assert expected_only.probs is None
    np.testing.assert_allclose(expected_only.expected, out.expected)


def test_ragged_cells_gene_names_counts_and_mask_ratio(config):
    model = StubDenoiser(config)
    pipe = _pipe(model)
    counts = [[5, 0, 1, 1], [2, 9, 3]]
    out = pipe([["G10", "ENSG00000000011", "G12", "G13"], [20, 21, 22]], counts=counts, mask_ratio=0.5,
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.gene_ids.tolist() == [[10, 11, 12, 13], [20, 21, 22, 0]]
    assert out.attention_mask.tolist() == [[True] * 4, [True, True, True, False]]
    assert out.mask.sum(1).tolist() == [2, 2] and not out.mask[1, 3]
    assert out.ranks[1, 3] == -1
    for i, cell in enumerate(counts):  # the mask is drawn first: the visible counts alone make the bins
        visible = ~out.mask[i, : len(cell)]
        tokens = exact_tokens(np.array(cell, dtype=float)[visible], B)
        np.testing.assert_array_equal(out.ranks[i, : len(cell)][visible], tokens)
    with pytest.raises(KeyError, match="NOPE"):
        pipe([["G10", "NOPE"]])
    with pytest.raises(ValueError, match="ranks must be integers in 0..10"):
        pipe([[10, 11]], ranks=[[3, 12]])


def _adata(n_obs=5):
    rng = np.random.default_rng(0)
    counts = rng.negative_binomial(1, 0.4, (n_obs, 12)).astype(float)
    counts[:, 0] += 1
    counts[rng.random(counts.shape) < 0.3] = np.nan  # missing values to impute
    counts[0, -1] = np.nan  # also at the gene the vocabulary lacks: still hidden, never imputed
    var_names = [f"G{i}" for i in range(10, 21)] + ["NOT_A_GENE"]
    adata = anndata.AnnData(counts, obs={"cell_type": list("abcde")[:n_obs]}, var={"chrom": ["1"] * 12})
    adata.obs_names, adata.var_names = [f"c{i}" for i in range(n_obs)], var_names
    return adata


def test_anndata_in_anndata_out(config):
    model = StubDenoiser(config)
    adata = _adata()
    counts = adata.X.copy()
    result = _pipe(model).impute_anndata(adata, return_probs=True, cell_batch_size=2,
                                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert result.obs.equals(adata.obs) and result.var.equals(adata.var)
    np.testing.assert_array_equal(result.X, adata.X)
    ranks, expected = result.layers["rankdiff_ranks"], result.layers["rankdiff_expected"]
    missing = np.isnan(counts)
    missing[:, -1] = False  # the gene the vocabulary lacks is never imputed
    assert (ranks[~missing] == -1).all() and np.isnan(expected[~missing]).all()
    assert ranks[missing].min() >= 0 and ranks[missing].max() <= B
    # The stub's distribution at a gene ignores the rest of the cell: each value lands at its own cell and gene.
    table = model.log_table.exp().numpy()
    genes = np.arange(10, 21)
    cell, gene = np.nonzero(missing[:, :-1])
    np.testing.assert_allclose(expected[cell, gene], table[genes[gene]] @ np.arange(B + 1), rtol=1e-5)
    requested = np.flatnonzero(missing[:, :-1].any(axis=0))
    assert result.uns["rankdiff"]["genes"] == [f"G{10 + j}" for j in requested]
    probs = result.obsm["rankdiff_probs"]
    assert probs.shape == (5, len(requested), B + 1)
    slot = np.searchsorted(requested, gene)
    np.testing.assert_allclose(probs[cell, slot], table[genes[gene]], rtol=1e-5)
    # Sparse counts (NaN entries stored) give the same result, read a batch of cells at a time.
    sparse = adata.copy()
    sparse.X = scipy.sparse.csr_matrix(np.nan_to_num(counts, nan=0.0))
    sparse.X.data[:] = 0  # every stored entry replaced below, so NaN entries are stored too
    sparse.X = scipy.sparse.csr_matrix(np.where(np.isnan(counts), np.nan, counts))
    again = _pipe(StubDenoiser(config)).impute_anndata(sparse, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(again.layers["rankdiff_expected"], expected, rtol=1e-6, equal_nan=True)


def test_anndata_cells_reach_the_model_with_the_tokens_of_all_their_visible_counts(config):
    # Every value the denoiser is shown comes from the cell's visible counts by the exact rule, the counts of the gene
    # the vocabulary lacks and of a second column naming G12 included; masked counts never take part.
    model = StubDenoiser(config)
    adata = _adata()
    again = anndata.AnnData(np.full((5, 1), 40.0), var={"chrom": ["1"]})
    again.var_names, again.obs_names = ["ENSG00000000012"], adata.obs_names
    adata = anndata.concat([adata, again], axis=1, merge="same")
    counts = adata.X.copy()
    _pipe(model).impute_anndata(adata, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    shown = model.inputs_seen[0]  # the first call: every cell (all have a masked known gene), no value drawn yet
    assert len(shown) == 5
    for (genes, tokens), cell in zip(shown, counts):
        visible = ~np.isnan(cell)
        expected = dict(zip(range(10, 21), exact_tokens(np.where(visible, cell, 0), B)))  # every column's token
        assert genes.count(12) <= 1  # the repeated column is never listed a second time
        for gene, token in zip(genes, tokens):
            assert token == (MASK if np.isnan(cell[gene - 10]) else expected[gene]), (gene, token)


def test_sparse_dense_and_backed_anndata_impute_alike_and_stay_as_they_were(config, tmp_path):
    # A model that reads the whole cell (a stub that ignores context would not see a corrupted table).
    torch.manual_seed(0)
    pipe = _pipe(randomize_zero_init(RankDiTModel(config).eval()))
    dense = _adata()
    sparse = dense.copy()
    sparse.X = scipy.sparse.csr_matrix(dense.X)  # NaN entries stored, zeros not
    before = sparse.X.copy()
    sparse.write_h5ad(tmp_path / "cells.h5ad")
    backed = anndata.read_h5ad(tmp_path / "cells.h5ad", backed="r")  # read from disk; the result is in memory
    results = [pipe.impute_anndata(a, generator=torch.Generator().manual_seed(0)) for a in (dense, sparse, backed)]
    assert backed.isbacked and not results[2].isbacked
    np.testing.assert_array_equal(results[2].layers["rankdiff_ranks"], results[1].layers["rankdiff_ranks"])
    for layer in ("rankdiff_ranks", "rankdiff_expected"):
        np.testing.assert_allclose(results[0].layers[layer], results[1].layers[layer], rtol=1e-6, equal_nan=True)
    for name in ("data", "indices", "indptr"):  # the user's matrix is read, never rewritten
        np.testing.assert_array_equal(getattr(sparse.X, name), getattr(before, name))


def test_anndata_errors_name_the_layer_the_cell_and_the_problem(config):
    pipe = _pipe(StubDenoiser(config))
    adata = _adata()
    adata.layers["raw"] = adata.X.copy()
    with pytest.raises(KeyError, match=r"layer 'counts' is not in the AnnData; its layers: \['raw'\]"):
        pipe.impute_anndata(adata, layer="counts")
    bad = adata.copy()
    bad.X[2, 0] = 1.5
    with pytest.raises(ValueError, match="cell 'c2'.*1.5 at gene 'G10'"):
        pipe.impute_anndata(bad)
    with pytest.raises(ValueError, match="0 cells"):
        pipe.impute_anndata(adata[:0].copy())
    with pytest.raises(ValueError, match="nothing to impute"):
        pipe.impute_anndata(adata, mask=np.zeros(adata.shape, dtype=bool))
    with pytest.raises(ValueError, match="sets \\['output_type'\\] itself"):
        pipe.impute_anndata(adata, output_type="probs")
    with pytest.raises(ValueError, match="key_added must be a non-empty string .*, got ''"):
        pipe.impute_anndata(adata, key_added="")
    adata.layers["mine_ranks"] = adata.X.copy()
    with pytest.raises(ValueError, match="key_added='mine' would overwrite \\['mine_ranks'\\]"):
        pipe.impute_anndata(adata, key_added="mine")
    with pytest.raises(TypeError, match="return_probs must be True or False, got 'yes'"):
        pipe.impute_anndata(adata, return_probs="yes")
    with pytest.raises(TypeError, match="adata must be an anndata.AnnData, got str \\(read it with anndata.read_h5ad"):
        pipe.impute_anndata("cells.h5ad")
    with pytest.raises(TypeError, match="adata must be an anndata.AnnData, got ndarray"):
        pipe.impute_anndata(adata.X)


def test_sampling_arguments_given_with_one_pass_outputs_are_named_as_ignored(config, caplog):
    gene_ids, ranks, mask = _cells(n_cells=2)
    pipe = _pipe(StubDenoiser(config))
    pipe(gene_ids, ranks=ranks, mask=mask, output_type="probs")
    assert "ignored" not in caplog.text
    pipe(gene_ids, ranks=ranks, mask=mask, output_type="probs", temperature=0.5, sampler="confidence")
    assert "['sampler', 'temperature'] only shape sampling and are ignored" in caplog.text


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ("False", TypeError, "mask must hold booleans \\(True: impute\\), got values of dtype <U5"),
        (float("nan"), ValueError, "mask must hold booleans or 0 / 1, got nan at \\(cell 0, gene 0\\)"),
        (-1, ValueError, "got -1.0 at \\(cell 0, gene 0\\)"),
        (0.3, ValueError, "got 0.3 at \\(cell 0, gene 0\\)"),
    ],
)
def test_a_mask_that_is_not_boolean_is_refused_naming_the_value_and_its_place(config, value, error, message):
    pipe = _pipe(StubDenoiser(config))
    adata = _adata()
    hidden = np.isnan(adata.X)
    mask = np.where(hidden, "True", "False") if isinstance(value, str) else hidden.astype(float)
    mask[0, 0] = value
    masks = [mask] if isinstance(value, str) else [mask, scipy.sparse.csr_matrix(mask)]  # dense and sparse
    for each in masks:
        with pytest.raises(error, match=message):
            pipe.impute_anndata(adata, mask=each)
    imputed = pipe.impute_anndata(adata, mask=hidden.astype(float), generator=torch.Generator().manual_seed(0))
    expected = pipe.impute_anndata(adata, generator=torch.Generator().manual_seed(0))  # 0 / 1 numbers: a mask
    np.testing.assert_array_equal(imputed.layers["rankdiff_ranks"], expected.layers["rankdiff_ranks"])


@pytest.fixture
def saved_pipeline(tmp_path):
    config = RankDiTConfig.from_preset("tiny", num_rank_bins=B, gene_vocab_size=200, max_length=64)
    torch.manual_seed(0)
    model = randomize_zero_init(RankDiTModel(config).eval())
    pipe = _pipe(model)
    pipe.save_pretrained(tmp_path / "pipe")
    return pipe, tmp_path / "pipe"


CALL = {
    "gene_ids": [["G10", "G11", "G12", "G13", "G14"], ["G20", "G21", "G22"]],
    "ranks": [[3, 0, 10, 1, 5], [2, 2, 7]],
    "mask": [[False, True, True, False, True], [True, False, True]],
}


def _fresh_process(code: str, cwd) -> None:
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_diffusion_pipeline_loads_in_a_fresh_process_and_reproduces(saved_pipeline, tmp_path):
    pipe, path = saved_pipeline
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_masked_rank_diffusion", "MaskedRankDiffusionPipeline"]
    expected = pipe(**CALL, num_inference_steps=16, generator=torch.Generator().manual_seed(7)).ranks
    code = f"""
import json, numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(path)!r}, trust_remote_code=True)
out = pipe(**json.loads({json.dumps(CALL)!r}), num_inference_steps=16, generator=torch.Generator().manual_seed(7))
np.save("ranks.npy", out.ranks)
"""
    _fresh_process(code, tmp_path)  # outside the repository: nothing can come from it
    np.testing.assert_array_equal(np.load(tmp_path / "ranks.npy"), expected)


@pytest.mark.slow
def test_transformers_pipeline_task_loads_in_a_fresh_process(saved_pipeline, tmp_path):
    pipe, path = saved_pipeline
    cells = pipe.processor(CALL["gene_ids"], ranks=CALL["ranks"], mask=CALL["mask"])
    expected = pipe.processor.predictive_distribution(pipe.model, cells)
    code = f"""
import json, numpy as np
from transformers import pipeline
task = pipeline(model={str(path / "model")!r}, trust_remote_code=True)
out = task(**json.loads({json.dumps(CALL)!r}))
np.save("probs0.npy", out[0]["probs"]); np.save("probs1.npy", out[1]["probs"])
"""
    _fresh_process(code, tmp_path)
    np.testing.assert_allclose(np.load(tmp_path / "probs0.npy"), expected[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "probs1.npy"), expected[1, :3].numpy(), rtol=1e-5, atol=1e-6)


def test_transformers_task_takes_whole_cells_longer_than_the_model_length(saved_pipeline):
    from modeling import RankDiTImputationPipeline

    pipe, _ = saved_pipeline  # model length 64
    rng = np.random.default_rng(0)
    genes = rng.choice(np.arange(3, 200), 150, replace=False).tolist()
    counts = (rng.poisson(2.0, 150) + (np.arange(150) == 0)).astype(float)
    mask = (rng.random(150) < 0.5).tolist()
    task = RankDiTImputationPipeline(model=pipe.model, feature_extractor=pipe.processor)
    out = task(gene_ids=genes, counts=counts.tolist(), mask=mask, context_counts=[[]])
    cells = pipe.processor([genes], counts=[counts], mask=[mask], context_counts=[[]])
    expected = pipe.processor.predictive_distribution(pipe.model, cells)[0].numpy()
    np.testing.assert_allclose(out["probs"], expected, rtol=1e-6)
    assert out["probs"].shape == (150, B + 1) and np.allclose(out["probs"].sum(-1), 1.0, atol=1e-5)


def test_denoising_is_recorded_and_drawn_as_a_gif(config, tmp_path):
    from PIL import Image

    from pipelines.denoising_animation import record_denoising, write_denoising_gif

    gene_ids, ranks, _ = _cells(n_cells=1, length=50)
    states = record_denoising(_pipe(StubDenoiser(config)), gene_ids[0], ranks=ranks, mask_ratio=0.8,
                              num_inference_steps=10, generator=torch.Generator().manual_seed(0))  # fmt: skip
    masked = [int((s == MASK).sum()) for s in states]
    assert masked[0] == 40 and masked[-1] == 0 and all(a >= b for a, b in zip(masked, masked[1:]))
    visible = states[0] != MASK
    assert all(np.array_equal(s[visible], ranks[0][visible]) for s in states)
    path = write_denoising_gif(states, tmp_path / "cell.gif", num_rank_bins=B, title="80% masked", fps=4)
    with Image.open(path) as gif:
        assert gif.n_frames == len(states)  # the held last frames are merged into one long one
        gif.seek(gif.n_frames - 1)
        assert gif.info["duration"] >= 1000


def test_masked_counts_never_shape_the_visible_ranks(config):
    counts = np.array([[5.0, 1.0, 1.0, 2.0, 9.0]])
    mask = np.array([[False, False, False, False, True]])
    cells = _processor(config)([[10, 11, 12, 13, 14]], counts=counts, mask=mask)
    hidden_nan = _processor(config)([[10, 11, 12, 13, 14]], counts=np.where(mask, np.nan, counts), mask=mask)
    assert cells.input_ids[0, :4].tolist() == exact_tokens(counts[0, :4], B)
    assert torch.equal(cells.input_ids, hidden_nan.input_ids) and cells.input_ids[0, 4] == MASK


def test_whole_cells_longer_than_the_model_length_are_seen_in_windows(config):
    model = StubDenoiser(config)  # trained length 64; the stub's output at a gene ignores the rest of the cell
    rng = np.random.default_rng(0)
    genes = rng.choice(np.arange(3, 200), 150, replace=False)
    counts = rng.poisson(2.0, 150).astype(float)
    counts[0] += 1
    mask = rng.random(150) < 0.5
    cells = _processor(config)([genes], counts=[counts], mask=[mask], context_counts=[[]])
    windows = cells.windows(64)
    real = windows.inputs.attention_mask
    assert windows.inputs.num_cells == 3 and real.sum(1).tolist() == [50, 50, 50]
    assert sorted(windows.position[real].tolist()) == list(range(150))  # every position once
    shuffled = _processor(config)([genes], counts=[rng.permutation(counts)], mask=[mask], context_counts=[[]])
    assert torch.equal(shuffled.windows(64).position, windows.position)  # drawn without looking at the counts
    per_window = windows.inputs.mask.sum(1).tolist()
    assert max(per_window) - min(per_window) <= 1  # masked genes dealt evenly: every window has visible ones too

    pipe = _pipe(model)
    out = pipe(gene_ids=[genes], counts=[counts], mask=[mask], context_counts=[[]], output_type="probs")
    tokens = np.zeros(150, dtype=np.int64)
    tokens[~mask] = exact_tokens(counts[~mask], B)
    expected = torch.softmax(model.log_table[torch.from_numpy(genes)], -1).numpy()
    np.testing.assert_allclose(out.probs[0][mask], expected[mask], rtol=1e-5)
    np.testing.assert_array_equal(out.probs[0][~mask].argmax(-1), tokens[~mask])
    assert out.model_calls.tolist() == [3]  # one pass per window
    model.rows_seen = 0
    sampled = pipe(gene_ids=[genes], counts=[counts], mask=[mask], context_counts=[[]], num_inference_steps=4,
                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    np.testing.assert_array_equal(sampled.ranks[0][~mask], tokens[~mask])
    assert sampled.ranks[0][mask].min() >= 0 and sampled.ranks[0][mask].max() <= B
    assert sampled.model_calls.tolist() == [12] and model.rows_seen == 12  # 3 windows x 4 steps


def test_context_counts_give_the_whole_cells_bins_and_a_part_of_a_cell_is_named(config, caplog):
    panel, rest = np.array([1.0, 0.0, 2.0, 5.0, 0.0]), np.array([1.0, 1.0, 1.0, 3.0, 8.0, 1.0])
    with caplog.at_level("WARNING", logger="modeling.processing_rank_dit"):
        alone = _processor(config)([[10, 11, 12, 13, 14]], counts=[panel])
    assert "context_counts" in caplog.text and "1 cells" in caplog.text
    assert alone.input_ids[0].tolist() == exact_tokens(panel, B)
    caplog.clear()
    with caplog.at_level("WARNING", logger="modeling.processing_rank_dit"):
        whole = _processor(config)([[10, 11, 12, 13, 14]], counts=[panel], context_counts=[rest])
    assert not caplog.text
    assert whole.input_ids[0].tolist() == exact_tokens(np.r_[panel, rest], B)[:5]
    assert not torch.equal(whole.input_ids, alone.input_ids)
    with pytest.raises(ValueError, match="context_counts go with counts"):
        _processor(config)([[10, 11]], ranks=[[1, 2]], context_counts=[[1.0]])


def test_a_drawn_mask_is_drawn_before_the_counts_are_binned(config):
    model = StubDenoiser(config)
    counts = np.array([[9.0, 1.0, 1.0, 2.0, 5.0, 3.0, 1.0, 7.0]])
    out = _pipe(model)(gene_ids=[list(range(10, 18))], counts=counts, mask_ratio=0.5, output_type="probs")
    visible = ~out.mask[0]
    assert out.mask[0].sum() == 4
    # The visible tokens are the bins of the visible counts alone, as with a mask given by the caller.
    assert out.probs[0][visible].argmax(-1).tolist() == exact_tokens(counts[0][visible], B)


def test_the_same_seed_gives_the_same_cells_whatever_the_batch_size(config):
    model = randomize_zero_init(RankDiTModel(config).eval())
    rng = np.random.default_rng(1)
    genes = [rng.choice(np.arange(3, 200), n, replace=False) for n in (30, 150, 45, 64)]  # one cell in windows
    ranks = [rng.integers(0, B + 1, len(g)) for g in genes]
    for sampler in ("ancestral", "first-hitting", "confidence"):
        outs = [
            _pipe(model, sampler)(
                genes,
                ranks=ranks,
                mask_ratio=0.6,
                num_inference_steps=8,
                batch_size=size,
                generator=torch.Generator().manual_seed(4),
            ).ranks  # fmt: skip
            for size in (1, 2, 64)
        ]
        np.testing.assert_array_equal(outs[0], outs[1])
        np.testing.assert_array_equal(outs[0], outs[2])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(generator=0), TypeError, "generator must be a torch.Generator"),
        (dict(batch_size=0), ValueError, "batch_size must be a positive integer, got 0"),
        (dict(num_inference_steps=2.5), ValueError, "num_inference_steps must be a positive integer, got 2.5"),
        (dict(temperature=float("nan")), ValueError, "temperature must be a positive number, got nan"),
        (dict(top_p=0.0), ValueError, "top_p must be a number in \\(0, 1\\]"),
        (dict(mask_ratio=1.5, mask=None), ValueError, "mask_ratio must be a number in \\(0, 1\\]"),
        (dict(mask_ratio=0.5), ValueError, "give mask or mask_ratio, not both"),
        (dict(output_type="numpy"), ValueError, "output_type must be one of"),
        (dict(sampler="greedy"), ValueError, "sampler must be one of"),
        (dict(callback_on_step_end_tensor_inputs=["latents"]), ValueError, "\\['latents'\\] are not among"),
        (dict(sampler=""), ValueError, "sampler must be one of"),
        (dict(guidance_scale=float("nan")), ValueError, "guidance_scale must be a number >= 0 .*, got nan"),
        (dict(guidance_scale=-5), ValueError, "guidance_scale must be a number >= 0 .*, got -5"),
        (dict(reference="cells.h5ad"), ValueError, "reference: this model reads no reference cells"),
        (dict(use_cache="no"), TypeError, "use_cache must be True or False, got 'no'"),
        (dict(callback_on_step_end=5), TypeError, "callback_on_step_end must be callable, got int"),
        (dict(callback_on_step_end_tensor_inputs="sample"), TypeError, "must be a list of names, got 'sample'"),
        (dict(return_dict=0), TypeError, "return_dict must be True or False, got 0"),
    ],
)
def test_bad_arguments_get_clear_errors(config, kwargs, error, message):
    gene_ids, ranks, mask = _cells(n_cells=2)
    with pytest.raises(error, match=message):
        _pipe(StubDenoiser(config))(gene_ids, ranks=ranks, **{"mask": mask, **kwargs})


def test_what_the_pipeline_would_output_as_ranks_must_be_ranks(config):
    gene_ids, ranks, mask = _cells(n_cells=2)

    def token_99(pipe, step, timestep, callback_kwargs):
        return {"sample": torch.full_like(callback_kwargs["sample"], 99)}

    with pytest.raises(ValueError, match="callback_on_step_end at step 0: 'sample' holds token 99 at \\(window 0"):
        _pipe(StubDenoiser(config))(gene_ids, ranks=ranks, mask=mask, callback_on_step_end=token_99)
    broken = StubDenoiser(config)
    gene = np.setdiff1d(np.arange(3, 200), gene_ids)[0]  # a gene of cell 1 only
    broken.log_table[gene, 3] = float("nan")  # its distribution: NaN weights, as a diverged checkpoint has
    gene_ids[1, 7] = gene
    for output_type in ("ranks", "probs"):
        with pytest.raises(ValueError, match="the denoiser returned NaN or infinite logits \\(first at window 1, "):
            _pipe(broken)(gene_ids, ranks=ranks, mask=mask, output_type=output_type)
    out = _pipe(StubDenoiser(config))(
        gene_ids, ranks=ranks, mask=mask, temperature=np.float32(0.5), top_p=np.float64(0.9)
    )
    assert out.ranks[mask].max() <= B  # numpy numbers are numbers


def test_callback_outputs_replace_the_sample(config):
    gene_ids, ranks, mask = _cells(n_cells=2)
    seen = []

    def force_zero(pipe, step, timestep, callback_kwargs):
        sample, logits = callback_kwargs["sample"], callback_kwargs["logits"]
        seen.append(logits.shape)
        return {"sample": torch.where(sample == MASK, sample, torch.where(torch.from_numpy(mask), 0, sample))}

    out = _pipe(StubDenoiser(config))(gene_ids, ranks=ranks, mask=mask, num_inference_steps=4,
                                      callback_on_step_end=force_zero,
                                      callback_on_step_end_tensor_inputs=["sample", "logits"])  # fmt: skip
    assert (out.ranks[mask] == 0).all() and (out.ranks[~mask] == ranks[~mask]).all()
    assert seen and seen[0] == (2, 30, B + 1)


def test_unknown_genes_are_refused_or_left_out_and_marked(config):
    pipe = _pipe(StubDenoiser(config))
    call = dict(gene_ids=[["G10", "RETIRED", "G12", "G13"]], ranks=[[3, 5, 0, 2]], mask=[[False, False, True, True]])
    with pytest.raises(KeyError, match="RETIRED.*unknown_genes='ignore'"):
        pipe(**call)
    out = pipe(**call, unknown_genes="ignore", generator=torch.Generator().manual_seed(0))
    assert out.gene_ids.tolist() == [[10, -1, 12, 13]] and out.ranks[0, 1] == -1
    assert out.attention_mask.tolist() == [[True, False, True, True]] and out.ranks[0, 2:].min() >= 0
    with pytest.raises(ValueError, match="cell 0: genes are repeated: \\['RETIRED'\\] \\(outside the vocabulary"):
        pipe(gene_ids=[["G10", "RETIRED", "RETIRED"]], counts=[[3, 2, 2]], mask=[[True, False, False]],
             unknown_genes="ignore")  # fmt: skip
    drawn = pipe(**{**call, "mask": None}, mask_ratio=0.5, unknown_genes="ignore")
    assert drawn.mask.tolist()[0][1] is False and drawn.mask.sum() == 2  # half of the three known genes, rounded


def test_transformers_task_refuses_unknown_arguments(saved_pipeline):
    from modeling import RankDiTImputationPipeline

    pipe, _ = saved_pipeline
    task = RankDiTImputationPipeline(model=pipe.model, feature_extractor=pipe.processor)
    for name in ("count", "mask_ratio", "temperature"):
        with pytest.raises(TypeError, match=f"unknown arguments \\['{name}'\\]"):
            task(gene_ids=["G10", "G11"], ranks=[1, 2], mask=[False, True], **{name: 1})
    with pytest.raises(ValueError, match="window_batch_size must be a positive integer, got 1.5"):
        task(gene_ids=["G10", "G11"], ranks=[1, 2], mask=[False, True], window_batch_size=1.5)
    for scale in (float("nan"), float("inf"), -5, True):  # refused before any cell is read, conditions or not
        with pytest.raises(ValueError, match=f"guidance_scale must be a number >= 0 .*, got {scale!r}"):
            task(gene_ids=["G10", "G11"], ranks=[1, 2], mask=[False, True], guidance_scale=scale)
    with pytest.raises(ValueError, match="ranks without mask or mask_ratio: nothing to impute"):
        task(gene_ids=["G10", "G11"], ranks=[1, 2])
    out = task(gene_ids=["G10", "RETIRED"], ranks=[1, 2], mask=[True, False], unknown_genes="ignore")
    assert out["gene_ids"] == [10, -1] and np.isnan(out["expected"][1])


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            dict(gene_ids=[[10, 2**70]], ranks=[[1, 2]]),
            ValueError,
            "gene id 1180591620717411303424 at position 1 is no",
        ),
        (dict(gene_ids=np.array([[10, 2**63 + 5]], dtype=np.uint64), ranks=[[1, 2]]), ValueError, "is no token id"),
        (dict(gene_ids=[[10, 11]], ranks=[[[1], [2]]]), ValueError, "ranks\\[0\\] must be a flat sequence"),
        (dict(gene_ids=[[10, 11]], counts=[[1, 2 + 1j]]), TypeError, "counts must be numbers, got \\(2\\+1j\\)"),
        (dict(gene_ids=[[10, 11]], counts=[[1e308, 2]]), ValueError, "non-negative integers up to 1e9 .*got 1e\\+308"),
        (dict(gene_ids=torch.zeros(1, 2, dtype=torch.long, device="meta"), ranks=[[1, 2]]), TypeError, "meta device"),
    ],
    ids=["huge id", "uint64 id", "3-deep", "complex", "1e308", "meta"],
)
def test_values_that_are_no_genes_ranks_or_counts_are_named(config, call, error, message):
    with pytest.raises(error, match=message):
        _pipe(StubDenoiser(config))(**call, mask=[[False, True]])
