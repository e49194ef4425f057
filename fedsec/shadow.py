"""The benign-only shadow federation: the prompt the federation would hold without its attackers.

The trigger-alone baseline ``trigger_only_asr`` applies the attackers' trigger
to a prompt that never saw a malicious update. Until session 9 that prompt was
the initial prompt plus the accumulated mean *benign update*; but each of those
updates was computed from the poisoned global prompt, so their sum is no
prompt that any federation trains (main job, session 8: 39.7% clean accuracy,
under zero-shot; the trigger under it 0.0% against 77.7% under a real
no-attack run). Here the benign clients train the shadow prompt itself: each
round the server sends it to the round's benign nodes in a second ``train``
message flagged :data:`SHADOW_FLAG`, carrying the real round's config and
records (FedProx's term, activation bounds) beside the shadow array; the client
trains it honestly, whatever its role, and the shadow moves by the example-weighted mean
of their updates (FedAvg, McMahan et al., AISTATS 2017) - a FedAvg federation of
the benign clients alone, run beside the real one. It is measurement, like the
rest of :mod:`fedsec.evaluation`: the strategy never sees these messages.

The price is a second local training pass of every benign client per round;
``shadow-federation = false`` switches it off (and back to the accumulated
updates, the earlier form, kept for the figures made with it).
"""

from __future__ import annotations

from collections.abc import Sequence
from logging import WARNING
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log

if TYPE_CHECKING:
    from flwr.serverapp import Grid

#: Config entry of a shadow ``train`` message: the client trains honestly, whatever its role.
SHADOW_FLAG = "fedsec-shadow"


def weighted_mean_update(updates: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """FedAvg's step: the mean of ``updates`` weighted by ``weights`` (e.g. example counts).

    Parameters
    ----------
    updates : sequence of np.ndarray
        Client updates (reply minus the array sent), all of one shape.
    weights : sequence of float
        Non-negative weights with a positive sum.

    Returns
    -------
    np.ndarray
        ``sum_i w_i u_i / sum_i w_i`` in float64, in the updates' shape.
    """
    if len(updates) == 0 or len(updates) != len(weights):
        raise ValueError(f"need as many weights as updates (>= 1); got {len(updates)} updates, {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum; got {w.tolist()}")
    stacked = np.stack([np.asarray(u, dtype=np.float64) for u in updates])
    return np.tensordot(w / w.sum(), stacked, axes=1)


def shadow_round(
    grid: Grid,
    server_round: int,
    shadow: np.ndarray | dict[str, np.ndarray],
    node_ids: Sequence[int],
    *,
    array_name: str = "",
    arrayrecord_key: str,
    weighted_by_key: str,
    metricrecord_key: str = "metrics",
    timeout: float | None = None,
    template: RecordDict | None = None,
) -> tuple[np.ndarray | dict[str, np.ndarray], int]:
    """One round of the shadow federation: the benign nodes train ``shadow``; FedAvg of their updates.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid.
    server_round : int
        The round (clients seed their training with it, as in the real round).
    shadow : np.ndarray or dict
        The shadow array before this round (named ``array_name``), or every learned array of the
        learner by name (e.g. ``{"vpt": ...}``); the result has the same form.
    node_ids : sequence of int
        The round's benign nodes.
    array_name, arrayrecord_key, weighted_by_key, metricrecord_key : str
        Name of the trained array, record key of the arrays, metric the replies weigh by, record key
        of the metrics.
    timeout : float, optional
        Seconds to wait for the replies.
    template : RecordDict, optional
        The real round's train content: its config (e.g. FedProx's ``proximal-mu``) and its other
        records (e.g. activation bounds) go with the shadow too, so the benign clients train the
        shadow exactly as they trained the real prompt; only the array differs. Not modified.

    Returns
    -------
    tuple
        The new shadow (``float32``, unchanged if no usable reply came) and the number of replies used.
    """
    named = isinstance(shadow, dict)
    arrays = {k: np.asarray(v) for k, v in shadow.items()} if named else {array_name: np.asarray(shadow)}
    records = {k: v for k, v in (template or {}).items() if k not in (arrayrecord_key, "config")}
    config = ConfigRecord(
        {**dict((template or {}).get("config", {})), "server-round": int(server_round), SHADOW_FLAG: True}
    )
    messages = [
        Message(
            content=RecordDict(
                {**records, arrayrecord_key: ArrayRecord({k: Array(v) for k, v in arrays.items()}), "config": config}
            ),
            message_type=MessageType.TRAIN,
            dst_node_id=int(node),
        )
        for node in node_ids
    ]
    updates, weights = [], []
    for reply in grid.send_and_receive(messages, timeout=timeout) if messages else []:
        if reply.has_error() or not reply.has_content():
            continue
        try:
            values = {k: reply.content[arrayrecord_key][k].numpy() for k in arrays}
            weight = float(reply.content[metricrecord_key][weighted_by_key])
        except (KeyError, TypeError):
            continue
        usable = all(v.shape == arrays[k].shape and np.all(np.isfinite(v)) for k, v in values.items())
        if not usable or weight <= 0:
            continue
        updates.append({k: v.astype(np.float64) - arrays[k] for k, v in values.items()})
        weights.append(weight)
    if len(updates) < len(messages):
        log(
            WARNING,
            "[fedsec] shadow round %d: %d of %d benign replies usable",
            server_round,
            len(updates),
            len(messages),
        )
    new = {
        k: (a + weighted_mean_update([u[k] for u in updates], weights) if updates else a).astype(np.float32)
        for k, a in arrays.items()
    }
    return (new if named else new[array_name]), len(updates)
