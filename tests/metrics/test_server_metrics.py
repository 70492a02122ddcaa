"""A block server's metrics after real traffic: requests by RPC and code, latency, sessions,
KV cache, rows per forward; /health 503 until the server serves."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from corolla.inference.client import RemoteModelForCausalLM
from corolla.inference.server.app import BlockServer, ServerConfig
from corolla.inference.wire import blocks_pb2 as pb
from corolla.inference.wire import blocks_pb2_grpc as pb_grpc
from corolla.metrics import MetricsEndpoint, ServerMetrics


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_server_metrics_after_generation_and_a_forward(tiny_llama: Path) -> None:
    metrics = ServerMetrics()
    server = BlockServer(
        ServerConfig(model=tiny_llama, blocks=(0, 4), dht=False, cache_budget_bytes=64 << 20), metrics=metrics
    )
    with MetricsEndpoint(metrics.registry, server.readiness) as endpoint:
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{endpoint.url}/health", timeout=5)
        assert info.value.code == 503
        server.start()
        try:
            with urllib.request.urlopen(f"{endpoint.url}/health", timeout=5) as r:
                assert r.status == 200
            with RemoteModelForCausalLM.from_pretrained(tiny_llama, servers=[server.endpoint]) as model:
                ids = torch.tensor([[1, 5, 9, 4, 7]])
                model.generate(ids, max_new_tokens=6, do_sample=False)
                model(torch.tensor([[3, 4, 5], [6, 7, 8]]))  # one parallel forward of 2 rows
            with grpc.insecure_channel(server.endpoint) as channel, pytest.raises(grpc.RpcError) as refused:
                pb_grpc.BlockServiceStub(channel).Forward(pb.ForwardRequest(model_id="another-model", start=0, end=4))
            code = refused.value.code().name
            with urllib.request.urlopen(f"{endpoint.url}/metrics", timeout=5) as r:
                samples = _samples(r.read().decode())
        finally:
            server.stop()
    assert samples[("corolla_server_requests_total", (("code", "OK"), ("rpc", "Inference")))] == 1.0
    assert samples[("corolla_server_requests_total", (("code", "OK"), ("rpc", "Forward")))] == 1.0
    assert code != "OK" and samples[("corolla_server_requests_total", (("code", code), ("rpc", "Forward")))] == 1.0
    # the open, one prefill and 5 decode steps: 7 responses timed on the stream
    assert samples[("corolla_server_request_duration_seconds_count", (("rpc", "Inference"),))] == 7.0
    assert samples[("corolla_server_tokens_total", (("rpc", "Inference"),))] == 5.0 + 5.0
    assert samples[("corolla_server_tokens_total", (("rpc", "Forward"),))] == 6.0
    assert samples[("corolla_server_batch_rows_count", ())] == 7.0
    assert samples[("corolla_server_kv_cache_capacity_bytes", ())] == float(64 << 20)
    assert samples[("corolla_server_sessions_open", ())] == 0.0  # the session closed with generate
