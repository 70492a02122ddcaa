"""The client side of the swarm: a model whose blocks run remotely, sessions, routing."""

from corolla.inference.client.adapter import LoraAdapter, LoraSettings
from corolla.inference.client.adapter_sync import AdapterSync
from corolla.inference.client.auditor import WorkAuditor
from corolla.inference.client.model import RemoteModelForCausalLM
from corolla.inference.client.routing import BanList, Hop, Router
from corolla.inference.client.sequential import HopGrads, RemoteSequential
from corolla.inference.client.session import InferenceSession
from corolla.inference.client.swarm import Swarm
from corolla.inference.client.transport import ServerStub

__all__ = [
    "AdapterSync",
    "BanList",
    "Hop",
    "HopGrads",
    "InferenceSession",
    "LoraAdapter",
    "LoraSettings",
    "RemoteModelForCausalLM",
    "RemoteSequential",
    "Router",
    "ServerStub",
    "Swarm",
    "WorkAuditor",
]
