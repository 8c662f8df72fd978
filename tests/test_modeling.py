import re
import sys

import pytest
import torch

from modeling import RankDiTConfig, RankDiTModel
from modeling.modeling_rank_dit import equal_head_sizes, key_padding_mask
from tests.conftest import REPO, randomize_zero_init


def _inputs(config, batch=2, length=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    gene_ids = torch.randint(3, config.gene_vocab_size, (batch, length), generator=generator)
    input_ids = torch.randint(0, config.mask_token_id + 1, (batch, length), generator=generator)
    return gene_ids, input_ids


def test_logits_cover_rank_tokens_only(tiny_model, tiny_config):
    gene_ids, input_ids = _inputs(tiny_config)
    logits = tiny_model(gene_ids=gene_ids, input_ids=input_ids).logits
    assert logits.shape == (2, 12, tiny_config.num_rank_bins + 1)
    assert logits.dtype == torch.float32


def test_fresh_model_starts_uniform_with_zero_gates(tiny_model, tiny_config):
    for block in tiny_model.blocks:
        assert block.adaLN_modulation.weight.abs().max() == 0 and block.adaLN_modulation.bias.abs().max() == 0
    assert tiny_model.proj_out.weight.abs().max() == 0 and tiny_model.gene_prior.weight.abs().max() == 0
    assert tiny_model.copy_head.query.weight.abs().max() == 0
    gene_ids, input_ids = _inputs(tiny_config)
    no_copy = RankDiTModel(RankDiTConfig(**{**tiny_config.to_dict(), "copy_head": False}))
    assert RankDiTModel(RankDiTConfig.from_preset("tiny", gene_vocab_size=200)).copy_head is None  # off by default
    logits = no_copy(gene_ids=gene_ids, input_ids=input_ids).logits
    torch.testing.assert_close(logits, torch.zeros_like(logits))
    # With the copy head, every visible position and the generate slot weigh the same at first.
    probs = tiny_model(gene_ids=gene_ids, input_ids=input_ids).logits.exp()
    visible = input_ids != tiny_config.mask_token_id
    one_hot = torch.nn.functional.one_hot(input_ids.clamp(max=10), 11).float() * visible[..., None]
    expected = (one_hot.sum(1, keepdim=True) + 1 / 11) / (visible.sum(1)[:, None, None] + 1)
    torch.testing.assert_close(probs, expected.expand_as(probs))


def test_copy_head_mixes_visible_tokens_and_the_generated_distribution(tiny_model, tiny_config):
    model = randomize_zero_init(tiny_model)
    gene_ids, input_ids = _inputs(tiny_config, length=16)
    input_ids[:, :8] = tiny_config.mask_token_id
    input_ids[:, 8:] = 4  # every visible position holds token 4
    probs = model(gene_ids=gene_ids, input_ids=input_ids).logits.exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 16))
    model.copy_head = None
    generated = model(gene_ids=gene_ids, input_ids=input_ids).logits.softmax(-1)
    # Tokens other than 4 get only the generate slot's share of the generated distribution: p = w * q, w in (0, 1).
    share = probs[..., [0, 1, 2, 3, 5, 6]] / generated[..., [0, 1, 2, 3, 5, 6]]
    torch.testing.assert_close(share, share[..., :1].expand_as(share))
    assert ((share > 0) & (share < 1)).all() and (probs[..., 4] > generated[..., 4]).all()
    all_masked = torch.full_like(input_ids, tiny_config.mask_token_id)  # nothing to copy: all generated
    model.copy_head = RankDiTModel(tiny_config).copy_head
    torch.testing.assert_close(
        model(gene_ids=gene_ids, input_ids=all_masked).logits.exp(), generated_for(model, gene_ids, all_masked)
    )


def generated_for(model, gene_ids, input_ids):
    copy_head, model.copy_head = model.copy_head, None
    probs = model(gene_ids=gene_ids, input_ids=input_ids).logits.softmax(-1)
    model.copy_head = copy_head
    return probs


