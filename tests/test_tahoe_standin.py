"""The Tahoe stand-in corpus and drug screen have the real layout and statistics, the screen's written answer is
what its cells show, and the stream benchmark reads them as training does."""

import ast
import hashlib
import json
import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path
from unittest import mock

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest

from dataset_scripts import cell_counts, load_expression_data, split_names, tahoe_builder, tahoe_screen, tahoe_standin
from dataset_scripts.tahoe_screen import CONTROL_WELLS_PER_PLATE, SCREEN_DRUGS, write_standin_screen
from dataset_scripts.tahoe_standin import CONTROL, DOSES_UM, DRUGS, write_standin_corpus
from modeling.conditions import drug_key

REPO = Path(__file__).resolve().parent.parent
CELLS_PER_CONDITION, CONTROLS_PER_LINE, PLATES, LINES, EXPECTED_CELLS = 12, 96, 6, 3, 400


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("standin") / "tahoe"
    with mock.patch.object(tahoe_screen, "CELLS_PER_FILE", 300):  # several files per plate at this size
        return write_standin_screen(root, num_lines=LINES, cells_per_condition=CELLS_PER_CONDITION,
                                    control_cells_per_line=CONTROLS_PER_LINE, num_plates=PLATES,
                                    expected_cells=EXPECTED_CELLS)  # fmt: skip


def _cells(root: Path, columns=("cell_line_id", "drug", "sample", "plate", "BARCODE_SUB_LIB_ID")) -> dict:
    return pq.read_table(sorted((root / "data").glob("*.parquet")), columns=list(columns)).to_pydict()


def _doses(root: Path) -> dict[str, float]:
    samples = pq.read_table(root / "metadata" / "sample_metadata.parquet").to_pylist()
    return {s["sample"]: ast.literal_eval(s["drugname_drugconc"])[0][1] for s in samples}


def test_the_layout_and_metadata_are_tahoes(corpus):
    files = sorted((corpus / "data").glob("*.parquet"))
    assert [f.name for f in files] == [f"train-{i:05d}-of-{len(files):05d}.parquet" for i in range(len(files))]
    plates = [set(pq.read_table(f, columns=["plate"])[0].to_pylist()) for f in files]
    assert all(len(p) == 1 for p in plates)  # a file holds one plate, a plate's files are consecutive
    order = [int(p.pop().removeprefix("plate")) for p in plates]
    assert order == sorted(order) and set(order) == set(range(1, PLATES + 1)) and len(files) > PLATES
    samples = pq.read_table(corpus / "metadata" / "sample_metadata.parquet").to_pylist()
    for sample in samples:
        drug, dose, unit = ast.literal_eval(sample["drugname_drugconc"])[0]
        assert unit == "uM" and drug == sample["drug"]
        assert (dose == 0.0) if drug == CONTROL else dose in DOSES_UM
    wells = {}
    for row in pq.read_table(files[0]).to_pylist():
        wells.setdefault(row["sample"], set()).add(row["cell_line_id"])
        assert row["genes"][0] == 1 and row["expressions"][0] == -2  # the <cls> marker
    assert len(wells) >= 2 and all(len(lines) == LINES for lines in wells.values())  # wells hold every line
    for name, columns in {
        "drug_metadata": {"drug", "canonical_smiles", "pubchem_cid", "targets", "moa-broad", "moa-fine"},
        "cell_line_metadata": {"Cell_ID_Cellosaur", "Cell_ID_DepMap", "Organ", "Driver_Gene"},
        "obs_metadata": {"BARCODE_SUB_LIB_ID", "sample", "gene_count", "tscp_count", "pass_filter"},
    }.items():
        assert columns <= set(pq.read_schema(corpus / "metadata" / f"{name}.parquet").names)
    names = pq.read_table(corpus / "metadata" / "drug_metadata.parquet")["drug"].to_pylist()
    assert any(n != n.strip() for n in names) and any("(DMSO_TF solvate)" in n for n in names)  # Tahoe's quirks
    obs = pq.read_table(corpus / "metadata" / "obs_metadata.parquet", columns=["BARCODE_SUB_LIB_ID"])[0]
    assert sorted(obs.to_pylist()) == sorted(_cells(corpus)["BARCODE_SUB_LIB_ID"])


