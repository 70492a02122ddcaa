"""`--device cpu|cuda|auto` and `--dtype`: resolution, refusals, and the cpu path through a real
`platform serve` process; a quantized span holds no float weights once loaded (docs/inference.md,
"Memory per mode"). The cuda path itself is tests/inference/test_gpu.py (marked `gpu`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from corolla.inference.client import RemoteModelForCausalLM
from corolla.inference.device import DeviceKind, check_dtype, resolve_device
from corolla.inference.errors import DeviceError
from corolla.inference.models.checkpoint import Checkpoint
from corolla.inference.models.llama import LlamaAttention, LlamaMLP
from corolla.inference.server import BlockServer
from corolla.inference.server.loading import load_served_span
from corolla.inference.server.quantization import quantized_bytes
from corolla.platform.cli import main
from corolla.platform.launch.servers import LocalServers

NO_CUDA = not torch.cuda.is_available()


def test_auto_is_cpu_without_cuda_and_cuda_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(DeviceKind.AUTO) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"


def test_cuda_without_cuda_and_unknown_devices_are_device_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="--device cuda: no CUDA device on this machine"):
        resolve_device(DeviceKind.CUDA)
    with pytest.raises(DeviceError, match="device 'tpu' is not supported; use one of auto, cpu, cuda"):
        resolve_device("tpu")
    assert DeviceError("x").exit_code == 15


def test_float16_is_refused_on_cpu_and_the_others_are_not() -> None:
    cpu = torch.device("cpu")
    with pytest.raises(DeviceError, match="--dtype float16 is for --device cuda"):
        check_dtype(cpu, torch.float16)
    with pytest.raises(DeviceError, match="--dtype float64 is not supported"):
        check_dtype(cpu, torch.float64)
    check_dtype(cpu, torch.float32)
    check_dtype(cpu, torch.bfloat16)


@pytest.mark.skipif(not NO_CUDA, reason="auto is cuda on this machine (tests/inference/test_gpu.py)")
@pytest.mark.parametrize("device", [DeviceKind.CPU, DeviceKind.AUTO])
def test_cpu_server_keeps_weights_caches_and_outputs_on_cpu(
    tiny_llama: Path, start_server: Callable[..., BlockServer], device: DeviceKind
) -> None:
    server = start_server(tiny_llama, (0, 4), device=device)
    assert server.device == torch.device("cpu") and server.backend is not None
    assert {p.device.type for p in server.backend.span.parameters()} == {"cpu"}
    assert server.backend.new_cache(0, 4, batch_size=1, max_length=4).layers[0].keys.device.type == "cpu"
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    want = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()(ids).logits.detach()
    with RemoteModelForCausalLM.from_pretrained(tiny_llama, servers=[server.endpoint], device="cpu") as model:
        assert model.device == torch.device("cpu")
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=1e-5)


def _serve(model: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """`platform serve` in this process, up to where it would load: its exit code and stderr."""
    code = main(["serve", "--model", str(model), "--blocks", "0:2", "--insecure", "--no-dht", *args])
    return code, capsys.readouterr().err


def test_serve_device_cuda_without_cuda_is_one_line_exit_15(
    tiny_llama: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = _serve(tiny_llama, capsys, "--device", "cuda")
    assert code == 15
    reason = "this torch was built without CUDA" if torch.version.cuda is None else "torch sees no CUDA device"
    assert err.splitlines() == [
        f"platform serve: --device cuda: no CUDA device on this machine ({reason}); use --device cpu or auto"
    ]


def test_serve_float16_on_cpu_is_one_line_exit_15(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _serve(tiny_llama, capsys, "--device", "cpu", "--dtype", "float16")
    assert code == 15
    assert err.splitlines() == [
        "platform serve: --dtype float16 is for --device cuda; on cpu use bfloat16 (same size, float32's range)"
    ]


def test_real_serve_process_with_device_cpu_serves_exactly(tiny_llama: Path) -> None:
    """A `platform serve --device cpu` process announces its device and serves logits equal to
    local transformers."""
    ids = torch.randint(0, 500, (1, 10), generator=torch.Generator().manual_seed(2))
    want = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()(ids).logits.detach()
    with LocalServers(tiny_llama, [(0, 4)], extra_args=["--no-dht", "--device", "cpu"], torch_threads=1) as swarm:
        assert swarm.servers[0].device == "cpu"  # from its READY line
        with RemoteModelForCausalLM.from_pretrained(tiny_llama, servers=swarm.endpoints) as model, torch.no_grad():
            torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_span_holds_no_float_weights(tiny_llama: Path, mode: str) -> None:
    """Quantized block by block: the fused float q/k/v and gate/up tensors are released with the
    layers they fed, so the span's bytes are the quantized ones only."""
    checkpoint = Checkpoint.open(tiny_llama)
    fp32 = quantized_bytes(checkpoint.load_span(0, 4))
    span = load_served_span(checkpoint, 0, 4, dtype=torch.float32, device=torch.device("cpu"), quant=mode)  # type: ignore[arg-type]
    for module in span.modules():
        if isinstance(module, LlamaAttention):
            assert module._qkv.weight is None and module._qkv.modules == []
        if isinstance(module, LlamaMLP):
            assert module._gate_up.weight is None and module._gate_up.modules == []
    floats = [p for p in span.parameters() if p.dim() == 2 and p.is_floating_point()]
    assert floats == []  # every weight matrix is int8 or packed nf4
    assert quantized_bytes(span) < (0.35 if mode == "int8" else 0.25) * fp32


def test_span_moved_with_to_fuses_again(tiny_llama: Path) -> None:
    """`.to()` copies each projection's view on its own; the fused tensor is rebuilt from them, so
    the fused matmul and the modules agree and share memory again."""
    checkpoint = Checkpoint.open(tiny_llama)
    moved = checkpoint.load_span(0, 4).to(torch.bfloat16)
    loaded = checkpoint.load_span(0, 4, dtype=torch.bfloat16)
    attention = moved.blocks[0].self_attn
    assert attention._qkv.weight is not None and attention._qkv.weight.dtype == torch.bfloat16
    assert attention.q_proj.weight.data_ptr() == attention._qkv.weight.data_ptr()
    hidden = torch.randn(2, 6, checkpoint.hidden_size, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    torch.testing.assert_close(moved(hidden), loaded(hidden), rtol=0, atol=0)


def test_generate_device_cuda_without_cuda_is_exit_15_before_any_server_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("COROLLA_WORKSPACE", str(tmp_path))
    assert main(["generate", "--device", "cuda", "--max-new-tokens", "1"]) == 15
    assert "platform generate: --device cuda: no CUDA device on this machine" in capsys.readouterr().err
    assert not (tmp_path / "models").exists()  # refused before the embedded swarm's model was made
