import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import exact_tokens

import train_hf
from dataset_scripts import cell_counts
from dataset_scripts.fixtures import write_tahoe_fixture
from dataset_scripts.schema import EXPRESSION_SCHEMA
from dataset_scripts.tokenization import tokenize_arrow_batch
from modeling.rank_tokenizer import TABLE_COUNTS


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tahoe")
    write_tahoe_fixture(root, num_shards=3, cells_per_shard=40, num_genes=6000)
    return root


def test_fixture_looks_like_tahoe(fixture_dir):
    shards = sorted((fixture_dir / "data").glob("*.parquet"))
    assert [p.name for p in shards] == [f"train-{i:05d}-of-00003.parquet" for i in range(3)]
    table = pa.concat_tables(pq.read_table(p) for p in shards)
    assert table.schema == EXPRESSION_SCHEMA
    genes, expressions = table["genes"].to_pylist(), table["expressions"].to_pylist()
    assert all(g[0] == 1 and e[0] == -2.0 for g, e in zip(genes, expressions))
    sizes = np.array([len(g) - 1 for g in genes])
    assert sizes.min() >= 300 and sizes.max() <= 5500 and sizes.max() > 2000
    counts = np.concatenate([e[1:] for e in expressions])
    assert 0.5 < np.mean(counts == 1) < 0.9 and counts.max() >= 50
    assert len(set(table["plate"].to_pylist())) == 3 and len(set(table["drug"].to_pylist())) > 2
    assert len(set(table["BARCODE_SUB_LIB_ID"].to_pylist())) == table.num_rows


def _per_cell(table, num_bins):
    """Expressed genes and their tokens, cell by cell, in exact arithmetic (each row's context counts join)."""
    for row in table.to_pylist():
        genes, counts = cell_counts(row)
        context = np.asarray(row.get("context_expressions") or [])
        tokens = np.array(exact_tokens(np.r_[counts, context], num_bins)[: len(counts)])
        yield genes[counts > 0], tokens[counts > 0]


@pytest.mark.parametrize("num_bins", [50, 7])
def test_vectorised_tokens_equal_the_per_cell_rule(fixture_dir, num_bins):
    table = pq.read_table(sorted((fixture_dir / "data").glob("*.parquet"))[0])
    batch = tokenize_arrow_batch(table, num_bins)
    assert batch.kept.all() and not batch.skipped
    for i, (genes, tokens) in enumerate(_per_cell(table, num_bins)):
        got_genes, got_tokens = batch.cell(i)
        np.testing.assert_array_equal(got_genes, genes)
        np.testing.assert_array_equal(got_tokens, tokens)


def _table(rows):
    genes, expressions = zip(*rows)
    n = len(rows)
    columns = {name: pa.nulls(n, pa.string()) for name in EXPRESSION_SCHEMA.names}
    columns["genes"] = pa.array([list(g) for g in genes], pa.list_(pa.int64()))
    columns["expressions"] = pa.array([list(e) for e in expressions], pa.list_(pa.float32()))
    return pa.table([columns[name] for name in EXPRESSION_SCHEMA.names], schema=EXPRESSION_SCHEMA)


def test_random_edge_cells_match_the_per_cell_rule():
    rng = np.random.default_rng(0)
    rows = [([1, 5], [-2, 3]), ([1, 4, 9, 12], [-2, 1, 1, 1]), ([7, 8, 9], [0, 2, 0])]  # one gene, ties, zeros
    rows.append(([1] + list(range(3, 1719)), [-2] + [1] * 1500 + [2] * 100 + [8] * 10 + [9] * 100 + [40] * 6))
    for _ in range(30):
        n = int(rng.integers(1, 400))
        genes = np.sort(rng.choice(np.arange(3, 2000), n, replace=False))
        counts = rng.negative_binomial(1, rng.uniform(0.05, 0.7), n)
        counts[0] += 1
        rows.append((genes.tolist(), counts.tolist()) if rng.random() < 0.5 else ([1, *genes], [-2, *counts]))
    table = _table(rows)
    batch = tokenize_arrow_batch(table, 50)
    assert batch.kept.all()
    for i, (genes, tokens) in enumerate(_per_cell(table, 50)):
        np.testing.assert_array_equal(batch.cell(i)[1], tokens)
        np.testing.assert_array_equal(batch.cell(i)[0], genes)


