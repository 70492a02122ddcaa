"""A gRPC server interceptor that records every RPC into the server's `ServerMetrics`:
requests by method and status code, and latency by method (a unary call as a whole, each
response of a stream from the request it answers). A stream the client closes (that is how
an inference session ends) counts as OK unless the server had set an error status.

An interceptor, so that no handler has to remember to count itself, and a failing handler
is counted with the status it ended with.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from corolla.metrics import ServerMetrics


class MeteringInterceptor(grpc.ServerInterceptor):
    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        rpc = details.method.rsplit("/", 1)[-1]
        m = self._metrics
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                began = time.perf_counter()
                try:
                    response = inner(request, context)
                except BaseException:
                    m.requests.labels(rpc=rpc, code=_code(context, failed=True)).inc()
                    raise
                m.latency.labels(rpc=rpc).observe(time.perf_counter() - began)
                m.requests.labels(rpc=rpc, code=_code(context, failed=False)).inc()
                return response

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
        if handler.stream_stream is not None:
            inner_stream = handler.stream_stream

            def stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
                arrived = [time.perf_counter()]

                def stamped() -> Iterator[Any]:
                    for request in requests:
                        arrived[0] = time.perf_counter()
                        yield request

                try:
                    for response in inner_stream(stamped(), context):
                        m.latency.labels(rpc=rpc).observe(time.perf_counter() - arrived[0])
                        yield response
                except GeneratorExit:  # the client closed the stream: how a session ends
                    m.requests.labels(rpc=rpc, code=_code(context, failed=False)).inc()
                    raise
                except BaseException:
                    m.requests.labels(rpc=rpc, code=_code(context, failed=True)).inc()
                    raise
                m.requests.labels(rpc=rpc, code=_code(context, failed=False)).inc()

            return grpc.stream_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return handler  # unary-stream / stream-unary: none in blocks.proto today; passed through uncounted


def _code(context: grpc.ServicerContext, *, failed: bool) -> str:
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    return "UNKNOWN" if failed else "OK"
