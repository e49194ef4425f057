"""The CNN app's ClientApp: train on the node's digits under the server's activation bounds.

Each node reads its partition from the node config (``partition-id``,
``num-partitions``), trains the received CNN for one epoch under the clamps
of the bounds record (when the server sent one) and replies with its weights.
For the demonstration, partition :data:`~task.FLIPPER` sends a boosted,
sign-flipped update and partition :data:`~task.MALFORMED` sends NaN weights
from round 2 on.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from experiments.examples.cnn_app.task import (
    ARRAYS_KEY,
    BOUNDS_KEY,
    CLIENT_KEY,
    FLIPPER,
    MALFORMED,
    METRICS_KEY,
    WEIGHT_KEY,
    SmallCNN,
    client_split,
    evaluate,
    load_arrays,
    to_record,
    train,
)
from fedsec.activation_bounds import ActivationBounds, bounds_from_content

app = ClientApp()


def _received(msg: Message) -> tuple[SmallCNN, ActivationBounds | None]:
    """The global CNN and the bounds (``None`` before the server learned any)."""
    model = load_arrays(SmallCNN(), {k: v.numpy() for k, v in msg.content[ARRAYS_KEY].items()})
    return model, bounds_from_content(msg.content, BOUNDS_KEY)


def _partition(context: Context) -> tuple[int, int]:
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    """Train the received CNN on this node's digits; reply with its weights."""
    torch.set_num_threads(1)
    pid, parts = _partition(context)
    server_round = int(msg.content["config"]["server-round"])
    model, bounds = _received(msg)
    sent = {k: v.numpy() for k, v in msg.content[ARRAYS_KEY].items()}
    images, labels = client_split(pid, parts)
    loss = train(model, images, labels, bounds, seed=1000 * server_round + pid)
    arrays = to_record(model)
    if pid == FLIPPER:  # a Byzantine node: its update reversed and boosted 5x
        arrays = ArrayRecord({k: Array(sent[k] - 5.0 * (v.numpy() - sent[k])) for k, v in arrays.items()})
    if pid == MALFORMED and server_round >= 2:  # a broken node: NaN in its first conv's weights
        first = next(iter(arrays))
        arrays[first] = Array(np.full_like(arrays[first].numpy(), np.nan))
    metrics = MetricRecord({WEIGHT_KEY: len(labels), CLIENT_KEY: pid, "train-loss": loss})
    return Message(RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: metrics}), reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    """Accuracy of the received CNN on this node's digits under the bounds, and the fraction they clip."""
    torch.set_num_threads(1)
    pid, parts = _partition(context)
    model, bounds = _received(msg)
    images, labels = client_split(pid, parts)
    acc, clipped = evaluate(model, images, labels, bounds)
    metrics = MetricRecord({WEIGHT_KEY: len(labels), "accuracy": acc, "clipped-fraction": clipped})
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=msg)