def test_gene_prior_starts_at_given_marginals_and_cell_profile_sees_the_visible_tokens(tiny_config):
    config = RankDiTConfig(**{**tiny_config.to_dict(), "copy_head": False})
    model = RankDiTModel(config)
    generator = torch.Generator().manual_seed(0)
    marginals = torch.rand(config.gene_vocab_size, 11, generator=generator, dtype=torch.float64) + 0.01
    marginals /= marginals.sum(-1, keepdim=True)
    model.init_gene_prior(marginals)
    gene_ids, input_ids = _inputs(config)
    probs = model(gene_ids=gene_ids, input_ids=input_ids).logits.softmax(-1)
    torch.testing.assert_close(probs, marginals[gene_ids].float())
    with pytest.raises(ValueError, match="shape"):
        model.init_gene_prior(marginals[:5])
    # The profile of visible tokens reaches every position through the conditioning.
    model = randomize_zero_init(model)
    other = input_ids.clone()
    other[:, -1] = (input_ids[:, -1] + 3) % 11
    changed = model(gene_ids=gene_ids, input_ids=other).logits - model(gene_ids=gene_ids, input_ids=input_ids).logits
    assert changed[:, 0].abs().max() > 1e-4
    model.cell_profile = None
    model.blocks = model.blocks[:0]  # without attention blocks, only the profile links positions
    changed = model(gene_ids=gene_ids, input_ids=other).logits - model(gene_ids=gene_ids, input_ids=input_ids).logits
    assert changed[:, 0].abs().max() == 0


def test_a_config_saved_without_the_heads_loads_without_them(tiny_model, tmp_path):
    # Checkpoints from before the cell profile, gene prior and copy head must predict as they were trained.
    config = tiny_model.config.to_dict()
    for name in ("cell_profile", "gene_prior", "copy_head"):
        config.pop(name)
    loaded = RankDiTConfig.from_dict(config)
    assert not (loaded.cell_profile or loaded.gene_prior or loaded.copy_head)
    model = RankDiTModel(loaded)
    assert model.cell_profile is None and model.gene_prior is None and model.copy_head is None


def test_copy_head_runs_in_bfloat16_weights(tiny_model, tiny_config):
    model = randomize_zero_init(tiny_model).to(torch.bfloat16)
    gene_ids, input_ids = _inputs(tiny_config)
    logits = model(gene_ids=gene_ids, input_ids=input_ids).logits
    assert logits.dtype == torch.float32 and torch.allclose(logits.exp().sum(-1), torch.ones(2, 12), atol=1e-4)


def test_gene_embedding_starts_at_given_vectors(tiny_model, tiny_config):
    vectors = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)).numpy()
    before = tiny_model.gene_embedding.weight.clone()
    tiny_model.init_gene_embedding([7, 9, 11], vectors)
    after = tiny_model.gene_embedding.weight
    scaled = torch.from_numpy(vectors) / torch.from_numpy(vectors).std() * tiny_config.initializer_range
    torch.testing.assert_close(after[[7, 9, 11], :5], scaled.float())
    torch.testing.assert_close(after[[7, 9, 11], 5:], before[[7, 9, 11], 5:])
    torch.testing.assert_close(after[8], before[8])
    with pytest.raises(ValueError, match="vectors must be"):
        tiny_model.init_gene_embedding([7], vectors)


def test_loading_restores_every_weight_without_reinitialising(tiny_model, tmp_path):
    # post_init must not re-zero gates and head that were trained away from zero.
    trained = randomize_zero_init(tiny_model)
    trained.save_pretrained(tmp_path)
    loaded = RankDiTModel.from_pretrained(tmp_path)
    expected = dict(trained.named_parameters())
    for name, parameter in loaded.named_parameters():
        torch.testing.assert_close(parameter, expected[name], msg=name)


def test_modeling_files_import_only_torch_numpy_and_transformers():
    from transformers.dynamic_module_utils import get_imports

    for path in (REPO / "modeling").glob("*.py"):
        if path.name != "__init__.py":
            third_party = set(get_imports(path)) - set(sys.stdlib_module_names) - {"__future__"}
            assert third_party <= {"torch", "numpy", "transformers"}, (path.name, third_party)


def test_permutation_equivariance(tiny_model, tiny_config):
    model = randomize_zero_init(tiny_model)
    gene_ids, input_ids = _inputs(tiny_config, length=16)
    permutation = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    logits = model(gene_ids=gene_ids, input_ids=input_ids).logits
    permuted = model(gene_ids=gene_ids[:, permutation], input_ids=input_ids[:, permutation]).logits
    torch.testing.assert_close(permuted, logits[:, permutation], atol=1e-5, rtol=1e-5)


