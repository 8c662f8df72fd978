import numpy as np
import pytest
import torch
from conftest import exact_tokens

from modeling import CellTokenizer, rank_tokens
from modeling.rank_tokenizer import (
    TABLE_COUNTS,
    cell_salts,
    check_counts,
    counts_at_tokens,
    draw_unexpressed,
    hash_keys,
    smallest_keys,
)


def test_hand_computed_bins_with_ties():
    # Non-zero counts [1, 1, 2, 10] with B = 4: edges are the quantiles at 0, 1/3, 2/3, 1 = [1, 1, 2, 10].
    tokens = rank_tokens(np.array([0, 1, 10, 1, 2, 0]), num_bins=4)
    np.testing.assert_array_equal(tokens, [0, 1, 4, 1, 3, 0])


def test_counts_at_new_tokens_are_the_cells_own_counts_at_those_tokens():
    rng = np.random.default_rng(0)
    counts = rng.negative_binomial(1, 0.1, size=(3, 40)).astype(float)
    context = [rng.negative_binomial(1, 0.1, size=n).astype(float) for n in (0, 25, 60)]
    offsets, context_offsets = np.arange(4) * 40, np.concatenate([[0], np.cumsum([len(c) for c in context])])
    flat, flat_context = counts.ravel(), np.concatenate(context)
    own = rank_tokens(flat, 8, offsets, context=flat_context, context_offsets=context_offsets)
    # Unchanged tokens keep their counts exactly; token 0 is count 0; -1 is no count.
    same = counts_at_tokens(own, flat, offsets, rng.random(120), 8, context=flat_context,
                            context_offsets=context_offsets)  # fmt: skip
    np.testing.assert_array_equal(same, flat)
    tokens = rng.integers(0, 9, 120)
    tokens[:3] = [0, -1, own[2]]
    draws = np.stack([counts_at_tokens(tokens, flat, offsets, rng.random(120), 8, context=flat_context,
                                       context_offsets=context_offsets) for _ in range(200)])  # fmt: skip
    assert draws[:, 0].max() == 0 and np.isnan(draws[:, 1]).all() and (draws[:, 2] == flat[2]).all()
    for i in np.flatnonzero((tokens > 0) & (tokens != own)):
        cell = i // 40
        whole = np.concatenate([counts[cell], context[cell]])
        whole_tokens = rank_tokens(whole, 8)
        at = np.unique(whole[(whole_tokens == tokens[i]) & (whole > 0)])
        if len(at):  # the cell's own counts at the token, every one of them picked in turn
            np.testing.assert_array_equal(np.unique(draws[:, i]), at)
    # Tied counts skip tokens: a token the cell does not hold takes its next count up (1, 1, 1, 5: tokens 1 and 8),
    # past its largest (a single count is token 1) the one below, never another cell's; a cell without one non-zero
    # count has no scale, so a moved gene takes count 1.
    tied = counts_at_tokens(np.array([4, 0, 1, 1, 1, 3, 8, 1]), np.array([0, 1, 1, 1, 5, 0, 2.0, 7]),
                            np.array([0, 5, 6, 7, 8]), np.full(8, 0.5), 8)  # fmt: skip
    np.testing.assert_array_equal(tied, [5, 0, 1, 1, 1, 1, 2, 7])


def test_mosaicfm_rule_for_b50():
    # With B = 50 the edges sit at positions 3k/49 of the sorted [1, 1, 2, 10]; 2 first reached at k = 33.
    np.testing.assert_array_equal(rank_tokens(np.array([1, 1, 2, 10]), 50), [1, 1, 34, 50])


def test_all_ones_cell_and_single_gene():
    np.testing.assert_array_equal(rank_tokens(np.ones(7), 50), np.ones(7))
    np.testing.assert_array_equal(rank_tokens(np.array([0, 0, 5, 0]), 50), [0, 0, 1, 0])


