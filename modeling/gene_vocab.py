"""Gene vocabulary: token id <-> Ensembl id <-> gene symbol, saved in the processor's config next to the weights."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

SPECIAL_TOKENS = {0: "<pad>", 1: "<cls>", 2: "<eoc>"}
FIRST_GENE_ID = len(SPECIAL_TOKENS)


def _strip_version(ensembl_id: str) -> str:
    """`ENSG00000141510.17` -> `ENSG00000141510` (the version suffix is not part of the identity)."""
    return ensembl_id.split(".", 1)[0]


class GeneVocab:
    """The genes a RankDiff checkpoint knows, in the layout of Tahoe-100M's `gene_metadata`.

    Ids 0, 1, 2 are `<pad>`, `<cls>`, `<eoc>`; genes start at 3. Genes can be named by token id, Ensembl id (with or
    without a version suffix) or symbol; a symbol shared by several Ensembl ids maps to the first of them in token-id
    order.

    Args:
        token_ids (`Sequence[int]`): the gene token ids (all >= 3, unique).
        ensembl_ids (`Sequence[str]`): Ensembl gene id of each token.
        symbols (`Sequence[str | None]`): gene symbol of each token (None where unknown).

    Examples:

    ```python
    >>> vocab = GeneVocab([3, 4], ["ENSG00000000003", "ENSG00000000005"], ["TSPAN6", "TNMD"])
    >>> vocab.encode(["TNMD", "ENSG00000000003.15", 4])
    [4, 3, 4]
    ```
    """

    def __init__(self, token_ids: Sequence[int], ensembl_ids: Sequence[str], symbols: Sequence[str | None]):
        if not len(token_ids) == len(ensembl_ids) == len(symbols):
            raise ValueError(
                f"token_ids, ensembl_ids and symbols differ in length: "
                f"{len(token_ids)}, {len(ensembl_ids)}, {len(symbols)}"
            )
        self.token_ids = np.asarray(token_ids, dtype=np.int64)
        special = self.token_ids[self.token_ids < FIRST_GENE_ID]
        if len(special):
            raise ValueError(
                f"gene token ids must be >= {FIRST_GENE_ID} (ids below are {SPECIAL_TOKENS}), "
                f"got {special[:10].tolist()}"
            )
        self.ensembl_ids = list(ensembl_ids)
        self.symbols = list(symbols)
        for name, values in (("token id", self.token_ids.tolist()), ("Ensembl id", self.ensembl_ids)):
            repeated = [value for value, count in Counter(values).items() if count > 1]
            if repeated:
                raise ValueError(f"each gene needs its own {name}; repeated: {repeated[:10]}")
        self._by_ensembl = {_strip_version(e): int(t) for t, e in zip(self.token_ids, self.ensembl_ids)}
        self._by_symbol: dict[str, int] = {}
        for token_id, symbol in sorted(zip(self.token_ids.tolist(), self.symbols)):
            if symbol:
                self._by_symbol.setdefault(symbol, token_id)
        self._known = set(self.token_ids.tolist())
        self._is_gene = np.zeros(self.size, dtype=bool)
        self._is_gene[self.token_ids] = True

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def size(self) -> int:
        """Number of ids the gene embedding needs: the largest token id + 1."""
        return int(self.token_ids.max()) + 1 if len(self) else FIRST_GENE_ID

    def lookup(self, genes: Iterable[int | str] | np.ndarray) -> np.ndarray:
        """Token id of each gene (token id, Ensembl id or symbol), -1 where the gene is not in the vocabulary."""
        if isinstance(genes, np.ndarray) and genes.dtype.kind in "iu":  # token ids: a table, no loop
            ids = genes.astype(np.int64)
            inside = (ids >= 0) & (ids < len(self._is_gene))
            return np.where(inside & self._is_gene[np.where(inside, ids, 0)], ids, -1)
        out = []
        for gene in genes:
            if isinstance(gene, (int, np.integer)):
                out.append(int(gene) if int(gene) in self._known else -1)
            elif isinstance(gene, str):
                key = _strip_version(gene) if gene.startswith("ENS") else gene
                out.append(self._by_ensembl.get(key, self._by_symbol.get(gene, -1)))
            else:
                raise TypeError(f"genes must be token ids or strings, got {type(gene).__name__}: {gene!r}")
        return np.asarray(out, dtype=np.int64)

    def columns(self, names: Sequence[str]) -> np.ndarray:
        """The token id of each column of a table whose genes are `names` (Ensembl ids or symbols), -1 where the
        column is not one of the vocabulary's genes: its name is unknown, or names a gene an earlier column already
        names (a symbol and its Ensembl id, or a symbol listed twice). RankDiff's one rule for an AnnData's genes:
        the columns with -1 are not listed to the model, and their counts still shape the cell's bins."""
        ids = self.lookup([str(name) for name in names])
        _, first = np.unique(ids, return_index=True)
        repeated = np.ones(len(ids), dtype=bool)
        repeated[first] = False
        return np.where(repeated, -1, ids)

    def encode(self, genes: Iterable[int | str]) -> list[int]:
        """Token ids of `genes`; raises `KeyError` naming every gene that is not in the vocabulary."""
        genes = list(genes)
        ids = self.lookup(genes)
        unknown = [(i, g) for i, (g, t) in enumerate(zip(genes, ids)) if t < 0]
        if unknown:
            shown = ", ".join(f"{g!r} (position {i})" for i, g in unknown[:10])
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise KeyError(f"{len(unknown)} of {len(genes)} genes are not in the vocabulary: {shown}{more}")
        return ids.tolist()

    def decode(self, token_ids: Iterable[int]) -> list[str]:
        """Ensembl id of each token id; raises `KeyError` naming the ids that are not genes of the vocabulary."""
        position = {int(t): i for i, t in enumerate(self.token_ids)}
        token_ids = [int(t) for t in token_ids]
        unknown = [t for t in token_ids if t not in position]
        if unknown:
            raise KeyError(f"{len(unknown)} token ids are not genes of the vocabulary: {unknown[:10]}")
        return [self.ensembl_ids[position[t]] for t in token_ids]

    def to_dict(self) -> dict:
        """The vocabulary as columns (`token_id`, `ensembl_id`, `gene_symbol`), as the processor's config holds it."""
        return {
            "special_tokens": {str(k): v for k, v in SPECIAL_TOKENS.items()},
            "token_id": self.token_ids.tolist(),
            "ensembl_id": self.ensembl_ids,
            "gene_symbol": self.symbols,
        }

    @classmethod
    def from_dict(cls, data: dict) -> GeneVocab:
        """The inverse of [`~GeneVocab.to_dict`]."""
        return cls(data["token_id"], data["ensembl_id"], data["gene_symbol"])

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> GeneVocab:
        """The vocabulary in a checkpoint's `preprocessor_config.json`, or in a JSON file of [`~GeneVocab.to_dict`]."""
        with open(path) as f:
            data = json.load(f)
        if "gene_vocab" in data:
            data = data["gene_vocab"]
        if data is None or "token_id" not in data:
            raise ValueError(f"{path} holds no gene vocabulary (token_id, ensembl_id, gene_symbol)")
        return cls.from_dict(data)
