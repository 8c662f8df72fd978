"""The data side of a run: splits, the training cells read for the baselines, the evaluation panels."""

import numpy as np
import pytest
import torch
from conftest import exact_tokens

from dataset_scripts.schema import CELL_ID_COLUMN, CLS_TOKEN_ID, CLS_VALUE, CONTEXT_COLUMN
from metrics.imputation import detection_strata, token_levels
from modeling import RankDiTProcessor
from training import DataArguments
from training.data import HVG_PANEL, RANDOM_PANEL, TRAINING_PANEL, panel_cells, prepare_data


@pytest.fixture(scope="module")
def data():
    return prepare_data(DataArguments(max_length=256), num_bins=50)


def test_splits_are_disjoint_and_everything_is_fitted_on_training_cells(data):
    ids = {name: set(rows["BARCODE_SUB_LIB_ID"]) for name, rows in data.splits.items()}
    assert not (ids["train"] & ids["validation"] or ids["train"] & ids["test"] or ids["validation"] & ids["test"])
    assert len(data.training_cells) == data.baseline.num_cells == len(ids["train"])
    # The gene pool is what the training cells express: a gene seen only in held-out cells is not in it.
    train_genes = set(data.training_cells.counts.indices.tolist())
    assert set(data.gene_pool.tolist()) == train_genes


def test_three_panels_chosen_on_training_cells_without_looking_at_held_out_counts(data):
    detection = data.training_cells.detection_rate
    assert set(data.panels) == {TRAINING_PANEL, HVG_PANEL, RANDOM_PANEL}
    assert all(len(genes) == 256 and np.all(np.diff(genes) > 0) for genes in data.panels.values())
    training = data.panels[TRAINING_PANEL]
    assert detection[training].min() >= np.sort(detection)[-256]  # the most often detected genes
    assert detection[data.panels[RANDOM_PANEL]].min() >= 0.05
    # Highly variable genes are not the most detected ones: the panels differ.
    assert len(set(data.panels[HVG_PANEL]) & set(training)) < 200
    assert len(set(data.panels[RANDOM_PANEL]) & set(training)) < 200


def test_panel_cells_carry_whole_cell_tokens_counts_and_levels(data):
    genes = data.panels[RANDOM_PANEL]
    cells = data.panel_cells(data.test_rows.take(3), genes, RankDiTProcessor(num_rank_bins=50))
    assert cells.cells["gene_ids"].shape == (3, len(genes)) and cells.attention_mask.all()
    row = next(iter(data.test_rows))
    listed, counts = np.asarray(row["genes"][1:]), np.asarray(row["expressions"][1:], dtype=np.float64)
    tokens = np.array(exact_tokens(counts, 50))  # from the whole cell, not from the panel
    at = np.searchsorted(listed, genes)
    found = (at < len(listed)) & (listed[at.clip(max=len(listed) - 1)] == genes)
    expected = np.where(found, tokens[at.clip(max=len(listed) - 1)], 0)
    np.testing.assert_array_equal(cells.tokens[0].numpy(), expected)
    np.testing.assert_array_equal(cells.counts[0].numpy(), np.where(found, counts[at.clip(max=len(listed) - 1)], 0))
    np.testing.assert_array_equal(cells.levels[0], token_levels(tokens, 50))
    inputs, visible_counts = cells.masked(torch.tensor([[True] + [False] * (len(genes) - 1)] * 3))
    assert inputs.input_ids[0, 0] == 51 and torch.isnan(visible_counts[:, 0]).all()


def test_detection_strata_labels():
    labels = detection_strata(np.array([0.0, 0.05, 0.1, 0.49, 0.5, 0.89, 0.9, 1.0]))
    assert (
        labels.tolist()
        == ["detected_lt10"] * 2 + ["detected_10_50"] * 2 + ["detected_50_90"] * 2 + ["detected_ge90"] * 2
    )


def test_gene_loadings_put_co_varying_genes_close(data):
    genes, loadings = data.training_cells.gene_loadings(8)
    assert loadings.shape == (len(genes), 8) and np.allclose(loadings.std(axis=0), 1.0)
    assert set(genes.tolist()) == set(data.gene_pool.tolist())


def test_panel_cells_of_rows_with_context_rank_among_all_the_cells_counts():
    """Rows with context counts (what an h5ad reader writes for genes outside the vocabulary): the panel's tokens come
    from each cell's listed counts and its context together; a panel gene the cell does not list is 0."""
    rows = [
        {"genes": [CLS_TOKEN_ID, 3, 4, 5, 6], "expressions": [CLS_VALUE, 1.0, 2.0, 3.0, 7.0],
         CONTEXT_COLUMN: [9.0, 9.0], CELL_ID_COLUMN: "a"},
        {"genes": [3, 5, 7], "expressions": [4.0, 1.0, 5.0], CONTEXT_COLUMN: [6.0, 6.0], CELL_ID_COLUMN: "b"},
    ]  # fmt: skip
    panel = np.array([3, 5, 6, 8])
    cells = panel_cells(rows, panel, RankDiTProcessor(num_rank_bins=4))

    def on_panel(a, b):  # tokens of cell a (genes 3, 4, 5, 6) and cell b (genes 3, 5, 7) at the panel
        return [[a[0], a[2], a[3], 0], [b[0], b[1], 0, 0]]

    expected = on_panel(exact_tokens([1, 2, 3, 7, 9, 9], 4), exact_tokens([4, 1, 5, 6, 6], 4))
    assert expected != on_panel(exact_tokens([1, 2, 3, 7], 4), exact_tokens([4, 1, 5], 4))  # the context matters
    np.testing.assert_array_equal(cells.tokens.numpy(), expected)
    np.testing.assert_array_equal(cells.counts.numpy(), [[1, 3, 7, 0], [4, 1, 0, 0]])
    np.testing.assert_array_equal(cells.cells["gene_ids"].numpy(), [panel, panel])
