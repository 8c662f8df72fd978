"""The rank rule (a cell's counts -> quantile bins, many cells at once) and the selection rules that make a cell's
(gene id, rank token) sequence."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

SELECTION_RULES = ("expressed", "panel", "random")
# Independent hash streams of a cell: the rule draw, the expressed genes kept, the zero genes added, the panel (or
# random) genes kept.
_STREAMS = ("rule", "expressed", "zeros", "panel")
TABLE_COUNTS = 64  # counts below this get their token from a per-cell table


def quantile_positions(sizes: np.ndarray, num_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer positions of the quantiles `linspace(0, 1, num_bins)` in sorted arrays of the given sizes.

    Quantile k sits at `k (n - 1) / (B - 1)`: returns `(low, high, remainder)`, each `(len(sizes), num_bins)`, so
    that the quantile is `v[low] + (v[high] - v[low]) * remainder / (B - 1)` (see [`interpolate_edges`]).
    """
    divisor = max(num_bins - 1, 1)
    steps = np.arange(num_bins, dtype=np.int64)[None, :] * (np.asarray(sizes, dtype=np.int64)[:, None] - 1)
    low, remainder = np.divmod(steps, divisor)
    return low, np.minimum(low + 1, sizes[:, None] - 1), remainder


def interpolate_edges(low_values: np.ndarray, high_values: np.ndarray, remainder: np.ndarray) -> np.ndarray:
    """Bin edges from the sorted values at the positions of [`quantile_positions`], in float64.

    Integer positions, not `np.quantile`'s float ones: an edge that falls on a data point (or between two equal
    ones) is that count exactly instead of a float a hair below it, which would move every tied count one bin up.
    """
    divisor = max(remainder.shape[-1] - 1, 1)
    low_values = np.asarray(low_values, dtype=np.float64)
    return low_values + ((high_values - low_values) * remainder) / divisor


# No cell holds a billion UMIs of one gene: a larger value is a unit or a parsing error, not a count.
MAX_COUNT = 1e9


def invalid_counts(values) -> np.ndarray:
    """True where a value is not a raw count (a non-negative integer up to `MAX_COUNT`): NaN, infinite, negative,
    fractional or absurdly large. The one count check of every reader: Tahoe rows, AnnData, the processor."""
    values = np.asarray(values)
    if values.dtype.kind in "iu":
        return (values < 0) | (values > MAX_COUNT)
    with np.errstate(invalid="ignore"):
        return ~(np.isfinite(values) & (values >= 0) & (values <= MAX_COUNT) & (values == np.rint(values)))


def check_counts(counts, where: str, genes: np.ndarray | None = None, positions: np.ndarray | None = None) -> None:
    """Raise a `ValueError` naming the first value of `counts` that is not a raw count ([`invalid_counts`]), its
    position (`positions[i]` when given) and its gene (`genes[i]` when given)."""
    bad = invalid_counts(counts)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        gene = f" (gene {genes[i]})" if genes is not None else ""
        position = int(positions[i]) if positions is not None else i
        raise ValueError(
            f"{where}: counts must be non-negative integers up to 1e9 (raw UMI counts), got {float(counts[i])} at "
            f"position {position}{gene}; {int(bad.sum())} bad values in all"
        )


