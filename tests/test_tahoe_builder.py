import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets.distributed import split_dataset_by_node

from dataset_scripts import cell_counts
from dataset_scripts.fixtures import write_tahoe_fixture
from dataset_scripts.tahoe_100m_tokenized import Tahoe100MTokenized
from modeling import CellTokenizer, rank_tokens


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tahoe")
    write_tahoe_fixture(root, num_shards=2, cells_per_shard=60, num_genes=5000, row_group_size=15, seed=1)
    return root


def _builder(root, tmp_path, **kwargs):
    kwargs = {"max_length": 128, "zero_share": 0.1, "window_rows": 16, "interleave_files": 4, **kwargs}
    return Tahoe100MTokenized(data_dir=str(root), cache_dir=str(tmp_path / "cache"), **kwargs)


def _raw_rows(root):
    return [row for path in sorted((root / "data").glob("*.parquet")) for row in pq.read_table(path).to_pylist()]


@pytest.mark.parametrize("shares", [(0.0, 0.0), (0.3, 0.3)])
def test_stream_matches_the_per_cell_tokenizer(fixture_dir, tmp_path, shares):
    panel = tuple(range(3, 5003, 7))
    builder = _builder(fixture_dir, tmp_path, panel_share=shares[0], random_share=shares[1], panel=panel)
    stream = builder.as_streaming_dataset(split="train")
    assert stream.n_shards == 2  # 2 files x 4 row groups, read 4 side by side
    raw = {row["BARCODE_SUB_LIB_ID"]: row for row in _raw_rows(fixture_dir)}
    tokenizer = CellTokenizer(
        max_length=128,
        zero_share=0.1,
        panel_share=shares[0],
        random_share=shares[1],
        gene_pool=np.arange(3, 5003),
        panel=np.array(panel),
    )
    rows = list(stream)
    assert rows and set(rows[0]) >= {"gene_ids", "input_ids", "length", "n_expressed", "total_counts", "plate"}
    for row in rows:
        source = raw[row["BARCODE_SUB_LIB_ID"]]
        genes, counts = cell_counts(source)
        expected_genes, expected_tokens = tokenizer(genes, counts, cell_id=row["BARCODE_SUB_LIB_ID"])
        assert row["gene_ids"] == expected_genes.tolist() and row["input_ids"] == expected_tokens.tolist()
        assert 1 not in row["gene_ids"]  # the <cls> marker is gone
        assert row["n_expressed"] == (counts > 0).sum()
        assert row["total_counts"] == counts.sum() and row["drug"] == source["drug"]


def test_without_max_length_every_expressed_gene_keeps_its_rank_token(fixture_dir, tmp_path):
    raw = {row["BARCODE_SUB_LIB_ID"]: row for row in _raw_rows(fixture_dir)}
    for row in _builder(fixture_dir, tmp_path, max_length=None).as_streaming_dataset(split="test"):
        genes, counts = cell_counts(raw[row["BARCODE_SUB_LIB_ID"]])
        expressed = counts > 0
        assert row["gene_ids"] == genes[expressed].tolist()
        assert row["input_ids"] == rank_tokens(counts, 50)[expressed].tolist()


def test_batches_mix_plates_and_files(tmp_path):
    """Issue 14's bar: 16 files of one plate each, 20 batches of 32 cells hold >= 4 plates and reach >= 12 files."""
    root = tmp_path / "tahoe"
    write_tahoe_fixture(root, num_shards=16, cells_per_shard=200, num_plates=16, num_genes=3000, seed=2)
    plate_of_file = {p.name: pq.read_table(p, columns=["plate"])[0][0].as_py() for p in (root / "data").iterdir()}
    assert len(set(plate_of_file.values())) == 16
    file_of = {
        c: p.name for p in (root / "data").iterdir() for c in pq.read_table(p)["BARCODE_SUB_LIB_ID"].to_pylist()
    }
    builder = Tahoe100MTokenized(data_dir=str(root), cache_dir=str(tmp_path / "cache"), max_length=None)
    stream = builder.as_streaming_dataset(split="train").shuffle(seed=0, buffer_size=1)
    loader = torch.utils.data.DataLoader(stream, batch_size=32, collate_fn=list)
    batches = [batch for _, batch in zip(range(20), loader)]
    plates = [len({row["plate"] for row in batch}) for batch in batches]
    files = {file_of[row["BARCODE_SUB_LIB_ID"]] for batch in batches for row in batch}
    assert np.mean(plates) >= 4 and len(files) >= 12


