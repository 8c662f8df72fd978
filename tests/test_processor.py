"""The processor: save / load, and every error it raises names the cell, the position and the value."""

import logging

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import exact_tokens
from transformers import AutoFeatureExtractor

from modeling import GeneVocab, RankDiTConfig, RankDiTModel, RankDiTProcessor

B = 10


def _processor(**kwargs) -> RankDiTProcessor:
    ids = range(3, 40)
    vocab = GeneVocab(list(ids), [f"ENSG{i:011d}" for i in ids], [f"G{i}" for i in ids])
    return RankDiTProcessor(num_rank_bins=B, max_length=16, gene_vocab=vocab, **kwargs)


def test_save_and_load_keep_the_settings_and_the_vocabulary(tmp_path):
    processor = _processor(whole_cell_genes=100)
    processor.save_pretrained(tmp_path)
    assert {"preprocessor_config.json", "processing_rank_dit.py", "imputation_task.py"} <= {
        p.name for p in tmp_path.iterdir()
    }
    call = dict(gene_ids=[["G5", "G6", "G7"]], counts=[[3, 0, 8]], mask=[[False, True, False]], context_counts=[[]])
    # transformers' Auto class builds a feature extractor from its config alone (`from_dict`): the vocabulary is in it.
    for loaded in (
        RankDiTProcessor.from_pretrained(tmp_path),
        AutoFeatureExtractor.from_pretrained(tmp_path, trust_remote_code=True),
    ):
        assert loaded.to_dict() == processor.to_dict()
        assert loaded.gene_vocab.encode(["G5", "ENSG00000000007.3", 9]) == [5, 7, 9]
        assert torch.equal(loaded(**call).input_ids, processor(**call).input_ids)


def test_tokens_come_from_the_visible_counts_by_the_training_rule():
    cells = _processor()(gene_ids=[5, 6, 7, 8], counts=[3, 0, 8, 1], mask=[False, True, False, False],
                         context_counts=[[2, 2]])  # fmt: skip
    expected = exact_tokens([3, 8, 1, 2, 2], B)  # the visible counts and the context, never the masked one
    assert cells.input_ids[0].tolist() == [expected[0], B + 1, expected[1], expected[2]]


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            dict(gene_ids=["G5", "G6"], ranks=[1, 2], mask=["False", "True"]),
            TypeError,
            "cell 0: mask must be booleans .* got 'False' \\(str\\) at position 0",
        ),
        (dict(gene_ids=[5, 6], ranks=[1, 2], mask=[0.5, 1]), TypeError, "mask must be booleans"),
        (dict(gene_ids=[5, 6], ranks=[12.7, 2]), ValueError, "ranks must be integers in 0..10, got 12.7 at position"),
        (dict(gene_ids=[5, 6], ranks=[3, float("nan")]), ValueError, "got nan at position 1"),
        (dict(gene_ids=[5, 6], ranks=[3, 11]), ValueError, "got 11 at position 1"),
        (dict(gene_ids=[5, 6], ranks=[3, "4"]), TypeError, "ranks must be numbers, got '4'"),
        (dict(gene_ids=[5, 100.7]), TypeError, "gene ids must be integer token ids or gene names.*100.7 \\(float\\)"),
        (dict(gene_ids=[5, True]), TypeError, "True \\(bool\\) at position 1"),
        (dict(gene_ids=[5, 0]), ValueError, "gene id 0 at position 1 is <pad>, not a gene"),
        (dict(gene_ids=[1, 5]), ValueError, "gene id 1 at position 0 is <cls>"),
        (dict(gene_ids=[2, 5]), ValueError, "is <eoc>"),
        (dict(gene_ids=[5, 400]), ValueError, "gene id 400 at position 1 is outside the model's 3..39"),
        (dict(gene_ids=[5, 6, 5]), ValueError, "cell 0: genes are repeated: token ids \\[5\\]"),
        (dict(gene_ids=[[5, 6], [7, 8, 7, 9, 8, 7]]), ValueError, "cell 1: genes are repeated: token ids \\[7, 8\\]"),
        (dict(gene_ids=[["G5"], ["G6", "NOPE"]]), KeyError, "cell 1: 1 of 2 genes .* 'NOPE' \\(position 1\\)"),
        (dict(gene_ids=[5, 6], counts=[1, -2]), ValueError, "cell 0: counts must be non-negative integers.*-2"),
        (dict(gene_ids=[5, 6], counts=[1, 2.5]), ValueError, "2.5 at position 1 \\(gene 6\\)"),
        (dict(gene_ids=[5, 6], counts=[1, 2], context_counts=[[1.5]]), ValueError, "context_counts"),
        (dict(gene_ids=[5, 6], ranks=[1, 2], counts=[1, 2]), ValueError, "ranks or counts, not both"),
        (dict(gene_ids=[5, 6], mask=[True, False]), ValueError, "a mask needs the ranks"),
        (dict(gene_ids=[5, 6], ranks=[1, 2, 3]), ValueError, "cell 0: ranks has 3 values for 2 genes"),
        (dict(gene_ids=[[5], [6]], ranks=[[1]]), ValueError, "ranks must hold one cell per cell of gene_ids"),
        (dict(gene_ids=[[5, 6], 7]), ValueError, "mixes cells"),
        (dict(gene_ids=[]), ValueError, "at least one gene per cell"),
        (dict(gene_ids="G5"), TypeError, "gene_ids must be a sequence"),
        (dict(gene_ids={5, 6}), TypeError, "gene_ids must be a sequence"),
        (dict(gene_ids=[5, 6], unknown_genes="drop"), ValueError, "unknown_genes must be one of"),
    ],
)
def test_every_bad_input_is_named(call, error, message):
    with pytest.raises(error, match=message):
        _processor()(**call)


