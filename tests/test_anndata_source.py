import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import train_hf
from dataset_scripts import (
    EMBEDDED_SAMPLE,
    RankDiffusionCollator,
    cell_counts,
    load_expression_data,
    read_gene_vocab,
)
from dataset_scripts.anndata_source import load_anndata
from modeling import CellTokenizer, RankDiTConfig, RankDiTModel, RankDiTProcessor
from pipelines import MaskedRankDiffusionPipeline, MaskedRankDiffusionScheduler

VOCAB = read_gene_vocab(EMBEDDED_SAMPLE / "metadata" / "gene_metadata.parquet")


def _cells(n=40):
    return [dict(r) for r in load_expression_data().rows.select(range(n))]


def _write_h5ad(path, cells, *, names="symbol", counts_in_layer=False, dense=False):
    genes = sorted({g for row in cells for g in cell_counts(row)[0].tolist()})
    column = {g: i for i, g in enumerate(genes)}
    matrix = np.zeros((len(cells), len(genes) + 1), dtype=np.float32)  # + one gene no vocabulary knows
    for i, row in enumerate(cells):
        g, c = cell_counts(row)
        matrix[i, [column[x] for x in g.tolist()]] = c
    index = {int(t): k for k, t in enumerate(VOCAB.token_ids.tolist())}
    pick = (lambda g: VOCAB.symbols[index[g]]) if names == "symbol" else (lambda g: VOCAB.ensembl_ids[index[g]] + ".5")
    var = pd.DataFrame(index=[pick(g) for g in genes] + ["NOT_A_GENE"])
    obs = pd.DataFrame(
        {"donor": [f"d{i % 3}" for i in range(len(cells))]}, index=[r["BARCODE_SUB_LIB_ID"] for r in cells]
    )
    counts = matrix if dense else sp.csr_matrix(matrix)
    if counts_in_layer:
        normalised = matrix / np.maximum(matrix.sum(1, keepdims=True), 1) * 1e4
        adata = anndata.AnnData(X=sp.csr_matrix(normalised), obs=obs, var=var, layers={"counts": counts})
    else:
        adata = anndata.AnnData(X=counts, obs=obs, var=var)
    adata.write_h5ad(path)
    return len(genes) + 1


@pytest.mark.parametrize(
    ("names", "counts_in_layer", "dense"),
    [("symbol", False, False), ("ensembl", True, False), ("symbol", False, True)],
)
def test_rows_match_the_cells_written(tmp_path, names, counts_in_layer, dense):
    cells = _cells()
    n_genes = _write_h5ad(tmp_path / "x.h5ad", cells, names=names, counts_in_layer=counts_in_layer, dense=dense)
    rows, match = load_anndata(
        tmp_path / "x.h5ad", VOCAB, layer="counts" if counts_in_layer else None, obs_columns=("donor",), block_size=16
    )
    assert (match.matched, match.total) == (n_genes - 1, n_genes) and match.unmatched_examples == ["NOT_A_GENE"]
    assert rows.n_shards == 3
    got = list(rows)
    assert [r["BARCODE_SUB_LIB_ID"] for r in got] == [c["BARCODE_SUB_LIB_ID"] for c in cells]
    for row, cell in zip(got, cells):
        genes, counts = cell_counts(cell)
        order = np.argsort(row["genes"])
        assert np.array_equal(np.array(row["genes"])[order], genes)
        assert np.array_equal(np.array(row["expressions"])[order], counts)
    assert got[4]["donor"] == "d1"


def test_a_missing_obs_value_is_a_null_not_the_string_nan(tmp_path):
    cells = _cells(6)
    _write_h5ad(tmp_path / "x.h5ad", cells)
    adata = anndata.read_h5ad(tmp_path / "x.h5ad")
    adata.obs["donor"] = pd.Categorical(["d0", None, "d2", "d0", None, "d1"])
    adata.obs["dose"] = [0.5, np.nan, 1.0, 0.0, 2.0, np.nan]
    adata.write_h5ad(tmp_path / "x.h5ad")
    rows, _ = load_anndata(tmp_path / "x.h5ad", VOCAB, obs_columns=("donor", "dose"))
    got = list(rows)
    assert [r["donor"] for r in got] == ["d0", None, "d2", "d0", None, "d1"]
    assert [r["dose"] for r in got] == ["0.5", None, "1.0", "0.0", "2.0", None]


def test_bad_choices_are_named(tmp_path):
    _write_h5ad(tmp_path / "x.h5ad", _cells(5))
    with pytest.raises(KeyError, match="no layer 'raw'"):
        load_anndata(tmp_path / "x.h5ad", VOCAB, layer="raw")
    with pytest.raises(KeyError, match="obs columns"):
        load_anndata(tmp_path / "x.h5ad", VOCAB, obs_columns=("tissue",))
    with pytest.raises(FileNotFoundError):
        load_expression_data(tmp_path / "missing.h5ad")


