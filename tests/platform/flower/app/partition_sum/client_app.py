"""ClientApp: answer a `query` message with this SuperNode's `partition-id` (node config)."""

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def report_partition(msg: Message, context: Context) -> Message:
    partition_id = int(context.node_config["partition-id"])
    return Message(RecordDict({"report": MetricRecord({"partition-id": partition_id})}), reply_to=msg)