@pytest.mark.parametrize("seed", range(6))
def test_bins_match_exact_arithmetic(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    counts = rng.negative_binomial(1, rng.uniform(0.05, 0.6), size=n)
    counts[rng.integers(n)] = 1 + int(rng.integers(20))
    assert rank_tokens(counts, 50).tolist() == exact_tokens(counts, 50)


def test_tied_edge_that_floats_get_wrong():
    # 1716 expressed genes: edge 46 sits exactly on the first 9, but np.quantile gives 8.999999999999773 and
    # would put every 9 in bin 48 instead of 47.
    counts = np.array([1] * 1500 + [2] * 100 + [8] * 10 + [9] * 100 + [40] * 6)
    tokens = rank_tokens(counts, 50)
    assert tokens.tolist() == exact_tokens(counts, 50)
    assert set(tokens[counts == 9].tolist()) == {47}


def test_quantiles_are_scale_free_and_monotone():
    rng = np.random.default_rng(0)
    counts = rng.negative_binomial(1, 0.3, size=500)
    counts[0] = 3
    tokens = rank_tokens(counts, 50)
    np.testing.assert_array_equal(tokens, rank_tokens(counts * 7, 50))
    order = np.argsort(counts[counts > 0], kind="stable")
    assert np.all(np.diff(tokens[counts > 0][order]) >= 0)
    assert tokens.max() == 50 and tokens[counts > 0].min() == 1


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ([1, -1, 2], "non-negative integers"),
        ([1, np.nan, 2], "non-negative integers"),
        ([1, 2.5, 2], "2.5 at position 1 \\(gene 11\\)"),
        ([1, np.inf, 2], "got inf at position 1"),
    ],
)
def test_bad_counts_are_named(counts, message):
    with pytest.raises(ValueError, match=message):
        check_counts(np.array(counts, dtype=float), "cell 'x'", genes=np.array([10, 11, 12]))
    with pytest.raises(ValueError, match="non-negative integers"):
        rank_tokens(np.array(counts, dtype=float), 50)


@pytest.mark.parametrize("seed", range(4))
def test_a_batch_of_cells_with_context_matches_exact_arithmetic_cell_by_cell(seed):
    # Cells of every size (one gene, all ties, counts beyond the table and at its seam, unexpressed genes), each with
    # context counts that join its bins: the batch rule against the exact one on each whole cell.
    rng = np.random.default_rng(seed)
    cells, contexts = [], []
    for _ in range(40):
        n = int(rng.integers(1, 300))
        counts = rng.negative_binomial(1, rng.uniform(0.05, 0.7), n)
        counts[rng.integers(n)] += int(rng.choice([1, TABLE_COUNTS - 2, TABLE_COUNTS - 1, TABLE_COUNTS, 5000]))
        cells.append(counts)
        contexts.append(rng.negative_binomial(1, 0.3, int(rng.integers(0, 50))))
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in cells])])
    context_offsets = np.concatenate([[0], np.cumsum([len(c) for c in contexts])])
    for num_bins in (50, 7):
        tokens = rank_tokens(np.concatenate(cells), num_bins, offsets, context=np.concatenate(contexts),
                             context_offsets=context_offsets)  # fmt: skip
        for i, (counts, context) in enumerate(zip(cells, contexts)):
            expected = exact_tokens(np.r_[counts, context], num_bins)[: len(counts)]
            assert tokens[offsets[i] : offsets[i + 1]].tolist() == expected, (num_bins, i)


def test_no_count_gets_the_mask_id():
    # With B = 1 every expressed gene is bin 1 however large (the edge is the smallest count); a count above every
    # reference count is bin B, never B + 1 (the [MASK] id).
    np.testing.assert_array_equal(rank_tokens(np.array([0, 3, 5, 900]), 1), [0, 1, 1, 1])
    held_out, visible = np.array([2, 9, 80, 5000, 0]), np.array([1, 1, 2, 3, 7])
    tokens = rank_tokens(held_out, 10, reference=visible)
    assert tokens.tolist() == exact_tokens(held_out, 10, reference=visible) == [6, 10, 10, 10, 0]
    rng = np.random.default_rng(0)
    for _ in range(20):
        counts = rng.negative_binomial(1, 0.2, 500)
        reference = rng.negative_binomial(1, 0.6, 100) + 1
        tokens = rank_tokens(counts, 50, reference=reference)
        assert tokens.max() <= 50 and tokens.tolist() == exact_tokens(counts, 50, reference=reference)