def test_splits_are_disjoint_and_complete(fixture_dir, tmp_path):
    builder = _builder(fixture_dir, tmp_path, validation_share=0.2, test_share=0.2)
    ids = {
        s: [r["BARCODE_SUB_LIB_ID"] for r in builder.as_streaming_dataset(split=s)]
        for s in ("train", "validation", "test")
    }
    every = [r["BARCODE_SUB_LIB_ID"] for r in _raw_rows(fixture_dir)]
    assert sorted(sum(ids.values(), [])) == sorted(every)
    assert all(len(v) > 5 for v in ids.values())


def test_plate_and_file_hold_outs_read_only_their_files(fixture_dir, tmp_path):
    builder = _builder(fixture_dir, tmp_path, split_by="plate", validation_plates=("plate2",))
    assert {r["plate"] for r in builder.as_streaming_dataset(split="validation")} == {"plate2"}
    assert {r["plate"] for r in builder.as_streaming_dataset(split="train")} == {"plate1"}
    plate2 = sorted((fixture_dir / "data").glob("*.parquet"))[1]  # the footers' statistics say which file
    assert {file for file, _ in builder.pieces("validation")} == {str(plate2)}
    assert str(plate2) not in {file for file, _ in builder.pieces("train")} and not builder.pieces("test")
    builder = _builder(fixture_dir, tmp_path, split_by="file", test_files=(plate2.name,))
    assert {file for file, _ in builder.pieces("test")} == {str(plate2)}
    assert {r["plate"] for r in builder.as_streaming_dataset(split="test")} == {"plate2"}