def test_cells_have_tahoe_like_counts_and_load_for_training(corpus):
    source = load_expression_data(corpus)
    counts = [cell_counts(row)[1] for row in source.rows]
    library = np.array([c.sum() for c in counts])
    assert len(counts) == len(_cells(corpus)["plate"]) and 1200 < np.median(library) < 3000
    assert np.mean(np.concatenate(counts) == 1) > 0.4 and 300 < np.median([len(c) for c in counts]) < 2000


def test_the_screen_drugs_are_real_molecules_in_families_the_first_the_plain_corpus_drugs():
    from rdkit import Chem

    assert len(SCREEN_DRUGS) >= 25 and SCREEN_DRUGS[: len(DRUGS)] == DRUGS
    assert [d[0] for d in DRUGS[1:]] == ["Aspirin", "Caffeine", "Ibuprofen ", "Acetaminophen",
                                         "Metformin (DMSO_TF solvate)"]  # fmt: skip
    assert all(Chem.MolFromSmiles(smiles) is not None for _, smiles, *_ in SCREEN_DRUGS)
    keys = [drug_key(name) for name, *_ in SCREEN_DRUGS]
    assert len(set(keys)) == len(keys) and SCREEN_DRUGS[0][1] == "CS(C)=O"
    similarity = tahoe_screen.tanimoto_similarity([smiles for _, smiles, *_ in SCREEN_DRUGS[1:]])
    nearest = (similarity - np.eye(len(similarity))).max(axis=1)
    assert np.mean(nearest > 0.3) > 0.5  # most drugs have a structural relative
    with pytest.raises(ValueError, match="cannot parse the SMILES 'C1CC'"):
        tahoe_screen.tanimoto_similarity(["C1CC"])


def _effects(root: Path) -> list[dict]:
    return pq.read_table(root / "metadata" / "simulated_effects.parquet").to_pylist()


def test_similar_drugs_act_alike_on_sparse_programs_of_realistic_sizes(corpus):
    effects = _effects(corpus)
    genes = sorted({g for e in effects for g in e["genes"]})
    column = {g: i for i, g in enumerate(genes)}
    drugs = [drug_key(name) for name, *_ in SCREEN_DRUGS[1:]]
    top = np.zeros((len(drugs), len(genes)))  # each drug's top-dose shift, summed over lines
    for e in effects:
        if e["dose_um"] == max(DOSES_UM):
            top[drugs.index(e["drug"]), [column[g] for g in e["genes"]]] += e["log_fold_changes"]
    correlation = np.corrcoef(top)
    similarity = tahoe_screen.tanimoto_similarity([smiles for _, smiles, *_ in SCREEN_DRUGS[1:]])
    pairs = np.triu_indices(len(drugs), 1)
    close, far = similarity[pairs] >= 0.3, similarity[pairs] < 0.15
    assert correlation[pairs][close].mean() > correlation[pairs][far].mean() + 0.15
    assert abs(correlation[pairs][far].mean()) < 0.1
    # programs: tens of genes, all among the source's 300 most-detected genes (so a 512-gene panel holds them)
    assert all(20 <= len(e["genes"]) <= 60 for e in effects)
    assert set(genes) <= set(tahoe_screen.genes_by_detection(tahoe_standin.real_cells(), 300).tolist())
    sizes = np.abs(np.concatenate([e["log_fold_changes"] for e in effects if e["dose_um"] == max(DOSES_UM)]))
    assert 0.2 < np.median(sizes) < 1.0 and np.quantile(sizes, 0.99) > 1.5 and sizes.max() <= 3.0  # a long tail
    mean = top.mean(axis=0)  # an average over drugs carries little of any one drug's effect
    assert np.mean([np.corrcoef(mean, effect)[0, 1] ** 2 for effect in top]) < 0.1


