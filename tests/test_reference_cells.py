"""Reference cells: the tie-aware scale, retrieval on visible genes, tokens read in the cell's own scale, the model's
use of them, and the pipeline component that carries them."""

import anndata
import numpy as np
import pytest
import scipy.sparse
import torch
from conftest import randomize_zero_init

from modeling import RankDiTConfig, RankDiTModel
from modeling.modeling_rank_dit import reference_distribution
from pipelines import ReferenceCells
from pipelines.reference_cells import level_tables

B = 10
MASK = B + 1


def test_level_tables_give_each_token_its_level_and_each_level_its_token():
    tokens = torch.tensor([[0, 3, 3, 7, 10, MASK]])
    shown = torch.tensor([[True, True, True, True, True, False]])  # the masked position is not shown
    level_of, token_of, top = level_tables(tokens, shown, B + 1)
    assert top.tolist() == [3]
    # shown tokens 3, 7, 10: levels 1, 2, 3; a token between them has the level below it
    assert level_of[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3]
    # level j -> the j-th smallest shown token; beyond the top level, the largest
    assert token_of[0].tolist() == [0, 3, 7, 10, 10, 10, 10, 10, 10, 10, 10]


def _two_cell_reference() -> ReferenceCells:
    # genes 3..8: cell 0 expresses genes 3, 4, 5, 8 (tokens 1, 5, 10, 5), cell 1 genes 6, 7, 8 (token 9)
    dense = np.zeros((2, 20), dtype=np.int64)
    dense[0, [3, 4, 5, 8]] = [1, 5, 10, 5]
    dense[1, [6, 7, 8]] = 9
    reference, rows = ReferenceCells.from_tokens(scipy.sparse.csr_matrix(dense), B, num_neighbours=1)
    assert rows.tolist() == [0, 1]
    return reference


def test_neighbours_are_found_on_visible_genes_and_read_in_the_cells_own_scale():
    reference = _two_cell_reference()
    # the cell shows tokens 2 and 6 at genes 3 and 4 (levels 1 and 2) and zeros at 6 and 7: like reference cell 0
    genes = torch.tensor([[3, 4, 5, 6, 7, 8, 12]])
    tokens = torch.tensor([[2, 6, MASK, 0, 0, MASK, MASK]])
    real = torch.ones_like(tokens, dtype=torch.bool)
    found = reference.context(genes, tokens, real, mask_token_id=MASK, k=1)
    assert found.shape == (1, 7, 1) and found.dtype == torch.int16
    # cell 0's tokens 1, 5, 10, 0, 0, 5 are its levels 1, 2, 3, 0, 0, 2: the cell's tokens of those levels (level 3
    # is beyond its top, so its largest token); gene 12 is expressed in no reference cell: 0
    assert found[0, :, 0].tolist() == [2, 6, 6, 0, 0, 6, 0]
    # excluded (as a training cell is from itself), the other cell: its token 9 is its level 1, the cell's token 2
    other = reference.context(genes, tokens, real, mask_token_id=MASK, k=1, exclude=torch.tensor([0]))
    assert other[0, :, 0].tolist() == [0, 0, 0, 2, 2, 2, 0]
    # padding reads -1
    padded = reference.context(genes, tokens, real & (torch.arange(7) < 5), mask_token_id=MASK, k=1)
    assert padded[0, 5:, 0].tolist() == [-1, -1]


def test_cells_shown_half_their_genes_find_reference_cells_of_their_kind():
    rng = np.random.default_rng(0)
    programmes = rng.random((4, 60)) < 0.4  # four kinds of cells, each expressing its own genes
    kinds = rng.integers(0, 4, 80)
    dense = np.where(programmes[kinds] & (rng.random((80, 60)) < 0.9), rng.integers(1, B + 1, (80, 60)), 0)
    reference, _ = ReferenceCells.from_tokens(scipy.sparse.csr_matrix(dense), B, num_components=8)
    genes = torch.arange(60).expand(80, -1)
    tokens = torch.from_numpy(dense)
    hidden = torch.from_numpy(rng.random((80, 60)) < 0.5)
    embedded = reference.embed(genes, tokens.masked_fill(hidden, 0), ~hidden)
    rows = reference.neighbours(embedded, 5)
    assert (torch.from_numpy(kinds)[rows] == torch.from_numpy(kinds)[:, None]).float().mean() > 0.9
    # never itself when excluded
    assert not (reference.neighbours(embedded, 5, exclude=torch.arange(80)) == torch.arange(80)[:, None]).any()