def test_two_ranks_by_two_workers_see_every_cell_once(fixture_dir, tmp_path):
    stream = _builder(fixture_dir, tmp_path, shard_multiple=4).as_streaming_dataset(split="train")
    assert stream.n_shards == 4
    seen = []
    for rank in range(2):
        shard = split_dataset_by_node(stream, rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(shard, batch_size=None, num_workers=2)
        seen.append([row["BARCODE_SUB_LIB_ID"] for row in loader])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(r["BARCODE_SUB_LIB_ID"] for r in stream)


@pytest.mark.parametrize("shuffle_shards", [False, True])
def test_resume_from_state_dict_continues_exactly(fixture_dir, tmp_path, shuffle_shards):
    def stream_of():
        stream = _builder(fixture_dir, tmp_path).as_streaming_dataset(split="train")
        return stream.shuffle(seed=3, buffer_size=1) if shuffle_shards else stream

    stream = stream_of()
    everything = [r["BARCODE_SUB_LIB_ID"] for r in stream]
    iterator = iter(stream)
    head = [next(iterator)["BARCODE_SUB_LIB_ID"] for _ in range(23)]
    state = stream.state_dict()
    resumed = stream_of()
    resumed.load_state_dict(state)
    assert head + [r["BARCODE_SUB_LIB_ID"] for r in resumed] == everything


def test_materialised_dataset_equals_the_stream(fixture_dir, tmp_path):
    builder = _builder(fixture_dir, tmp_path)
    builder.download_and_prepare()
    materialised = builder.as_dataset(split="validation")
    streamed = list(_builder(fixture_dir, tmp_path / "other").as_streaming_dataset(split="validation"))
    assert materialised.to_list() == streamed


def test_bad_rows_are_skipped_and_reported(tmp_path, caplog):
    root = tmp_path / "tahoe"
    write_tahoe_fixture(root, num_shards=1, cells_per_shard=10, num_genes=3000)
    path = next((root / "data").glob("*.parquet"))
    table = pq.read_table(path).to_pylist()
    table[0]["expressions"] = table[0]["expressions"][:-1]  # lengths differ
    table[1]["expressions"][3] = float("nan")
    table[2]["genes"][2] = 99_999  # unknown gene
    table[3]["expressions"] = [-2.0] + [0.0] * (len(table[3]["expressions"]) - 1)  # nothing expressed
    pq.write_table(pq.read_table(path).from_pylist(table, schema=pq.read_schema(path)), path)
    with caplog.at_level(logging.WARNING):
        rows = list(_builder(root, tmp_path, validation_share=0.0, test_share=0.0).as_streaming_dataset(split="train"))
    assert len(rows) == 6
    assert "skipped 4 cells" in caplog.text and path.name in caplog.text
    assert "'length_mismatch': 1" in caplog.text and "'unknown_genes': 1" in caplog.text


def test_corrupt_empty_and_wrong_files(fixture_dir, tmp_path, caplog):
    root = tmp_path / "tahoe"
    write_tahoe_fixture(root, num_shards=3, cells_per_shard=10, num_genes=3000)
    truncated, empty, _ = sorted((root / "data").glob("*.parquet"))
    truncated.write_bytes(truncated.read_bytes()[: len(truncated.read_bytes()) // 2])
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="cannot read parquet file .*train-0000[01]-of-00003.parquet"):
        list(_builder(root, tmp_path, on_bad_files="error").as_streaming_dataset(split="train"))
    with caplog.at_level(logging.WARNING):
        rows = list(_builder(root, tmp_path).as_streaming_dataset(split="train"))
    assert rows and truncated.name in caplog.text and empty.name in caplog.text
    pq.write_table(pa.table({"cell": ["a"]}), empty)  # another dataset's file
    with pytest.raises(ValueError, match=f"{empty.name}.*lacks the columns.*genes"):
        list(_builder(root, tmp_path).as_streaming_dataset(split="train"))


def test_data_files_as_list_or_glob(fixture_dir, tmp_path):
    files = sorted(str(p) for p in (fixture_dir / "data").glob("*.parquet"))
    by_dir = [r["BARCODE_SUB_LIB_ID"] for r in _builder(fixture_dir, tmp_path).as_streaming_dataset(split="train")]
    for data_files in ({"train": files}, str(fixture_dir / "data" / "*.parquet")):
        builder = Tahoe100MTokenized(
            data_files=data_files,
            gene_metadata=str(fixture_dir / "metadata" / "gene_metadata.parquet"),
            cache_dir=str(tmp_path / "cache"),
            max_length=128,
            zero_share=0.1,
            window_rows=16,
            interleave_files=4,
        )
        assert [r["BARCODE_SUB_LIB_ID"] for r in builder.as_streaming_dataset(split="train")] == by_dir
    with pytest.raises(ValueError, match="zero_share > 0 and random_share > 0 need gene_metadata"):
        list(
            Tahoe100MTokenized(
                data_files={"train": files}, cache_dir=str(tmp_path / "c2"), zero_share=0.1
            ).as_streaming_dataset(split="train")
        )


def test_windows_are_shuffled_anew_each_epoch_and_reproducibly(fixture_dir, tmp_path):
    builder = _builder(fixture_dir, tmp_path, max_length=None, window_rows=64)
    stream = builder.as_streaming_dataset(split="train")
    orders = []
    for epoch in (0, 1, 0):
        builder.set_epoch(epoch)
        orders.append([row["BARCODE_SUB_LIB_ID"] for row in stream])
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1] and orders[0] == orders[2]


def test_a_single_file_is_one_window_shuffled_whole(tmp_path):
    """Windows span the parquet reads: one file of 400 cells in a 512-row window is shuffled as a whole."""
    root = tmp_path / "tahoe"
    write_tahoe_fixture(root, num_shards=1, cells_per_shard=400, num_genes=2000, row_group_size=100, seed=3)
    config = {"max_length": None, "window_rows": 512, "min_shards": 1, "validation_share": 0.0, "test_share": 0.0}
    builder = Tahoe100MTokenized(data_dir=str(root), cache_dir=str(tmp_path / "c"), **config)
    order = [row["BARCODE_SUB_LIB_ID"] for row in builder.as_streaming_dataset(split="train")]
    in_file = pq.read_table(next((root / "data").glob("*.parquet")))["BARCODE_SUB_LIB_ID"].to_pylist()
    assert sorted(order) == sorted(in_file)
    position = {cell: i for i, cell in enumerate(in_file)}
    assert max(position[cell] for cell in order[:50]) >= 300  # the file's last rows come early too


def test_the_stream_and_the_samples_do_not_depend_on_where_the_data_lies(fixture_dir, tmp_path):
    import shutil

    copy = tmp_path / "elsewhere" / "tahoe"
    shutil.copytree(fixture_dir, copy)
    builders = [_builder(root, tmp_path / name, max_length=None) for root, name in ((fixture_dir, "a"), (copy, "b"))]
    orders = [[row["BARCODE_SUB_LIB_ID"] for row in b.as_streaming_dataset(split="train")] for b in builders]
    assert orders[0] == orders[1]
    samples = [b.sample_cells({"train": 20, "validation": 5}, seed=0) for b in builders]
    for split in ("train", "validation"):
        assert (
            samples[0][split]["BARCODE_SUB_LIB_ID"].to_pylist() == samples[1][split]["BARCODE_SUB_LIB_ID"].to_pylist()
        )


def test_without_gene_metadata_special_token_ids_are_not_taken_as_genes(tmp_path, caplog):
    root = tmp_path / "tahoe"
    write_tahoe_fixture(root, num_shards=1, cells_per_shard=6, num_genes=3000)
    (root / "metadata" / "gene_metadata.parquet").unlink()
    path = next((root / "data").glob("*.parquet"))
    table = pq.read_table(path).to_pylist()
    table[0]["genes"][1], table[1]["genes"][1] = 0, 2  # <pad> and a special token where a gene should be
    pq.write_table(pq.read_table(path).from_pylist(table, schema=pq.read_schema(path)), path)
    builder = _builder(root, tmp_path, zero_share=0.0, validation_share=0.0, test_share=0.0)
    with caplog.at_level(logging.WARNING):
        rows = list(builder.as_streaming_dataset(split="train"))
    assert len(rows) == 4 and "'unknown_genes': 2" in caplog.text
    assert min(min(row["gene_ids"]) for row in rows) >= 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_rank_bins=0), "num_rank_bins must be a positive integer, got 0"),
        (dict(max_length=0), "max_length must be a positive integer, got 0"),
        (dict(zero_share=1.5), "zero_share must be a share in \\[0, 1\\], got 1.5"),
        (dict(seed=-1), "seed must be an integer >= 0, got -1"),
        (dict(interleave_files=1.5), "interleave_files must be a positive integer, got 1.5"),
        (
            dict(split_by="plate", validation_plates="plate2"),
            "validation_plates must be a tuple of names, got the str",
        ),
        (dict(test_files=("a.parquet",)), "test_files holds out files: give split_by='file', not 'barcode'"),
        (dict(panel=(0, 5, 5)), "panel must list distinct gene ids >= 3 .*, got \\[0\\]"),
        (dict(keep_columns="plate"), "keep_columns must be a tuple of column names, got the string 'plate'"),
    ],
)
def test_a_bad_builder_config_is_refused_naming_the_field(fixture_dir, tmp_path, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        _builder(fixture_dir, tmp_path, **kwargs)