def rank_tokens(
    counts,
    num_bins: int = 50,
    offsets: np.ndarray | None = None,
    *,
    context=None,
    context_offsets: np.ndarray | None = None,
    reference=None,
    reference_offsets: np.ndarray | None = None,
    checked: bool = False,
) -> np.ndarray:
    """Rank tokens of the counts of one cell or of many back to back: the MosaicFM / Tahoe-x1 rule, RankDiff's one.

    A cell's bin edges are the quantiles `linspace(0, 1, B)` of its non-zero counts (linear interpolation at integer
    positions, see [`interpolate_edges`]); an expressed gene gets `min(bucketize(count, edges, right=False) + 1, B)`,
    so tied counts share a bin, the smallest count is bin 1 and the largest bin B; an unexpressed gene gets 0.
    Vectorised over cells without sorting them: counts are small integers, so a per-cell histogram gives the sorted
    values at the quantile positions, and a per-cell table maps each small count to its token; the few counts at or
    above `TABLE_COUNTS - 1` are compared with the edges.

    Args:
        counts (`np.ndarray`): raw counts (non-negative integers, zeros allowed).
        num_bins (`int`): B, the number of bins for expressed genes.
        offsets (`np.ndarray`, *optional*): `(n_cells + 1,)` start of each cell in `counts`; one cell when None.
        context (`np.ndarray`, *optional*): counts of each cell's other genes (`context_offsets` lays them out): they
            join the cell's bins and get no token, so a part of a cell is binned as the whole cell.
        reference (`np.ndarray`, *optional*): instead, the counts whose quantiles alone make each cell's edges
            (`reference_offsets` lays them out): `counts` are put on their scale, e.g. a cell's held-out counts on the
            scale of its visible ones (a count above them all gets bin B).
        checked (`bool`, defaults to `False`): the caller has checked every count ([`invalid_counts`], naming the
            row or cell of a bad one), so they are not checked again.

    Returns:
        `np.ndarray` of int64 tokens in 0..B, one per count.
    """
    if reference is not None and context is not None:
        raise ValueError("give context (joins the counts in the bins) or reference (makes the bins), not both")
    counts = np.asarray(counts)
    if counts.ndim != 1:
        raise ValueError(f"counts must be 1-D (cells back to back, laid out by offsets), got shape {counts.shape}")
    offsets = np.array([0, len(counts)]) if offsets is None else np.asarray(offsets)
    if context is not None and context_offsets is None:
        context_offsets = np.array([0, len(context)])  # one cell's
    if not checked:
        for name, given in (("counts", counts), ("context counts", context), ("reference counts", reference)):
            if given is not None:
                check_counts(np.asarray(given), name)
    if context is not None and not len(context):
        context = None
    values, sizes, expressed = _expressed(counts, offsets)
    if reference is not None:  # the edges from other counts: each count looked up on its cell's
        reference = np.asarray(reference)
        reference_offsets = np.array([0, len(reference)]) if reference_offsets is None else reference_offsets
        edges, edge_sizes, _ = _expressed(reference, np.asarray(reference_offsets))
        cells = np.repeat(np.arange(len(sizes)), sizes)
        binned = _bin(_offsets(edge_sizes), edges, num_bins, queries=values, query_cells=cells)
    elif context is not None:  # each cell's counts, then its context, make its edges
        context = np.asarray(context)
        others, other_sizes, _ = _expressed(context, np.asarray(context_offsets))
        merged_offsets = _offsets(sizes + other_sizes)
        own = concatenated_ranges(merged_offsets[:-1], sizes)
        merged = np.empty(merged_offsets[-1], dtype=np.result_type(values, others))
        merged[own] = values
        merged[concatenated_ranges(merged_offsets[:-1] + sizes, other_sizes)] = others
        binned = _bin(merged_offsets, merged, num_bins)[own]
    else:
        binned = _bin(_offsets(sizes), values, num_bins)
    if expressed is None:  # every count was expressed
        return binned
    tokens = np.zeros(len(counts), dtype=np.int64)
    tokens[expressed] = binned
    return tokens