def test_attention_is_bidirectional(tiny_model, tiny_config):
    model = randomize_zero_init(tiny_model)
    gene_ids, input_ids = _inputs(tiny_config, batch=1)
    changed = input_ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % tiny_config.num_rank_tokens
    first = model(gene_ids=gene_ids, input_ids=input_ids).logits[0, 0]
    assert not torch.allclose(first, model(gene_ids=gene_ids, input_ids=changed).logits[0, 0])


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_padding_does_not_change_real_positions(tiny_config, attn_implementation):
    torch.manual_seed(0)
    model = randomize_zero_init(RankDiTModel(tiny_config)).eval()
    model.set_attn_implementation(attn_implementation)
    gene_ids, input_ids = _inputs(tiny_config, batch=1, length=10)
    alone = model(gene_ids=gene_ids, input_ids=input_ids).logits
    padded_genes = torch.cat([gene_ids, torch.randint(3, 200, (1, 6))], dim=1)
    padded_tokens = torch.cat([input_ids, torch.randint(0, 11, (1, 6))], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 6)], dim=1).long()
    padded = model(gene_ids=padded_genes, input_ids=padded_tokens, attention_mask=mask).logits
    torch.testing.assert_close(padded[:, :10], alone, atol=1e-5, rtol=1e-5)


def test_the_key_padding_mask_hides_padded_keys_from_every_query():
    attention_mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    mask = key_padding_mask(attention_mask)
    assert mask.shape == (2, 1, 1, 3) and mask.dtype == torch.bool
    assert mask[:, 0, 0].tolist() == [[True, True, False], [True, False, False]]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_padding_of_other_lengths_in_one_batch(tiny_config, attn_implementation):
    torch.manual_seed(0)
    model = randomize_zero_init(RankDiTModel(tiny_config)).eval()
    model.set_attn_implementation(attn_implementation)
    gene_ids, input_ids = _inputs(tiny_config, batch=2, length=12)
    mask = torch.tensor([[1] * 12, [1] * 7 + [0] * 5])
    batch = model(gene_ids=gene_ids, input_ids=input_ids, attention_mask=mask).logits
    short = model(gene_ids=gene_ids[1:, :7], input_ids=input_ids[1:, :7]).logits
    torch.testing.assert_close(batch[1:, :7], short, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[:1], model(gene_ids=gene_ids[:1], input_ids=input_ids[:1]).logits)


def test_ids_are_checked_at_attended_positions_only_and_on_every_device(tiny_model, tiny_config, monkeypatch):
    gene_ids, input_ids = _inputs(tiny_config, batch=1, length=8)
    mask = torch.tensor([[1] * 6 + [0] * 2])
    left_out, anything = gene_ids.clone(), input_ids.clone()
    left_out[0, 6], left_out[0, 7], anything[0, 7] = -1, 10_000, -100  # unattended: a left-out gene, any value
    torch.testing.assert_close(
        tiny_model(gene_ids=left_out, input_ids=anything, attention_mask=mask).logits[:, :6],
        tiny_model(gene_ids=gene_ids, input_ids=input_ids, attention_mask=mask).logits[:, :6],
    )
    attended = gene_ids.clone()
    attended[0, 2] = -1
    with pytest.raises(ValueError, match=r"gene_ids must be in 0..199; got -1 at \(row 0, position 2\)"):
        tiny_model(gene_ids=attended, input_ids=input_ids, attention_mask=mask)
    # On an accelerator (or compiled) the same check is a device-side assertion, which on the host raises at once.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(RuntimeError, match="gene_ids must be in 0..199 at every attended position"):
        tiny_model(gene_ids=attended, input_ids=input_ids, attention_mask=mask)


def test_time_conditioning_uses_timesteps(tiny_config):
    config = RankDiTConfig.from_preset("tiny", num_rank_bins=10, gene_vocab_size=200, time_conditioning=True)
    model = randomize_zero_init(RankDiTModel(config)).eval()
    gene_ids, input_ids = _inputs(config)
    with pytest.raises(ValueError, match="timesteps"):
        model(gene_ids=gene_ids, input_ids=input_ids)
    early = model(gene_ids=gene_ids, input_ids=input_ids, timesteps=torch.tensor([0.1, 0.1])).logits
    late = model(gene_ids=gene_ids, input_ids=input_ids, timesteps=torch.tensor([0.9, 0.9])).logits
    assert not torch.allclose(early, late)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gene_ids": 200}, r"gene_ids must be in 0\.\.199; got 200 at \(row 1, position 4\)"),
        ({"input_ids": 12}, r"input_ids must be in 0\.\.11; got 12 at \(row 1, position 4\)"),
        ({"input_ids": -1}, r"input_ids must be in 0\.\.11; got -1"),
    ],
)
def test_bad_ids_are_named(tiny_model, tiny_config, change, message):
    gene_ids, input_ids = _inputs(tiny_config)
    inputs = {"gene_ids": gene_ids, "input_ids": input_ids}
    ((name, value),) = change.items()
    inputs[name][1, 4] = value
    with pytest.raises(ValueError, match=message):
        tiny_model(**inputs)


