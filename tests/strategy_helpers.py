"""Shared helpers for the strategy tests: real Flower messages, a fake grid, snapshots."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy
from flwr.supercore.task_identity import TaskIdentity

from fedsec.config import RunConfig
from strategies.registry import StrategyContext, strategy_param_defaults


class FakeGrid:
    """The part of ``flwr.serverapp.Grid`` FedAvg's sampling uses."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


@contextlib.contextmanager
def task_identity() -> Iterator[None]:
    """Set the ServerApp identity Flower needs to create instruction messages, then restore it."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def ctx_arrays(values: np.ndarray) -> ArrayRecord:
    """An ``ArrayRecord`` holding ``values`` under ``"ctx"``."""
    return ArrayRecord({"ctx": Array(np.asarray(values))})


def train_content(values: np.ndarray, num_examples: float = 10, **metrics: object) -> RecordDict:
    """A well-formed training reply content."""
    return RecordDict(
        {"arrays": ctx_arrays(values), "metrics": MetricRecord({"num-examples": num_examples, **metrics})}
    )


def configure(strategy: Strategy, global_ctx: np.ndarray, node_ids: list[int], server_round: int = 1) -> list[Message]:
    """Run ``strategy.configure_train`` on a fake grid; return the instruction messages."""
    with task_identity():
        return list(strategy.configure_train(server_round, ctx_arrays(global_ctx), ConfigRecord(), FakeGrid(node_ids)))


def replies_to(instructions: list[Message], contents: Mapping[int, RecordDict | Error]) -> list[Message]:
    """Replies (in node-id order) to the instructions, as the nodes would send them."""
    by_node = {ins.metadata.dst_node_id: ins for ins in instructions}
    out = []
    for node in sorted(contents):
        content = contents[node]
        out.append(Message(content, reply_to=by_node[node]))
    return out


def run_round(
    strategy: Strategy, global_ctx: np.ndarray, contents: Mapping[int, RecordDict | Error], server_round: int = 1
) -> tuple[ArrayRecord | None, MetricRecord | None, list[Message]]:
    """configure_train + replies + aggregate_train; return arrays, metrics and the replies."""
    instructions = configure(strategy, global_ctx, sorted(contents), server_round)
    replies = replies_to(instructions, contents)
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    return arrays, metrics, replies


def snapshot(replies: list[Message]) -> list[object]:
    """A comparable picture of the replies (metadata, record names, array bytes, metrics)."""
    out: list[object] = []
    for msg in replies:
        md = msg.metadata
        head = (md.src_node_id, md.dst_node_id, md.message_type, md.reply_to_message_id)
        if msg.has_error():
            out.append((head, "error", msg.error.code, msg.error.reason))
            continue
        records = []
        for name, record in msg.content.items():
            if isinstance(record, ArrayRecord):
                arrays = [(k, a.dtype, tuple(a.shape), a.stype, bytes(a.data)) for k, a in record.items()]
                records.append((name, arrays))
            else:
                records.append((name, sorted((k, repr(v)) for k, v in record.items())))
        out.append((head, records))
    return out


def make_sctx(strategy: str, num_nodes: int, server_update: object = None, **extra: object) -> StrategyContext:
    """A strategy context with default parameters, ``extra`` overriding them (kebab-case keys)."""
    params = dict(strategy_param_defaults())
    params.update(extra)
    cfg = RunConfig(strategy=strategy, min_train_nodes=2, fraction_evaluate=0.0, extra=params)
    return StrategyContext(
        cfg,
        num_nodes,
        server_update=server_update,  # type: ignore[arg-type]
        arrayrecord_key="arrays",
        weighted_by_key="num-examples",
        client_id_key="partition-id",
        array_name="ctx",
    )


def npy_bytes(value: np.ndarray) -> bytes:
    """``value`` serialized as Flower's ``Array`` does (``.npy``)."""
    buf = io.BytesIO()
    np.save(buf, value, allow_pickle=False)
    return buf.getvalue()


def ctx_of(arrays: ArrayRecord | None) -> np.ndarray:
    """The ``"ctx"`` array of an aggregate."""
    assert arrays is not None
    return arrays["ctx"].numpy()
