"""Each private API mmtrain relies on (mmtrain/compat/), checked against the installed releases.

One test per use, on CPU, against the real libraries. A failure names the library, its
installed version and what changed: update the helper in mmtrain/compat/ (and its
call sites) before raising that library's upper bound in pyproject.toml.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import os
import socket
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from torch import nn

from mmtrain.compat import accelerate as accelerate_compat
from mmtrain.compat import datasets as datasets_compat
from mmtrain.compat import deepspeed as deepspeed_compat
from mmtrain.compat import peft as peft_compat
from mmtrain.compat import torch as torch_compat
from mmtrain.compat import transformers as transformers_compat
from mmtrain.data import tar_shards
from mmtrain.model import fp8, varlen_attention
from mmtrain.training import adam_state

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def pinned(library: str, what: str):
    """Turn any error inside into one failure naming the library, its version and the private API."""
    try:
        yield
    except Exception as e:  # AttributeError, TypeError, KeyError, AssertionError: all mean the same here
        pytest.fail(
            f"{library} {version(library)}: {what} is not what mmtrain/compat/ relies on "
            f"({type(e).__name__}: {e}); adapt mmtrain/compat/ before allowing this release",
            pytrace=True,
        )


# --- torch ------------------------------------------------------------------------------


def test_torch_assert_async_raises_on_a_false_cpu_tensor():
    with pinned("torch", "torch._assert_async(tensor, message)"):
        torch_compat.assert_async(torch.tensor(3) == 3, "must not raise")
        with pytest.raises(RuntimeError, match="spans and features differ"):
            torch_compat.assert_async(torch.tensor(3) == 4, "spans and features differ")


def _float8_devices() -> list[str]:
    # torch's CPU _scaled_mm takes float8 inputs with row-wise scales from torch 2.13 on, so
    # the contract is checked on any machine with such a torch; a capable GPU checks the
    # cuBLASLt path too, which is the one training uses.
    devices = ["cpu"] if fp8.float8_row_wise_runs("cpu") else []
    if torch.cuda.is_available() and fp8.float8_matmul_problem("cuda") is None:
        devices.append("cuda")
    return devices


@pytest.mark.parametrize("device", _float8_devices())
def test_torch_scaled_mm_row_wise_multiplies_the_scales_back(device):
    with pinned("torch", "torch._scaled_mm(a, b_column_major, scale_a=[M, 1], scale_b=[1, N], out_dtype=bf16)"):
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(5, 32, generator=gen).to(fp8.FLOAT8).to(device)  # M = 5: only K and N are aligned
        b = torch.randn(48, 32, generator=gen).to(fp8.FLOAT8).to(device)
        scale_a = torch.rand(5, 1, generator=gen).add(0.5).to(device)
        scale_b = torch.rand(1, 48, generator=gen).add(0.5).to(device)
        out = fp8.float8_matmul(a, b, scale_a, scale_b, torch.bfloat16)
        assert out.dtype == torch.bfloat16 and out.shape == (5, 48)
        want = (a.double() * scale_a.double()) @ (b.double() * scale_b.double().t()).t()
        torch.testing.assert_close(out.double(), want, rtol=1e-2, atol=1e-2)
        # a transposed (non-contiguous) second operand is laid out before the call
        bt = b.t().contiguous().t()
        torch.testing.assert_close(fp8.float8_matmul(a, bt, scale_a, scale_b, torch.bfloat16), out)


def test_float8_row_wise_probe_agrees_with_the_product():
    """The probe says yes exactly where a row-wise product runs (torch 2.13's CPU backend does, 2.11's does not)."""
    a = torch.ones(16, 16).to(fp8.FLOAT8)
    try:
        fp8.float8_matmul(a, a, torch.ones(16, 1), torch.ones(1, 16), torch.bfloat16)
        runs = True
    except RuntimeError:
        runs = False
    assert fp8.float8_row_wise_runs("cpu") is runs


def test_torch_float8_matmul_refuses_unaligned_widths_and_other_dtypes():
    a = torch.zeros(4, 40).to(fp8.FLOAT8)
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8.float8_matmul(a, torch.zeros(16, 40).to(fp8.FLOAT8), torch.ones(4, 1), torch.ones(1, 16), torch.bfloat16)
    with pytest.raises(ValueError, match="float8_e4m3fn operands"):
        fp8.float8_matmul(torch.zeros(4, 32), torch.zeros(16, 32).to(fp8.FLOAT8), torch.ones(4, 1), torch.ones(1, 16), torch.bfloat16)
    assert fp8.FLOAT8_MAX == 448.0


def test_torch_float8_matmul_problem_names_the_device():
    assert "the device is cpu" in fp8.float8_matmul_problem("cpu")
    if torch.cuda.is_available():
        capable = torch.cuda.get_device_capability(0) >= fp8.FLOAT8_MIN_CAPABILITY
        assert (fp8.float8_matmul_problem("cuda:0") is None) == capable


def _argument_names(op) -> list[str]:
    return [argument.name for argument in op.default._schema.arguments]  # the overload compat calls


def test_torch_cudnn_attention_op_takes_the_arguments_compat_passes():
    # torch_compat.cudnn_causal_attention passes attn_bias .. return_debug_mask positionally and reads output 0
    op = torch.ops.aten._scaled_dot_product_cudnn_attention
    names = _argument_names(op)
    assert names[:8] == ["query", "key", "value", "attn_bias", "compute_log_sumexp", "dropout_p", "is_causal", "return_debug_mask"]
    assert "scale" in names and op.default._schema.returns[0].name == "output"
    q = torch.zeros(1, 2, 4, 8)
    assert not varlen_attention.cudnn_attention_takes(q, q)  # a CPU tensor: never
    if torch.cuda.is_available():
        half = q.to("cuda", torch.bfloat16)
        assert varlen_attention.cudnn_attention_takes(half, half) and not varlen_attention.cudnn_attention_takes(half, half[:, :1])
        varlen_attention.use_cudnn_dense(False)  # a measurement leaves such rows to SDPA
        try:
            assert not varlen_attention.cudnn_attention_takes(half, half)
        finally:
            varlen_attention.use_cudnn_dense(True)


def test_flash_attention_problem_names_what_is_missing():
    assert varlen_attention.flash_attention_problem("cpu", torch.bfloat16) == "the device is cpu"
    assert "float32" in varlen_attention.flash_attention_problem("cuda", torch.float32)  # dtype asked before the GPU
    if torch.cuda.is_available():
        capable = torch.cuda.get_device_capability(0) >= varlen_attention.FLASH_ATTENTION_MIN_CAPABILITY
        assert (varlen_attention.flash_attention_problem("cuda:0", torch.bfloat16) is None) == capable


def test_torch_varlen_attention_ops_take_the_arguments_compat_passes():
    # varlen_attention.varlen_attention calls these positionally: the order of the leading arguments
    # and the keyword ``scale`` are what it relies on (the kernel itself needs CUDA).
    assert _argument_names(torch.ops.aten._flash_attention_forward)[:10] == [
        "query", "key", "value", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p", "is_causal", "return_debug_mask"]
    assert _argument_names(torch.ops.aten._flash_attention_backward)[:14] == [
        "grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q", "cum_seq_k", "max_q", "max_k",
        "dropout_p", "is_causal", "rng_state", "unused"]
    for op in (torch.ops.aten._flash_attention_forward, torch.ops.aten._flash_attention_backward):
        assert "scale" in _argument_names(op)
    with pytest.raises(ValueError, match="flash_varlen"):
        varlen_attention.varlen_attention("tiled", *(torch.zeros(4, 2, 8) for _ in range(3)), torch.tensor([0, 4]), 4, None)


def test_torch_batchnorm_base_covers_every_batch_norm():
    with pinned("torch", "torch.nn.modules.batchnorm._BatchNorm"):
        for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LazyBatchNorm1d):
            assert issubclass(cls, torch_compat.BatchNormBase), cls.__name__
        assert not issubclass(nn.LayerNorm, torch_compat.BatchNormBase)


def test_torch_inductor_matmul_padding_switch_exists_and_turns_off():
    import torch._inductor.config as inductor_config
    from torch._inductor.fx_passes import pad_mm

    with inductor_config.patch(shape_padding=True):  # restored on exit
        torch_compat.disable_inductor_matmul_padding()
        assert inductor_config.shape_padding is False
        # the pass reads that switch before anything else: off, no product is considered for padding
        a = torch.randn(8, 12, device="cpu")
        assert not pad_mm.can_pad(a, a.t(), torch.ops.aten.mm)


def test_compiled_decoder_layers_run_without_matmul_padding():
    import torch._inductor.config as inductor_config
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmtrain.model.decoder_layers import compile_decoder_layers

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32))
    with inductor_config.patch(shape_padding=True):
        assert compile_decoder_layers(model, backend="eager") == 1
        assert inductor_config.shape_padding is False


# --- transformers -------------------------------------------------------------------------


def _tiny_llama_config(attn_implementation: str = "sdpa"):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation=attn_implementation,
    )


def test_transformers_config_attn_implementation_is_what_models_dispatch_to():
    from transformers import AutoModelForCausalLM

    with pinned("transformers", "config._attn_implementation"):
        model = AutoModelForCausalLM.from_config(_tiny_llama_config(), attn_implementation="eager")
        assert transformers_compat.attn_implementation(model.config) == "eager"
        model.set_attn_implementation("sdpa")
        assert transformers_compat.attn_implementation(model.config) == "sdpa"
        assert transformers_compat.attn_implementation(_tiny_llama_config("mmtrain_compat_probe")) == "mmtrain_compat_probe"
        assert transformers_compat.attn_implementation(object()) is None


def test_transformers_attention_support_flags_decide_what_a_model_class_may_run():
    """What supports_attention answers is what transformers does when asked: builds with it, or refuses."""
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, LlamaForCausalLM

    gemma2 = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8, pad_token_id=None)
    with pinned("transformers", "PreTrainedModel._supports_sdpa / _supports_flex_attn"):
        assert transformers_compat.supports_attention(LlamaForCausalLM, "sdpa") and transformers_compat.supports_attention(LlamaForCausalLM, "eager")
        assert not transformers_compat.supports_attention(Gemma2ForCausalLM, "sdpa")  # it caps attention logits
        assert transformers_compat.supports_attention(Gemma2ForCausalLM, "flex_attention")
        for config, cls in ((_tiny_llama_config(), LlamaForCausalLM), (Gemma2Config(**gemma2), Gemma2ForCausalLM)):
            for name in ("sdpa", "eager", "flex_attention"):
                if transformers_compat.supports_attention(cls, name):
                    model = AutoModelForCausalLM.from_config(config, attn_implementation=name)
                    assert transformers_compat.attn_implementation(model.config) == name
                else:
                    with pytest.raises(ValueError, match="does not support"):
                        AutoModelForCausalLM.from_config(config, attn_implementation=name)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        transformers_compat.supports_attention(LlamaForCausalLM, "mmtrain_compat_probe")


def test_transformers_scaled_embeddings_multiply_by_their_embed_scale():
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=8, pad_token_id=None)
    table = AutoModelForCausalLM.from_config(config).get_input_embeddings()
    ids = torch.tensor([[3, 5, 7]])
    with pinned("transformers", "ScaledWordEmbedding.embed_scale"):
        scale = transformers_compat.embedding_scale(table)
        assert scale is not None and float(scale) == pytest.approx(16**0.5)
        torch.testing.assert_close(table(ids), table.weight[ids] * scale)
    assert transformers_compat.embedding_scale(nn.Embedding(4, 2)) is None


def test_transformers_sdpa_mask_takes_allow_is_causal_skip():
    from transformers.masking_utils import sdpa_mask

    with pinned("transformers", "transformers.masking_utils.sdpa_mask(..., allow_is_causal_skip=)"):
        assert "allow_is_causal_skip" in inspect.signature(sdpa_mask).parameters
        causal = torch.ones(4, 4, dtype=torch.bool).tril()
        mask = transformers_compat.sdpa_mask_materialized(batch_size=1, q_length=4, kv_length=4, allow_is_causal_skip=True)
        assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.shape == (1, 1, 4, 4)
        assert torch.equal(mask[0, 0], causal), "True must mean 'may attend', causally"
        padded = transformers_compat.sdpa_mask_materialized(batch_size=1, q_length=4, kv_length=4, attention_mask=torch.tensor([[0, 1, 1, 1]]))
        assert torch.equal(padded[0, 0], causal & torch.tensor([False, True, True, True])), "padding must close its key"


def test_transformers_mask_builder_lookup_gives_sdpa_mask():
    from transformers.masking_utils import sdpa_mask

    with pinned("transformers", "AttentionMaskInterface()[name]"):
        assert transformers_compat.attention_mask_builder("sdpa") is sdpa_mask
        padding = torch.tensor([[False, True, True, True]])  # transformers hands the builder a boolean 2D mask
        mask = transformers_compat.attention_mask_builder("sdpa")(batch_size=1, q_length=4, kv_length=4, attention_mask=padding)
        assert mask.dtype == torch.bool and not bool(mask[0, 0, 3, 0]) and bool(mask[0, 0, 3, 1])


def test_transformers_mask_interface_dispatches_to_a_registered_builder():
    from transformers import DynamicCache
    from transformers.masking_utils import create_causal_mask

    seen = {}

    def probe(*args, **kwargs):
        seen.update(kwargs)
        return transformers_compat.sdpa_mask_materialized(*args, **kwargs)

    with pinned("transformers", "AttentionMaskInterface.register and create_causal_mask's dispatch"):
        transformers_compat.register_attention_mask("mmtrain_compat_probe", probe)
        config = _tiny_llama_config("mmtrain_compat_probe")
        offered = {
            "config": config, "inputs_embeds": torch.zeros(2, 3, 16), "input_embeds": torch.zeros(2, 3, 16),
            "attention_mask": torch.tensor([[1, 1, 1], [0, 1, 1]]), "cache": DynamicCache(), "past_key_values": DynamicCache(),
            "cache_position": torch.arange(3), "position_ids": torch.arange(3)[None].expand(2, 3),
        }
        params = inspect.signature(create_causal_mask).parameters
        mask = create_causal_mask(**{k: v for k, v in offered.items() if k in params})
        assert {"batch_size", "q_length", "kv_length", "attention_mask"} <= seen.keys(), sorted(seen)
        assert mask.shape == (2, 1, 3, 3) and not bool(mask[1, 0, 2, 0]) and bool(mask[0, 0, 2, 0])


def test_transformers_repeat_kv_repeats_each_kv_head_in_place():
    with pinned("transformers", "transformers.integrations.sdpa_attention.repeat_kv"):
        kv = torch.randn(2, 3, 5, 4)
        assert torch.equal(transformers_compat.repeat_kv(kv, 2), kv.repeat_interleave(2, dim=1))
        assert transformers_compat.repeat_kv(kv, 1) is kv


def test_transformers_create_causal_mask_splits_packed_samples():
    from mmtrain.model.attention import check_packed_attention

    with pinned("transformers", "transformers.masking_utils.create_causal_mask with restarting position_ids"):
        assert transformers_compat.create_causal_mask.__module__ == "transformers.masking_utils"
        for name in ("sdpa", "eager"):
            check_packed_attention(_tiny_llama_config(name))  # raises ValueError when samples would see each other


# --- peft ---------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 5)
        self.other = nn.Linear(5, 5)


def _adapted(**config):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    block = _Block()
    options = dict(r=2, lora_alpha=6, lora_dropout=0.0, target_modules=["proj"])
    inject_adapter_in_model(LoraConfig(**{**options, **config}), block)
    with torch.no_grad():
        for name, param in block.named_parameters():
            if ".lora_" in name:
                param.normal_()
    return block


def test_transformers_naflex_size_is_what_siglip2_s_processor_resizes_to():
    from PIL import Image
    from transformers import Siglip2ImageProcessorPil

    processor = Siglip2ImageProcessorPil(patch_size=8, max_num_patches=48)
    for width, height in ((150, 40), (30, 100), (64, 64), (5, 7)):
        shapes = processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")["spatial_shapes"].tolist()
        rows, cols = (v // 8 for v in transformers_compat.naflex_size(height, width, 8, 48))
        assert [[rows, cols]] == shapes and rows * cols <= 48


def test_peft_lora_layer_exposes_the_adapter_state_fused_lora_reads():
    with pinned("peft", "LoRA Linear's adapter dicts and flags"):
        from peft.tuners.lora import Linear, LoraLayer

        layer = _adapted().proj
        assert isinstance(layer, Linear) and isinstance(layer, LoraLayer)
        assert not peft_compat.is_lora_linear(layer.base_layer, "default")
        assert peft_compat.is_lora_linear(layer, "default") and not peft_compat.is_lora_linear(layer, "other")
        assert peft_compat.lora_runs_one_plain_adapter(layer, "default")
        base, lora_a, lora_b, scale = peft_compat.lora_parts(layer, "default")
        assert isinstance(base, nn.Linear) and (lora_a.in_features, lora_a.out_features, lora_b.out_features) == (6, 2, 5)
        assert scale == 3.0, "scaling must be lora_alpha / r"
        x = torch.randn(4, 6)
        assert torch.allclose(layer(x), base(x) + scale * lora_b(lora_a(x)), atol=1e-6), "peft's forward is not base + scale * B(A(x))"


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")
def test_peft_lora_flags_say_when_the_forward_is_not_one_plain_adapter():
    with pinned("peft", "LoRA layer flags (disable_adapters, merged, active_adapters, lora_variant, lora_dropout)"):
        x = torch.randn(4, 6)
        layer = _adapted().proj
        layer.enable_adapters(False)
        assert not peft_compat.lora_runs_one_plain_adapter(layer, "default"), "disabled adapters"
        layer.enable_adapters(True)
        layer.merge()
        assert not peft_compat.lora_runs_one_plain_adapter(layer, "default"), "merged weights"
        layer.unmerge()
        assert peft_compat.lora_runs_one_plain_adapter(layer, "default")
        assert not peft_compat.lora_runs_one_plain_adapter(_adapted(lora_dropout=0.1).proj, "default"), "dropout"
        dora = _adapted(use_dora=True).proj
        assert not peft_compat.lora_runs_one_plain_adapter(dora, "default"), "a variant (DoRA)"
        base, lora_a, lora_b, scale = peft_compat.lora_parts(dora, "default")
        assert not torch.allclose(dora(x), base(x) + scale * lora_b(lora_a(x)), atol=1e-4), "DoRA must differ from plain LoRA"
        from peft import LoraConfig, inject_adapter_in_model

        block = _adapted()
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["proj"]), block, adapter_name="second")
        block.proj.set_adapter(["default", "second"])
        assert not peft_compat.lora_runs_one_plain_adapter(block.proj, "default"), "several active adapters"
        block.proj.set_adapter("default")
        assert peft_compat.lora_runs_one_plain_adapter(block.proj, "default")


def test_peft_lora_scaling_is_alpha_over_rank():
    with pinned("peft", "LoraLayer.scaling"):
        block = _adapted(r=4, lora_alpha=2)
        assert peft_compat.lora_scaling(block.proj, "default") == 0.5
        assert peft_compat.lora_scaling(block.proj, "other") is None
        assert peft_compat.lora_scaling(block.other, "default") is None


def test_peft_lora_input_cast_goes_through_the_instance_method():
    with pinned("peft", "LoraLayer._cast_input_dtype"):
        layer = _adapted().proj
        layer.base_layer.to(torch.bfloat16)  # frozen base in half precision, adapters in fp32
        calls = []

        def record(cast):
            def cast_input(x, dtype):
                calls.append((x.dtype, dtype))
                return cast(x, dtype)

            return cast_input

        assert peft_compat.wrap_lora_input_cast(layer, record)
        assert not peft_compat.wrap_lora_input_cast(_Block().proj, record)
        out = layer(torch.randn(3, 6, dtype=torch.bfloat16))
        assert (torch.bfloat16, torch.float32) in calls, f"peft did not cast its input through _cast_input_dtype: {calls}"
        assert out.dtype == torch.bfloat16


def test_peft_state_dict_names_are_what_the_merge_reads():
    with pinned("peft", "LoRA state-dict names (base_layer, lora_A/lora_B.<adapter>)"):
        state = _adapted().state_dict()
        a_name, b_name = peft_compat.lora_weight_names("proj", "default")
        assert {"proj" + peft_compat.BASE_LAYER_MARK + "weight", a_name, b_name} <= state.keys(), sorted(state)
        assert {k for k in state if peft_compat.LORA_NAME_MARK in k} == {a_name, b_name}, sorted(state)


# --- accelerate + transformers: the ZeRO-3 config transformers holds -----------------------


def _plugin(stage: int):
    from accelerate.utils import DeepSpeedPlugin

    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage}}
    return DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=True)


def test_accelerate_zero3_init_flag_is_true_only_at_stage_3():
    with pinned("accelerate", "DeepSpeedPlugin.zero3_init_flag after construction"):
        assert accelerate_compat.zero3_init_enabled(_plugin(3))
        with pytest.warns(UserWarning):
            stage2 = _plugin(2)
        assert not accelerate_compat.zero3_init_enabled(stage2)


def test_transformers_unset_and_accelerate_reinstall_of_the_deepspeed_config():
    from transformers.integrations.deepspeed import deepspeed_config, is_deepspeed_zero3_enabled

    plugin = _plugin(3)
    try:
        with pinned("accelerate", "DeepSpeedPlugin.set_deepspeed_weakref / dschf"):
            accelerate_compat.reinstall_hf_deepspeed_config(plugin)
            assert is_deepspeed_zero3_enabled(), "set_deepspeed_weakref did not hand transformers the stage-3 config"
        with pinned("transformers", "transformers.integrations.deepspeed.unset_hf_deepspeed_config"):
            transformers_compat.unset_hf_deepspeed_config()
            assert not is_deepspeed_zero3_enabled(), "unset_hf_deepspeed_config left ZeRO-3 on"
        with pinned("accelerate", "DeepSpeedPlugin.set_deepspeed_weakref / dschf"):
            plugin.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 1234
            accelerate_compat.reinstall_hf_deepspeed_config(plugin)
            assert is_deepspeed_zero3_enabled()
            assert deepspeed_config()["zero_optimization"]["stage3_param_persistence_threshold"] == 1234, "edits made later are not seen"
            plugin.dschf = None
            gc.collect()
            assert not is_deepspeed_zero3_enabled(), "plugin.dschf no longer owns the object transformers refers to"
    finally:
        transformers_compat.unset_hf_deepspeed_config()


# --- DeepSpeed ------------------------------------------------------------------------------


def test_deepspeed_ulysses_registration_takes_what_compat_passes():
    """The keyword arguments ``register_ulysses`` passes, and the group accessors it reads, exist in this release.

    What the registration does to the LM's attention is tested on two processes
    (tests/model/test_sequence_parallel.py)."""
    import inspect

    with pinned("deepspeed", "UlyssesSPAttentionHF.register_with_transformers / parallel_state_sp"):
        assert deepspeed_compat.ulysses_problem() is None
        from deepspeed.runtime.sequence_parallel import parallel_state_sp
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        params = inspect.signature(UlyssesSPAttentionHF.register_with_transformers).parameters
        wanted = {"model_name_or_path", "core_attn_implementation", "sequence_parallel_size", "micro_batch_size", "seq_length_is_variable", "disable_in_eval"}
        assert wanted <= set(params), sorted(wanted - set(params))
        assert callable(parallel_state_sp.get_sequence_parallel_group) and callable(parallel_state_sp.get_sequence_parallel_rank)

_ZERO3_PARAM = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import deepspeed
    from mmtrain.compat import deepspeed as deepspeed_compat

    deepspeed.init_distributed(dist_backend="gloo")
    with deepspeed.zero.Init(config_dict_or_path={"train_batch_size": 1, "zero_optimization": {"stage": 3}}):
        layer = torch.nn.Linear(6, 5)
    plain = torch.nn.Parameter(torch.zeros(5, 6))
    weight = layer.weight
    with deepspeed.zero.GatheredParameters([weight]):
        gathered_inside = deepspeed_compat.zero3_gathered(weight)
    print("RESULT " + json.dumps({
        "gathered": deepspeed_compat.zero3_gathered(weight),
        "gathered_inside": gathered_inside,
        "plain_gathered": deepspeed_compat.zero3_gathered(plain),
        "partitioned": deepspeed_compat.is_zero3_partitioned(weight),
        "plain_partitioned": deepspeed_compat.is_zero3_partitioned(plain),
        "full_numel": deepspeed_compat.full_numel(weight),
        "local_numel": weight.numel(),
        "plain_numel": deepspeed_compat.full_numel(plain),
        "full_shape": list(deepspeed_compat.full_shape(weight)),
        "plain_shape": list(deepspeed_compat.full_shape(plain)),
    }))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_in_one_process_group(script: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """``script`` in a child process of a one-process gloo group (the test session's own state stays
    untouched); returns the run and its ``RESULT`` lines."""
    env = {
        **os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    # The group is ended before the interpreter exits: left to tear down at exit, gloo's
    # threads sometimes aborted the process (SIGABRT) after it had printed its results.
    teardown = "\nimport torch.distributed as _dist\nif _dist.is_initialized():\n    _dist.destroy_process_group()\n"
    run = subprocess.run([sys.executable, "-c", script + teardown], env=env, capture_output=True, text=True, timeout=300)
    return run, [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]


def test_deepspeed_zero3_parameters_carry_ds_id_ds_numel_and_ds_shape():
    run, lines = _run_in_one_process_group(_ZERO3_PARAM)
    with pinned("deepspeed", "ZeRO-3 parameter attributes ds_id / ds_numel"):
        assert run.returncode == 0 and lines, f"building a ZeRO-3 parameter failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
        got = json.loads(lines[-1][len("RESULT "):])
        assert got["partitioned"] and not got["plain_partitioned"], got
        assert got["full_numel"] == 30 and got["local_numel"] == 0 and got["plain_numel"] == 30, got
    with pinned("deepspeed", "ZeRO-3 parameter attribute ds_shape (whole inside a gather)"):
        assert not got["gathered"] and got["gathered_inside"] and got["plain_gathered"], got
        assert got["full_shape"] == [5, 6] and got["plain_shape"] == [5, 6], got


_ZERO3_SWAP = textwrap.dedent(
    """
    import json
    import torch
    import deepspeed
    from mmtrain.compat import deepspeed as deepspeed_compat

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    # one weight above the persistence threshold (gathered per forward), one below (kept gathered)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False), torch.nn.Linear(16, 2, bias=False))
    plain = [p.detach().clone() for p in model.parameters()]
    config = {"train_batch_size": 1, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100}}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    x = torch.ones(1, 16)
    expected = x @ plain[0].T @ plain[1].T
    shares = [deepspeed_compat.partition(p) for p in engine.module.parameters()]
    kept = [s.data for s in shares]

    def forward_with_zero_share(i, release):
        shares[i].data = torch.zeros_like(kept[i])
        if release:
            deepspeed_compat.release_gathered(engine)
        out = engine(x).abs().sum().item()
        deepspeed_compat.release_gathered(engine)
        shares[i].data = kept[i]
        return out

    with torch.no_grad():
        engine(x)
        engine(x)  # a second forward: the trace is complete, gathered weights may be kept
        stale = forward_with_zero_share(1, release=False)
        zeroed = [forward_with_zero_share(i, release=True) for i in (0, 1)]
        restored = engine(x)
    print("RESULT " + json.dumps({
        "persistent": [bool(p.ds_persist) for p in engine.module.parameters()],
        "stale_error": abs(stale - expected.abs().sum().item()), "zeroed": zeroed,
        "restored_error": (restored - expected).abs().max().item(),
    }))
    """
)


def test_deepspeed_zero3_forward_gathers_from_the_partitions_once_released():
    run, lines = _run_in_one_process_group(_ZERO3_SWAP)
    with pinned("deepspeed", "ZeRO-3 ds_tensor and the stage-3 optimizer's empty_partition_cache"):
        assert run.returncode == 0 and lines, f"the ZeRO-3 engine failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
        got = json.loads(lines[-1][len("RESULT "):])
        assert got["persistent"] == [False, True], got
        assert got["stale_error"] < 1e-6, got  # the small weight stays gathered: unreleased, a forward reads its old values
        assert got["zeroed"] == [0.0, 0.0], got  # released, each forward gathers from the (zeroed) partition
        assert got["restored_error"] < 1e-6, got  # and from the partitions given back


def test_deepspeed_memory_estimators_take_counts():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as mmtrain.training.distributed.prepare_environment
    with contextlib.redirect_stdout(sys.stderr), pinned("deepspeed", "estimate_zero{2,3}_model_states_mem_needs"):
        cpu, gpu = deepspeed_compat.estimate_zero2_model_states_mem_needs(
            10**6, num_gpus_per_node=2, num_nodes=1, cpu_offload=False
        )
        assert gpu > 0 and cpu > 0
        cpu, gpu, largest = deepspeed_compat.estimate_zero3_model_states_mem_needs(
            10**6, 10**4, num_gpus_per_node=2, num_nodes=1, cpu_offload=True, cpu_offload_params=False
        )
        assert gpu > largest > 0 and cpu > 0
        _, gpu_on_four, _ = deepspeed_compat.estimate_zero3_model_states_mem_needs(
            10**6, 10**4, num_gpus_per_node=4, num_nodes=1, cpu_offload=True, cpu_offload_params=False
        )
        assert gpu_on_four < gpu, "more GPUs must mean fewer bytes per GPU"


def test_accelerate_sync_gradients_flag_decides_whether_the_prepared_optimizer_steps():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    try:
        with pinned("accelerate", "GradientState._set_sync_gradients read by the prepared optimizer and schedule"):
            accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
            model = nn.Linear(2, 1)
            optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
            model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
            before = model.weight.detach().clone()
            model(torch.ones(1, 2)).sum().backward()
            accelerate_compat.set_sync_gradients(accelerator, False)
            assert not accelerator.sync_gradients
            optimizer.step()
            scheduler.step()
            assert torch.equal(model.weight, before) and optimizer.param_groups[0]["lr"] == 1.0
            accelerate_compat.set_sync_gradients(accelerator, True)
            assert accelerator.sync_gradients
            optimizer.step()
            scheduler.step()
            assert not torch.equal(model.weight, before) and optimizer.param_groups[0]["lr"] < 1.0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_compat_imports_no_deepspeed_accelerate_or_mmtrain_args():
    modules = ", ".join(f"mmtrain.compat.{p.stem}" for p in (REPO / "mmtrain" / "compat").glob("*.py") if p.stem != "__init__")
    code = (
        f"import sys, {modules}; "
        "bad = [m for m in ('deepspeed', 'accelerate', 'peft', 'mmtrain.args', 'mmtrain.data') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"importing mmtrain.compat pulled in {run.stdout.strip()} {run.stderr[-2000:]}"


# --- optimizer state behind the wrappers ------------------------------------------------------


def _two_group_adam(**kwargs):
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[1].parameters()), "weight_decay": 0.0}]
    return model, torch.optim.AdamW(groups, lr=1e-2, **kwargs)


def test_torch_adam_state_is_what_create_adam_state_makes():
    with pinned("torch", "AdamW's per-parameter state (step, exp_avg, exp_avg_sq)"):
        model, stepped = _two_group_adam()
        model(torch.randn(5, 4)).sum().backward()
        stepped.step()
        _, made = _two_group_adam()
        adam_state.create_adam_state(made, 1)
        assert deepspeed_compat.base_optimizer(made) is made and adam_state.adam_step_count(made) == adam_state.adam_step_count(stepped) == 1
        real = list(stepped.state.values())
        ours = [made.state[p] for g in made.param_groups for p in g["params"]]
        assert len(real) == len(ours) == 4
        for a, b in zip(real, ours):
            assert a.keys() == b.keys()
            for key in a:
                assert (a[key].dtype, a[key].device, a[key].shape) == (b[key].dtype, b[key].device, b[key].shape), key
            assert not b["exp_avg"].any() and float(b["step"]) == 1.0
        # the state made by hand is one torch's own step accepts and counts on from
        ours[0]["exp_avg"].add_(1.0)
        made.param_groups[0]["params"][0].grad = torch.zeros(3, 4)
        made.step()
        assert adam_state.adam_step_count(made) == 2


_ZERO2_LINK = textwrap.dedent(
    """
    import json
    import torch
    import deepspeed
    from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state
    from mmtrain.compat import deepspeed as deepspeed_compat
    from mmtrain.training import adam_state

    deepspeed.init_distributed(dist_backend="gloo")
    config = {"train_batch_size": 1, "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}

    def engine(config=config):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        groups = [{"params": list(model[0].parameters())}, {"params": list(model[1].parameters()), "weight_decay": 0.0}]
        eng, opt, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=1e-2), config=config)
        return eng, opt

    eng, opt = engine()
    loss = eng(torch.randn(1, 4, dtype=torch.bfloat16)).float().sum()
    eng.backward(loss)
    eng.step()
    params = list(eng.module.parameters())
    try:
        safe_get_full_optimizer_state(params[-1], "exp_avg")
        second_group_linked = True
    except ValueError:
        second_group_linked = False
    deepspeed_compat.link_zero_optimizer_state(opt)
    moments = [safe_get_full_optimizer_state(p, "exp_avg") for p in params]

    fresh, fresh_opt = engine()  # before any step: no optimizer state at all
    adam_state.create_adam_state(fresh_opt, 7)
    deepspeed_compat.link_zero_optimizer_state(fresh_opt)
    for p, m in zip(fresh.module.parameters(), moments):
        safe_set_full_optimizer_state(p, m, "exp_avg")
    back = [safe_get_full_optimizer_state(p, "exp_avg") for p in fresh.module.parameters()]
    # ZeRO 0 with bf16: masters apart from the weights, which are their bf16 copies
    zero0, zero0_opt = engine({**config, "zero_optimization": {"stage": 0}})
    eng_loss = zero0(torch.randn(1, 4, dtype=torch.bfloat16)).float().sum()
    zero0.backward(eng_loss)
    zero0.step()
    masters = deepspeed_compat.fp32_masters(zero0_opt)
    zero0_params = list(zero0.module.parameters())
    def master(p):
        held, offset = masters[id(p)]
        return held.view(-1).narrow(0, offset, p.numel()).view(p.shape)
    print("RESULT " + json.dumps({
        "zero0_masters": len(masters) == len(zero0_params) and all(
            torch.equal(master(p).to(p.dtype), p.data) and master(p).dtype == torch.float32 for p in zero0_params
        ),
        "zero2_has_no_separate_masters": deepspeed_compat.fp32_masters(opt) == {},
        "base_is_torch": type(deepspeed_compat.base_optimizer(opt)) is torch.optim.AdamW,
        "second_group_linked_by_deepspeed": second_group_linked,
        "moments_nonzero": all(bool(m.abs().sum() > 0) for m in moments),
        "round_trip": all(torch.equal(a, b) for a, b in zip(moments, back)),
        "fresh_step": adam_state.adam_step_count(fresh_opt),
        "trained_step": adam_state.adam_step_count(opt),
    }))
    """
)


def test_deepspeed_optimizer_state_and_fp32_masters_are_where_compat_finds_them():
    run, lines = _run_in_one_process_group(_ZERO2_LINK)
    with pinned("deepspeed", "the base optimizer (.optimizer), ZeRO-2's _lazy_init_hp_params_optimizer_state, ZeRO-0's fp16_groups / fp32_groups_flat"):
        assert run.returncode == 0 and lines, f"the ZeRO-2 engine failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
        got = json.loads(lines[-1][len("RESULT "):])
        assert got["base_is_torch"] and got["moments_nonzero"] and got["round_trip"], got
        assert got["fresh_step"] == 7 and got["trained_step"] == 1, got
        assert got["zero0_masters"] and got["zero2_has_no_separate_masters"], got


def test_tar_member_data_offset_points_at_the_members_bytes(tmp_path):
    import io
    import tarfile

    path = tmp_path / "a.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("a.json", b"{}"), ("a.png", b"image bytes")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path, "r:") as tar:
        member = tar.getmember("a.png")
        offset = tar_shards.tar_member_data_offset(member)
    with open(path, "rb") as f:
        f.seek(offset)
        assert f.read(member.size) == b"image bytes", f"tarfile (Python {sys.version.split()[0]}) moved TarInfo.offset_data"


def test_datasets_offline_resolves_a_hub_name_from_the_cache_only(tmp_path):
    import datasets
    import datasets.config

    was = datasets.config.HF_HUB_OFFLINE
    with datasets_compat.datasets_offline():
        assert datasets.config.HF_HUB_OFFLINE is True
        # Not cached: the loader must give up without reaching for the network (a
        # ConnectionError naming offline mode), and quickly.
        with pytest.raises(ConnectionError, match="someone/not-cached"):
            datasets.load_dataset("someone/not-cached", cache_dir=str(tmp_path))
    assert datasets.config.HF_HUB_OFFLINE == was


def test_bitsandbytes_cpu_notice_stays_out_of_mmtrain_output():
    """peft imports bitsandbytes when it is installed: no line of bitsandbytes' may reach an mmtrain command's stderr."""
    pytest.importorskip("bitsandbytes")
    code = "import mmtrain, peft, bitsandbytes, logging; logging.basicConfig(); import mmtrain.model.nf4"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and "bitsandbytes" not in proc.stderr and "kernels" not in proc.stderr, proc.stderr
    import importlib.util
    import logging

    from mmtrain.compat import bitsandbytes as bitsandbytes_compat

    assert logging.getLogger(bitsandbytes_compat.BITSANDBYTES_CPU_LOGGER).level == logging.ERROR
    assert importlib.util.find_spec(bitsandbytes_compat.BITSANDBYTES_CPU_LOGGER) is not None  # the module whose logger it is still exists
