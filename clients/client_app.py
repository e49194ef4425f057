"""The fedsec ClientApp: local prompt training (benign or malicious) and local evaluation.

A node learns its ``partition-id`` and ``num-partitions`` from its node config.
Whether it is malicious follows from the run config (``num-malicious``,
``malicious-ids``, ``seed``); a malicious node's attack wraps the same honest
training path. Only the learner's learned arrays leave the node (``ctx`` for
CoOp, ``vpt`` for visual prompts, ``adapter-down``/``adapter-up`` for
CLIP-Adapter: ``fedsec.models.learners``). A ``train`` message flagged
``fedsec-shadow`` (the server's benign-only shadow federation,
:mod:`fedsec.shadow`) is trained honestly, whatever the node's role. Activation
bounds the server sends (record ``"bounds"``) are applied as clamps in every
evaluation, and in training unless ``bounds-client-training = false``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

if TYPE_CHECKING:
    from fedsec.config import RunConfig

# Everything else (torch, open_clip, fedsec's attacks, data and models) is imported inside the
# handlers: a deployment runs every message in a fresh process, and importing this module (which
# Flower does before it calls a handler) stays cheap and pulls in no attack, strategy or defense
# module (``tests/test_client_imports.py``).

app = ClientApp()


def _node(context: Context) -> tuple[RunConfig, int, int]:
    from fedsec.config import RunConfig

    cfg = RunConfig.from_mapping(context.run_config)
    pid = int(context.node_config.get("partition-id", 0))
    n = int(context.node_config.get("num-partitions", 1))
    return cfg, pid, n


def received_arrays(msg: Message) -> dict:
    """The learned arrays of the message's ``arrays`` record, by name, as numpy."""
    return {name: a.numpy() for name, a in msg.content["arrays"].items()}


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the learner's arrays (``ctx``, ``vpt``...) locally from the received global ones."""
    from fedsec.activation_bounds import bounded
    from fedsec.attacks import get_attack, malicious_partitions
    from fedsec.node import (
        bounds_from_content,
        clip_for,
        get_arrays,
        learner_model_for,
        local_data_for,
        local_data_under_bounds,
        seed_everything,
        set_arrays,
        training_bounds,
    )
    from fedsec.shadow import SHADOW_FLAG

    t0 = time.perf_counter()  # "train-time-s": the handler's work, as before the imports moved in here
    cfg, pid, n = _node(context)
    server_round = int(msg.content["config"].get("server-round", 0))
    seed = cfg.seed * 100_003 + server_round * 1_009 + pid
    seed_everything(seed)
    data, classnames = local_data_for(cfg, pid, n)
    model = learner_model_for(cfg, tuple(classnames))
    set_arrays(model, received_arrays(msg))
    clip = clip_for(cfg)
    received = bounds_from_content(msg.content)  # activation bounds, when the server sends them

    malicious = cfg.attack != "none" and pid in malicious_partitions(
        n, cfg.num_malicious, cfg.seed, str(cfg.get("malicious-ids"))
    )
    shadow = bool(msg.content["config"].get(SHADOW_FLAG, False))  # the benign-only baseline: always honest
    attack_cls = get_attack(cfg.attack if malicious and not shadow else "none")
    attack = attack_cls(cfg, cfg.resolved_run_dir(context.run_id) / "attacker")
    if malicious and not attack.is_active(server_round):
        attack = get_attack("none")(cfg, attack.store)
    bounds = attack.training_bounds(received, training_bounds(cfg, received))  # an adaptive attacker's own choice
    data = local_data_under_bounds(data, model, bounds, (pid, n))
    attack.round_config = dict(msg.content["config"])  # e.g. FedProx's proximal-mu
    with bounded(model.bound_root(), bounds):
        stats = attack.run(model, data, clip, server_round, pid, seed)

    metrics = {"num-examples": len(data), "partition-id": pid, "train-time-s": time.perf_counter() - t0}
    metrics.update({k: float(v) for k, v in stats.items()})
    arrays = ArrayRecord({name: Array(a) for name, a in get_arrays(model).items()})
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Accuracy of the received global arrays on this client's local data."""
    from fedsec.activation_bounds import bounded
    from fedsec.node import (
        bounds_from_content,
        learner_model_for,
        local_data_for,
        local_data_under_bounds,
        set_arrays,
    )
    from fedsec.training import accuracy_on_features

    cfg, pid, n = _node(context)
    data, classnames = local_data_for(cfg, pid, n)
    model = learner_model_for(cfg, tuple(classnames))
    set_arrays(model, received_arrays(msg))
    bounds = bounds_from_content(msg.content)
    data = local_data_under_bounds(data, model, bounds, (pid, n))
    with bounded(model.bound_root(), bounds):
        features = model.features(data.images, data.features)  # the cached ones unless the learner maps them
        acc = accuracy_on_features(model, features, data.labels)
    content = RecordDict({"metrics": MetricRecord({"num-examples": len(data), "local-acc": acc})})
    return Message(content=content, reply_to=msg)
