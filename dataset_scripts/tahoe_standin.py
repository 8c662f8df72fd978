"""A Tahoe-100M stand-in corpus: the real layout and statistics, cells made from real cells.

Nothing can be downloaded here, so tests and benchmarks read a corpus written in the exact Hub layout:

    ROOT/data/train-XXXXX-of-NNNNN.parquet     expression_data rows, files grouped by plate (as on the Hub)
    ROOT/metadata/gene_metadata.parquet        token_id, ensembl_id, gene_symbol (the embedded sample's genes)
    ROOT/metadata/sample_metadata.parquet      sample, plate, drug, drugname_drugconc, mean QC counts per well
    ROOT/metadata/drug_metadata.parquet        drug, targets, moa-broad, moa-fine, canonical_smiles, pubchem_cid
    ROOT/metadata/cell_line_metadata.parquet   cell_name, Cell_ID_Cellosaur, Cell_ID_DepMap, Organ, Driver_Gene
    ROOT/metadata/obs_metadata.parquet         BARCODE_SUB_LIB_ID, sample, plate, cell_line, gene_count,
                                               tscp_count, pass_filter, phase

Each plate has wells (`sample`), each given one drug at one dose (0.05, 0.5 or 5 uM; `DMSO_TF` at 0 is the
control) and holding many cell lines (Cellosaurus-style ids). A cell is a real cell of the embedded sample (its
line's pool: the sample's cells are dealt to lines, so a line's cells share real gene-gene structure) resampled to a
Tahoe-like library size (log-normal around 1,900 UMIs). At that depth about 700 genes are expressed and half the
counts are 1 (Tahoe: 1,000-1,500 genes, most counts 1): the embedded sample's cells express fewer genes than
Tahoe's, which bounds how many a resampled cell can have.
Drug names carry Tahoe's quirks: a trailing space and a "(DMSO_TF solvate)" variant.

With `--responses` it writes a drug screen with a known answer instead: `dataset_scripts/tahoe_screen.py`.

    python -m dataset_scripts.tahoe_standin /tmp/tahoe_standin --files 64 --cells_per_file 1600
    python -m dataset_scripts.tahoe_standin /tmp/screen --responses
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .expression_data import EMBEDDED_SAMPLE, GENE_METADATA_PATH
from .schema import CLS_TOKEN_ID, CLS_VALUE, EXPRESSION_SCHEMA
from .standin_tables import CONTROL, DOSES_UM, DRUGS, prepare_root, real_cells, write_metadata
from .tahoe_screen import write_standin_screen


def _resample(genes, counts, library_size, rng):
    """A cell of `library_size` UMIs drawn from a real cell's expression profile."""
    profile = counts / counts.sum()
    drawn = rng.multinomial(library_size, profile)
    keep = drawn > 0
    return genes[keep], drawn[keep].astype(np.float32)