def test_masked_values_may_be_missing():
    cells = _processor()(gene_ids=[5, 6, 7], ranks=[4, None, float("nan")], mask=[False, True, True])
    assert cells.input_ids.tolist() == [[4, B + 1, B + 1]]
    cells = _processor()(gene_ids=[5, 6], counts=[4, np.nan], mask=[0, 1], context_counts=[[]])
    assert cells.input_ids.tolist() == [[1, B + 1]]  # a lone count is the cell's lowest bin


def test_pandas_and_tensors_are_taken_as_given():
    processor = _processor()
    index = pd.Index(["G5", "G6", "G7"])
    from_pandas = processor(gene_ids=index, ranks=pd.Series([1, 0, 4]), mask=np.array([False, True, False]))
    from_lists = processor(gene_ids=["G5", "G6", "G7"], ranks=[1, 0, 4], mask=[False, True, False])
    from_tensors = processor(gene_ids=torch.tensor([5, 6, 7]), ranks=torch.tensor([1, 0, 4]),
                             mask=torch.tensor([False, True, False]))  # fmt: skip
    for cells in (from_pandas, from_tensors):
        assert torch.equal(cells.gene_ids, from_lists.gene_ids) and torch.equal(cells.input_ids, from_lists.input_ids)


def test_unknown_genes_are_left_out_when_asked_and_reported(caplog):
    processor = _processor()
    with caplog.at_level(logging.WARNING, logger="modeling.processing_rank_dit"):
        cells = processor(gene_ids=["G5", "OLD1", "G7"], counts=[3, 50, 1], mask=[False, False, True],
                          context_counts=[[]], unknown_genes="ignore")  # fmt: skip
    assert "1 genes outside the checkpoint's vocabulary were left out" in caplog.text
    assert cells.gene_ids.tolist() == [[5, -1, 7]] and cells.attention_mask.tolist() == [[True, False, True]]
    assert not cells.mask[0, 1]
    # The left-out gene's count still shapes the cell's bins: 3 is low next to 50.
    assert cells.input_ids[0, 0] == exact_tokens([3, 50], B)[0] == 1
    windows = processor.windows(cells)
    assert windows.inputs.gene_ids.tolist() == [[5, 7]]  # the model never sees it
    # Hidden at a left-out gene: still hidden (NaN allowed), and its count never shapes the bins.
    for hidden_count in (np.nan, 1000.0):
        hidden = processor(gene_ids=["G5", "OLD1", "G7", "G8"], counts=[3, hidden_count, 1, 9],
                           mask=[False, True, True, False], context_counts=[[]], unknown_genes="ignore")  # fmt: skip
        assert hidden.input_ids[0, 0] == exact_tokens([3, 9], B)[0] and not hidden.mask[0, 1]


def test_a_model_with_other_bins_or_fewer_genes_is_refused():
    processor = _processor()
    processor.check_model_config(RankDiTConfig.from_preset("tiny", num_rank_bins=B, gene_vocab_size=40))
    with pytest.raises(ValueError, match="num_rank_bins"):
        processor.check_model_config(RankDiTConfig.from_preset("tiny", num_rank_bins=50, gene_vocab_size=40))
    with pytest.raises(ValueError, match="do not fit"):
        processor.check_model_config(RankDiTConfig.from_preset("tiny", num_rank_bins=B, gene_vocab_size=20))


def test_the_batch_goes_straight_into_the_model_and_ragged_cells_get_the_exact_rule():
    processor = _processor()
    rng = np.random.default_rng(0)
    genes = [rng.choice(np.arange(3, 40), n, replace=False) for n in (5, 30, 12)]
    counts = [rng.negative_binomial(1, 0.3, len(g)).astype(float) for g in genes]
    for c in counts:
        c[0] += 1
    masks = [rng.random(len(g)) < 0.3 for g in genes]
    contexts = [rng.negative_binomial(1, 0.3, k) for k in (0, 7, 40)]
    batch = processor(gene_ids=genes, counts=[np.where(m, np.nan, c) for c, m in zip(counts, masks)], mask=masks,
                      context_counts=contexts)  # fmt: skip
    assert set(batch) == {"gene_ids", "input_ids", "attention_mask"}
    for i, (c, m, context) in enumerate(zip(counts, masks, contexts)):
        visible = exact_tokens(np.r_[np.where(m, 0, c), context], B)[: len(c)]
        expected = np.where(m, B + 1, visible)
        assert batch.input_ids[i, : len(c)].tolist() == expected.tolist(), i
        assert not batch.attention_mask[i, len(c) :].any()
    model = RankDiTModel(RankDiTConfig.from_preset("tiny", num_rank_bins=B, gene_vocab_size=40)).eval()
    assert model(**batch).logits.shape == (3, 30, B + 1)