def test_effects_differ_between_lines_and_grow_with_dose(corpus):
    by_key = {(e["drug"], e["dose_um"], e["cell_line_id"]): e for e in _effects(corpus)}
    lines = sorted({k[2] for k in by_key})
    for drug, dose, line in by_key:
        lower, higher = by_key[(drug, dose, line)], by_key.get((drug, dose * 10, line))
        if higher is not None:  # one Hill curve: every gene's shift grows by the same factor
            ratio = np.array(higher["log_fold_changes"]) / np.array(lower["log_fold_changes"])
            assert ratio.min() >= 1.0 and np.ptp(ratio) < 1e-9 and higher["survival"] <= lower["survival"]
    first, second = by_key[("Aspirin", 5.0, lines[0])], by_key[("Aspirin", 5.0, lines[1])]
    assert set(first["genes"]) != set(second["genes"])  # each line's own extra program


def test_the_truth_is_what_the_cells_show(corpus):
    effects = _effects(corpus)
    strongest = max(effects, key=lambda e: np.abs(e["log_fold_changes"]).sum())
    table = pq.read_table(sorted((corpus / "data").glob("*.parquet"))).to_pylist()
    doses = _doses(corpus)

    def mean_profile(rows):
        profile = np.zeros(len(strongest["genes"]))
        for row in rows:
            genes, counts = cell_counts(row)
            where = np.searchsorted(genes, strongest["genes"]).clip(max=len(genes) - 1)
            present = genes[where] == strongest["genes"]
            profile[present] += np.log1p(1e4 * counts[where[present]] / counts.sum())
        return profile / len(rows)

    line = [r for r in table if r["cell_line_id"] == strongest["cell_line_id"]]
    condition = (strongest["drug"], strongest["dose_um"])
    treated = [r for r in line if (drug_key(r["drug"]), doses[r["sample"]]) == condition]
    plates = {r["plate"] for r in treated}
    controls = [r for r in line if r["drug"] == CONTROL and r["plate"] in plates]  # the same plates' offsets
    shift, truth = mean_profile(treated) - mean_profile(controls), np.array(strongest["log_fold_changes"])
    large = np.abs(truth) > 0.5
    assert large.sum() >= 5 and np.mean(np.sign(shift[large]) == np.sign(truth[large])) >= 0.75
    assert np.corrcoef(shift, truth)[0, 1] > 0.6
    offsets = pq.read_table(corpus / "metadata" / "simulated_plate_offsets.parquet").to_pylist()
    assert [o["plate"] for o in offsets] == [f"plate{p + 1}" for p in range(PLATES)]
    assert all(len(o["genes"]) == len(o["log_offsets"]) == 100 for o in offsets)
    assert 0.07 < np.std(np.concatenate([o["log_offsets"] for o in offsets])) < 0.13


