"""The training fast path: activation checkpointing and (on CUDA) bf16, the SDPA kernels,
fused AdamW and torch.compile. The CUDA tests run where a GPU is (`benchmarks/gpu_check.sh`)."""

import pytest
import torch
from conftest import randomize_zero_init

import train_hf
from modeling import RankDiTConfig, RankDiTModel

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run benchmarks/gpu_check.sh)")


def _inputs(config, batch=3, length=40, padded=True, device="cpu"):
    generator = torch.Generator().manual_seed(0)
    gene_ids = torch.randint(3, config.gene_vocab_size, (batch, length), generator=generator)
    input_ids = torch.randint(0, config.mask_token_id + 1, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    if padded:
        attention_mask[1, length // 2 :] = 0
    inputs = {"gene_ids": gene_ids, "input_ids": input_ids, "attention_mask": attention_mask}
    return {name: tensor.to(device) for name, tensor in inputs.items()}


def _gradients(model, inputs):
    model.zero_grad()
    logits = model(**inputs).logits
    (logits.float().logsumexp(-1) * inputs["attention_mask"]).sum().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_the_same_gradients(tiny_config):
    model = randomize_zero_init(RankDiTModel(tiny_config)).train()
    inputs = _inputs(tiny_config)
    logits, grads = _gradients(model, inputs)
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    logits_ckpt, grads_ckpt = _gradients(model, inputs)
    torch.testing.assert_close(logits_ckpt, logits)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], msg=name)


def test_train_hf_refuses_length_grouping_of_the_stream(tmp_path):
    with pytest.raises(ValueError, match="group_by_length"):
        train_hf.main(["--output_dir", str(tmp_path / "run"), "--train_sampling_strategy", "group_by_length"])


@cuda
def test_bf16_autocast_matches_float32_on_cuda():
    config = RankDiTConfig.from_preset("small", num_rank_bins=10, gene_vocab_size=500, max_length=256)
    model = randomize_zero_init(RankDiTModel(config)).cuda().eval()
    inputs = _inputs(config, batch=4, length=256, device="cuda")
    with torch.no_grad():
        full = model(**inputs).logits
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = model(**inputs).logits
    assert half.dtype == torch.float32  # logits leave the model in float32
    real = inputs["attention_mask"].bool()
    assert (half - full)[real].abs().max() < 0.05 * full[real].abs().max()


@cuda
@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_uses_the_fused_kernels_on_cuda(padded):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config = RankDiTConfig.from_preset("small", num_rank_bins=10, gene_vocab_size=500, max_length=256)
    model = randomize_zero_init(RankDiTModel(config)).cuda().eval().to(torch.bfloat16)
    inputs = _inputs(config, batch=4, length=256, padded=padded, device="cuda")
    # Without padding the mask is dropped and the flash kernel runs; with padding the memory-efficient one does.
    kernels = [SDPBackend.EFFICIENT_ATTENTION] if padded else [SDPBackend.FLASH_ATTENTION]
    with torch.no_grad(), sdpa_kernel(kernels):
        fused = model(**inputs).logits
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        reference = model(**inputs).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(fused[real], reference[real], atol=0.05, rtol=0.05)


@cuda
def test_a_few_bf16_steps_with_fused_adamw_and_compile_lower_the_loss_on_cuda(tmp_path):
    flags = "--preset small --max_steps 30 --max_length 256 --per_device_train_batch_size 16 --learning_rate 2e-3"
    flags += " --bf16 --torch_compile --activation_checkpointing --logging_steps 5 --eval_strategy no"
    flags += " --max_eval_cells 32 --model_card false --disable_tqdm true"
    trainer, _ = train_hf.main(["--output_dir", str(tmp_path / "run"), *flags.split()])
    assert trainer.args.optim == "adamw_torch_fused" and trainer.model.device.type == "cuda"
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0] - 0.5, losses