def test_shape_mismatches_are_named(tiny_model, tiny_config):
    gene_ids, input_ids = _inputs(tiny_config)
    with pytest.raises(ValueError, match="gene_ids and input_ids"):
        tiny_model(gene_ids=gene_ids[:, :5], input_ids=input_ids)
    with pytest.raises(ValueError, match="attention_mask"):
        tiny_model(gene_ids=gene_ids, input_ids=input_ids, attention_mask=torch.ones(2, 3))
    for name, bad, message in (
        ("timesteps", torch.tensor([0.5, float("nan")]), "timesteps must be times in [0, 1]; got nan at row 1"),
        ("timesteps", torch.tensor([0.5, 5.0]), "timesteps must be times in [0, 1]; got 5.0 at row 1"),
        ("gene_ids", gene_ids.tolist(), "gene_ids must be a torch.LongTensor (batch, length), got list"),
        ("input_ids", input_ids.float(), "input_ids must be an integer tensor, got torch.float32"),
    ):
        with pytest.raises((ValueError, TypeError), match=re.escape(message)):
            tiny_model(**{"gene_ids": gene_ids, "input_ids": input_ids, name: bad})
    for rows, length in ((0, 5), (2, 0)):
        with pytest.raises(ValueError, match=f"at least one cell of at least one gene, got \\({rows}, {length}\\)"):
            tiny_model(gene_ids=gene_ids[:rows, :length], input_ids=input_ids[:rows, :length])
    for timesteps in (torch.zeros(3), torch.zeros(2, 8), torch.tensor(0.5)):
        with pytest.raises(
            ValueError,
            match=re.escape(f"timesteps must be a tensor of shape (batch,) = (2,), got {tuple(timesteps.shape)}"),
        ):
            tiny_model(gene_ids=gene_ids, input_ids=input_ids, timesteps=timesteps)


def test_config_validation():
    with pytest.raises(ValueError, match="mask_token_id"):
        RankDiTConfig(num_rank_bins=10, mask_token_id=5)
    with pytest.raises(ValueError, match="did you mean 'hidden_size'"):
        RankDiTConfig(hiden_size=32)
    with pytest.raises(ValueError, match="divisible"):
        RankDiTConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="num_attention_heads must be positive"):
        RankDiTConfig(num_attention_heads=0)
    with pytest.raises(ValueError, match="unknown preset"):
        RankDiTConfig.from_preset("huge")
    assert RankDiTConfig().mask_token_id == 51 and RankDiTConfig().num_rank_tokens == 51


def test_base_preset_is_the_mosaicfm_70m_backbone():
    with torch.device("meta"):
        model = RankDiTModel(RankDiTConfig.from_preset("base"))
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers) == (512, 12)
    # Beside the backbone: adaLN modulation, the cell profile, the per-gene prior and the copy head.
    extras = ("adaLN", "cell_profile", "gene_prior", "copy_head")
    added = sum(p.numel() for n, p in model.named_parameters() if any(part in n for part in extras))
    assert 68e6 < model.num_parameters() - added < 72e6


@pytest.mark.parametrize("widths", [(66, 53), (12, 40)])
def test_attention_padded_to_one_head_size_is_the_same_attention(widths):
    # The copy head's queries and keys (width q) and its values (width v) padded to one width for SDPA's fused
    # kernel: the scores and, up to the value's width, the outputs are those of the unpadded attention.
    from torch.nn import functional as F

    q_width, v_width = widths
    generator = torch.Generator().manual_seed(0)
    query, key = (torch.randn(2, 1, 9, q_width, generator=generator) for _ in range(2))
    value = torch.randn(2, 1, 9, v_width, generator=generator)
    mask = torch.rand(2, 1, 1, 9, generator=generator) > 0.3
    mask[..., 0] = True
    padded = equal_head_sizes(query, key, value)
    assert {t.shape[-1] for t in padded} == {max(widths)}
    out = F.scaled_dot_product_attention(*padded, attn_mask=mask, scale=q_width**-0.5)[..., :v_width]
    scores = (query @ key.transpose(-1, -2) * q_width**-0.5).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(out, scores.softmax(-1) @ value)
