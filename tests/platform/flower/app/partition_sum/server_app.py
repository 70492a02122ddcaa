"""ServerApp: wait for `min-nodes` SuperNodes, query each once, write who answered and the sum.

The result goes to `result-path` as JSON: {"nodes": [...], "partitions": {node id: partition id},
"sum": ...}, and is printed, so it also appears in the run's log (`flwr log`).
"""

import json
import time
from pathlib import Path

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    min_nodes = int(context.run_config["min-nodes"])
    wait_seconds = float(context.run_config["wait-seconds"])
    deadline = time.monotonic() + wait_seconds
    node_ids = sorted(grid.get_node_ids())
    while len(node_ids) < min_nodes and time.monotonic() < deadline:
        time.sleep(0.5)
        node_ids = sorted(grid.get_node_ids())
    queries = [Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.QUERY) for node_id in node_ids]
    partitions = {
        str(reply.metadata.src_node_id): int(reply.content["report"]["partition-id"])
        for reply in grid.send_and_receive(queries, timeout=wait_seconds)
        if not reply.has_error()
    }
    result = {"nodes": node_ids, "partitions": partitions, "sum": sum(partitions.values())}
    Path(str(context.run_config["result-path"])).write_text(json.dumps(result), encoding="utf-8")
    print(f"partition-sum result: {json.dumps(result)}")
