import math

import pytest
import torch

from pipelines import MaskedRankDiffusionScheduler


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
    # By the formula: t_i = eps + (1 - eps) ((u + i / n) mod 1), u the generator's one uniform draw.
    eps = 0.3
    u = torch.rand((), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected = eps + (1 - eps) * torch.remainder(u + torch.arange(16, dtype=torch.float64) / 16, 1.0)
    got = MaskedRankDiffusionScheduler(eps=eps).sample_timesteps(16, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, expected.float())
    assert got.min() >= eps


def test_parts_of_a_global_batch_cover_each_global_stratum_once():
    scheduler = MaskedRankDiffusionScheduler()
    parts = [  # 2 processes x 2 accumulation steps of 4 cells, the last part short: one generator seed for all
        scheduler.sample_timesteps(
            4 if k < 3 else 3, generator=torch.Generator().manual_seed(7), first_stratum=4 * k, num_strata=16
        )  # fmt: skip
        for k in range(4)
    ]
    t = torch.cat(parts).double()
    strata = ((t - 1e-3) / (1 - 1e-3) * 16).floor().long()
    assert len(set(strata.tolist())) == 15 and strata.min() >= 0 and strata.max() <= 15  # 15 strata, once each
    with pytest.raises(ValueError, match="num_strata"):
        scheduler.sample_timesteps(4, first_stratum=14, num_strata=16)


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
    masked = MaskedRankDiffusionScheduler.random_mask(maskable, 0.5, generator=torch.Generator().manual_seed(0))
    assert masked.sum(1).tolist() == [5, 3, 5]
    assert not (masked & ~maskable).any()
    with pytest.raises(ValueError, match="share"):
        MaskedRankDiffusionScheduler.random_mask(maskable, 0.0)


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


def _uniform_logits(sample, num_classes=11):
    return torch.zeros(*sample.shape, num_classes)


def test_set_timesteps_runs_from_one_towards_zero():
    scheduler = MaskedRankDiffusionScheduler(num_rank_bins=10)
    scheduler.set_timesteps(4)
    torch.testing.assert_close(scheduler.timesteps, torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64))
    with pytest.raises(ValueError, match="sampler must be one of"):
        scheduler.set_timesteps(4, sampler="greedy")


@pytest.mark.parametrize("sampler", ["ancestral", "first-hitting", "confidence"])
def test_step_fills_only_masked_positions_with_valid_ranks(sampler):
    scheduler = MaskedRankDiffusionScheduler(num_rank_bins=10, sampler=sampler)
    scheduler.set_timesteps(5)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randint(0, 11, (6, 40), generator=generator)
    masked = torch.rand(6, 40, generator=generator) < 0.5
    sample[masked] = 11
    logits = torch.randn(6, 40, 11, generator=generator)
    out = scheduler.step(logits, scheduler.timesteps[1], sample, generator=generator)
    assert torch.equal(out.prev_sample[~masked], sample[~masked])
    revealed = masked & (out.prev_sample != 11)
    assert revealed.any() and out.prev_sample[revealed].max() <= 10
    assert torch.equal(out.pred_original_sample[masked], logits.argmax(-1)[masked])
    assert torch.equal(out.pred_original_sample[~masked], sample[~masked])  # visible tokens carried over (SUBS)


@pytest.mark.parametrize("schedule", ["log-linear", "cosine"])
def test_ancestral_reveals_the_share_the_schedule_says(schedule):
    scheduler = MaskedRankDiffusionScheduler(num_rank_bins=10, noise_schedule=schedule)
    scheduler.set_timesteps(8)
    generator = torch.Generator().manual_seed(0)
    sample = torch.full((50, 400), 11)
    for t, s in zip(scheduler.timesteps, [*scheduler.timesteps[1:], torch.tensor(0.0)]):
        masked = sample == 11
        out = scheduler.step(_uniform_logits(sample), t, sample, generator=generator)
        revealed = (masked & (out.prev_sample != 11)).sum().item() / masked.sum().item()
        expected = 1 - scheduler.mask_probability(s.double()) / scheduler.mask_probability(t.double())
        assert abs(revealed - float(expected)) < 0.01 + 0.05 * float(expected)
        sample = out.prev_sample
    assert not (sample == 11).any()


