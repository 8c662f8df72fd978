"""`rankdiff`: the command line of RankDiff for AnnData users.

    rankdiff impute IN.h5ad OUT.h5ad --model outputs/demo [--layer counts] [--num_inference_steps 64] [--seed 0]

reads raw counts (NaN entries, or a boolean `layers[--mask_layer]`, are imputed), runs the pipeline folder's
`impute_anndata` a batch of cells at a time with a progress bar, and writes the layers it adds
(`rankdiff_ranks`, `rankdiff_expected`; `obsm["rankdiff_probs"]` with `--return_probs`) to OUT.h5ad.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawTextHelpFormatter
    parser = argparse.ArgumentParser(prog="rankdiff", description=__doc__, formatter_class=formatter)
    commands = parser.add_subparsers(dest="command", required=True)
    impute = commands.add_parser("impute", help="impute the masked values of an .h5ad of raw counts")
    impute.add_argument("input", type=Path, help="an .h5ad file of raw counts (NaN where a value is to be imputed)")
    impute.add_argument("output", type=Path, help="where the annotated .h5ad goes")
    impute.add_argument("--model", required=True, help="a RankDiff pipeline folder (train_hf.py's output) or Hub id")
    impute.add_argument("--layer", help="the layer holding the counts (default: X)")
    impute.add_argument("--mask_layer", help="a boolean layer, True where a value is to be imputed (default: NaN)")
    impute.add_argument("--gene_column", help="the var column naming the genes (default: var_names)")
    impute.add_argument("--num_inference_steps", type=int, default=64, help="denoising steps")
    impute.add_argument("--sampler", choices=("ancestral", "first-hitting", "confidence"), help="the sampler")
    impute.add_argument("--seed", type=seed, default=0, help="seed of every draw (0 .. 2**63 - 1)")
    impute.add_argument("--batch_size", type=int, default=64, help="windows denoised together")
    impute.add_argument("--cell_batch_size", type=int, default=256, help="cells read and imputed together")
    impute.add_argument("--return_probs", action="store_true", help="also store the requested genes' distributions")
    impute.add_argument("--key_added", default="rankdiff", help="prefix of the new layers")
    impute.add_argument(
        "--reference",
        type=Path,
        help="an .h5ad of raw counts of your own cells (same --layer and --gene_column) whose nearest cells each cell "
        "reads, instead of the checkpoint's reference (a sample of its training cells)",
    )
    impute.add_argument("--no_reference", action="store_true", help="read no reference cells")
    impute.add_argument("--device", default=None, help="where the model runs (default: cuda when there is one)")
    impute.add_argument("--overwrite", action="store_true", help="replace OUTPUT when it exists")
    return parser


def seed(text: str) -> int:
    """An argparse type: a seed torch takes (argparse names the flag and the value otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in 0 .. 2**63 - 1, got {value}")
    return value


def check_device(device: str | None) -> str:
    """The device the model runs on: a torch device that exists here (cuda when there is one, by default)."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError) as error:
        raise SystemExit(f"rankdiff impute: --device {device!r} is not a torch device ({error})") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"rankdiff impute: --device {device!r}: this machine has no CUDA GPU (use cpu)")
    return device


def impute(args: argparse.Namespace) -> Path:
    """Run `rankdiff impute`; returns the output path."""
    import torch
    from diffusers import DiffusionPipeline

    if not args.input.is_file():
        raise SystemExit(f"rankdiff impute: {args.input} is not a file")
    check_writable(args.output, args.overwrite)
    device = check_device(args.device)
    adata = read_h5ad(args.input, "input")
    mask = None
    if args.mask_layer is not None:
        if args.mask_layer not in adata.layers:
            raise SystemExit(f"rankdiff impute: no layer {args.mask_layer!r}; the layers are {list(adata.layers)}")
        mask = adata.layers[args.mask_layer]
    if args.reference is not None and (args.no_reference or not args.reference.is_file()):
        raise SystemExit(f"rankdiff impute: --reference {args.reference} is not a file (or --no_reference is given)")
    pipe = DiffusionPipeline.from_pretrained(args.model, trust_remote_code=True).to(device)
    reference = False if args.no_reference else None
    if args.reference is not None:
        cells = read_h5ad(args.reference, "--reference")
        reference = pipe.make_reference(cells, layer=args.layer, gene_column=args.gene_column)
    result = pipe.impute_anndata(
        adata,
        mask=mask,
        layer=args.layer,
        gene_column=args.gene_column,
        return_probs=args.return_probs,
        key_added=args.key_added,
        cell_batch_size=args.cell_batch_size,
        num_inference_steps=args.num_inference_steps,
        sampler=args.sampler,
        batch_size=args.batch_size,
        generator=torch.Generator().manual_seed(args.seed),
        reference=reference,
    )
    # Written beside OUTPUT under a temporary name, then moved into place: a failed write leaves no half a file.
    partial = args.output.with_name(f".{args.output.name}.{os.getpid()}.partial")
    try:
        result.write_h5ad(partial)
        os.replace(partial, args.output)
    finally:
        partial.unlink(missing_ok=True)
    return args.output


def check_writable(output: Path, overwrite: bool) -> None:
    """Refuse, before any work, an OUTPUT that exists (without --overwrite), is a folder, or cannot be written (its
    folder is made when missing)."""
    if output.is_dir():
        raise SystemExit(f"rankdiff impute: OUTPUT {output} is a folder; give a file name in it, e.g. out.h5ad")
    if output.suffix != ".h5ad":
        raise SystemExit(f"rankdiff impute: OUTPUT {output} must end in .h5ad (an AnnData file is written)")
    if output.exists() and not overwrite:
        raise SystemExit(f"rankdiff impute: {output} exists; pass --overwrite to replace it")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"rankdiff impute: cannot make the folder of OUTPUT {output}: {error}") from None
    if not os.access(output.parent, os.W_OK | os.X_OK) or (output.exists() and not os.access(output, os.W_OK)):
        raise SystemExit(f"rankdiff impute: OUTPUT {output} cannot be written (no write permission)")


def read_h5ad(path: Path, name: str):
    """An .h5ad file, or a message naming the file and what it is not."""
    import anndata

    try:
        return anndata.read_h5ad(path)
    except (OSError, KeyError, ValueError, TypeError) as error:  # h5py's "file signature not found", a non-AnnData
        raise SystemExit(f"rankdiff impute: {name} {path} is not an .h5ad file anndata can read ({error})") from None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    args = build_parser().parse_args(argv)
    if args.command == "impute":
        try:
            path = impute(args)
        except (KeyError, ValueError, TypeError) as error:
            raise SystemExit(f"rankdiff impute: {error}") from None
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
