import sys

import pytest
import torch

from modeling import RankDiTConfig, RankDiTModel
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
    assert tiny_model.proj_out.weight.abs().max() == 0
    gene_ids, input_ids = _inputs(tiny_config)
    logits = tiny_model(gene_ids=gene_ids, input_ids=input_ids).logits
    torch.testing.assert_close(logits, torch.zeros_like(logits))


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
    modulation = sum(p.numel() for n, p in model.named_parameters() if "adaLN" in n)
    assert 68e6 < model.num_parameters() - modulation < 72e6
