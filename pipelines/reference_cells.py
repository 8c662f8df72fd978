# Copyright 2026 The RankDiff authors. Licensed under the Apache License, Version 2.0.
"""`ReferenceCells`: a set of cells the denoiser reads beside the cell it denoises, and the index that finds them.

A cell's nearest reference cells are found on its visible genes alone: each cell is a point in the principal
components of the reference cells' expression on the tie-aware level scale (`log1p` of a gene's level, the rank of
its count among the cell's distinct counts, so count 1 is level 1 in every cell), a cell with masked genes is
projected from its visible ones (least squares on their loadings), and scikit-learn's `NearestNeighbors` searches.
Their tokens at the cell's genes are read in the cell's own token scale (a neighbour's level j becomes the token at
which the cell shows its level j), the distribution the denoiser embeds and may copy from. A cell never reads
itself: training names its row, and at inference a reference cell with the cell's own tokens at every gene it
shows is taken for it (a training cell imputed or translated).

A grouped reference (`group_condition`, e.g. a screen's control cells grouped by `cell_line_id`) finds a cell's
neighbours among the reference cells of its own group only, and a cell that shows nothing reads k cells of its group
drawn at random: a perturbed cell reads the control cells of its line it looks most like.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import logging

logger = logging.get_logger(__name__)

# Cells projected and matched at a time (the projection reads a `(cells, length, components)` block).
_CHUNK = 64


def level_tables(tokens: torch.Tensor, shown: torch.Tensor, num_rank_tokens: int) -> tuple[torch.Tensor, ...]:
    """Each cell's tie-aware scale from the tokens it shows (`tokens` `(n, length)` where `shown`):

    - `level_of` `(n, B + 1)`: the level of each token (the number of distinct shown tokens at or below it);
    - `token_of` `(n, B + 1)`: the token of each level (its largest shown token beyond the cell's top level);
    - `top` `(n,)`: the number of levels the cell shows."""
    present = torch.zeros(tokens.shape[0], num_rank_tokens + 1, dtype=torch.bool, device=tokens.device)
    present.scatter_(1, torch.where(shown & (tokens > 0), tokens, num_rank_tokens).long(), True)
    present = present[:, :num_rank_tokens]
    level_of = present.long().cumsum(dim=1)
    top = level_of[:, -1]
    token_of = torch.zeros_like(level_of)
    rows, shown_tokens = present.nonzero(as_tuple=True)
    token_of[rows, level_of[rows, shown_tokens]] = shown_tokens
    levels = torch.arange(num_rank_tokens, device=tokens.device)
    highest = token_of.gather(1, top[:, None])
    token_of = torch.where(levels[None] > top[:, None], highest, token_of)
    return level_of, token_of, top


def _not_itself(theirs: torch.Tensor, tokens: torch.Tensor, shown: torch.Tensor) -> torch.Tensor:
    """`(n, k + 1)` which of each cell's `k + 1` found reference cells (`theirs`, their tokens at its genes) it
    reads: all but the first with its own tokens at every gene it shows (the cell itself, a training cell in the
    reference; training never lets a cell read itself), else all but the farthest."""
    same = ((theirs == tokens[:, None, :]) | ~shown[:, None, :]).all(dim=2) & shown.any(dim=1)[:, None]
    dropped = torch.where(same.any(dim=1), same.long().argmax(dim=1), same.shape[1] - 1)
    keep = torch.ones_like(same)
    keep[torch.arange(len(keep), device=keep.device), dropped] = False
    return keep


class ReferenceCells(ModelMixin, ConfigMixin):
    r"""Reference cells (rank tokens at their genes) with the index that finds a cell's nearest ones.

    Saved in a pipeline folder as the `reference` component (`config.json` and the tensors); memory is about
    `num_cells x num_genes` bytes of tokens plus `num_components x num_genes` floats.

    Args:
        num_cells (`int`): reference cells.
        num_genes (`int`): genes with a column (the genes some reference cell expresses).
        num_rank_bins (`int`, defaults to 50): B, as the model's.
        num_components (`int`, defaults to 32): principal components of the embedding.
        num_neighbours (`int`, defaults to 16): neighbours read per cell by default.
        group_condition (`str`, *optional*): the condition whose ids group the cells (`groups`, 0: none): a cell
            reads only reference cells of its own group.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self, num_cells: int, num_genes: int, num_rank_bins: int = 50, num_components: int = 32,
        num_neighbours: int = 16, group_condition: str | None = None,
    ):  # fmt: skip
        super().__init__()
        if group_condition is not None:
            self.register_buffer("groups", torch.zeros(num_cells, dtype=torch.long))
        self.register_buffer("gene_ids", torch.zeros(num_genes, dtype=torch.long))
        self.register_buffer("tokens", torch.zeros(num_cells, num_genes, dtype=torch.uint8))
        self.register_buffer("levels", torch.zeros(num_cells, num_rank_bins + 1, dtype=torch.int16))  # of each token
        self.register_buffer("mean", torch.zeros(num_genes))
        self.register_buffer("components", torch.zeros(num_components, num_genes))
        self.register_buffer("embeddings", torch.zeros(num_cells, num_components))
        self._search = {}

    @classmethod
    def from_tokens(
        cls, tokens, num_rank_bins: int, *, max_cells: int | None = 2048, num_components: int = 32,
        num_neighbours: int = 16, seed: int = 0, groups=None, group_condition: str | None = None,
    ) -> tuple[ReferenceCells, np.ndarray]:  # fmt: skip
        """Build from cells' rank tokens, `(n_cells, gene_vocab_size)` (a scipy sparse matrix with an entry per
        expressed gene, or dense): up to `max_cells` of them (a seeded draw, kept in order), their principal
        components fitted with scikit-learn; with `group_condition`, `groups` `(n_cells,)` are their group ids
        (ids >= 1 of that condition). Returns the reference and the rows of `tokens` it holds."""
        from scipy import sparse
        from sklearn.decomposition import PCA

        tokens = sparse.csr_matrix(tokens)
        if not 1 <= num_rank_bins <= 255:  # tokens are held as bytes
            raise ValueError(f"reference cells hold num_rank_bins of 1..255, got {num_rank_bins}")
        if tokens.shape[0] < 2:
            raise ValueError(f"a reference needs at least 2 cells, got {tokens.shape[0]}")
        if tokens.nnz and (tokens.data.min() < 0 or tokens.data.max() > num_rank_bins):
            raise ValueError(f"reference tokens must be in 0..{num_rank_bins}")
        if (groups is None) != (group_condition is None):
            raise ValueError("give groups and group_condition together (a grouped reference), or neither")
        if groups is not None:
            groups = np.asarray(groups)
            if groups.shape != (tokens.shape[0],) or not np.issubdtype(groups.dtype, np.integer) or groups.min() < 1:
                raise ValueError(f"groups must be {tokens.shape[0]} integer ids >= 1, one per cell")
        rows = np.arange(tokens.shape[0])
        if max_cells is not None and tokens.shape[0] > max_cells:
            rows = np.sort(np.random.default_rng(seed).choice(tokens.shape[0], max_cells, replace=False))
        tokens = tokens[rows]
        tokens.eliminate_zeros()
        genes = np.unique(tokens.indices)
        dense = torch.from_numpy(tokens[:, genes].toarray().astype(np.uint8))
        num_components = max(1, min(num_components, len(rows) - 1, len(genes)))
        reference = cls(len(rows), len(genes), num_rank_bins, num_components, num_neighbours, group_condition)
        features = reference._features(dense, torch.ones_like(dense, dtype=torch.bool)).numpy()
        pca = PCA(n_components=num_components, random_state=seed).fit(features)
        reference.gene_ids.copy_(torch.from_numpy(genes))
        reference.tokens.copy_(dense)
        reference.levels.copy_(level_tables(dense, torch.ones_like(dense, dtype=torch.bool), num_rank_bins + 1)[0])
        reference.mean.copy_(torch.from_numpy(pca.mean_).float())
        reference.components.copy_(torch.from_numpy(pca.components_).float())
        reference.embeddings.copy_(torch.from_numpy(pca.transform(features)).float())
        if groups is not None:
            reference.groups.copy_(torch.from_numpy(groups[rows].astype(np.int64)))
        return reference, rows

    @property
    def num_rank_tokens(self) -> int:
        return self.config.num_rank_bins + 1

    def _features(self, tokens: torch.Tensor, shown: torch.Tensor) -> torch.Tensor:
        """`log1p(level)` of each shown token in its cell's scale (0 elsewhere)."""
        level_of, _, _ = level_tables(tokens, shown, self.num_rank_tokens)
        levels = level_of.gather(1, tokens.long().clamp(max=self.num_rank_tokens - 1))
        return torch.log1p(levels.float()) * shown

    def columns(self, gene_ids: torch.Tensor) -> torch.Tensor:
        """The reference column of each gene id, -1 for a gene no reference cell expresses."""
        position = torch.searchsorted(self.gene_ids, gene_ids.clamp(min=0))
        position = position.clamp(max=len(self.gene_ids) - 1)
        return torch.where(self.gene_ids[position] == gene_ids, position, -1)

    def embed(self, gene_ids: torch.Tensor, input_ids: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """`(n, num_components)` coordinates of cells from their visible positions alone: the least-squares fit
        of their features there by the components' loadings (a small ridge keeps it stable with few genes)."""
        column = self.columns(gene_ids)
        used = visible & (column >= 0)
        safe = column.clamp(min=0)
        features = self._features(input_ids, visible) - self.mean[safe]
        features = features * used
        loadings = self.components.T[safe] * used[..., None]  # (n, length, components)
        gram = loadings.transpose(1, 2) @ loadings
        ridge = 1e-2 * gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp(min=1e-6)
        gram = gram + ridge[:, None, None] * torch.eye(gram.shape[-1], device=gram.device)
        return torch.linalg.solve(gram, (loadings.transpose(1, 2) @ features[..., None]))[..., 0]

    def neighbours(
        self, embeddings: torch.Tensor, k: int, exclude: torch.Tensor | None = None, group: int | None = None
    ) -> torch.Tensor:
        """`(n, k)` rows of the `k` nearest reference cells, nearest first; `exclude` `(n,)` a row each cell must
        not get (itself, in training; -1: none); `group`: among the cells of that group only."""
        candidates = self.group_rows(group)
        if group not in self._search:
            from sklearn.neighbors import NearestNeighbors

            self._search[group] = NearestNeighbors().fit(self.embeddings[candidates].cpu().numpy())
        extra = int(exclude is not None)
        if not 1 <= k <= len(candidates) - extra:
            raise ValueError(f"k must be in 1..{len(candidates) - extra} for {len(candidates)} reference cells")
        _, found = self._search[group].kneighbors(embeddings.detach().float().cpu().numpy(), n_neighbors=k + extra)
        rows = candidates.cpu()[torch.from_numpy(found)]
        if exclude is not None:  # drop the excluded row, else the farthest
            keep = rows != exclude.cpu()[:, None]
            keep[keep.all(dim=1), -1] = False
            rows = rows[keep].view(len(rows), k)
        return rows.to(self.tokens.device)

    def group_rows(self, group: int | None) -> torch.Tensor:
        """The rows of a group's reference cells (every row for None, or for an ungrouped reference)."""
        if group is None or self.config.group_condition is None:
            return torch.arange(len(self.embeddings), device=self.tokens.device)
        return (self.groups == group).nonzero().squeeze(1)

    def usable_groups(self, groups: torch.Tensor, needed: int) -> torch.Tensor:
        """Cells' group ids, 0 (any reference cell, with a warning) for a group with fewer than `needed` reference
        cells, so every cell reads as many as the others and a cell's context does not depend on its batch."""
        sizes = torch.bincount(self.groups.cpu(), minlength=int(groups.max()) + 1)
        small = (groups > 0) & (sizes[groups] < needed)
        if small.any():
            shown = sorted(set(groups[small].tolist()))[:5]
            logger.warning("%s ids %s have fewer than %d reference cells: those cells read any reference cell",
                           self.config.group_condition, shown, needed)  # fmt: skip
        return groups.masked_fill(small, 0)

    def _found_rows(
        self, embeddings: torch.Tensor, visible: torch.Tensor, k: int, exclude: torch.Tensor | None,
        groups: torch.Tensor | None, generator: torch.Generator | None,
    ) -> torch.Tensor:  # fmt: skip
        """Each cell's `k` reference rows: nearest on its visible genes (within its group for a grouped reference;
        a cell of a grouped reference that shows nothing gets k of its group drawn at random)."""
        if self.config.group_condition is None or groups is None:
            return self.neighbours(embeddings, k, exclude)
        rows = torch.zeros(len(embeddings), k, dtype=torch.long, device=self.tokens.device)
        blind = ~visible.any(dim=1).cpu()
        for value in groups.unique().tolist():
            members = (groups == value).nonzero().squeeze(1)
            group = value if value > 0 else None
            candidates = self.group_rows(group)
            seen, unseen = members[~blind[members]], members[blind[members]]
            if len(seen):
                rows[seen] = self.neighbours(embeddings[seen], k, None if exclude is None else exclude[seen], group)
            for cell in unseen.tolist():
                order = torch.randperm(len(candidates), generator=generator)
                drawn = candidates.cpu()[order]
                if exclude is not None:
                    drawn = drawn[drawn != int(exclude[cell])]
                rows[cell] = drawn[:k].to(rows.device)
        return rows

    @torch.no_grad()
    def context(
        self, gene_ids: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
        mask_token_id: int, k: int | None = None, exclude: torch.Tensor | None = None,
        groups: torch.Tensor | None = None, generator: torch.Generator | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """The model's `reference_tokens` for cells: `(n, length, k)` int16, at each position the tokens of the
        cell's `k` nearest reference cells (found on its visible positions; all but one when there are fewer) at
        its gene, in the cell's own scale; -1 at padding. `exclude` `(n,)`: a reference row each cell must not
        read (-1: none); without it, a reference cell with the cell's own tokens at every gene it shows is taken
        for the cell itself and not read. A grouped reference reads `groups` `(n,)`, each cell's group id (0: any
        group), and `generator` draws the cells of those that show nothing."""
        k = self.config.num_neighbours if k is None else k
        k = min(k, len(self.embeddings) - 1)  # a small reference: all its cells but the cell itself
        if groups is not None and self.config.group_condition is not None:
            groups = self.usable_groups(groups.cpu().long(), k + 1)
        else:
            groups = None
        searched = k if exclude is not None else k + 1  # no row named: one more, to drop the cell if found
        out = []
        for start in range(0, len(gene_ids), _CHUNK):
            part = slice(start, start + _CHUNK)
            genes, tokens = gene_ids[part].to(self.tokens.device), input_ids[part].to(self.tokens.device)
            real = attention_mask[part].to(self.tokens.device).bool()
            visible = real & (tokens != mask_token_id)
            excluded = None if exclude is None else exclude[part]
            embeddings = self.embed(genes, tokens.masked_fill(~visible, 0), visible)
            grouped = None if groups is None else groups[part]
            rows = self._found_rows(embeddings, visible, searched, excluded, grouped, generator)
            column = self.columns(genes.masked_fill(~real, 0))
            theirs = self.tokens[rows[:, :, None], column.clamp(min=0)[:, None, :]].long()  # (n, k, length)
            theirs = theirs * (column >= 0)[:, None, :]
            if searched > k:
                keep = _not_itself(theirs, tokens, visible & (column >= 0))
                rows, theirs = rows[keep].view(-1, k), theirs[keep].view(-1, k, theirs.shape[-1])
            levels = self.levels[rows].long().gather(2, theirs)
            _, token_of, top = level_tables(tokens, visible, self.num_rank_tokens)
            mapped = token_of[:, None, :].expand(-1, k, -1).gather(2, levels)
            mapped = torch.where(top[:, None, None] > 0, mapped, theirs)  # a cell showing no expressed gene
            out.append(mapped.transpose(1, 2).masked_fill(~real[..., None], -1).to(torch.int16).cpu())
        return torch.cat(out) if out else torch.zeros(0, gene_ids.shape[1], k, dtype=torch.int16)
