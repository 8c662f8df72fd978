import math

import pytest
import torch

from pipelines import MaskedRankDiffusionScheduler
from training.loss import masked_nelbo, masked_ordinal, ordinal_term

PROBS = torch.tensor([0.5, 0.5, 0.0, 0.0])  # B = 3


@pytest.mark.parametrize(
    ("kind", "target", "value", "gradient"),
    [
        # E_p[k] = 0.5: |0.5 - 3| / 3; d/dp_k = sign(E - k_true) k / B
        ("mean_matching", 3, 2.5 / 3, [0.0, -1 / 3, -2 / 3, -1.0]),
        ("mean_matching", 0, 0.5 / 3, [0.0, 1 / 3, 2 / 3, 1.0]),
        # F = [0.5, 1, 1] below the last rank, 1[k >= 3] = [0, 0, 0]: (0.25 + 1 + 1) / 3;
        # d/dp_j = 2 sum_{k >= j} (F(k) - O(k)) / B
        ("rps", 3, 2.25 / 3, [5 / 3, 4 / 3, 2 / 3, 0.0]),
        # 1[k >= 1] = [0, 1, 1]: (0.25 + 0 + 0) / 3
        ("rps", 1, 0.25 / 3, [1 / 3, 0.0, 0.0, 0.0]),
    ],
)
def test_ordinal_terms_and_their_gradients_by_hand(kind, target, value, gradient):
    probs = PROBS.clone().requires_grad_(True)
    result = ordinal_term(probs, torch.tensor(target), kind)
    result.backward()
    torch.testing.assert_close(result, torch.tensor(value))
    torch.testing.assert_close(probs.grad, torch.tensor(gradient))


def test_ordinal_terms_charge_near_misses_less_and_a_point_mass_on_the_truth_nothing():
    for kind in ("mean_matching", "rps"):
        point = torch.nn.functional.one_hot(torch.tensor(4), 11).float()
        assert ordinal_term(point, torch.tensor(4), kind) == 0
        near, far = ordinal_term(point, torch.tensor(5), kind), ordinal_term(point, torch.tensor(9), kind)
        assert 0 < near < far


def test_masked_ordinal_counts_masked_tokens_only_and_follows_the_time_weighting():
    scheduler = MaskedRankDiffusionScheduler(num_rank_bins=3)
    logits = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 4, (2, 5), generator=torch.Generator().manual_seed(1))
    masked = torch.tensor([[True, False, True, False, False], [False, False, False, False, True]])
    t = torch.tensor([0.5, 0.25])
    per_token = ordinal_term(torch.softmax(logits, -1), target, "rps")
    plain = masked_ordinal(logits, target, masked, t, scheduler, "rps", time_weighting="none")
    torch.testing.assert_close(plain, per_token[masked].sum())
    weighted = masked_ordinal(logits, target, masked, t, scheduler, "rps", time_weighting="nelbo")
    torch.testing.assert_close(weighted, (per_token * masked / t[:, None]).sum())
    assert masked_nelbo(logits, target, torch.zeros_like(masked), t, scheduler) == 0
    with pytest.raises(ValueError, match="ordinal term"):
        ordinal_term(PROBS, torch.tensor(1), "hinge")


@pytest.mark.parametrize(
    ("schedule", "weights"),
    [
        # log-linear: -alpha'(t) / (1 - alpha(t)) = (1 - eps) / ((1 - eps) t) = 1 / t
        ("log-linear", [1 / 0.5, 1 / 0.25]),
        # cosine: (1 - eps)(pi / 2) sin(pi t / 2) / ((1 - eps)(1 - cos(pi t / 2)))
        ("cosine", [(math.pi / 2) * math.sin(math.pi / 4) / (1 - math.cos(math.pi / 4)),
                    (math.pi / 2) * math.sin(math.pi / 8) / (1 - math.cos(math.pi / 8))]),
    ],
)  # fmt: skip
def test_masked_nelbo_by_hand(schedule, weights):
    # eps = 0.1, so a weight of 1 / (1 - alpha(t)) instead of -alpha'(t) / (1 - alpha(t)) is off by 10% or more.
    scheduler = MaskedRankDiffusionScheduler(num_rank_bins=2, noise_schedule=schedule, eps=0.1)
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]], [[0.2, 0.2, 0.6], [0.7, 0.2, 0.1]]]))
    target = torch.tensor([[0, 2], [2, 1]])
    masked = torch.tensor([[True, True], [False, True]])
    expected = (-math.log(0.5) - math.log(0.3)) * weights[0] - math.log(0.2) * weights[1]
    nelbo = masked_nelbo(logits, target, masked, torch.tensor([0.5, 0.25]), scheduler)
    assert nelbo.item() == pytest.approx(expected, rel=1e-5)