def test_a_matrix_that_is_not_raw_counts_is_refused_before_training(tmp_path):
    _write_h5ad(tmp_path / "x.h5ad", _cells(5), counts_in_layer=True)  # X: normalised, layers["counts"]: counts
    with pytest.raises(ValueError, match=r"x.h5ad \(X\) does not hold raw counts: [0-9.]+ at cell .* --layer"):
        load_anndata(tmp_path / "x.h5ad", VOCAB)
    load_anndata(tmp_path / "x.h5ad", VOCAB, layer="counts")
    adata = anndata.read_h5ad(tmp_path / "x.h5ad")
    adata.layers["counts"] = sp.csr_matrix(adata.shape, dtype=np.float32)
    adata.write_h5ad(tmp_path / "zero.h5ad")
    with pytest.raises(ValueError, match=r"\(layers\['counts'\]\) holds no non-zero count in any of its 5 cells"):
        load_anndata(tmp_path / "zero.h5ad", VOCAB, layer="counts", block_size=2)


@pytest.mark.slow
def test_train_hf_on_an_h5ad_file(tmp_path):
    _write_h5ad(tmp_path / "cells.h5ad", _cells(60), counts_in_layer=True)
    _, metrics = train_hf.main(
        ["--data", str(tmp_path / "cells.h5ad"), "--layer", "counts", "--output_dir", str(tmp_path / "run"),
         "--max_steps", "2", "--max_length", "32", "--per_device_train_batch_size", "4", "--max_eval_cells", "4",
         "--eval_time_grid", "1", "--use_cpu", "--disable_tqdm", "true"]
    )  # fmt: skip
    assert np.isfinite(metrics["eval_masked_nll_0.5"])


@pytest.mark.slow
def test_train_hf_conditions_on_obs_columns_of_an_h5ad_file(tmp_path):
    _write_h5ad(tmp_path / "cells.h5ad", _cells(60))
    trainer, metrics = train_hf.main(
        ["--data", str(tmp_path / "cells.h5ad"), "--conditions", "donor", "--output_dir", str(tmp_path / "run"),
         "--max_steps", "2", "--max_length", "32", "--per_device_train_batch_size", "4", "--max_eval_cells", "4",
         "--eval_time_grid", "1", "--use_cpu", "--disable_tqdm", "true", "--model_card", "false"]
    )  # fmt: skip
    assert trainer.model.config.conditions == {"donor": ["d0", "d1", "d2"]} and not trainer.model.config.dose_condition
    assert np.isfinite(metrics["eval_masked_nll_0.5"])
    with pytest.raises(ValueError, match=r"--conditions \['tissue'\] are not obs columns"):
        train_hf.main(["--data", str(tmp_path / "cells.h5ad"), "--conditions", "tissue", "--output_dir",
                       str(tmp_path / "run2"), "--use_cpu"])  # fmt: skip


def test_the_same_h5ad_cell_gets_the_same_tokens_in_training_and_in_impute_anndata(tmp_path):
    # One rule on both sides: a gene outside the vocabulary (NOT_A_GENE) and a second column naming a listed gene
    # (by its Ensembl id) are not listed, and their counts shape the cell's bins.
    cells = _cells(10)[2:]  # each under 2,048 genes: one window of the model below
    _write_h5ad(tmp_path / "x.h5ad", cells)
    adata = anndata.read_h5ad(tmp_path / "x.h5ad")
    first = adata.var_names[0]
    again = VOCAB.ensembl_ids[VOCAB.encode([first])[0] - 3]
    extra = anndata.AnnData(
        sp.csr_matrix(np.tile([30.0, 2.0], (adata.n_obs, 1)), dtype=np.float32),
        obs=adata.obs[[]], var=pd.DataFrame(index=["NOT_A_GENE_2", again]),
    )  # fmt: skip
    adata = anndata.concat([adata, extra], axis=1, merge="first")
    adata.write_h5ad(tmp_path / "y.h5ad")

    config = RankDiTConfig.from_preset("tiny", gene_vocab_size=VOCAB.size, max_length=2048)
    processor = RankDiTProcessor.from_model_config(config, gene_vocab=VOCAB)
    rows, _ = load_anndata(tmp_path / "y.h5ad", VOCAB)
    batch = RankDiffusionCollator(processor, CellTokenizer(max_length=10_000), rule="expressed")(list(rows))
    training = {}
    for i, cell_id in enumerate(adata.obs_names):
        real = batch["attention_mask"][i]
        training[cell_id] = dict(zip(batch["gene_ids"][i][real].tolist(), batch["input_ids"][i][real].tolist()))

    model = RankDiTModel(config).eval()
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    pipe = MaskedRankDiffusionPipeline(model=model, scheduler=MaskedRankDiffusionScheduler(), processor=processor)
    pipe.set_progress_bar_config(disable=True)
    counts = adata.X.toarray()
    known = VOCAB.columns(list(adata.var_names)) >= 0
    mask = np.zeros(adata.shape, dtype=bool)
    for i in range(adata.n_obs):  # hide one known gene the cell does not express: the visible counts are all of them
        mask[i, np.flatnonzero(known & (counts[i] == 0))[i]] = True
    pipe.impute_anndata(adata, mask=mask, num_inference_steps=1, batch_size=1)
    for i, cell_id in enumerate(adata.obs_names):
        inputs = seen[i]  # one step, one cell per call: the first calls show each cell before anything is drawn
        genes, tokens = inputs["gene_ids"][0].tolist(), inputs["input_ids"][0].tolist()
        shown = {gene: token for gene, token in zip(genes, tokens) if token != config.mask_token_id}
        expressed = {gene: token for gene, token in shown.items() if token > 0}
        assert expressed == training[cell_id], cell_id
        assert len(expressed) == len(training[cell_id]) > 100
