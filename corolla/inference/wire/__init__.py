"""The gRPC data plane: protobuf messages (`blocks.proto`, generated `blocks_pb2*`) and
tensor encoding. Regenerate the protobuf modules with `make proto`."""

from corolla.inference.wire.tensors import DTYPES, deserialize, serialize

__all__ = ["DTYPES", "deserialize", "serialize"]