def _cell(n_expressed: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    genes = rng.choice(np.arange(3, 5000), n_expressed, replace=False)
    counts = rng.integers(1, 30, n_expressed).astype(float)
    return genes, counts


def test_tokens_are_computed_before_subsampling():
    genes, counts = _cell(300)
    tokenizer = CellTokenizer(num_bins=50, max_length=64)
    gene_ids, input_ids = tokenizer(genes, counts, cell_id="c1")
    assert len(gene_ids) == 64 and len(set(gene_ids.tolist())) == 64
    full = dict(zip(genes.tolist(), rank_tokens(counts, 50).tolist()))
    assert [full[g] for g in gene_ids.tolist()] == input_ids.tolist()


def test_subsampling_is_fixed_by_seed_epoch_and_cell():
    genes, counts = _cell(300)
    tokenizer = CellTokenizer(num_bins=50, max_length=64)
    first, _ = tokenizer(genes, counts, cell_id="c1")
    np.testing.assert_array_equal(first, tokenizer(genes, counts, cell_id="c1")[0])
    assert not np.array_equal(first, tokenizer(genes, counts, cell_id="c2")[0])
    assert not np.array_equal(first, tokenizer(genes, counts, cell_id="c1", epoch=1)[0])
    assert not np.array_equal(first, CellTokenizer(num_bins=50, max_length=64, seed=1)(genes, counts, cell_id="c1")[0])


def test_short_cells_keep_every_expressed_gene():
    genes, counts = _cell(20)
    gene_ids, input_ids = CellTokenizer(max_length=64)(genes, counts, cell_id="c")
    assert sorted(gene_ids.tolist()) == sorted(genes.tolist()) and (input_ids > 0).all()


def test_zero_share_adds_unexpressed_genes_from_the_pool():
    genes, counts = _cell(300)
    pool = np.arange(3, 6000)
    tokenizer = CellTokenizer(max_length=100, zero_share=0.25, gene_pool=pool)
    gene_ids, input_ids = tokenizer(genes, counts, cell_id="c")
    assert len(gene_ids) == 100 and len(set(gene_ids.tolist())) == 100
    zeros = gene_ids[input_ids == 0]
    assert len(zeros) == 25
    assert not set(zeros.tolist()) & set(genes.tolist()) and set(zeros.tolist()) <= set(pool.tolist())
    assert (input_ids[:75] > 0).all()


def test_panel_rule_ignores_the_counts():
    genes, counts = _cell(300)
    panel = np.arange(3, 200)
    tokenizer = CellTokenizer(max_length=64, panel=panel)
    gene_ids, input_ids = tokenizer(genes, counts, cell_id="c", rule="panel")
    # Which genes enter does not depend on the counts: another cell with the same id draws the same genes.
    other_ids, _ = tokenizer(*_cell(50, seed=3), cell_id="c", rule="panel")
    np.testing.assert_array_equal(gene_ids, other_ids)
    full = dict(zip(genes.tolist(), rank_tokens(counts, 50).tolist()))
    assert input_ids.tolist() == [full.get(g, 0) for g in gene_ids.tolist()]
    assert set(gene_ids.tolist()) <= set(panel.tolist())


def test_panel_share_mixes_rules():
    genes, counts = _cell(300)
    tokenizer = CellTokenizer(max_length=64, panel_share=0.5, panel=np.arange(3, 2000))
    zero_shares = [np.mean(tokenizer(genes, counts, cell_id=f"c{i}")[1] == 0) for i in range(40)]
    assert 5 < sum(share > 0 for share in zero_shares) < 35


@pytest.mark.parametrize(
    ("genes", "counts", "message"),
    [
        ([3, 4], [1.0], "differ in shape"),
        ([3, 3, 4], [1.0, 2.0, 1.0], r"repeated: \[3\]"),
        ([3, 4], [0.0, 0.0], "no expressed genes"),
        ([3, 4], [1.0, -2.0], "non-negative integers"),
    ],
)
def test_bad_cells_are_named(genes, counts, message):
    with pytest.raises(ValueError, match=f"cell 'bad'.*{message}"):
        CellTokenizer()(np.array(genes), np.array(counts), cell_id="bad")


def test_configuration_errors():
    with pytest.raises(ValueError, match="gene_pool"):
        CellTokenizer(zero_share=0.1)
    with pytest.raises(ValueError, match="panel"):
        CellTokenizer(panel_share=0.1)


def test_hash_keys_are_a_bijection_for_a_fixed_salt():
    values = np.arange(2**20)
    keys = hash_keys(np.uint32(12345), values)
    assert len(np.unique(keys)) == len(values) and keys.dtype == np.uint32
    assert not np.array_equal(keys, hash_keys(np.uint32(12346), values))


@pytest.mark.parametrize("n_keep", [1, 5, 40])
@pytest.mark.parametrize("min_size", [0, 41])  # some segments shorter than n_keep, or none
def test_smallest_keys_match_a_sort_per_segment(n_keep, min_size):
    rng = np.random.default_rng(n_keep)
    sizes = rng.integers(min_size, 80, 30)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    keys = np.concatenate([rng.permutation(2**32 - 1 - np.arange(s)) for s in sizes]).astype(np.uint32)
    expected = [
        np.sort(start + np.argsort(keys[start:stop])[:n_keep]) for start, stop in zip(offsets[:-1], offsets[1:])
    ]
    np.testing.assert_array_equal(smallest_keys(offsets, keys, n_keep), np.concatenate(expected))


def _select_one(tokenizer, genes, tokens, cell_id, epoch=0):
    _, gene_ids, input_ids = tokenizer.select_batch(np.array([0, len(genes)]), genes, tokens, [cell_id], epoch=epoch)
    return gene_ids, input_ids


def _random_cells(rng, n_cells, pool):
    sizes = rng.integers(1, 400, n_cells)
    genes = [np.sort(rng.choice(pool, size, replace=False)) for size in sizes]
    tokens = [rng.integers(1, 51, size) for size in sizes]
    return sizes, genes, tokens


@pytest.mark.parametrize("zero_share", [0.0, 0.25])
def test_select_batch_with_every_rule_equals_each_cell_alone(zero_share):
    rng = np.random.default_rng(0)
    pool = np.arange(3, 700)
    sizes, genes, tokens = _random_cells(rng, 60, pool)
    tokens = [np.where(rng.random(len(t)) < 0.2, 0, t) for t in tokens]  # listed zero counts too
    tokenizer = CellTokenizer(
        max_length=128,
        zero_share=zero_share,
        gene_pool=pool,
        panel=pool[::3],
        panel_share=0.3,
        random_share=0.3,
        seed=7,
    )
    ids = [f"cell-{i}" for i in range(len(sizes))]
    offsets, gene_ids, input_ids = tokenizer.select_batch(
        np.concatenate([[0], np.cumsum(sizes)]), np.concatenate(genes), np.concatenate(tokens), ids, epoch=2
    )
    assert set(tokenizer.rules_of(ids, epoch=2)) == {"expressed", "panel", "random"}
    for i, cell_id in enumerate(ids):
        expected = _select_one(tokenizer, genes[i], tokens[i], cell_id, epoch=2)
        np.testing.assert_array_equal(gene_ids[offsets[i] : offsets[i + 1]], expected[0])
        np.testing.assert_array_equal(input_ids[offsets[i] : offsets[i + 1]], expected[1])


def test_expressed_rule_keeps_the_smallest_hash_keys_in_input_order():
    rng = np.random.default_rng(1)
    sizes, genes, tokens = _random_cells(rng, 20, np.arange(3, 3000))
    tokenizer = CellTokenizer(max_length=64, seed=5)
    ids = [f"c{i}" for i in range(len(sizes))]
    offsets, gene_ids, _ = tokenizer.select_batch(
        np.concatenate([[0], np.cumsum(sizes)]), np.concatenate(genes), np.concatenate(tokens), ids, rule="expressed"
    )
    salts = cell_salts(5, 0, ids)[:, 1]  # the "expressed" hash stream
    for i in range(len(ids)):
        keys = hash_keys(salts[i], genes[i])
        expected = genes[i][np.sort(np.argsort(keys)[:64])]
        np.testing.assert_array_equal(gene_ids[offsets[i] : offsets[i + 1]], expected)


def test_expressed_subsample_is_uniform():
    # 200 expressed genes, 50 kept: over 2,000 cells each gene is kept about 500 times.
    genes, tokens = np.arange(3, 203), np.ones(200, dtype=np.int64)
    tokenizer = CellTokenizer(max_length=50)
    kept = np.zeros(203)
    for i in range(2000):
        np.add.at(kept, _select_one(tokenizer, genes, tokens, f"c{i}")[0], 1)
    chi2 = ((kept[3:] - 500) ** 2 / 500).sum()
    assert chi2 < 280  # chi-square with 199 degrees of freedom: mean 199, sd 20


def test_unexpressed_draws_are_uniform_without_repeats():
    pool = np.arange(100)
    expressed = np.array([2, 5, 50])
    drawn = np.zeros(100)
    n_cells = 3000
    salts = cell_salts(0, 0, [f"c{i}" for i in range(n_cells)])[:, 2]
    offsets = np.arange(n_cells + 1) * len(expressed)
    zero_offsets, zeros = draw_unexpressed(salts, offsets, np.tile(expressed, n_cells), pool, 10)
    assert np.all(np.diff(zero_offsets) == 10)
    for start, stop in zip(zero_offsets[:-1], zero_offsets[1:]):
        assert len(set(zeros[start:stop].tolist())) == 10
    np.add.at(drawn, zeros, 1)
    assert drawn[expressed].sum() == 0
    expected = n_cells * 10 / 97
    chi2 = ((np.delete(drawn, expressed) - expected) ** 2 / expected).sum()
    assert chi2 < 150  # chi-square with 96 degrees of freedom: mean 96, sd 14


def test_unexpressed_draws_take_every_gene_a_small_pool_has():
    offsets, zeros = draw_unexpressed(cell_salts(0, 0, ["a", "b"])[:, 2], np.array([0, 2, 3]), np.array([3, 4, 3]),
                                      np.arange(3, 9), 10)  # fmt: skip
    assert offsets.tolist() == [0, 4, 9]
    assert sorted(zeros[:4].tolist()) == [5, 6, 7, 8] and sorted(zeros[4:].tolist()) == [4, 5, 6, 7, 8]


def tahoe_x1_bins(counts: np.ndarray, num_bins: int = 50) -> np.ndarray:
    """Tahoe-x1's own formulation (its collator's `binning` on a row of expressed counts, `n_bins = B + 1`):
    float32 quantiles at `linspace(0, 1, B)`, `torch.bucketize(right=False)`, + 1."""
    row = torch.as_tensor(counts, dtype=torch.float32)
    edges = torch.quantile(row, torch.linspace(0, 1, num_bins, dtype=torch.float32))
    return (torch.bucketize(row, edges, right=False) + 1).numpy()


def test_rank_rule_matches_tahoe_x1_on_every_cell_of_the_embedded_sample():
    from dataset_scripts import cell_counts, load_expression_data

    cells = 0
    for row in load_expression_data().rows:
        _, counts = cell_counts(row)
        expressed = counts[counts > 0]
        np.testing.assert_array_equal(rank_tokens(expressed, 50), tahoe_x1_bins(expressed), err_msg=str(cells))
        cells += 1
    assert cells == 559


def test_random_rule_lists_the_smallest_hash_keys_of_the_pool_with_the_cells_tokens():
    rng = np.random.default_rng(2)
    pool = np.arange(3, 900)
    sizes, genes, tokens = _random_cells(rng, 12, pool)
    tokenizer = CellTokenizer(max_length=100, gene_pool=pool, seed=4)
    ids = [f"r{i}" for i in range(len(sizes))]
    offsets, gene_ids, input_ids = tokenizer.select_batch(
        np.concatenate([[0], np.cumsum(sizes)]), np.concatenate(genes), np.concatenate(tokens), ids, rule="random"
    )
    salts = cell_salts(4, 0, ids)[:, 3]  # the "panel" hash stream draws listed genes
    for i in range(len(ids)):
        expected = np.sort(pool[np.argsort(hash_keys(salts[i], pool))[:100]])
        token_of = dict(zip(genes[i].tolist(), tokens[i].tolist()))
        np.testing.assert_array_equal(gene_ids[offsets[i] : offsets[i + 1]], expected)
        assert input_ids[offsets[i] : offsets[i + 1]].tolist() == [token_of.get(g, 0) for g in expected.tolist()]