def counts_at_tokens(
    tokens: np.ndarray,
    counts: np.ndarray,
    offsets: np.ndarray,
    uniforms: np.ndarray,
    num_bins: int = 50,
    *,
    context: np.ndarray | None = None,
    context_offsets: np.ndarray | None = None,
) -> np.ndarray:
    """Counts for new rank tokens of cells, the rank rule read backwards within each cell: the inverse of
    [`rank_tokens`] that a translated cell's counts come from.

    A position whose token is its count's own token keeps its count; token 0 is count 0; any other token b takes a
    count that the same cell holds at token b (one of them, picked by `uniforms[i]` in [0, 1) among the cell's
    non-zero counts of that token, its context's included), so a moved gene lands on the cell's own scale. Where the
    cell holds no count of token b (tied counts skip tokens), its smallest count above b, else its largest; a cell
    with no count at all has no scale: 1.

    Args:
        tokens (`np.ndarray`): the new tokens in 0..B, one per count (-1 where there is none: NaN out).
        counts (`np.ndarray`): the cells' raw counts at the same positions, back to back (`offsets`).
        offsets (`np.ndarray`): `(n_cells + 1,)` start of each cell.
        uniforms (`np.ndarray`): one draw in [0, 1) per position.
        num_bins (`int`): B.
        context (`np.ndarray`, *optional*), context_offsets (`np.ndarray`, *optional*): each cell's other counts, as
            for [`rank_tokens`]: they shape the bins and are counts the cell holds.

    Returns:
        `np.ndarray` of float64 counts, one per position.
    """
    tokens, counts, offsets = np.asarray(tokens), np.asarray(counts, dtype=np.float64), np.asarray(offsets)
    n_cells = len(offsets) - 1
    if context is None:
        context, context_offsets = np.zeros(0), np.zeros(n_cells + 1, dtype=np.int64)
    context, context_offsets = np.asarray(context, dtype=np.float64), np.asarray(context_offsets)
    own = rank_tokens(counts, num_bins, offsets, context=context, context_offsets=context_offsets)
    # Every count of each cell with its token, sorted by (cell, count): tokens rise with counts within a cell.
    others = rank_tokens(context, num_bins, context_offsets, context=counts, context_offsets=offsets)
    pool_cell = np.concatenate([segment_ids(offsets), segment_ids(context_offsets)])
    pool_count, pool_token = np.concatenate([counts, context]), np.concatenate([own, others])
    kept = pool_count > 0
    order = np.lexsort((pool_count[kept], pool_cell[kept]))
    pool_cell, pool_count, pool_token = pool_cell[kept][order], pool_count[kept][order], pool_token[kept][order]
    stride = num_bins + 1
    keys = pool_cell * stride + pool_token
    cell = segment_ids(offsets)
    query = cell * stride + np.clip(tokens, 0, num_bins)
    first, end = np.searchsorted(keys, query, side="left"), np.searchsorted(keys, query, side="right")
    found = np.ones(len(tokens))
    if len(keys):
        last = len(keys) - 1
        drawn = first + np.minimum((np.asarray(uniforms) * (end - first)).astype(np.int64), end - first - 1)
        # None at the token: the cell's next count up, else (past its largest) the one below.
        above = np.minimum(first, last)
        index = np.where(end > first, drawn, np.where(pool_cell[above] == cell, above, first - 1)).clip(0, last)
        found = np.where(pool_cell[index] == cell, pool_count[index], 1.0)
    out = np.where(tokens == own, counts, np.where(tokens == 0, 0.0, found))
    return np.where(tokens < 0, np.nan, out)


def _offsets(sizes: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(sizes)])


