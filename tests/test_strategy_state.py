"""Strategy state across a resume: ``state_dict``/``load_state_dict``, the run directory, the global RNGs."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from flwr.app import Error

from fedsec.rundir import RunDir
from strategies.recorder import Recorder, round_faults
from strategies.registry import STRATEGIES, load_all
from strategies.state import collect_state, restore_state
from strategies.validation import Validated
from tests.strategy_helpers import configure, ctx_of, make_sctx, replies_to, run_round, task_identity, train_content

D = 6
PARTITIONS = [0, 1, 2, 3, 4]  # 3 and 4 are sybils
SYBIL = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 0.0])


def _build(name: str, wrap: bool = True):
    load_all()
    strategy = STRATEGIES.get(name)(
        make_sctx(name, len(PARTITIONS), **{"flame-noise-lambda": 0.05, "foolsgold-norm-cap": 0.0})
    )
    return Validated(strategy) if wrap else strategy


def _updates(server_round: int) -> dict[int, np.ndarray]:
    """Partition -> update of ``server_round``: honest ones diverse; sybils identical in rounds 1-2, then random.

    Only the histories of rounds 1-2 still tell the sybils apart in rounds 3-4.
    """
    rng = np.random.default_rng(100 + server_round)
    out = {p: np.eye(D)[p] + 0.3 * rng.normal(size=D) for p in (0, 1, 2)}
    for p in (3, 4):
        out[p] = SYBIL if server_round <= 2 else rng.normal(size=D)
    return out


def _round(strategy, ctx: np.ndarray, server_round: int, node_base: int) -> np.ndarray:
    """One training round; node ids are ``node_base + partition`` (a new run draws new ones)."""
    contents = {
        node_base + p: train_content((ctx + u.reshape(1, D)).astype(np.float32), **{"partition-id": p})
        for p, u in _updates(server_round).items()
    }
    arrays, _, _ = run_round(strategy, ctx, contents, server_round=server_round)
    return ctx_of(arrays).astype(np.float32) if arrays is not None else ctx


@pytest.mark.parametrize("name", ["foolsgold", "flame"])
def test_resumed_strategy_equals_uninterrupted_one(tmp_path, name):
    # Prepare: the uninterrupted run, 4 rounds
    ctx0 = np.zeros((1, D), np.float32)
    ref, ctx, ref_ctx = _build(name), ctx0, {}
    for r in range(1, 5):
        ctx = ref_ctx[r] = _round(ref, ctx, r, node_base=100)
    # Execute: 2 rounds, state to the run directory; a new strategy (and new node ids) resumes it
    first, ctx = _build(name), ctx0
    for r in (1, 2):
        ctx = _round(first, ctx, r, node_base=100)
    run_dir = RunDir.create(tmp_path / "run", {})
    run_dir.write_strategy_state(2, collect_state(first))
    resumed, fresh, ctx_r, ctx_f = _build(name), _build(name), ctx, ctx
    restore_state(resumed, run_dir.strategy_state(2))
    for r in (3, 4):
        ctx_r = _round(resumed, ctx_r, r, node_base=200)
        ctx_f = _round(fresh, ctx_f, r, node_base=200)
    # Assert: identical to the uninterrupted run; without the state it would differ
    np.testing.assert_array_equal(ctx_r, ref_ctx[4])
    assert not np.allclose(ctx_f, ref_ctx[4], atol=1e-4)


def test_foolsgold_histories_follow_the_reported_partition_not_the_node_id():
    # Prepare
    strategy = _build("foolsgold", wrap=False)
    ctx = np.zeros((1, D), np.float32)
    # Execute: the same partitions under new node ids (restarted SuperNodes)
    ctx = _round(strategy, ctx, 1, node_base=100)
    _round(strategy, ctx, 2, node_base=300)
    # Assert: one history per partition, the sum of both rounds' updates
    assert sorted(strategy.histories) == PARTITIONS
    np.testing.assert_allclose(strategy.histories[3], _updates(1)[3] + _updates(2)[3], rtol=1e-6, atol=1e-6)
    assert sorted(strategy.last_excluded) == [303, 304]


def test_collect_state_walks_wrappers_and_restores_the_global_rngs(tmp_path):
    # Prepare: Recorder(Validated(FoolsGold)) after a round; the global generators at some point
    strategy = Recorder(
        _build("foolsgold"), sink=lambda info: None, arrayrecord_key="arrays", client_id_key="partition-id"
    )
    _round(strategy, np.zeros((1, D), np.float32), 1, node_base=100)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.normal(), torch.rand(1)
    # Execute: save through the run directory, draw, restore, draw again
    run_dir = RunDir.create(tmp_path / "run", {})
    run_dir.write_strategy_state(1, collect_state(strategy))
    first = (random.random(), np.random.normal(size=3).tolist(), torch.rand(2).tolist())
    other = Recorder(
        _build("foolsgold"), sink=lambda info: None, arrayrecord_key="arrays", client_id_key="partition-id"
    )
    restore_state(other, run_dir.strategy_state(1))
    again = (random.random(), np.random.normal(size=3).tolist(), torch.rand(2).tolist())
    # Assert: nested keys, the histories back in the inner strategy, the same draws
    state = run_dir.strategy_state(1)
    assert {f"inner:inner:history.{p}" for p in PARTITIONS} <= set(state)
    assert {"rng:python", "rng:numpy-key", "rng:numpy-rest", "rng:torch"} <= set(state)
    inner = other.inner.inner
    assert sorted(inner.histories) == PARTITIONS
    np.testing.assert_array_equal(inner.histories[2], strategy.inner.inner.histories[2])
    assert again == first
    assert run_dir.strategy_state(7) is None


def test_fltrust_checkpoints_its_server_update_counter():
    # Prepare: a server update with a call counter, as the ServerApp's root-set trainer has
    calls = {"n": 0}

    def server_update(arrays):
        calls["n"] += 1
        return arrays

    server_update.state_dict = lambda: {"calls": np.int64(calls["n"])}
    server_update.load_state_dict = lambda d: calls.__setitem__("n", int(d["calls"]))
    load_all()
    strategy = STRATEGIES.get("fltrust")(make_sctx("fltrust", 5, server_update=server_update))
    # Execute
    _round(strategy, np.zeros((1, D), np.float32), 1, node_base=100)
    _round(strategy, np.zeros((1, D), np.float32), 2, node_base=100)
    state = collect_state(strategy, include_rng=False)
    calls["n"] = 0
    restore_state(strategy, state)
    # Assert
    assert state == {"server-update.calls": 2}
    assert calls["n"] == 2


def test_round_faults_counts_error_replies_and_missing_replies():
    # Prepare: instructions to 3 nodes, ids set as Flower does when pushing them
    strategy = _build("foolsgold", wrap=False)
    instructions = configure(strategy, np.zeros((1, D), np.float32), [11, 12, 13])
    for i, msg in enumerate(instructions):
        msg.metadata.__dict__["_message_id"] = f"m{i}"
    with task_identity():
        # node 11 replies, node 12's ClientApp crashed (error reply), node 13 never answers
        replies = replies_to(
            [m for m in instructions if m.metadata.dst_node_id != 13],
            {11: train_content(np.ones((1, D), np.float32)), 12: Error(code=5, reason="Node Unavailable")},
        )
    # Execute
    faults = round_faults({m.metadata.message_id: m.metadata.dst_node_id for m in instructions}, replies)
    # Assert
    assert faults == {"num_sent": 3, "failed_replies": 1, "missing_replies": 1, "failed_nodes": [12, 13]}


def test_run_dir_keeps_the_two_newest_strategy_states(tmp_path):
    # Prepare
    run_dir = RunDir.create(tmp_path / "run", {})
    # Execute
    for r in range(1, 5):
        run_dir.write_strategy_state(r, {"x": np.full(3, r)})
    # Assert
    names = sorted(p.name for p in (run_dir.path / "checkpoints").iterdir())
    assert names == ["strategy_0003.npz", "strategy_0004.npz"]
    np.testing.assert_array_equal(run_dir.strategy_state(4)["x"], [4, 4, 4])
    assert run_dir.strategy_state(2) is None
