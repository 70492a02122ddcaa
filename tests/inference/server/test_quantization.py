"""int8 / nf4 quantization of blocks on CPU: every Linear replaced, memory down, outputs close, grads flow.

The error bounds sit 1.3-1.5x above what these fixed-seed inputs measure (numbers at
`ERROR_BOUND`): tight enough that a broken kernel fails, loose enough for other CPUs' kernels
(without AVX-512 the int8 matmul runs in fp32). Memory and the type checks catch a layer left
unquantized, whose error would be 0.
"""

from __future__ import annotations

import copy
import sys
import threading
from collections.abc import Callable

import pytest
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from corolla.inference.errors import ModelLoadError
from corolla.inference.server.quantization import QuantMode, quantize_linears, quantized_bytes

bnb = pytest.importorskip("bitsandbytes")

# (mode, compute dtype) -> bound on the relative L2 error of outputs and of input gradients.
# Measured here (largest over the two models, forward and gradient): int8 0.013 fp32, 0.022 bf16
# (bf16 rounding of the Llama residual stream alone gives 0.018); nf4 0.20 in both (each nf4
# layer adds about 0.09, and the MLP stack's gradient goes back through four of them).
ERROR_BOUND: dict[tuple[QuantMode, torch.dtype], float] = {
    ("int8", torch.float32): 0.02,
    ("int8", torch.bfloat16): 0.03,
    ("nf4", torch.float32): 0.25,
    ("nf4", torch.bfloat16): 0.25,
}
# Bytes of the quantized module over bytes of the fp32 one; int8 needs 1/4 plus scales, nf4 about 1/8.
MEMORY_RATIO_BOUND: dict[QuantMode, float] = {"int8": 0.3, "nf4": 0.2}
CASES = list(ERROR_BOUND)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def mlp_stack() -> tuple[nn.Module, Callable[[nn.Module, torch.Tensor], torch.Tensor]]:
    """Two MLP blocks (64 -> 256 -> 64, with biases); the run returns the stack's output."""
    torch.manual_seed(0)
    stack = nn.Sequential(*(nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)) for _ in range(2))).eval()
    return stack, lambda module, x: module(x)


def llama_layer() -> tuple[nn.Module, Callable[[nn.Module, torch.Tensor], torch.Tensor]]:
    """A real transformers Llama decoder layer; the run returns what it adds to its residual input.

    The layer's output is input + attention + MLP; comparing the whole output would mostly
    compare the input with itself, so the error is measured on the part the weights compute.
    """
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, layer_idx=0).eval()
    rotary = LlamaRotaryEmbedding(config)

    def run(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1]).unsqueeze(0)
        return module(x, position_embeddings=rotary(x, positions)) - x

    return layer, run


MODELS = {"mlp_stack": mlp_stack, "llama_layer": llama_layer}


def inputs(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1)).to(dtype)  # (B, T, H)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(("mode", "dtype"), CASES)
def test_quantized_forward_is_close_to_fp32(model: str, mode: QuantMode, dtype: torch.dtype) -> None:
    reference, run = MODELS[model]()
    linears = sum(type(m) is nn.Linear for m in reference.modules())
    quantized = quantize_linears(copy.deepcopy(reference).to(dtype), mode, compute_dtype=dtype)
    x = inputs(dtype)

    with torch.no_grad():
        out = run(quantized, x)
        expected = run(reference, x.float())

    assert out.dtype == dtype
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    assert sum(isinstance(m, bnb.nn.Linear8bitLt | bnb.nn.Linear4bit) for m in quantized.modules()) == linears
    assert relative_error(out, expected) < ERROR_BOUND[mode, dtype]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(("mode", "dtype"), CASES)
def test_input_gradient_flows_through_frozen_quantized_weights(model: str, mode: QuantMode, dtype: torch.dtype) -> None:
    reference, run = MODELS[model]()
    quantized = quantize_linears(copy.deepcopy(reference).to(dtype), mode, compute_dtype=dtype)
    # A no-grad forward first: bitsandbytes would repack nf4 weights there and lose autograd.
    with torch.no_grad():
        run(quantized, inputs(dtype))
    grad_out = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(2))
    x = inputs(dtype).requires_grad_()
    x_ref = inputs(torch.float32).requires_grad_()

    run(quantized, x).backward(grad_out.to(dtype))
    run(reference, x_ref).backward(grad_out)

    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x_ref.grad is not None
    assert relative_error(x.grad, x_ref.grad) < ERROR_BOUND[mode, dtype]
    assert all(not p.requires_grad for p in quantized.parameters() if p.dtype in (torch.int8, torch.uint8))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_module_holds_fewer_bytes(model: str, mode: QuantMode) -> None:
    reference, _ = MODELS[model]()
    fp32_bytes = quantized_bytes(reference)

    quantized = quantize_linears(copy.deepcopy(reference), mode)

    assert quantized_bytes(quantized) < MEMORY_RATIO_BOUND[mode] * fp32_bytes


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_concurrent_first_forwards_match_a_sequential_run(mode: QuantMode) -> None:
    reference, run = llama_layer()
    x = inputs(torch.float32)
    expected = run(quantize_linears(copy.deepcopy(reference), mode), x).detach()
    quantized = quantize_linears(copy.deepcopy(reference), mode)
    results: list[torch.Tensor] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        barrier.wait()  # all four make their first call together
        with torch.no_grad():
            results.append(run(quantized, x))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(results) == 4
    for out in results:
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_int8_keeps_outlier_activation_columns_out_of_int8() -> None:
    """LLM.int8(): columns with a value >= 6 run in 16 bits. Plain int8 gives 0.03 on this input."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(256, 256)).eval()
    x = torch.randn(64, 256)
    x[:, 7] *= 40  # outlier feature columns, as large LLMs have
    x[:, 100] *= 25

    with torch.no_grad():
        out = quantize_linears(copy.deepcopy(reference), "int8")(x)

    assert relative_error(out, reference(x)) < 0.01


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ModelLoadError, match="'int4'"):
        quantize_linears(mlp_stack()[0], "int4")  # type: ignore[arg-type]


def test_unsupported_compute_dtype_is_refused() -> None:
    with pytest.raises(ModelLoadError, match=r"nf4 compute_dtype torch\.float16"):
        quantize_linears(mlp_stack()[0], "nf4", compute_dtype=torch.float16)


def test_missing_bitsandbytes_is_a_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError

    with pytest.raises(ModelLoadError, match=r"int8.*bitsandbytes does not import"):
        quantize_linears(mlp_stack()[0], "int8")


def test_kernel_failure_is_a_load_error_and_leaves_the_module_intact(monkeypatch: pytest.MonkeyPatch) -> None:
    stack, _ = mlp_stack()

    def broken(*args: object, **kwargs: object) -> None:
        raise NotImplementedError("no kernel for this backend")

    monkeypatch.setattr(bnb.functional, "quantize_4bit", broken)

    with pytest.raises(ModelLoadError, match=r"nf4.*no kernel for this backend"):
        quantize_linears(stack, "nf4")
    assert sum(type(m) is nn.Linear for m in stack.modules()) == 4


def test_linear_subclass_is_refused_rather_than_left_in_full_precision() -> None:
    attention = nn.MultiheadAttention(64, 4)  # reads out_proj.weight directly, bypassing forward

    with pytest.raises(ModelLoadError, match="out_proj"):
        quantize_linears(attention, "int8")
