"""Server discovery over a libp2p Kademlia DHT.

Block servers announce a `ServerRecord` per model on a `DhtNode`; clients ask any node
for all live servers of a model. The DHT runs in its own trio thread; this API is plain
blocking Python for grpc threads.
"""

from corolla.inference.discovery._node import DhtNode
from corolla.inference.discovery._record import MAX_RECORD_BYTES, ServerRecord

__all__ = ["MAX_RECORD_BYTES", "DhtNode", "ServerRecord"]
