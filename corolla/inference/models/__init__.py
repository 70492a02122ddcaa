"""Model families and checkpoint loading: a span of blocks for a server, the embeddings,
norm and head for a client, tiny random checkpoints for tests."""

from corolla.inference.models.checkpoint import Checkpoint
from corolla.inference.models.family import Block, ClientParts, ModelFamily
from corolla.inference.models.kv_cache import SpanCache
from corolla.inference.models.registry import FAMILIES, family_for
from corolla.inference.models.span import Span
from corolla.inference.models.tiny import TinySpec, init_tiny

__all__ = [
    "FAMILIES",
    "Block",
    "Checkpoint",
    "ClientParts",
    "ModelFamily",
    "Span",
    "SpanCache",
    "TinySpec",
    "family_for",
    "init_tiny",
]