def test_cytotoxic_conditions_have_fewer_cells_and_every_condition_enough(corpus):
    cells, doses = _cells(corpus), _doses(corpus)
    counts = Counter((line, drug_key(drug), doses[sample])
                     for line, drug, sample in zip(cells["cell_line_id"], cells["drug"], cells["sample"]))  # fmt: skip
    survival = {(e["cell_line_id"], e["drug"], e["dose_um"]): e["survival"] for e in _effects(corpus)}
    assert set(survival) == {k for k in counts if k[1] != CONTROL}
    keys = sorted(survival)
    observed, expected = np.array([counts[k] for k in keys]), np.array([survival[k] for k in keys])
    assert observed.min() == CELLS_PER_CONDITION and np.corrcoef(observed, expected)[0, 1] > 0.95
    np.testing.assert_array_equal(observed, np.ceil(CELLS_PER_CONDITION * expected / expected.min()))
    assert 0.6 <= expected.min() < 0.9 and expected.max() <= 1.0  # some conditions are cytotoxic
    controls = Counter((line, plate) for line, drug, plate in zip(cells["cell_line_id"], cells["drug"], cells["plate"])
                       if drug == CONTROL)  # fmt: skip
    assert len(controls) == LINES * PLATES and set(controls.values()) == {CONTROLS_PER_LINE // PLATES}


def test_doses_follow_the_plates(corpus):
    samples = pq.read_table(corpus / "metadata" / "sample_metadata.parquet").to_pylist()
    for p in range(1, PLATES + 1):
        wells = [s for s in samples if s["plate"] == f"plate{p}"]
        treated = [s for s in wells if s["drug"] != CONTROL]
        assert sorted(s["drug"] for s in treated) == sorted(name for name, *_ in SCREEN_DRUGS[1:])
        assert {ast.literal_eval(s["drugname_drugconc"])[0][1] for s in treated} == {DOSES_UM[(p - 1) % 3]}
        assert len(wells) - len(treated) == CONTROL_WELLS_PER_PLATE
    with pytest.raises(ValueError, match=r"num_plates \(2\) must be at least 3"):
        write_standin_screen("/nonexistent", num_plates=2)
    with pytest.raises(ValueError, match=r"num_drugs \(0\) must be between 1 and"):
        write_standin_screen("/nonexistent", num_drugs=0)


def test_the_expected_expression_is_the_mean_the_real_cells_scatter_around(corpus):
    """Per well and line, the oracle's expected log-normalised expression; the mean of the real cells of a plate's
    controls (two wells) lies within sampling noise of it, a cell's normalisation being its total count."""
    from metrics.perturbation_protocol import read_expected_expression, read_screen_cells

    expected = read_expected_expression(corpus / "oracle")
    samples = pq.read_table(corpus / "metadata" / "sample_metadata.parquet").to_pylist()
    assert len(expected) == len({(s["plate"], drug_key(s["drug"])) for s in samples}) * LINES
    cells = read_screen_cells(corpus)
    obs = cells.obs
    line = obs["line"].iloc[0]
    genes = expected[(line, CONTROL, 0.0, "plate1")][0]
    mean = np.mean([expected[(line, CONTROL, 0.0, f"plate{p + 1}")][1] for p in range(PLATES)], axis=0)
    rows = np.flatnonzero(((obs["line"] == line) & (obs["drug"] == CONTROL)).to_numpy())
    real = cells.expression(genes, rows).mean(axis=0)
    assert len(rows) == CONTROLS_PER_LINE and np.corrcoef(real, mean)[0, 1] > 0.97 and abs((real - mean).mean()) < 0.03
    # A strong condition's expected profile differs from its line's controls where its truth says.
    effects = pq.read_table(corpus / "metadata" / "simulated_effects.parquet").to_pylist()
    strongest = max((e for e in effects if e["cell_line_id"] == line and e["dose_um"] == 5.0),
                    key=lambda e: np.abs(e["log_fold_changes"]).sum())  # fmt: skip
    plate = next(p for (ln, d, z_, p) in expected if (ln, d, z_) == (line, strongest["drug"], 5.0))
    shift = expected[(line, strongest["drug"], 5.0, plate)][1] - expected[(line, CONTROL, 0.0, plate)][1]
    moved = np.isin(genes, strongest["genes"]) & (np.abs(np.interp(genes, *zip(*sorted(zip(
        strongest["genes"], strongest["log_fold_changes"]))))) > 0.5)  # fmt: skip
    signs = np.sign(np.interp(genes[moved], *zip(*sorted(zip(strongest["genes"], strongest["log_fold_changes"])))))
    assert moved.sum() >= 3 and np.mean(np.sign(shift[moved]) == signs) > 0.8


def test_the_oracle_is_a_fresh_draw_of_the_same_wells_and_roots_readers_skip_it(corpus):
    oracle = corpus / "oracle"
    files = sorted(p.name for p in (oracle / "data").glob("*.parquet"))
    assert files == sorted(p.name for p in (corpus / "data").glob("*.parquet"))
    main, fresh = _cells(corpus), _cells(oracle)
    for column in ("sample", "plate", "drug"):
        keys = ("sample", "cell_line_id", column)
        assert Counter(zip(*(main[k] for k in keys))) == Counter(zip(*(fresh[k] for k in keys)))
    assert not set(main["BARCODE_SUB_LIB_ID"]) & set(fresh["BARCODE_SUB_LIB_ID"])
    for name in ("gene", "sample", "drug", "cell_line"):
        table = f"metadata/{name}_metadata.parquet"
        assert pq.read_table(oracle / table).equals(pq.read_table(corpus / table))
    obs = pq.read_table(oracle / "metadata" / "obs_metadata.parquet", columns=["BARCODE_SUB_LIB_ID"])[0]
    assert sorted(obs.to_pylist()) == sorted(fresh["BARCODE_SUB_LIB_ID"])
    first = pq.read_table(oracle / "data" / files[0], columns=["expressions"])[0].to_pylist()
    assert first != pq.read_table(corpus / "data" / files[0], columns=["expressions"])[0].to_pylist()
    # ROOT's readers read ROOT/data alone
    assert sorted(load_expression_data(corpus).rows["BARCODE_SUB_LIB_ID"]) == sorted(main["BARCODE_SUB_LIB_ID"])
    read = tahoe_builder(corpus).input_files()[0]
    assert read == [str(p) for p in sorted((corpus / "data").glob("*.parquet"))]
    assert tahoe_builder(oracle).input_files()[0] == [str(p) for p in sorted((oracle / "data").glob("*.parquet"))]


def test_the_plain_corpus_is_unchanged(tmp_path):
    # The digest of this corpus as written before the screen was rebuilt (the plain corpus's draws must not move).
    root = write_standin_corpus(tmp_path / "plain", num_files=2, cells_per_file=8, num_plates=2, wells_per_file=2,
                                num_lines=3, seed=5)  # fmt: skip
    digest = hashlib.sha256()
    for path in sorted((root / "data").glob("*.parquet")) + sorted((root / "metadata").glob("*.parquet")):
        digest.update(json.dumps(pq.read_table(path).to_pylist()).encode())
    assert digest.hexdigest() == "019fb748bde221919cd4ebea91af9c76e9b25f70221770ab5625e402e7fd5341"
    assert sorted(p.name for p in (root / "metadata").iterdir()) == [
        f"{n}_metadata.parquet" for n in ("cell_line", "drug", "gene", "obs", "sample")
    ]


def test_the_command_line_writes_a_screen(tmp_path, capsys):
    tahoe_standin.main([str(tmp_path / "screen"), "--responses", "--lines", "2", "--drugs", "2",
                        "--cells_per_condition", "2", "--plates", "3", "--seed", "1"])  # fmt: skip
    assert "drug screen" in capsys.readouterr().out
    drugs = pq.read_table(tmp_path / "screen" / "metadata" / "drug_metadata.parquet")["drug"].to_pylist()
    assert drugs == [CONTROL, "Aspirin", "Caffeine"] and (tmp_path / "screen" / "oracle" / "data").is_dir()
    effects = _effects(tmp_path / "screen")
    assert len(effects) == 2 * 3 * 2 and {e["cell_line_id"] for e in effects} == {"CVCL_1000", "CVCL_1037"}
    for flags in (["--responses", "--files", "4"], ["--drugs", "2"]):  # another mode's size is refused
        with pytest.raises(SystemExit):
            tahoe_standin.main([str(tmp_path / "refused"), *flags])
    assert not (tmp_path / "refused").exists()


@pytest.mark.slow
def test_the_stream_benchmark_reports_its_keys(corpus, tmp_path):
    out = tmp_path / "stream.json"
    command = [sys.executable, str(REPO / "benchmarks" / "data_stream.py"), "--data", str(corpus), "--batches", "6",
               "--batch_size", "16", "--json", str(out), "--max_length", "256"]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    files = len(list((corpus / "data").glob("*.parquet")))
    assert record["batches"] == 6 and record["cells_per_s"] > 0 and record["peak_rss_mib"] > 0
    assert 1 <= record["mean_plates_per_batch"] <= PLATES and 1 <= record["distinct_shards"] <= files


def test_training_data_is_streamed_and_evaluation_cells_come_from_every_file(corpus):
    from training import DataArguments
    from training.data import prepare_data

    data = prepare_data(DataArguments(data=str(corpus), max_eval_cells=256, max_length=128, interleave_files=4), 10)
    file_of = {
        c: f.name for f in (corpus / "data").iterdir() for c in pq.read_table(f)["BARCODE_SUB_LIB_ID"].to_pylist()
    }
    for split in ("validation", "test"):
        assert {file_of[c] for c in data.splits[split]["BARCODE_SUB_LIB_ID"]} == set(file_of.values())
    assert {file_of[c] for c in data.training_rows["BARCODE_SUB_LIB_ID"]} == set(file_of.values())
    files = len(set(file_of.values()))
    assert isinstance(data.train_rows, datasets.IterableDataset) and data.train_rows.n_shards == -(-files // 4)
    ids = [row["BARCODE_SUB_LIB_ID"] for row in data.train_rows]
    held_out = set(data.splits["validation"]["BARCODE_SUB_LIB_ID"]) | set(data.splits["test"]["BARCODE_SUB_LIB_ID"])
    assert len(ids) == len(set(ids)) > 0.6 * len(file_of) and not held_out & set(ids)


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


@pytest.mark.parametrize("flag", ["--lines", "--plates", "--files", "--cells_per_file", "--drugs"])
def test_the_generator_refuses_a_count_below_one_naming_the_flag(tmp_path, capsys, flag):
    from dataset_scripts.tahoe_standin import main

    with pytest.raises(SystemExit):
        main([str(tmp_path / "out"), flag, "0"])
    assert f"{flag}: must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_corpus_is_written_whole_and_never_beside_an_earlier_one(tmp_path, capsys):
    root = tmp_path / "corpus"
    small = ["--plates", "2", "--lines", "3"]
    tahoe_standin.main([str(root), "--files", "4", "--cells_per_file", "3", *small])  # fewer cells than wells

    def rows():
        return sum(pq.read_metadata(path).num_rows for path in (root / "data").glob("*.parquet"))

    assert rows() == 4 * 3
    with pytest.raises(SystemExit):
        tahoe_standin.main([str(root), "--files", "2", "--cells_per_file", "5", *small])
    assert "holds an earlier corpus (9 parquet files" in capsys.readouterr().err
    tahoe_standin.main([str(root), "--files", "2", "--cells_per_file", "5", "--overwrite", *small])
    assert sorted(p.name for p in (root / "data").iterdir()) == [f"train-0000{i}-of-00002.parquet" for i in (0, 1)]
    assert rows() == 2 * 5
    with pytest.raises(FileExistsError, match="holds an earlier corpus"):
        write_standin_screen(root, num_lines=2, num_drugs=2, cells_per_condition=2, num_plates=3)
    bad = [(["", "--files", "2"], "argument root: an empty path"),
           ([str(tmp_path / "new"), "--seed", "-1"], "argument --seed: must be at least 0, got -1")]  # fmt: skip
    for argv, message in bad:
        with pytest.raises(SystemExit):
            tahoe_standin.main(argv)
        assert message in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_the_perturbation_suite_scores_a_screen_end_to_end(corpus, tmp_path, capsys, monkeypatch):
    # The suite runs the benchmark's evaluate_split over its own splits: a flag the benchmark grows must reach it.
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import perturbation_suite

    out = tmp_path / "suite.json"
    report = perturbation_suite.main(["--data", str(corpus), "--questions", "unseen drug", "--seeds", "1",
                                      "--drugs_left_out", "1", "--json", str(out)])  # fmt: skip
    question = report["questions"]["unseen drug"]
    assert question["splits"] == 1 and question["perturbations"] > 0
    assert {"B2 PerturbMean", "B5 dose-pooled PerturbMean", "ceiling"} <= set(question["methods"])
    assert json.loads(out.read_text())["questions"]["unseen drug"]["perturbations"] == question["perturbations"]
    assert "unseen drug" in capsys.readouterr().out
