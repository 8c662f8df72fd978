import os
import sys
import tempfile
from pathlib import Path

# Offline, with every cache in a temporary folder (importing diffusers writes a torch inductor cache).
_CACHE = tempfile.mkdtemp(prefix="rankdiff-test-cache-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_CACHE, "inductor"))
os.environ.setdefault("HF_HOME", os.path.join(_CACHE, "hf"))

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fractions import Fraction  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from modeling import RankDiTConfig, RankDiTModel  # noqa: E402


@pytest.fixture
def tiny_config() -> RankDiTConfig:
    """The tiny preset with the heads `train_hf.py` trains with (cell profile, gene prior, copy head)."""
    return RankDiTConfig.from_preset(
        "tiny",
        num_rank_bins=10,
        gene_vocab_size=200,
        max_length=64,
        cell_profile=True,
        gene_prior=True,
        copy_head=True,
    )


@pytest.fixture
def tiny_model(tiny_config) -> RankDiTModel:
    torch.manual_seed(0)
    return RankDiTModel(tiny_config).eval()


def randomize_zero_init(model: RankDiTModel) -> RankDiTModel:
    """Give the zero-initialised modulations, head, copy query, gene prior, reference embedding and gene condition
    random weights, so outputs depend on the inputs."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            zero_init = ("adaLN", "proj_out", "copy_head", "gene_prior", "reference_embedding", "gene_condition.out")
            if any(part in name for part in zero_init):
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def exact_tokens(counts, num_bins: int, reference=None) -> list[int]:
    """The rank rule in exact rational arithmetic, one cell at a time: the edges sit at positions k (n - 1) / (B - 1)
    of the sorted non-zero counts (of `reference` when given), and a count gets 1 + the number of edges below it, at
    most B. The independent reference the vectorised rule is held against."""
    nonzero = sorted(int(c) for c in (counts if reference is None else reference) if c > 0)
    n = len(nonzero)
    edges = []
    for k in range(num_bins):
        position = Fraction(k * (n - 1), max(num_bins - 1, 1))
        low = int(position)
        high = min(low + 1, n - 1)
        edges.append(nonzero[low] + (nonzero[high] - nonzero[low]) * (position - low))
    token = {c: min(sum(e < c for e in edges) + 1, num_bins) for c in set(np.asarray(counts).tolist()) if c > 0}
    return [token.get(c, 0) for c in np.asarray(counts).tolist()]
