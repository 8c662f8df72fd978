"""The Tahoe stand-in corpus has the real layout and statistics, and the stream benchmark reads it as training does."""

import ast
import json
import logging
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest

from dataset_scripts import cell_counts, load_expression_data, split_names
from dataset_scripts.tahoe_standin import CONTROL, DOSES_UM, drug_key, write_standin_corpus

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("standin") / "tahoe"
    return write_standin_corpus(root, num_files=8, cells_per_file=120, num_plates=4, wells_per_file=3,
                                num_lines=12, responses=True)  # fmt: skip


def test_the_layout_and_metadata_are_tahoes(corpus):
    files = sorted((corpus / "data").glob("*.parquet"))
    assert [f.name for f in files] == [f"train-{i:05d}-of-00008.parquet" for i in range(8)]
    plates = [set(pq.read_table(f, columns=["plate"])[0].to_pylist()) for f in files]
    assert all(len(p) == 1 for p in plates) and [p.pop() for p in plates] == [f"plate{i // 2 + 1}" for i in range(8)]
    samples = pq.read_table(corpus / "metadata" / "sample_metadata.parquet").to_pylist()
    for sample in samples:
        drug, dose, unit = ast.literal_eval(sample["drugname_drugconc"])[0]
        assert unit == "uM" and drug == sample["drug"]
        assert (dose == 0.0) if drug == CONTROL else dose in DOSES_UM
    table = pq.read_table(files[0]).to_pylist()
    wells = {}
    for row in table:
        wells.setdefault(row["sample"], set()).add(row["cell_line_id"])
        assert row["genes"][0] == 1 and row["expressions"][0] == -2  # the <cls> marker
    assert len(wells) == 3 and all(len(lines) >= 8 for lines in wells.values())  # wells hold many lines
    for name, columns in {
        "drug_metadata": {"drug", "canonical_smiles", "pubchem_cid", "moa-fine"},
        "cell_line_metadata": {"Cell_ID_Cellosaur", "Cell_ID_DepMap", "Organ", "Driver_Gene"},
        "obs_metadata": {"BARCODE_SUB_LIB_ID", "sample", "gene_count", "tscp_count", "pass_filter"},
    }.items():
        assert columns <= set(pq.read_schema(corpus / "metadata" / f"{name}.parquet").names)
    names = pq.read_table(corpus / "metadata" / "drug_metadata.parquet")["drug"].to_pylist()
    assert any(n != n.strip() for n in names) and any("(DMSO_TF solvate)" in n for n in names)  # Tahoe's quirks


def test_cells_have_tahoe_like_counts_and_load_for_training(corpus):
    source = load_expression_data(corpus)
    counts = [cell_counts(row)[1] for row in source.rows]
    library = np.array([c.sum() for c in counts])
    assert len(counts) == 8 * 120 and 1200 < np.median(library) < 3000
    assert np.mean(np.concatenate(counts) == 1) > 0.4 and 300 < np.median([len(c) for c in counts]) < 2000


def test_simulated_responses_follow_dose_and_are_recorded(corpus):
    effects = pq.read_table(corpus / "metadata" / "simulated_effects.parquet").to_pylist()
    assert effects and all(len(e["genes"]) == len(e["log_fold_changes"]) == 60 for e in effects)
    by_key = {(e["drug"], e["dose_um"], e["cell_line_id"]): e for e in effects}
    for (drug, dose, line), effect in by_key.items():
        assert drug == drug_key(drug) and 0 <= effect["responder_share"] <= 1
        higher = by_key.get((drug, max(DOSES_UM), line))
        if higher is not None and dose < max(DOSES_UM):  # the Hill curve grows with dose
            assert np.abs(higher["log_fold_changes"]).sum() >= np.abs(effect["log_fold_changes"]).sum()


@pytest.mark.slow
def test_the_stream_benchmark_reports_its_keys(corpus, tmp_path):
    out = tmp_path / "stream.json"
    command = [sys.executable, str(REPO / "benchmarks" / "data_stream.py"), "--data", str(corpus), "--batches", "6",
               "--batch_size", "16", "--json", str(out), "--max_length", "256"]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["batches"] == 6 and record["cells_per_s"] > 0 and record["peak_rss_mib"] > 0
    assert 1 <= record["mean_plates_per_batch"] <= 4 and 1 <= record["distinct_shards"] <= 8


def test_training_data_is_streamed_and_evaluation_cells_come_from_every_file(corpus):
    from training import DataArguments
    from training.data import prepare_data

    data = prepare_data(DataArguments(data=str(corpus), max_eval_cells=64, max_length=128, interleave_files=4), 10)
    file_of = {
        c: f.name for f in (corpus / "data").iterdir() for c in pq.read_table(f)["BARCODE_SUB_LIB_ID"].to_pylist()
    }
    for split in ("validation", "test"):
        assert {file_of[c] for c in data.splits[split]["BARCODE_SUB_LIB_ID"]} == set(file_of.values())
    assert {file_of[c] for c in data.reference_rows["BARCODE_SUB_LIB_ID"]} == set(file_of.values())
    assert isinstance(data.train_rows, datasets.IterableDataset) and data.train_rows.n_shards == 2
    ids = [row["BARCODE_SUB_LIB_ID"] for row in data.train_rows]
    held_out = set(data.splits["validation"]["BARCODE_SUB_LIB_ID"]) | set(data.splits["test"]["BARCODE_SUB_LIB_ID"])
    assert len(ids) == len(set(ids)) > 600 and not held_out & set(ids)


@pytest.mark.slow
def test_training_skips_bad_files_and_rows_and_names_them(corpus, tmp_path, caplog):
    import shutil

    import pyarrow as pa

    import train_hf

    data = tmp_path / "tahoe"
    shutil.copytree(corpus, data)
    truncated, empty, bad_rows = sorted((data / "data").glob("*.parquet"))[:3]
    truncated.write_bytes(truncated.read_bytes()[:5000])
    empty.write_bytes(b"")
    rows = pq.read_table(bad_rows).to_pylist()
    first, second, third = np.flatnonzero(split_names([r["BARCODE_SUB_LIB_ID"] for r in rows], 0.1, 0.15) == "train")[
        :3
    ]
    rows[first]["expressions"] = rows[first]["expressions"][:-1]  # lists of different lengths
    rows[second]["expressions"][2] = -3.0  # a negative count
    rows[third]["genes"][2] = 10**6  # a gene id outside the vocabulary
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(bad_rows)), bad_rows)
    # 12 steps of 64 cells: a whole epoch of the 7 readable files' training cells
    flags = f"--data {data} --max_steps 12 --max_length 64 --per_device_train_batch_size 64 --max_eval_cells 16"
    flags += " --eval_time_grid 1 --model_card false --use_cpu --disable_tqdm true --interleave_files 4"
    with caplog.at_level(logging.WARNING):
        trainer, metrics = train_hf.main(["--output_dir", str(tmp_path / "run"), *flags.split()])
    assert trainer.state.global_step == 12 and metrics["eval_tokens"] > 0
    assert truncated.name in caplog.text and empty.name in caplog.text and bad_rows.name in caplog.text
    assert "length_mismatch" in caplog.text and "bad_counts" in caplog.text and "unknown_genes" in caplog.text
    (data / "metadata" / "gene_metadata.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="gene_metadata.parquet"):
        train_hf.main(["--output_dir", str(tmp_path / "run2"), *flags.split()])