def test_first_hitting_reveals_one_token_at_the_next_hitting_time():
    scheduler = MaskedRankDiffusionScheduler(num_rank_bins=10, sampler="first-hitting")
    scheduler.set_timesteps(1)
    sample = torch.full((4000, 3), 11)
    t = torch.full((4000,), 0.8, dtype=torch.float64)
    out = scheduler.step(_uniform_logits(sample), t, sample, generator=torch.Generator().manual_seed(0))
    assert torch.equal((out.prev_sample != 11).sum(dim=1), torch.ones(4000, dtype=torch.long))
    # log-linear: s = t u^(1/n), so (s / t)^n is uniform on (0, 1).
    u = (out.prev_timestep / 0.8) ** 3
    assert abs(u.mean().item() - 0.5) < 0.02 and abs((u < 0.25).double().mean().item() - 0.25) < 0.02


def test_confidence_reveals_the_most_likely_values_first():
    scheduler = MaskedRankDiffusionScheduler(num_rank_bins=10, sampler="confidence")
    scheduler.set_timesteps(2)
    sample = torch.full((1, 4), 11)
    logits = torch.full((1, 4, 11), -5.0)
    logits[0, torch.arange(4), torch.tensor([3, 7, 1, 9])] = torch.tensor([1.0, 8.0, 2.0, 6.0])
    out = scheduler.step(logits, scheduler.timesteps[0], sample)
    assert out.prev_sample.tolist() == [[11, 7, 11, 9]]  # half revealed at t = 1 -> 0.5, the two most confident
    out = scheduler.step(logits, scheduler.timesteps[1], out.prev_sample)
    assert out.prev_sample.tolist() == [[3, 7, 1, 9]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    scheduler = MaskedRankDiffusionScheduler(num_rank_bins=3)
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    probs = scheduler.sampling_distribution(logits, top_p=0.7)
    torch.testing.assert_close(probs, torch.tensor([0.625, 0.375, 0.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="temperature"):
        scheduler.sampling_distribution(logits, temperature=0.0)


def test_a_per_call_sampler_does_not_stick_and_float_noise_does_not_stall_a_step():
    scheduler = MaskedRankDiffusionScheduler(num_rank_bins=10)
    scheduler.set_timesteps(100, sampler="confidence")
    assert scheduler.sampler == "confidence"
    scheduler.set_timesteps(100)
    assert scheduler.sampler == "ancestral"
    t = scheduler.timesteps[1]
    for noisy in (t, t.float(), t + 1e-9, t - 1e-9):
        assert scheduler._next_time(noisy.reshape(1)).item() == pytest.approx(0.98)


def test_keyed_draws_are_splitmix64_and_uniform():
    from pipelines.scheduling_masked_rank_diffusion import keyed_uniforms, splitmix64

    def reference(x):  # splitmix64 in plain Python integers, modulo 2^64
        m = 2**64
        z = (x + 0x9E3779B97F4A7C15) % m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % m
        return z ^ (z >> 31)

    keys = [0, 1, 12345, -1, 2**62 + 7, -(2**63)]
    mixed = splitmix64(torch.tensor(keys)).tolist()
    assert [m % 2**64 for m in mixed] == [reference(k % 2**64) for k in keys]
    u = keyed_uniforms(torch.arange(200_000))
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.003
    assert abs((u < 0.1).double().mean().item() - 0.1) < 0.003


def test_a_run_is_a_plain_loop_over_the_scheduler():
    scheduler = MaskedRankDiffusionScheduler(num_rank_bins=10, sampler="first-hitting")
    scheduler.set_timesteps(4)
    sample = torch.full((3, 6), 11)
    sample[0, :4] = 2  # rows with 2, 6 and 6 masked genes
    scheduler.begin(sample, seeds=torch.tensor([1, 2, 3]))
    assert len(scheduler) == 6 and torch.equal(scheduler.row_times, torch.ones(3, dtype=torch.float64))
    for _ in range(len(scheduler)):
        sample = scheduler.step(_uniform_logits(sample), scheduler.row_times, sample).prev_sample
    assert not (sample == 11).any() and scheduler.step_index == 6
    scheduler.set_timesteps(5, sampler="ancestral")
    assert len(scheduler) == 5