def _expressed(counts: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """`(values, sizes, expressed)`: the non-zero counts cell by cell, each cell's number of them, and where they are
    (None when every count is non-zero: no copy)."""
    expressed = counts > 0
    if expressed.all():
        return counts, np.diff(offsets), None
    before = np.concatenate([[0], np.cumsum(expressed, dtype=np.int64)])
    return counts[expressed], before[offsets[1:]] - before[offsets[:-1]], expressed


def _bin(
    offsets: np.ndarray,
    values: np.ndarray,
    num_bins: int,
    queries: np.ndarray | None = None,
    query_cells: np.ndarray | None = None,
) -> np.ndarray:
    """Tokens of the positive integer `values` (cell by cell with `offsets`) on their cells' bins, or of other
    positive integer `queries` (each in cell `query_cells[i]`) on the bins of the `values`."""
    n_cells, sizes = len(offsets) - 1, np.diff(offsets)
    if not len(values if queries is None else queries):
        return np.zeros(0, dtype=np.int64)
    if queries is not None and (sizes[np.unique(query_cells)] == 0).any():
        raise ValueError("a cell with expressed genes has no non-zero reference counts to make its bins of")
    # Column v of a cell's histogram counts its values equal to v; the last column holds all larger values.
    index = np.minimum(values, TABLE_COUNTS - 1).astype(np.int64)
    index += np.repeat(np.arange(n_cells, dtype=np.int64) * TABLE_COUNTS, sizes)
    histogram = np.bincount(index, minlength=n_cells * TABLE_COUNTS).reshape(n_cells, TABLE_COUNTS)
    at_most = histogram[:, :-1].cumsum(axis=1)  # at_most[c, v]: the cell's values <= v
    n_small = at_most[:, -1]
    large = np.flatnonzero(values >= TABLE_COUNTS - 1)
    large_cell = np.searchsorted(offsets, large, side="right") - 1
    large_values = values[large].astype(np.float64)
    large_sorted = large_values[np.lexsort((large_values, large_cell))]
    large_start = np.cumsum(sizes - n_small) - (sizes - n_small)
    # Cell-major, each row shifted past the last, so one searchsorted finds the smallest v with at_most > rank.
    shift = np.arange(n_cells)[:, None] * (int(sizes.max()) + 1)
    flat_at_most = (at_most + shift).ravel()

    def sorted_value(rank: np.ndarray) -> np.ndarray:
        """The value at each (cell, rank) of the cells' sorted values."""
        small = np.searchsorted(flat_at_most, rank + shift, side="right") - np.arange(n_cells)[:, None] * (
            TABLE_COUNTS - 1
        )
        if not len(large):
            return small
        large_rank = np.clip(large_start[:, None] + rank - n_small[:, None], 0, len(large) - 1)
        return np.where(rank < n_small[:, None], small, large_sorted[large_rank])

    # Cells without values (only those no query falls in) get harmless edges from a size of one.
    low, high, remainder = quantile_positions(np.maximum(sizes, 1), num_bins)
    edges = interpolate_edges(sorted_value(low), sorted_value(high), remainder)
    # token = 1 + (edges below the count), as `searchsorted(edges, count, side="left") + 1` per cell. An edge e is
    # below the integer counts from floor(e) + 1 on: a cumulative histogram of those gives the table.
    first_above = np.minimum(np.floor(edges) + 1, TABLE_COUNTS).astype(np.int64)
    first_above += np.arange(n_cells)[:, None] * (TABLE_COUNTS + 1)
    below = np.bincount(first_above.ravel(), minlength=n_cells * (TABLE_COUNTS + 1)).reshape(n_cells, -1)
    table = 1 + below.cumsum(axis=1)[:, :TABLE_COUNTS]
    if queries is None:  # the values themselves: their table slots are `index`
        tokens = table.ravel()[index]
        tokens[large] = 1 + (edges[large_cell] < large_values[:, None]).sum(axis=1)
    else:
        small = queries < TABLE_COUNTS - 1
        tokens = np.empty(len(queries), dtype=np.int64)
        tokens[small] = table[query_cells[small], queries[small].astype(np.int64)]
        tokens[~small] = 1 + (edges[query_cells[~small]] < queries[~small, None]).sum(axis=1)
    # A count above every edge (above the largest reference count, or any but the smallest when B = 1) is bin B:
    # B + 1 is [MASK].
    return np.minimum(tokens, num_bins, out=tokens)


def cell_salts(seed: int, epoch: int, cell_ids: list[str]) -> np.ndarray:
    """`(len(cell_ids), 4)` uint32 salts fixed by (seed, epoch, cell id), one per hash stream of a cell.

    Every draw of the selection rules is a hash of a salt, so workers, ranks and resumes draw the same genes and
    a batch of cells draws exactly what each cell draws alone.
    """
    digests = b"".join(
        hashlib.blake2b(f"{seed}:{epoch}:{cell_id}".encode(), digest_size=4 * len(_STREAMS)).digest()
        for cell_id in cell_ids
    )
    return np.frombuffer(digests, dtype="<u4").reshape(len(cell_ids), len(_STREAMS)).astype(np.uint32)


def hash_keys(salts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Pseudo-random uint32 keys of non-negative integers (< 2**32) under per-element salts (broadcast).

    MurmurHash3's finaliser of `value * golden + salt`: for a fixed salt a bijection of 32-bit values, so two
    genes of one cell never share a key.
    """
    with np.errstate(over="ignore"):
        h = np.asarray(values).astype(np.uint32) * np.uint32(0x9E3779B9) + np.asarray(salts, dtype=np.uint32)
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
        h ^= h >> np.uint32(16)
    return h


def segment_ids(offsets: np.ndarray) -> np.ndarray:
    """The segment (cell) index of every flat position of arrays with per-segment `offsets`."""
    return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))


def repeated_genes(
    offsets: np.ndarray, gene_ids: np.ndarray, listed: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The gene ids that a cell lists more than once, among cells laid out by `offsets` (only the positions where
    `listed` is True count, all when None): `(cells, genes)`, one entry per repeated (cell, gene) pair, by cell."""
    cell = segment_ids(offsets)
    if listed is not None:
        cell, gene_ids = cell[listed], gene_ids[listed]
    stride = int(gene_ids.max(initial=0)) + 1
    keys = cell * stride + gene_ids
    if stride * (len(offsets) - 1) < 2**31:  # int32 keys sort twice as fast (a training batch's usual case)
        keys = keys.astype(np.int32)
    keys = np.sort(keys)
    repeated = np.unique(keys[1:][np.diff(keys) == 0])
    return repeated // stride, repeated % stride


def concatenated_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """`np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)])` without the loop."""
    return np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())


def smallest_keys(offsets: np.ndarray, keys: np.ndarray, n_keep: int) -> np.ndarray:
    """Indices (increasing) of the `n_keep` smallest keys of each segment, or of all keys of a shorter segment.

    Keys must be distinct within a segment. Longer segments become rows of a padded matrix, so one
    `np.partition` finds every segment's threshold at once.
    """
    sizes = np.diff(offsets)
    long = sizes > n_keep
    if not long.any():
        return np.arange(len(keys))
    long_sizes, long_starts = sizes[long], offsets[:-1][long]
    width = int(long_sizes.max())
    every = long.all()  # the usual case: no gather of the long segments' keys
    flat = np.arange(len(keys)) if every else concatenated_ranges(long_starts, long_sizes)
    long_keys = keys if every else keys[flat]
    slot = flat + np.repeat(np.arange(len(long_sizes)) * width - long_starts, long_sizes)  # row * width + column
    padded = np.full((len(long_sizes), width), np.iinfo(keys.dtype).max, dtype=keys.dtype)
    padded.ravel()[slot] = long_keys
    threshold = np.partition(padded, n_keep - 1, axis=1)[:, n_keep - 1]
    keep_long = long_keys <= np.repeat(threshold, long_sizes)
    if every:
        return np.flatnonzero(keep_long)
    keep = np.ones(len(keys), dtype=bool)
    keep[flat] = keep_long
    return np.flatnonzero(keep)


def draw_unexpressed(
    salts: np.ndarray, offsets: np.ndarray, expressed_genes: np.ndarray, gene_pool: np.ndarray, n_zero: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per cell, `n_zero` genes of `gene_pool` (sorted, unique) that it does not express, or all there are.

    Draw j = 0, 1, 2, ... of a cell is the pool entry at a hashed index of j; the first `n_zero` draws that are
    neither expressed nor drawn before are kept. This is sequential rejection sampling, so each cell gets a
    uniform sample without replacement, in draw order. Returns `(offsets, genes)` of the drawn genes.
    """
    n_cells, pool_size = len(offsets) - 1, len(gene_pool)
    cell = segment_ids(offsets)
    stride = int(max(gene_pool.max(), expressed_genes.max(initial=0))) + 1
    expressed_keys = np.append(np.sort(cell * stride + expressed_genes), -1)  # -1: a sentinel that never matches
    in_pool = gene_pool[np.searchsorted(gene_pool, expressed_genes).clip(max=pool_size - 1)] == expressed_genes
    target = np.minimum(n_zero, pool_size - np.bincount(cell[in_pool], minlength=n_cells))
    out_offsets = np.concatenate([[0], np.cumsum(target)])
    out = np.empty(out_offsets[-1], dtype=gene_pool.dtype)
    rows, draws = np.flatnonzero(target > 0), 2 * n_zero + 16
    while len(rows):
        index = (hash_keys(salts[rows, None], np.arange(draws)).astype(np.uint64) * np.uint64(pool_size)) >> 32
        candidates = gene_pool[index.astype(np.int64)]
        keys = rows[:, None] * stride + candidates
        fresh = expressed_keys[np.searchsorted(expressed_keys[:-1], keys)] != keys
        order = np.argsort(candidates, axis=1, kind="stable")  # a repeat of an earlier draw is not fresh
        in_order = np.take_along_axis(candidates, order, axis=1)
        repeat = np.zeros_like(fresh)
        np.put_along_axis(repeat, order[:, 1:], in_order[:, 1:] == in_order[:, :-1], axis=1)
        fresh &= ~repeat
        taken = np.cumsum(fresh, axis=1)
        done = taken[:, -1] >= target[rows]
        picked = fresh & (taken <= target[rows, None]) & done[:, None]
        out[concatenated_ranges(out_offsets[rows[done]], target[rows[done]])] = candidates[picked]
        rows, draws = rows[~done], 2 * draws
    return out_offsets, out


@dataclass
class CellTokenizer:
    """Turns one cell (expressed gene ids and raw counts) into a sequence of (gene id, rank token) pairs.

    Rank tokens are computed over *all* expressed genes before any subsampling. Which genes enter the sequence
    follows a selection rule:

    - `"expressed"`: up to `max_length - round(zero_share * max_length)` expressed genes drawn uniformly (all of
      them if they fit; in input order), then unexpressed genes of `gene_pool` drawn uniformly (token 0) to fill
      the zero share, so the model learns zeros. Being in such a sequence says a gene is probably expressed.
    - `"panel"`: up to `max_length` genes of `panel` drawn without looking at the counts (the whole panel when it
      fits), each with its token (0 if not expressed). Being in the sequence says nothing about expression.
    - `"random"`: `max_length` genes of `gene_pool` drawn uniformly without looking at the counts, each with its
      token: a new gene list for every cell and epoch, like the panels users bring.

    With `rule=None` each cell uses `"panel"` with probability `panel_share`, `"random"` with probability
    `random_share`, else `"expressed"`. All draws are
    hashes of salts fixed by (seed, epoch, cell id) ([`cell_salts`]): a gene is drawn when its hash key is among
    the smallest, so [`~CellTokenizer.select_batch`] on a batch of cells gives each cell what it gets alone.

    Args:
        num_bins (`int`): B of [`rank_tokens`].
        max_length (`int`): L, the most pairs in a sequence.
        zero_share (`float`): share of the `"expressed"` sequence given to unexpressed genes.
        panel_share (`float`): probability of the `"panel"` rule when the rule is not given.
        random_share (`float`): probability of the `"random"` rule when the rule is not given.
        seed (`int`): base seed of the draws.
        gene_pool (`np.ndarray`, *optional*): the genes to draw unexpressed genes from (for example the genes seen
            in the training split); needed when `zero_share > 0` or `random_share > 0`.
        panel (`np.ndarray`, *optional*): the gene panel of the `"panel"` rule; needed when that rule is used.
    """

    num_bins: int = 50
    max_length: int = 1024
    zero_share: float = 0.0
    panel_share: float = 0.0
    random_share: float = 0.0
    seed: int = 0
    gene_pool: np.ndarray | None = None
    panel: np.ndarray | None = None

    def __post_init__(self):
        if not 0.0 <= self.zero_share < 1.0 or round(self.zero_share * self.max_length) >= self.max_length:
            raise ValueError(f"zero_share must be in [0, 1) and leave room for expressed genes, got {self.zero_share}")
        shares = (self.panel_share, self.random_share)
        if min(shares) < 0.0 or sum(shares) > 1.0:
            raise ValueError(f"panel_share and random_share must be >= 0 with a sum <= 1, got {shares}")
        for name in ("gene_pool", "panel"):
            if getattr(self, name) is not None:
                setattr(self, name, np.unique(np.asarray(getattr(self, name), dtype=np.int64)))
        if (self.zero_share > 0 or self.random_share > 0) and self.gene_pool is None:
            raise ValueError("zero_share > 0 and random_share > 0 need a gene_pool to draw genes from")
        if self.panel_share > 0 and self.panel is None:
            raise ValueError("panel_share > 0 needs a panel")

    def __call__(
        self,
        genes: np.ndarray,
        counts: np.ndarray,
        *,
        cell_id: str,
        epoch: int = 0,
        rule: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize one cell.

        Args:
            genes (`np.ndarray`): gene token ids of the cell's listed genes (unique).
            counts (`np.ndarray`): their raw counts (zeros allowed).
            cell_id (`str`): a stable id of the cell (Tahoe-100M: `BARCODE_SUB_LIB_ID`), seeds the draws.
            epoch (`int`): the training epoch, so each epoch draws another subsample.
            rule (`str`, *optional*): one of `SELECTION_RULES`; drawn with `panel_share` and `random_share` when
                None.

        Returns:
            `(gene_ids, input_ids)`: two int64 arrays of the same length, at most `max_length`.
        """
        where = f"cell {cell_id!r}"
        genes = np.asarray(genes, dtype=np.int64)
        if genes.ndim != 1 or genes.shape != np.shape(counts):
            raise ValueError(f"{where}: genes and counts differ in shape: {genes.shape} vs {np.shape(counts)}")
        _, repeated = repeated_genes(np.array([0, len(genes)]), genes)
        if len(repeated):
            raise ValueError(f"{where}: gene ids are repeated: {repeated[:10].tolist()}")
        check_counts(np.asarray(counts), where, genes)
        if not (np.asarray(counts) > 0).any():
            raise ValueError(f"{where}: the cell has no expressed genes")
        _, gene_ids, input_ids = self.select_batch(
            np.array([0, len(genes)]), genes, rank_tokens(counts, self.num_bins), [cell_id], epoch=epoch, rule=rule
        )
        return gene_ids, input_ids

    def rules_of(self, cell_ids: list[str], epoch: int = 0) -> np.ndarray:
        """The selection rule each cell draws (`panel_share`, `random_share`, else `"expressed"`)."""
        drawn = hash_keys(cell_salts(self.seed, epoch, cell_ids)[:, _STREAMS.index("rule")], 0) / 2**32
        rules = np.full(len(cell_ids), "expressed", dtype=object)
        rules[drawn < self.panel_share + self.random_share] = "random"
        rules[drawn < self.panel_share] = "panel"
        return rules

    def select_batch(
        self,
        offsets: np.ndarray,
        genes: np.ndarray,
        tokens: np.ndarray,
        cell_ids: list[str],
        *,
        epoch: int = 0,
        rule: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The sequences of many cells at once, each exactly what the cell gets alone: every rule, the one
        selection code of training, evaluation and the `Tahoe100MTokenized` builder.

        Args:
            offsets (`np.ndarray`): `(n_cells + 1,)` start of each cell in `genes` / `tokens`.
            genes (`np.ndarray`): the cells' listed gene ids, back to back.
            tokens (`np.ndarray`): their rank tokens from each whole cell (0 for listed zero counts).
            cell_ids (`list[str]`): the cells' ids.
            epoch, rule: as in `__call__`; with `rule=None` each cell draws its own.

        Returns:
            `(offsets, gene_ids, input_ids)` of the sequences, back to back.
        """
        if rule is not None and rule not in SELECTION_RULES:
            raise ValueError(f"rule must be one of {SELECTION_RULES}, got {rule!r}")
        salts = cell_salts(self.seed, epoch, cell_ids)
        rules = self.rules_of(cell_ids, epoch) if rule is None else np.full(len(cell_ids), rule, dtype=object)
        if (rules == "panel").any() and self.panel is None:
            raise ValueError("the panel rule needs CellTokenizer(panel=...)")
        if (rules == "random").any() and self.gene_pool is None:
            raise ValueError("the random rule needs CellTokenizer(gene_pool=...)")
        sizes = np.zeros(len(cell_ids), dtype=np.int64)
        listed = {}  # rule -> (its cells, their genes and tokens as (cells, k) matrices)
        for name, candidates in (("panel", self.panel), ("random", self.gene_pool)):
            cells = np.flatnonzero(rules == name)
            if len(cells):
                listed[name] = (cells, *self._listed(candidates, cells, offsets, genes, tokens, salts))
                sizes[cells] = listed[name][1].shape[1]
        expressed_cells = np.flatnonzero(rules == "expressed")
        if len(expressed_cells):  # their expressed genes, cell by cell
            cell_of = segment_ids(offsets)
            keep = (tokens > 0) & (rules[cell_of] == "expressed")
            per_cell = np.bincount(cell_of[keep], minlength=len(cell_ids))[expressed_cells]
            expressed = self._select_expressed(
                np.concatenate([[0], np.cumsum(per_cell)]), genes[keep], tokens[keep], salts[expressed_cells]
            )
            sizes[expressed_cells] = np.diff(expressed[0])
        out_offsets = np.concatenate([[0], np.cumsum(sizes)])
        out_genes = np.empty(out_offsets[-1], dtype=np.int64)
        out_tokens = np.empty(out_offsets[-1], dtype=np.int64)
        if len(expressed_cells):
            at = concatenated_ranges(out_offsets[expressed_cells], sizes[expressed_cells])
            out_genes[at], out_tokens[at] = expressed[1], expressed[2]
        for cells, listed_genes, listed_tokens in listed.values():
            at = concatenated_ranges(out_offsets[cells], sizes[cells])
            out_genes[at], out_tokens[at] = listed_genes.ravel(), listed_tokens.ravel()
        return out_offsets, out_genes, out_tokens

    def _select_expressed(self, offsets, genes, tokens, salts):
        n_zero = round(self.zero_share * self.max_length)
        sizes = np.diff(offsets)
        keys = hash_keys(np.repeat(salts[:, _STREAMS.index("expressed")], sizes), genes)
        kept = smallest_keys(offsets, keys, self.max_length - n_zero)
        gene_ids, input_ids = genes.take(kept), tokens.take(kept)
        kept_sizes = np.minimum(sizes, self.max_length - n_zero)
        if not n_zero:
            return np.concatenate([[0], np.cumsum(kept_sizes)]), gene_ids, input_ids
        zero_offsets, zeros = draw_unexpressed(
            salts[:, _STREAMS.index("zeros")], offsets, genes, self.gene_pool, n_zero
        )
        # Each sequence: its kept expressed genes in input order, then its zeros in draw order.
        zero_sizes = np.diff(zero_offsets)
        out_offsets = np.concatenate([[0], np.cumsum(kept_sizes + zero_sizes)])
        starts = out_offsets[:-1]
        expressed_at = concatenated_ranges(starts, kept_sizes)
        zeros_at = concatenated_ranges(starts + kept_sizes, zero_sizes)
        out_genes = np.empty(out_offsets[-1], dtype=gene_ids.dtype)
        out_tokens = np.zeros(out_offsets[-1], dtype=input_ids.dtype)
        out_genes[expressed_at], out_tokens[expressed_at] = gene_ids, input_ids
        out_genes[zeros_at] = zeros
        return out_offsets, out_genes, out_tokens

    def _listed(self, candidates, cells, offsets, genes, tokens, salts):
        """For each of `cells`: up to `max_length` of `candidates` (all when they fit, else those with the smallest
        hash keys under the cell's salt), in candidate order, each with its token in the cell (0 when the cell does
        not list it). Returns two `(len(cells), k)` matrices: genes and tokens."""
        if len(candidates) > self.max_length:
            keys = hash_keys(salts[cells, _STREAMS.index("panel"), None], candidates[None, :])
            threshold = np.partition(keys, self.max_length - 1, axis=1)[:, self.max_length - 1 : self.max_length]
            chosen = np.broadcast_to(candidates, keys.shape)[keys <= threshold].reshape(len(cells), self.max_length)
        else:
            chosen = np.broadcast_to(candidates, (len(cells), len(candidates)))
        # A dense (cell, gene) -> token table of these cells: one scatter and one gather, no search.
        cell_of = segment_ids(offsets)
        row_of = np.full(len(offsets) - 1, -1)
        row_of[cells] = np.arange(len(cells))
        mine = np.flatnonzero(row_of[cell_of] >= 0)
        table = np.zeros((len(cells), int(max(genes.max(initial=0), candidates.max())) + 1), dtype=np.int16)
        table[row_of[cell_of[mine]], genes[mine]] = tokens[mine]
        return chosen.copy(), np.take_along_axis(table, chosen, axis=1).astype(tokens.dtype)