def test_a_reference_cell_imputed_or_translated_does_not_read_itself():
    rng = np.random.default_rng(1)
    dense = np.where(rng.random((40, 30)) < 0.5, rng.integers(1, B + 1, (40, 30)), 0)
    reference, _ = ReferenceCells.from_tokens(scipy.sparse.csr_matrix(dense[:30]), B, num_components=4)
    genes = torch.arange(30).expand(40, -1)
    hidden = torch.from_numpy(rng.random((40, 30)) < 0.5)
    tokens = torch.from_numpy(dense).masked_fill(hidden, MASK)
    real = torch.ones_like(tokens, dtype=torch.bool)
    found = reference.context(genes, tokens, real, mask_token_id=MASK, k=5)
    # the 30 reference cells read what training gives them (themselves excluded by row) ...
    named = torch.cat([torch.arange(30), torch.full((10,), -1)])
    trained = reference.context(genes, tokens, real, mask_token_id=MASK, k=5, exclude=named)
    assert torch.equal(found, trained)
    # ... not the k nearest, which a cell in the reference finds itself among; other cells read their k nearest
    nearest = reference.context(genes, tokens, real, mask_token_id=MASK, k=5, exclude=torch.full((40,), -1))
    assert sum(not torch.equal(found[i], nearest[i]) for i in range(30)) >= 27  # a few miss themselves
    assert torch.equal(found[30:], nearest[30:])


@pytest.fixture
def reference_model():
    config = RankDiTConfig.from_preset("tiny", num_rank_bins=B, gene_vocab_size=40, max_length=16, copy_head=True,
                                       cell_profile=True, reference_context=True)  # fmt: skip
    torch.manual_seed(0)
    return randomize_zero_init(RankDiTModel(config).eval())


def test_the_model_reads_references_only_where_there_are_some(reference_model):
    generator = torch.Generator().manual_seed(0)
    genes = torch.randint(3, 40, (3, 12), generator=generator)
    tokens = torch.randint(0, B + 1, (3, 12), generator=generator).masked_fill(
        torch.rand(3, 12, generator=generator) < 0.5, MASK
    )
    references = torch.randint(0, B + 1, (3, 12, 4), generator=generator)
    plain = reference_model(gene_ids=genes, input_ids=tokens).logits
    none = reference_model(gene_ids=genes, input_ids=tokens, reference_tokens=torch.full_like(references, -1)).logits
    torch.testing.assert_close(none, plain)
    read = reference_model(gene_ids=genes, input_ids=tokens, reference_tokens=references).logits
    assert (read - plain).abs().amax(dim=(1, 2)).min() > 1e-3
    with pytest.raises(ValueError, match="reference_tokens must be in 0..10"):
        reference_model(gene_ids=genes, input_ids=tokens, reference_tokens=references.masked_fill(references == 3, 11))


def test_the_reference_slot_of_the_copy_head_gives_the_references_distribution(reference_model):
    with torch.no_grad():  # every position puts all its weight on the reference slot
        reference_model.copy_head.reference_score.weight.zero_()
        reference_model.copy_head.reference_score.bias.fill_(60.0)
    genes = torch.tensor([[5, 6, 7, 8]])
    tokens = torch.tensor([[3, MASK, MASK, 0]])
    references = torch.tensor([[[1, 1, 2, 2], [0, 0, 0, 7], [4, -1, -1, -1], [9, 9, 9, 9]]])
    probs = reference_model(gene_ids=genes, input_ids=tokens, reference_tokens=references).logits.exp()
    expected, _ = reference_distribution(references, B + 1)
    torch.testing.assert_close(probs, expected, atol=1e-4, rtol=0)


