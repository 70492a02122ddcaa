"""Pipelined remote inference: block servers, the client, routing, discovery, wire format.

The submodules are imported on use (`corolla.inference.client`, `.server`, ...) so that
a client does not pay for server-only imports and vice versa.
"""

from corolla.inference.errors import InferenceError

__all__ = ["InferenceError"]
