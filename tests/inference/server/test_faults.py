"""Fault injection: a fraction of outputs corrupted, the rest exactly honest, caches kept whole."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from corolla.inference.client.transport import ServerStub
from corolla.inference.errors import BadRequestError
from corolla.inference.models.checkpoint import Checkpoint
from corolla.inference.models.lora import SpanAdapter
from corolla.inference.server import BlockServer
from corolla.inference.server.backend import SpanBackend
from corolla.inference.server.faults import FaultInjectingBackend, FaultKind, FaultSpec, other_weights_span
from corolla.inference.wire.backward import AdapterGrads
from corolla.platform.commands import serve

KINDS = list(FaultKind)


def _backend(model: Path) -> SpanBackend:
    checkpoint = Checkpoint.open(model)
    span = checkpoint.load_span(0, checkpoint.num_blocks)
    return SpanBackend(span, model_id="m", hidden_size=checkpoint.hidden_size, dtype=torch.float32, quant=None)


def _faulty(model: Path, kind: FaultKind, fraction: float, seed: int = 0) -> FaultInjectingBackend:
    honest = _backend(model)
    other = None
    if kind == FaultKind.OTHER_WEIGHTS:
        checkpoint = Checkpoint.open(model)
        other = other_weights_span(checkpoint, 0, checkpoint.num_blocks, dtype=torch.float32, quant=None, seed=5)
    return FaultInjectingBackend(honest, FaultSpec(kind=kind, fraction=fraction, seed=seed), other=other)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _adapter(backend: SpanBackend, seed: int = 0) -> SpanAdapter:
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for index in range(backend.start, backend.end):
        layer = backend.span.blocks[index - backend.start].get_submodule("self_attn.q_proj")
        a = torch.randn(2, layer.in_features, generator=g) * 0.1
        b = torch.randn(layer.out_features, 2, generator=g) * 0.1
        pairs[(index, "self_attn.q_proj")] = (a, b)
    return SpanAdapter.from_pairs(pairs, 2.0)


# -- the option ------------------------------------------------------------------------------


def test_spec_parses_and_validates() -> None:
    assert FaultSpec.parse("noise:0.01") == FaultSpec(kind=FaultKind.NOISE, fraction=0.01)
    assert FaultSpec.parse("skip-block:1.0:7") == FaultSpec(kind=FaultKind.SKIP_BLOCK, fraction=1.0, seed=7)
    assert str(FaultSpec.parse("other-weights:0.3")) == "other-weights:0.3"
    for bad in ("noise", "noise:0", "noise:1.5", "noise:nan", "noise:x", "flip:0.5", "noise:0.5:-1", "a:b:c:d"):
        with pytest.raises(BadRequestError):
            FaultSpec.parse(bad)


def test_serve_option_is_hidden_from_help() -> None:
    parser = argparse.ArgumentParser(prog="platform")
    serve.register(parser.add_subparsers())
    sub = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    assert "inject-fault" not in sub.format_help()
    args = parser.parse_args(["serve", "--model", "x", "--inject-fault", "noise:0.25:3"])
    assert args.inject_fault == FaultSpec(kind=FaultKind.NOISE, fraction=0.25, seed=3)
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--model", "x", "--inject-fault", "noise:2"])


# -- every output corrupted --------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_every_output_corrupted_at_fraction_one(kind: FaultKind, tiny_llama: Path) -> None:
    honest, faulty = _backend(tiny_llama), _faulty(tiny_llama, kind, 1.0)
    x = torch.randn(2, 7, honest.hidden_size, generator=torch.Generator().manual_seed(1))
    n = honest.end
    assert _rel(faulty.forward(x, 0, n), honest.forward(x, 0, n)) > 1e-3
    assert _rel(faulty.forward(x, 1, 2), honest.forward(x, 1, 2)) > 1e-3  # one block: skip = identity

    cache_h = honest.new_cache(0, n, batch_size=2, max_length=8)
    cache_f = faulty.new_cache(0, n, batch_size=2, max_length=8)
    want = honest.step(x, cache=cache_h, position=0, start=0, end=n)
    assert _rel(faulty.step(x, cache=cache_f, position=0, start=0, end=n), want) > 1e-3

    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    adapter = _adapter(honest)
    good = honest.backward(x, g, 0, n, adapter=adapter, adapter_grads=AdapterGrads.NORMS)
    bad = faulty.backward(x, g, 0, n, adapter=adapter, adapter_grads=AdapterGrads.NORMS)
    assert good.grad_input is not None and bad.grad_input is not None and bad.squared_norms is not None
    assert _rel(bad.grad_input, good.grad_input) > 1e-3
    assert sorted(bad.per_sample) == sorted(good.per_sample)
    flat = lambda r: torch.cat([r.per_sample[k].flatten() for k in sorted(r.per_sample)])  # noqa: E731
    assert _rel(flat(bad), flat(good)) > 1e-3
    recomputed = sum(v.reshape(2, -1).pow(2).sum(dim=1) for v in bad.per_sample.values())
    torch.testing.assert_close(bad.squared_norms, recomputed)
    assert faulty.corrupted == faulty.calls == 4


def test_noise_is_a_quarter_of_the_rms(tiny_llama: Path) -> None:
    honest, faulty = _backend(tiny_llama), _faulty(tiny_llama, FaultKind.NOISE, 1.0)
    x = torch.randn(4, 32, honest.hidden_size, generator=torch.Generator().manual_seed(1))
    assert _rel(faulty.forward(x, 0, 2), honest.forward(x, 0, 2)) == pytest.approx(0.25, rel=0.1)


# -- a fraction of outputs ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_steps_not_hit_are_exact_and_caches_stay_whole(kind: FaultKind, tiny_llama: Path) -> None:
    """At f = 0.5 every step is either bit-identical to the honest server's or corrupted, and a
    corrupted step does not spoil the next ones (the skipped block still fills its cache)."""
    honest, faulty = _backend(tiny_llama), _faulty(tiny_llama, kind, 0.5, seed=3)
    n = honest.end
    x = torch.randn(1, 24, honest.hidden_size, generator=torch.Generator().manual_seed(4))
    cache_h = honest.new_cache(0, n, batch_size=1, max_length=24)
    cache_f = faulty.new_cache(0, n, batch_size=1, max_length=24)
    exact = 0
    for position in range(24):
        step = x[:, position : position + 1]
        want = honest.step(step, cache=cache_h, position=position, start=0, end=n)
        got = faulty.step(step, cache=cache_f, position=position, start=0, end=n)
        if torch.equal(got, want):
            exact += 1
        else:
            assert _rel(got, want) > 1e-3
    assert exact == faulty.calls - faulty.corrupted
    assert 0 < faulty.corrupted < 24


def test_fraction_is_kept_over_many_calls(tiny_llama: Path) -> None:
    faulty = _faulty(tiny_llama, FaultKind.NOISE, 0.2, seed=11)
    x = torch.randn(1, 2, faulty.hidden_size)
    for _ in range(500):
        faulty.forward(x, 0, 1)
    assert faulty.calls == 500
    assert 60 <= faulty.corrupted <= 140  # 100 expected; sd ~9


def test_seed_makes_it_reproducible(tiny_llama: Path) -> None:
    x = torch.randn(1, 3, 64)
    runs = []
    for _ in range(2):
        faulty = _faulty(tiny_llama, FaultKind.NOISE, 0.5, seed=9)
        runs.append(torch.stack([faulty.forward(x, 0, 2) for _ in range(6)]))
    assert torch.equal(runs[0], runs[1])


# -- a real server -----------------------------------------------------------------------------


def test_fault_injecting_server_warns_and_corrupts(
    tiny_llama: Path, start_server: Callable[..., BlockServer], caplog: pytest.LogCaptureFixture
) -> None:
    honest = start_server(tiny_llama, (0, 4))
    with caplog.at_level("WARNING"):
        bad = start_server(tiny_llama, (0, 4), inject_fault=FaultSpec.parse("other-weights:1.0:1"))
    assert "FAULT INJECTION" in caplog.text
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))
    want = ServerStub(honest.endpoint).forward(x, model_id="", start=0, end=4)
    got = ServerStub(bad.endpoint).forward(x, model_id="", start=0, end=4)
    assert _rel(got, want) > 1e-3
    info = ServerStub(bad.endpoint).info()
    assert (info.start, info.end, info.dtype) == (0, 4, "float32")  # it looks like any other server
