"""gRPC channel and server options, the same on both ends (message size limits, keepalive)."""

from __future__ import annotations

__all__ = ["grpc_options"]


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # the server must accept the clients' 10 s keepalive pings on idle channels (its default
        # minimum is 5 min, beyond which it answers GOAWAY "too_many_pings")
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ]
