import json
import subprocess
import sys

import anndata
import numpy as np
import pytest
import torch
from conftest import randomize_zero_init

from modeling import GeneVocab, RankDiTConfig, RankDiTModel, rank_tokens
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

    def forward(self, gene_ids, input_ids, attention_mask=None, timesteps=None, return_dict=True):
        self.rows_seen += gene_ids.shape[0]
        logits = self.log_table[gene_ids].clone()
        visible_share = (input_ids != self.config.mask_token_id).float().mean(dim=1)
        logits[..., 0] += self.feedback * visible_share[:, None]
        return type("Output", (), {"logits": logits})()


def _pipe(model, sampler="ancestral") -> MaskedRankDiffusionPipeline:
    pipe = MaskedRankDiffusionPipeline(
        model=model, scheduler=MaskedRankDiffusionScheduler(num_rank_bins=B, sampler=sampler)
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


def test_all_visible_input_comes_back_unchanged_without_model_calls(config):
    gene_ids, ranks, _ = _cells()
    model = StubDenoiser(config)
    out = _pipe(model)(gene_ids, ranks=ranks)
    np.testing.assert_array_equal(out.ranks, ranks)
    assert model.rows_seen == 0 and not out.model_calls.any()


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
    model.gene_vocab = _vocab()
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
        tokens = rank_tokens(np.array(cell, dtype=float)[visible], B)
        np.testing.assert_array_equal(out.ranks[i, : len(cell)][visible], tokens)
    with pytest.raises(KeyError, match="NOPE"):
        pipe([["G10", "NOPE"]])
    with pytest.raises(ValueError, match="ranks must be in 0..10"):
        pipe([[10, 11]], ranks=[[3, 12]])


def test_anndata_in_anndata_out(config):
    model = StubDenoiser(config)
    model.gene_vocab = _vocab()
    rng = np.random.default_rng(0)
    counts = rng.negative_binomial(1, 0.4, (5, 12)).astype(float)
    counts[:, 0] += 1
    counts[rng.random(counts.shape) < 0.3] = np.nan  # missing values to impute
    var_names = [f"G{i}" for i in range(10, 21)] + ["NOT_A_GENE"]
    adata = anndata.AnnData(counts, obs={"cell_type": list("abcde")}, var={"chrom": ["1"] * 12})
    adata.obs_names, adata.var_names = [f"c{i}" for i in range(5)], var_names
    result = _pipe(model).impute_anndata(adata, return_probs=True, generator=torch.Generator().manual_seed(0))
    assert result.obs.equals(adata.obs) and result.var.equals(adata.var)
    np.testing.assert_array_equal(result.X, adata.X)
    ranks, expected = result.layers["rankdiff_ranks"], result.layers["rankdiff_expected"]
    assert (ranks[:, -1] == -1).all() and np.isnan(expected[:, -1]).all()
    missing = np.isnan(counts[:, :-1])
    assert ranks[:, :-1][missing].min() >= 0 and ranks[:, :-1][missing].max() <= B
    for i in range(5):  # bins from the whole cell's visible counts, the gene the vocabulary lacks included
        visible = ~missing[i]
        other = counts[i, -1:][np.isfinite(counts[i, -1:])]
        expected = rank_tokens(counts[i, :-1][visible], B, reference=np.r_[counts[i, :-1][visible], other])
        np.testing.assert_array_equal(ranks[i, :-1][visible], expected)
    assert result.obsm["rankdiff_probs"].shape == (5, 12, B + 1)


@pytest.fixture
def saved_pipeline(tmp_path):
    config = RankDiTConfig.from_preset("tiny", num_rank_bins=B, gene_vocab_size=200, max_length=64)
    torch.manual_seed(0)
    model = randomize_zero_init(RankDiTModel(config).eval())
    model.gene_vocab = _vocab()
    pipe = _pipe(model)
    pipe.save_pretrained(tmp_path / "pipe")
    return pipe, tmp_path / "pipe"


CALL = {
    "gene_ids": [["G10", "G11", "G12", "G13", "G14"], ["G20", "G21", "G22"]],
    "ranks": [[3, 0, 10, 1, 5], [2, 2, 7]],
    "mask": [[False, True, True, False, True], [True, False, True]],
}


def _fresh_process(code: str, cwd) -> None:
    subprocess.run([sys.executable, "-c", code], cwd=cwd, check=True, capture_output=True, text=True)


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


def test_transformers_pipeline_task_loads_in_a_fresh_process(saved_pipeline, tmp_path):
    pipe, path = saved_pipeline
    cells = pipe.model.prepare_inputs(CALL["gene_ids"], ranks=CALL["ranks"], mask=CALL["mask"])
    expected = pipe.model.predictive_distribution(cells)
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
    task = RankDiTImputationPipeline(model=pipe.model)
    out = task(gene_ids=genes, counts=counts.tolist(), mask=mask, context_counts=[[]])
    cells = pipe.model.prepare_inputs([genes], counts=[counts], mask=[mask], context_counts=[[]])
    np.testing.assert_allclose(out["probs"], pipe.model.predictive_distribution(cells)[0].numpy(), rtol=1e-6)
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
    model = StubDenoiser(config)
    counts = np.array([[5.0, 1.0, 1.0, 2.0, 9.0]])
    mask = np.array([[False, False, False, False, True]])
    cells = model.prepare_inputs([[10, 11, 12, 13, 14]], counts=counts, mask=mask)
    hidden_nan = model.prepare_inputs([[10, 11, 12, 13, 14]], counts=np.where(mask, np.nan, counts), mask=mask)
    expected = rank_tokens(counts[0, :4], B)
    np.testing.assert_array_equal(cells.ranks[0, :4].numpy(), expected)
    assert torch.equal(cells.ranks, hidden_nan.ranks) and cells.ranks[0, 4] == MASK


def test_whole_cells_longer_than_the_model_length_are_seen_in_windows(config):
    model = StubDenoiser(config)  # trained length 64; the stub's output at a gene ignores the rest of the cell
    rng = np.random.default_rng(0)
    genes = rng.choice(np.arange(3, 200), 150, replace=False)
    counts = rng.poisson(2.0, 150).astype(float)
    counts[0] += 1
    mask = rng.random(150) < 0.5
    cells = model.prepare_inputs([genes], counts=[counts], mask=[mask], context_counts=[[]])
    windows = cells.windows(64)
    real = windows.inputs.attention_mask
    assert len(real) == 3 and real.sum(1).tolist() == [50, 50, 50]
    assert sorted(windows.position[real].tolist()) == list(range(150))  # every position once
    shuffled = model.prepare_inputs([genes], counts=[rng.permutation(counts)], mask=[mask], context_counts=[[]])
    assert torch.equal(shuffled.windows(64).position, windows.position)  # drawn without looking at the counts
    per_window = windows.inputs.mask.sum(1).tolist()
    assert max(per_window) - min(per_window) <= 1  # masked genes dealt evenly: every window has visible ones too

    pipe = _pipe(model)
    out = pipe(gene_ids=[genes], counts=[counts], mask=[mask], context_counts=[[]], output_type="probs")
    tokens = np.zeros(150, dtype=np.int64)
    tokens[~mask] = rank_tokens(counts[~mask], B)
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
    model = StubDenoiser(config)
    panel, rest = np.array([1.0, 0.0, 2.0, 5.0, 0.0]), np.array([1.0, 1.0, 1.0, 3.0, 8.0, 1.0])
    with caplog.at_level("WARNING", logger="modeling.cell_inputs"):
        alone = model.prepare_inputs([[10, 11, 12, 13, 14]], counts=[panel])
    assert "context_counts" in caplog.text and "1 cells" in caplog.text
    np.testing.assert_array_equal(alone.ranks[0].numpy(), rank_tokens(panel, B))
    caplog.clear()
    with caplog.at_level("WARNING", logger="modeling.cell_inputs"):
        whole = model.prepare_inputs([[10, 11, 12, 13, 14]], counts=[panel], context_counts=[rest])
    assert not caplog.text
    np.testing.assert_array_equal(whole.ranks[0].numpy(), rank_tokens(np.r_[panel, rest], B)[:5])
    assert not torch.equal(whole.ranks, alone.ranks)
    with pytest.raises(ValueError, match="context_counts go with counts"):
        model.prepare_inputs([[10, 11]], ranks=[[1, 2]], context_counts=[[1.0]])


def test_a_drawn_mask_is_drawn_before_the_counts_are_binned(config):
    model = StubDenoiser(config)
    counts = np.array([[9.0, 1.0, 1.0, 2.0, 5.0, 3.0, 1.0, 7.0]])
    out = _pipe(model)(gene_ids=[list(range(10, 18))], counts=counts, mask_ratio=0.5, output_type="probs")
    visible = ~out.mask[0]
    assert out.mask[0].sum() == 4
    # The visible tokens are the bins of the visible counts alone, as with a mask given by the caller.
    np.testing.assert_array_equal(out.probs[0][visible].argmax(-1), rank_tokens(counts[0][visible], B))