def test_counts_beyond_the_token_table_match_the_per_cell_rule():
    # Counts below TABLE_COUNTS come from the per-cell table, the rest from the edges: cover both sides and the seam.
    seam = [TABLE_COUNTS - 2, TABLE_COUNTS - 1, TABLE_COUNTS, TABLE_COUNTS + 1]
    rows = [
        (list(range(3, 7)), seam),
        (list(range(3, 8)), [5000, 70, 70, 123456, 99]),  # only large counts
        (list(range(3, 13)), [1, 1, 2, *seam, 900, 900, 3]),
    ]
    rng = np.random.default_rng(1)
    for _ in range(10):
        counts = np.concatenate([rng.integers(1, 5, 300), rng.integers(50, 5000, int(rng.integers(1, 60)))])
        rows.append((list(range(3, 3 + len(counts))), rng.permutation(counts).tolist()))
    table = _table(rows)
    batch = tokenize_arrow_batch(table, 50)
    for i, (genes, tokens) in enumerate(_per_cell(table, 50)):
        np.testing.assert_array_equal(batch.cell(i)[0], genes)
        np.testing.assert_array_equal(batch.cell(i)[1], tokens)


def test_context_counts_of_anndata_rows_join_the_bins_and_bad_ones_skip_the_row():
    rows = [([3, 4, 5], [1, 2, 3]), ([3, 4, 5], [1, 2, 3]), ([3, 4], [1, 1]), ([3, 4], [1, 1])]
    table = _table(rows).append_column(
        "context_expressions", pa.array([[], [7, 7, 1, 0], [2.5], [-1]], pa.list_(pa.float32()))
    )
    batch = tokenize_arrow_batch(table, 50)
    assert batch.kept.tolist() == [True, True, False, False] and batch.skipped == {"bad_counts": 2}
    assert batch.cell(0)[1].tolist() == exact_tokens([1, 2, 3], 50)
    assert batch.cell(1)[1].tolist() == exact_tokens([1, 2, 3, 7, 7, 1], 50)[:3]  # the context moves the bins
    for i, (_, tokens) in enumerate(list(_per_cell(table.slice(0, 2), 50))):
        np.testing.assert_array_equal(batch.cell(i)[1], tokens)


def test_bad_rows_are_skipped_and_counted():
    good = ([1, 3, 4, 5], [-2, 1, 2, 3])
    rows = [
        good,
        ([1, 3, 4], [-2, 1]),  # lengths differ
        ([1, 3, 4], [-2, -1, 2]),  # negative count
        ([1, 3, 4], [-2, float("nan"), 2]),  # NaN
        ([1, 3, 4], [-2, 1.5, 2]),  # not an integer
        ([1, 3, 99_999], [-2, 1, 2]),  # unknown gene
        ([1, 3, 3], [-2, 1, 2]),  # repeated gene
        ([1, 3, 4], [-2, 0, 0]),  # nothing expressed
        ([5, 3, 4], [3, 1, 2]),  # good: genes out of order and no marker
        ([2, 3, 4], [-2, 1, 2]),  # a negative first value at another gene than <cls>: a bad count, not a marker
        ([1, 3, 4], [-1, 1, 2]),  # <cls> with another value than -2: a bad count
    ]
    batch = tokenize_arrow_batch(_table(rows), 50, known_genes=np.arange(3, 100))
    assert batch.kept.tolist() == [True] + [False] * 7 + [True, False, False]
    assert dict(batch.skipped) == {
        "length_mismatch": 1,
        "bad_counts": 5,
        "unknown_genes": 1,
        "repeated_genes": 1,
        "no_expressed_genes": 1,
    }
    np.testing.assert_array_equal(batch.cell(0)[0], [3, 4, 5])
    np.testing.assert_array_equal(batch.cell(1)[0], [5, 3, 4])
    assert batch.cell(0)[1].tolist() == exact_tokens([1, 2, 3], 50) and batch.cell(1)[1].tolist() == [50, 1, 26]


@pytest.mark.slow
def test_train_hf_on_local_tahoe_schema_shards(fixture_dir, tmp_path):
    _, metrics = train_hf.main(
        ["--data", str(fixture_dir), "--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--max_length", "32",
         "--per_device_train_batch_size", "4", "--max_eval_cells", "4", "--eval_time_grid", "1", "--use_cpu",
         "--disable_tqdm", "true"]
    )  # fmt: skip
    assert (
        np.isfinite(metrics["eval_masked_nll_0.5"])
        and (tmp_path / "run" / "model" / "preprocessor_config.json").exists()
    )