def write_standin_corpus(
    root: str | Path,
    *,
    num_files: int = 64,
    cells_per_file: int = 1600,
    num_plates: int = 8,
    wells_per_file: int = 4,
    num_lines: int = 50,
    median_library_size: int = 1900,
    source: str | Path = EMBEDDED_SAMPLE,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a stand-in corpus (see the module docstring) and return its root; `overwrite` replaces an earlier
    corpus there ([`prepare_root`])."""
    if num_files < num_plates:
        raise ValueError(f"num_files ({num_files}) must be at least num_plates ({num_plates}): files hold one plate")
    if min(num_files, cells_per_file, num_plates, wells_per_file, num_lines) < 1:
        raise ValueError("num_files, cells_per_file, num_plates, wells_per_file and num_lines must be at least 1")
    root = prepare_root(root, overwrite)
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(source) / GENE_METADATA_PATH, root / "metadata" / "gene_metadata.parquet")
    rng = np.random.default_rng(seed)
    cells = real_cells(source)
    lines = [f"CVCL_{1000 + 37 * i:04d}" for i in range(num_lines)]
    pools = [list(range(i, len(cells), num_lines)) or [i % len(cells)] for i in range(num_lines)]  # cells per line
    drugs = [name for name, *_ in DRUGS]
    plate_of_file = np.repeat(np.arange(num_plates), -(-num_files // num_plates))[:num_files]
    wells = _Wells(cells, lines, pools, median_library_size, rng)
    samples = []
    for file_index in range(num_files):
        plate = f"plate{plate_of_file[file_index] + 1}"
        rows = {name: [] for name in EXPRESSION_SCHEMA.names}
        # The file's cells over its wells, as evenly as they go (fewer cells than wells: fewer wells).
        for well, size in enumerate(np.diff(np.linspace(0, cells_per_file, wells_per_file + 1).round()).astype(int)):
            if size == 0:
                continue
            sample = f"smp_{file_index * wells_per_file + well:05d}"
            drug = drugs[rng.integers(len(drugs))]
            dose = 0.0 if drug == CONTROL else float(rng.choice(DOSES_UM))
            samples.append((sample, plate, drug, f"[('{drug}', {dose}, 'uM')]"))
            for _ in range(size):
                wells.add_cell(rows, plate, sample, drug)
        path = root / "data" / f"train-{file_index:05d}-of-{num_files:05d}.parquet"
        pq.write_table(pa.table(rows, schema=EXPRESSION_SCHEMA), path)
    write_metadata(root, samples, wells.obs, lines, rng)
    return root


class _Wells:
    """Draws the cells of a well: a real cell of a random line, resampled to a library size, with its row columns
    and QC record."""

    def __init__(self, cells, lines, pools, median_library_size, rng):
        self.cells, self.lines, self.pools = cells, lines, pools
        self.median_library_size, self.rng = median_library_size, rng
        self.obs = []

    def add_cell(self, rows: dict, plate: str, sample: str, drug: str) -> None:
        rng = self.rng
        line_index = int(rng.integers(len(self.lines)))
        line, pool = self.lines[line_index], self.pools[line_index]
        genes, counts = self.cells[pool[rng.integers(len(pool))]]
        library_size = max(200, int(rng.lognormal(np.log(self.median_library_size), 0.5)))
        cell_genes, cell_counts_ = _resample(genes, counts, library_size, rng)
        barcode = f"{plate}_{sample}_{rng.integers(2**62):016x}"
        name, smiles, cid, _, _, moa = DRUGS[[d for d, *_ in DRUGS].index(drug)]
        rows["genes"].append([CLS_TOKEN_ID, *cell_genes.tolist()])
        rows["expressions"].append([CLS_VALUE, *cell_counts_.tolist()])
        for column, value in (("drug", drug), ("sample", sample), ("BARCODE_SUB_LIB_ID", barcode),
                              ("cell_line_id", line), ("moa-fine", moa), ("canonical_smiles", smiles),
                              ("pubchem_cid", cid), ("plate", plate)):  # fmt: skip
            rows[column].append(value)
        self.obs.append((barcode, sample, plate, line, len(cell_genes), int(cell_counts_.sum())))


def int_at_least(minimum: int):
    """An argparse type: an integer of at least `minimum` (argparse names the flag and the value otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)  # a count
seed_value = int_at_least(0)  # a seed numpy takes


def folder(text: str) -> Path:
    """An argparse type: a folder's path, not empty (an empty one would be the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; name the corpus's folder")
    return Path(text)


def main(argv: list[str] | None = None) -> None:
    """The command line: a plain corpus, or with `--responses` a drug screen (`tahoe_screen.write_standin_screen`)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=folder)
    parser.add_argument("--files", type=positive_int, default=None, help="default 64 (not a screen's)")
    parser.add_argument("--cells_per_file", type=positive_int, default=None, help="default 1600 (not a screen's)")
    parser.add_argument("--plates", type=positive_int, default=None, help="default 8 (a screen: 6)")
    parser.add_argument("--lines", type=positive_int, default=None, help="default 50 (a screen: 6)")
    parser.add_argument(
        "--median_library_size", type=positive_int, default=1900, help="UMIs per cell (Tahoe: about 1,900)"
    )
    parser.add_argument("--responses", action="store_true", help="a drug screen with a known answer")
    parser.add_argument(
        "--drugs", type=positive_int, default=None, help="a screen's drugs (default: all of SCREEN_DRUGS)"
    )
    parser.add_argument("--cells_per_condition", type=positive_int, default=None, help="a screen's, default 150")
    parser.add_argument("--seed", type=seed_value, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier corpus in ROOT")
    args = parser.parse_args(argv)
    try:
        prepare_root(args.root, overwrite=False)
    except (FileExistsError, NotADirectoryError) as error:
        if not args.overwrite or isinstance(error, NotADirectoryError):
            parser.error(str(error))
    if args.responses:
        if args.files is not None or args.cells_per_file is not None:
            parser.error("a screen's size is --lines, --drugs, --cells_per_condition and --plates, not --files")
        write_standin_screen(args.root, num_lines=args.lines or 6, num_drugs=args.drugs,
                             cells_per_condition=args.cells_per_condition or 150, num_plates=args.plates or 6,
                             median_library_size=args.median_library_size, seed=args.seed,
                             overwrite=args.overwrite)  # fmt: skip
        print(f"wrote a drug screen (and its oracle) to {args.root}")
        return
    if args.drugs is not None or args.cells_per_condition is not None:
        parser.error("--drugs and --cells_per_condition are a screen's (--responses)")
    files, cells_per_file = args.files or 64, args.cells_per_file or 1600
    write_standin_corpus(args.root, num_files=files, cells_per_file=cells_per_file, num_plates=args.plates or 8,
                         num_lines=args.lines or 50, median_library_size=args.median_library_size,
                         seed=args.seed, overwrite=args.overwrite)  # fmt: skip
    print(f"wrote {files} files of {cells_per_file} cells to {args.root}")


if __name__ == "__main__":
    main()
