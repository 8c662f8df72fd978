import math

import pytest
import torch

from pipelines import MaskedRankDiffusionScheduler, mask_random_share


@pytest.mark.parametrize("schedule", ["log-linear", "cosine"])
def test_alpha_runs_from_one_to_eps(schedule):
    scheduler = MaskedRankDiffusionScheduler(noise_schedule=schedule)
    alpha = scheduler.alpha(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(alpha, torch.tensor([1.0, 1e-3]))


@pytest.mark.parametrize("schedule", ["log-linear", "cosine"])
def test_mask_probability_is_one_minus_alpha_and_stable_near_zero(schedule):
    scheduler = MaskedRankDiffusionScheduler(noise_schedule=schedule)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(scheduler.mask_probability(t), 1 - scheduler.alpha(t))
    # In float32, 1 - alpha(t) loses most digits at t = eps for the cosine schedule; mask_probability does not.
    small = torch.tensor([1e-3])
    exact = scheduler.mask_probability(small.double()).float()
    torch.testing.assert_close(scheduler.mask_probability(small), exact, rtol=1e-6, atol=0)


def test_log_linear_loss_weight_is_one_over_t():
    scheduler = MaskedRankDiffusionScheduler()
    t = torch.tensor([0.01, 0.25, 0.5, 1.0])
    torch.testing.assert_close(scheduler.loss_weight(t), 1.0 / t)


@pytest.mark.parametrize("schedule", ["log-linear", "cosine"])
def test_loss_weight_matches_the_derivative_of_alpha(schedule):
    scheduler = MaskedRankDiffusionScheduler(noise_schedule=schedule)
    t = torch.tensor([0.1, 0.4, 0.8], dtype=torch.float64)
    h = 1e-6
    derivative = (scheduler.alpha(t + h) - scheduler.alpha(t - h)) / (2 * h)
    expected = -derivative / (1 - scheduler.alpha(t))
    torch.testing.assert_close(scheduler.loss_weight(t), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("schedule", ["log-linear", "cosine"])
def test_time_at_alpha_inverts_alpha(schedule):
    scheduler = MaskedRankDiffusionScheduler(noise_schedule=schedule)
    for alpha in (0.9, 0.5, 0.05):
        t = scheduler.time_at_alpha(alpha)
        assert math.isclose(scheduler.alpha(torch.tensor(t, dtype=torch.float64)).item(), alpha, rel_tol=1e-9)


def test_stratified_timesteps_cover_each_stratum_once():
    scheduler = MaskedRankDiffusionScheduler()
    t = scheduler.sample_timesteps(16, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 1e-3 and t.max() <= 1.0
    strata = ((t.double() - 1e-3) / (1 - 1e-3) * 16).floor().long()
    assert sorted(strata.tolist()) == list(range(16))


def test_add_noise_masks_at_the_scheduled_rate_and_never_padding():
    scheduler = MaskedRankDiffusionScheduler(num_rank_bins=10)
    clean = torch.randint(0, 11, (4, 20000))
    t = torch.tensor([0.1, 0.3, 0.6, 0.95])
    maskable = torch.ones_like(clean, dtype=torch.bool)
    maskable[:, -5000:] = False
    noisy = scheduler.add_noise(clean, t, generator=torch.Generator().manual_seed(0), maskable=maskable)
    masked = noisy == 11
    assert not masked[:, -5000:].any()
    torch.testing.assert_close(masked[:, :-5000].float().mean(1), 1 - scheduler.alpha(t), atol=0.01, rtol=0)
    assert torch.equal(noisy[~masked], clean[~masked])
    with pytest.raises(ValueError, match="timesteps"):
        scheduler.add_noise(clean, t[:2])


def test_mask_random_share_is_exact_per_row():
    maskable = torch.ones(3, 10, dtype=torch.bool)
    maskable[1, 6:] = False
    masked = mask_random_share(maskable, 0.5, generator=torch.Generator().manual_seed(0))
    assert masked.sum(1).tolist() == [5, 3, 5]
    assert not (masked & ~maskable).any()
    with pytest.raises(ValueError, match="share"):
        mask_random_share(maskable, 0.0)


def test_config_round_trip_and_model_check(tmp_path, tiny_config):
    scheduler = MaskedRankDiffusionScheduler(num_rank_bins=10, noise_schedule="cosine")
    scheduler.save_pretrained(tmp_path)
    loaded = MaskedRankDiffusionScheduler.from_pretrained(tmp_path)
    assert loaded.config.mask_token_id == 11 and loaded.config.noise_schedule == "cosine"
    loaded.check_model_config(tiny_config)
    with pytest.raises(ValueError, match="num_rank_bins"):
        MaskedRankDiffusionScheduler(num_rank_bins=50).check_model_config(tiny_config)
    with pytest.raises(ValueError, match="mask_token_id"):
        MaskedRankDiffusionScheduler(num_rank_bins=10, mask_token_id=3)
    with pytest.raises(ValueError, match="noise_schedule"):
        MaskedRankDiffusionScheduler(noise_schedule="linear")
