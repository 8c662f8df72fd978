import hashlib
import importlib.util
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dataset_scripts import (
    EMBEDDED_SAMPLE,
    RankDiffusionCollator,
    cell_counts,
    is_hub_dataset_id,
    load_expression_data,
    read_gene_vocab,
    split_by_cell_id,
    split_names,
)
from dataset_scripts.schema import EXPRESSION_SCHEMA
from dataset_scripts.splits import held_out_fraction
from modeling import CellTokenizer, GeneVocab, RankDiTProcessor, rank_tokens
from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("build_sample", REPO / "data" / "build_celltypist_sample.py")
build_sample = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_sample)

TAHOE_COLUMNS = [  # written out here from the dataset card, independently of dataset_scripts.schema
    ("genes", pa.list_(pa.int64())),
    ("expressions", pa.list_(pa.float32())),
    ("drug", pa.string()),
    ("sample", pa.string()),
    ("BARCODE_SUB_LIB_ID", pa.string()),
    ("cell_line_id", pa.string()),
    ("moa-fine", pa.string()),
    ("canonical_smiles", pa.string()),
    ("pubchem_cid", pa.string()),
    ("plate", pa.string()),
]


def test_embedded_sample_has_the_exact_tahoe_schema():
    table = pq.read_table(EMBEDDED_SAMPLE / "data" / "train-00000-of-00001.parquet")
    assert [(f.name, f.type) for f in table.schema] == TAHOE_COLUMNS == [(f.name, f.type) for f in EXPRESSION_SCHEMA]
    assert table.num_rows == 559
    genes, expressions = table["genes"].to_pylist(), table["expressions"].to_pylist()
    assert all(g[0] == 1 and e[0] == -2.0 for g, e in zip(genes, expressions))
    rest = np.concatenate([e[1:] for e in expressions])
    assert (rest >= 1).all() and (rest == np.round(rest)).all()
    assert len(set(table["BARCODE_SUB_LIB_ID"].to_pylist())) == 559


def test_embedded_gene_metadata_layout():
    table = pq.read_table(EMBEDDED_SAMPLE / "metadata" / "gene_metadata.parquet")
    assert table.column_names == ["token_id", "ensembl_id", "gene_symbol"]
    ids = table["token_id"].to_numpy()
    np.testing.assert_array_equal(ids, np.arange(3, 3 + len(ids)))
    assert table["ensembl_id"].to_pylist() == sorted(table["ensembl_id"].to_pylist())


def test_conversion_script_on_a_small_csv():
    gencode = b"ENSG00000000005,TNMD\nENSG00000000003,TSPAN6\nENSG00000000009,TNMD\n"
    counts = b",TSPAN6,TNMD,UNKNOWN1\nCell_1,0,3.0000000001,5\nCell_2,2,0,0\n"
    metadata = build_sample.build_gene_metadata(gencode)
    assert metadata.to_pydict() == {
        "token_id": [3, 4, 5],
        "ensembl_id": ["ENSG00000000003", "ENSG00000000005", "ENSG00000000009"],
        "gene_symbol": ["TSPAN6", "TNMD", "TNMD"],
    }
    table, summary = build_sample.build_expression_data(counts, metadata)
    assert table.schema == build_sample.EXPRESSION_SCHEMA
    assert table["genes"].to_pylist() == [[1, 4], [1, 3]]  # TNMD -> its first Ensembl id; UNKNOWN1 dropped
    assert table["expressions"].to_pylist() == [[-2.0, 3.0], [-2.0, 2.0]]
    assert table["plate"].null_count == 2
    assert summary["genes_matched_to_gencode_v44"] == 2
    with pytest.raises(ValueError, match="integer counts"):
        build_sample.build_expression_data(b",TSPAN6\nCell_1,1.5\n", metadata)


