"""ClientApp: local training; fedsqueeze's mod decodes the model and compresses the update."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import message_size_mod

from fedsqueeze.flower import make_compression_mod

from .task import load_partition, make_model, train


def initial_model(context: Context) -> ArrayRecord:
    """The initial model, built here from the run's seed as the server builds it (for `prior = true`)."""
    return ArrayRecord(make_model(int(context.run_config["seed"])).state_dict())


# message_size_mod comes first, so it logs the sizes of the messages as they travel (compressed).
app = ClientApp(mods=[message_size_mod, make_compression_mod(prior=initial_model)])


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    cfg = context.run_config
    seed = int(cfg["seed"])
    model = make_model(seed)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    partition_id = int(context.node_config["partition-id"])
    x, y = load_partition(partition_id, int(context.node_config["num-partitions"]), seed)
    server_round = int(msg.content["config"]["server-round"])
    loss = train(model, x, y, epochs=int(cfg["local-epochs"]), batch_size=int(cfg["batch-size"]), lr=float(cfg["lr"]),
                 momentum=float(cfg["momentum"]), seed=seed * 100_003 + server_round * 1009 + partition_id)  # fmt: skip
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"train-loss": loss, "num-examples": len(y)}),
        }
    )
    return Message(content, reply_to=msg)