def test_windows_carry_each_positions_reference_tokens():
    from modeling import CellBatch

    genes = torch.arange(3, 23)[None]
    cells = CellBatch({"gene_ids": genes, "input_ids": torch.full((1, 20), MASK),
                       "attention_mask": torch.ones(1, 20, dtype=torch.bool)}, MASK)  # fmt: skip
    cells = cells.replace(reference_tokens=(genes[..., None] * 10 + torch.arange(3)).to(torch.int16))
    windows = cells.windows(max_length=8)
    inputs = windows.inputs
    real = inputs["attention_mask"]
    assert len(inputs["gene_ids"]) == 3
    expected = inputs["gene_ids"][..., None] * 10 + torch.arange(3)
    assert torch.equal(inputs["reference_tokens"][real].long(), expected[real])
    assert inputs.rows(slice(0, 2)).model_inputs("cpu")["reference_tokens"].dtype == torch.long


def test_a_users_anndata_reference_reads_its_cells_by_the_checkpoints_rule(reference_model):
    from modeling import GeneVocab, RankDiTProcessor
    from pipelines import MaskedRankDiffusionPipeline, MaskedRankDiffusionScheduler

    ids = range(3, 40)
    vocab = GeneVocab(list(ids), [f"ENSG{i:011d}" for i in ids], [f"G{i}" for i in ids])
    processor = RankDiTProcessor.from_model_config(reference_model.config, gene_vocab=vocab)
    rng = np.random.default_rng(1)
    counts = rng.poisson(2.0, (30, 37)) * (rng.random((30, 37)) < 0.5)
    adata = anndata.AnnData(counts.astype(np.float32), var={"symbol": [f"G{i}" for i in ids]})
    adata.var_names = [f"ENSG{i:011d}" for i in ids]
    pipe = MaskedRankDiffusionPipeline(reference_model, MaskedRankDiffusionScheduler(num_rank_bins=B), processor)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe.make_reference(adata)
    # its tokens are the processor's tokens of the whole cells
    whole = processor(np.arange(3, 40)[None].repeat(30, 0), counts=counts, context_counts=[[]] * 30)
    dense = np.zeros((30, 40), dtype=np.int64)
    dense[:, 3:] = whole["input_ids"].numpy()
    columns = reference.gene_ids.numpy()
    np.testing.assert_array_equal(reference.tokens.numpy(), dense[:, columns])
    call = {
        "gene_ids": [[f"G{i}" for i in range(3, 15)]],
        "counts": [counts[0, :12].tolist()],
        "mask": [[False, True] * 6],
        "context_counts": [counts[0, 12:].tolist()],
        "output_type": "probs",
    }
    with_own = pipe(**call, reference=adata).probs
    with_cells = pipe(**call, reference=reference).probs
    np.testing.assert_allclose(with_own, with_cells)
    assert np.abs(pipe(**call, reference=False).probs - with_own).max() > 1e-4
    pipe.reference = None
    np.testing.assert_allclose(pipe(**call).probs, pipe(**call, reference=False).probs)
    for kwargs, message in ((dict(max_cells=0), "max_cells must be an integer >= 2 .*, got 0"),
                            (dict(seed=-1), "seed must be an integer >= 0, got -1")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            pipe.make_reference(adata, **kwargs)
    with pytest.raises(ValueError, match="the reference AnnData holds no count above 0"):
        pipe.make_reference(anndata.AnnData(np.zeros((5, 37), np.float32), var=adata.var))
    with pytest.raises(TypeError, match="reference must be an anndata.AnnData, got ndarray"):
        pipe.make_reference(counts)
    with pytest.raises(TypeError, match="reference must be an AnnData"):
        pipe(**call, reference="cells.h5ad")
