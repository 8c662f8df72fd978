"""Perturbation conditions: drug identity, doses from sample_metadata, condition vocabularies."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataset_scripts.tahoe_metadata import CONTROL_DRUG, parse_drug_doses, sample_conditions
from dataset_scripts.tahoe_standin import DOSES_UM, write_standin_corpus
from modeling.conditions import drug_key


def test_drug_keys_ignore_spaces_and_solvates():
    assert drug_key("Ibuprofen ") == "Ibuprofen"
    assert drug_key("Trametinib (DMSO_TF solvate)") == "Trametinib"
    assert drug_key(" DMSO_TF") == CONTROL_DRUG and drug_key("Vitamin D3 (cholecalciferol)") != "Vitamin D3"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("[('Bortezomib', 0.5, 'uM')]", [("Bortezomib", 0.5)]),
        ("[('DMSO_TF', 0.0, 'uM')]", [("DMSO_TF", 0.0)]),
        ("[('Trametinib (DMSO_TF solvate)', 50, 'nM')]", [("Trametinib", 0.05)]),
    ],
)
def test_doses_are_read_in_micromolar(value, expected):  # one drug per well, as in Tahoe
    ((drug, dose),), ((expected_drug, expected_dose),) = parse_drug_doses(value), expected
    assert drug == expected_drug and dose == pytest.approx(expected_dose)


@pytest.mark.parametrize("value", ["Bortezomib 0.5 uM", "[('Bortezomib', 0.5, 'ug')]", "[]", "[('x', 'a', 'uM')]"])
def test_malformed_doses_are_named(value):
    with pytest.raises(ValueError, match="drugname_drugconc"):
        parse_drug_doses(value)


def test_every_well_of_the_standin_has_its_drug_and_dose(tmp_path):
    root = write_standin_corpus(tmp_path / "tahoe", num_files=4, cells_per_file=20, num_plates=2, wells_per_file=2,
                                num_lines=4)  # fmt: skip
    conditions = sample_conditions(root)
    rows = [row for f in sorted((root / "data").glob("*.parquet")) for row in pq.read_table(f).to_pylist()]
    for row in rows:
        drug, dose = conditions[row["sample"]]
        assert drug == drug_key(row["drug"])
        assert dose == 0.0 if drug == CONTROL_DRUG else dose in DOSES_UM
    (root / "metadata" / "sample_metadata.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="sample_metadata.parquet"):
        sample_conditions(root)
    pq.write_table(pa.table({"sample": ["s1"]}), root / "metadata" / "sample_metadata.parquet")
    with pytest.raises(ValueError, match="lacks the columns \\['drugname_drugconc'\\]"):
        sample_conditions(root)