def _write_hub_layout(root, n_cells=30):
    (root / "data").mkdir(parents=True)
    (root / "metadata").mkdir()
    source = pq.read_table(EMBEDDED_SAMPLE / "data" / "train-00000-of-00001.parquet").slice(0, n_cells)
    pq.write_table(source.slice(0, n_cells // 2), root / "data" / "train-00000-of-00002.parquet")
    pq.write_table(source.slice(n_cells // 2), root / "data" / "train-00001-of-00002.parquet")
    pq.write_table(
        pq.read_table(EMBEDDED_SAMPLE / "metadata" / "gene_metadata.parquet"),
        root / "metadata" / "gene_metadata.parquet",
    )


def test_local_folder_in_hub_layout(tmp_path):
    _write_hub_layout(tmp_path / "tahoe")
    source = load_expression_data(tmp_path / "tahoe")
    assert source.rows.num_rows == 30 and len(source.vocab) == 62754


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_expression_data(tmp_path / "no_such_folder")
    with pytest.raises(FileNotFoundError, match="no parquet files"):
        load_expression_data(tmp_path)
    pq.write_table(pq.read_table(EMBEDDED_SAMPLE / "data" / "train-00000-of-00001.parquet"), tmp_path / "x.parquet")
    with pytest.raises(FileNotFoundError, match="gene metadata"):
        load_expression_data(tmp_path)


def test_split_is_disjoint_complete_and_stable():
    rows = load_expression_data().rows
    splits = split_by_cell_id(rows, 0.2, 0.1)
    ids = {name: set(split["BARCODE_SUB_LIB_ID"]) for name, split in splits.items()}
    assert not (ids["train"] & ids["validation"] or ids["train"] & ids["test"] or ids["validation"] & ids["test"])
    assert len(ids["train"] | ids["validation"] | ids["test"]) == 559
    assert 0.12 < len(ids["validation"]) / 559 < 0.28 and 0.05 < len(ids["test"]) / 559 < 0.15
    assert set(split_by_cell_id(rows, 0.2, 0.1)["validation"]["BARCODE_SUB_LIB_ID"]) == ids["validation"]
    # The same rule as the streaming builder's: the next slice of the hash is the test split.
    names = split_names(sorted(ids["test"]), 0.2, 0.1)
    assert set(names) == {"test"}
    with pytest.raises(ValueError, match="sum below 1"):
        split_by_cell_id(rows, 0.6, 0.5)


def _collator(tokenizer: CellTokenizer, **kwargs) -> RankDiffusionCollator:
    return RankDiffusionCollator(RankDiTProcessor(num_rank_bins=tokenizer.num_bins), tokenizer, **kwargs)


def test_the_split_is_a_fixed_function_of_the_cell_id():
    # blake2b of "seed:cell id", never Python's hash(), which is salted per process: every process, machine and
    # resume puts a cell in the same split.
    ids = [f"cell-{i}" for i in range(300)]
    by_hand = [
        int.from_bytes(hashlib.blake2b(f"7:{c}".encode(), digest_size=8).digest(), "little") / 2**64 for c in ids
    ]
    assert [held_out_fraction(c, seed=7) for c in ids] == by_hand
    fraction = np.array(by_hand)
    expected = np.where(fraction < 0.1, "validation", np.where(fraction < 0.25, "test", "train"))
    assert split_names(ids, 0.1, 0.15, seed=7).tolist() == expected.tolist()


def test_collator_strips_marker_and_pads():
    rows = [dict(r) for r in load_expression_data().rows.select(range(3))]
    rows[1]["genes"] = rows[1]["genes"][:40]
    rows[1]["expressions"] = rows[1]["expressions"][:40]
    batch = _collator(CellTokenizer(max_length=128))(rows)
    assert batch["gene_ids"].shape == (3, 128)
    assert batch["attention_mask"].sum(1).tolist() == [128, 39, 128]
    assert (batch["gene_ids"][batch["attention_mask"] == 1] >= 3).all()
    assert (batch["labels"][1, 39:] == -100).all() and (batch["labels"][1, :39] == batch["input_ids"][1, :39]).all()


def test_collator_skips_and_names_bad_rows(caplog):
    rows = [dict(r) for r in load_expression_data().rows.select(range(3))]
    rows[0]["genes"] = rows[0]["genes"][:10]  # lists of different lengths
    with caplog.at_level(logging.WARNING):
        batch = _collator(CellTokenizer(max_length=128))(rows)
    assert batch["gene_ids"].shape[0] == 2
    assert "celltypist_sample_Cell_1" in caplog.text and "length_mismatch" in caplog.text
    with pytest.raises(ValueError, match="every cell of the batch is a bad row.*celltypist_sample_Cell_1"):
        _collator(CellTokenizer())(rows[:1])


def test_collator_takes_stream_rows_and_raw_rows_alike():
    rows = [dict(r) for r in load_expression_data().rows.select(range(4))]
    streamed = []
    for row in rows:
        genes, counts = cell_counts(row)
        expressed = counts > 0
        tokens = rank_tokens(counts, 50)[expressed]
        streamed.append(
            {"gene_ids": genes[expressed], "input_ids": tokens, "BARCODE_SUB_LIB_ID": row["BARCODE_SUB_LIB_ID"]}
        )
    tokenizer = CellTokenizer(max_length=256, panel=np.arange(3, 3000), panel_share=0.5, seed=3)
    for key, value in _collator(tokenizer, epoch=1)(rows).items():
        assert torch.equal(value, _collator(tokenizer, epoch=1)(streamed)[key])


def test_gene_vocab_lookup_and_round_trip(tmp_path):
    vocab = read_gene_vocab(EMBEDDED_SAMPLE / "metadata" / "gene_metadata.parquet")
    assert vocab.size == 3 + 62754
    tp53 = vocab.encode(["TP53"])[0]
    assert vocab.encode(["ENSG00000141510.17", tp53, "TP53"]) == [tp53] * 3
    with pytest.raises(KeyError, match=r"2 of 3 genes.*'NOT_A_GENE' \(position 1\)"):
        vocab.encode(["TP53", "NOT_A_GENE", 999_999])
    (tmp_path / "vocab.json").write_text(json.dumps(vocab.to_dict()))
    loaded = GeneVocab.from_file(tmp_path / "vocab.json")
    assert loaded.encode(["TP53", "CD3E"]) == vocab.encode(["TP53", "CD3E"])
    with pytest.raises(ValueError, match=r"special|got \[1\]"):
        GeneVocab([1, 5], ["a", "b"], ["A", "B"])
    with pytest.raises(ValueError, match=r"Ensembl id; repeated: \['ENSG1'\]"):
        GeneVocab([3, 4], ["ENSG1", "ENSG1"], ["A", "B"])


def test_hub_dataset_ids_are_told_apart_from_local_paths(tmp_path, monkeypatch):
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").mkdir()
    assert is_hub_dataset_id("tahoebio/Tahoe-100M")
    for local in ("./tahoe/data", "/data/tahoe", "~/cells", "cells/train.parquet", "a/b/c", "cells"):
        assert not is_hub_dataset_id(local), local
    monkeypatch.chdir(tmp_path)
    assert not is_hub_dataset_id("owner/name")  # an existing folder wins


def test_samples_are_drawn_across_the_data_not_from_its_first_rows():
    import datasets

    from training.data import sample_rows

    rows = datasets.Dataset.from_dict({"plate": [f"plate{i // 100}" for i in range(800)], "i": list(range(800))})
    drawn = sample_rows(rows, 80, seed=0)
    assert len(drawn) == 80 and len(set(drawn["plate"])) == 8  # every plate, where the first 80 rows hold one
    assert drawn["i"] == sorted(drawn["i"]) and drawn["i"] == sample_rows(rows, 80, seed=0)["i"]
    assert sample_rows(rows, None) is rows and sample_rows(rows, 1000) is rows
    streamed = list(sample_rows(rows.to_iterable_dataset(num_shards=8), 80, seed=0))
    assert len(streamed) == 80 and len({r["plate"] for r in streamed}) > 1
