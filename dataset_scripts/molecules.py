"""Drugs as molecules: Morgan fingerprints of their SMILES (RDKit) and the Tanimoto similarity of two of them.

One rule for the whole repository: radius 2, 2,048 bits. The stand-in screen draws its drug effects by this
similarity, the nearest-drug baseline picks by it, and the model reads the fingerprints as drug features.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MORGAN_RADIUS = 2
MORGAN_BITS = 2048


def morgan_fingerprints(smiles: Sequence[str]) -> np.ndarray:
    """The molecules' Morgan fingerprints, `(n, MORGAN_BITS)` bits as uint8.

    Raises:
        ValueError: a SMILES RDKit cannot parse (named).
    """
    from rdkit import Chem, RDLogger
    from rdkit.Chem import rdFingerprintGenerator

    RDLogger.DisableLog("rdApp.*")  # the error below names the SMILES; RDKit's own log would repeat it
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=MORGAN_RADIUS, fpSize=MORGAN_BITS)
    bits = np.zeros((len(smiles), MORGAN_BITS), dtype=np.uint8)
    for row, text in enumerate(smiles):
        molecule = Chem.MolFromSmiles(text) if text else None
        if molecule is None:
            raise ValueError(f"RDKit cannot parse the SMILES {text!r}")
        bits[row] = generator.GetFingerprintAsNumPy(molecule)
    return bits


def tanimoto_similarity(smiles: Sequence[str]) -> np.ndarray:
    """The Tanimoto similarity of the molecules' Morgan fingerprints, `(n, n)`: shared bits over bits in either.

    Raises:
        ValueError: a SMILES RDKit cannot parse (named).
    """
    bits = morgan_fingerprints(smiles).astype(np.float64)
    shared = bits @ bits.T
    counts = bits.sum(axis=1)
    either = counts[:, None] + counts[None, :] - shared
    return np.divide(shared, either, out=np.zeros_like(shared), where=either > 0)
