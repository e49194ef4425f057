"""The fedsec ServerApp: build the strategy by name, run it, evaluate every round."""

from __future__ import annotations

import os
import time
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedsec.config import RunConfig
from fedsec.evaluation import Evaluation
from fedsec.grid import fast_polling
from fedsec.node import seed_everything
from fedsec.preflight import check_config, check_nodes
from fedsec.rundir import RunDir, claim
from fedsec.shadow import shadow_round
from fedsec.synthetic import synthetic_provider
from strategies.recorder import Recorder
from strategies.registry import StrategyContext, build_strategy
from strategies.state import collect_state, restore_state

app = ServerApp()

#: fedsec's message records (what the ClientApp sends): the strategies are generic, the glue names them.
ARRAYRECORD_KEY, METRICRECORD_KEY, WEIGHTED_BY_KEY = "arrays", "metrics", "num-examples"
#: The prompt array in the ArrayRecord, and the metric each reply reports its partition under.
PROMPT_ARRAY, CLIENT_ID_KEY = "ctx", "partition-id"
#: Aggregated training metrics written to ``metrics.jsonl`` (``*``: a prefix: the server's own fusion and bounds).
RECORDED_METRICS = ("train-loss", "train-acc", "rejected-replies", "fusion-*", "bound-*")


def _wait_for_nodes(grid: Grid, minimum: int, timeout_s: float = 300.0) -> int:
    t0 = last_note = time.time()
    while True:
        n = len(list(grid.get_node_ids()))
        if n >= minimum or time.time() - t0 > timeout_s:
            return n
        if time.time() - last_note >= 10.0:
            last_note = time.time()
            log(
                WARNING,
                "[fedsec] waiting for nodes: %d of min-train-nodes=%d connected after %.0f s (gives up after %.0f s)",
                n,
                minimum,
                time.time() - t0,
                timeout_s,
            )
        time.sleep(1.0)


class MaliciousClientsFailed(RuntimeError):
    """Every malicious client of a round failed: the attack did not run, its figures would be meaningless."""


def malicious_failure(info: dict, malicious: list[int], known: dict[int, int], reasons: list[str]) -> str | None:
    """Why a round's attack did not run (every malicious client sent an error reply), or ``None``.

    Parameters
    ----------
    info : dict
        The round's facts from :class:`strategies.recorder.Recorder` (``partitions``: node id ->
        partition id of the replies that arrived, ``failed_nodes``, ``failed_replies``, ``num_sent``).
    malicious : list of int
        The malicious partition ids (the evaluation's knowledge; no strategy sees it).
    known : dict[int, int]
        Node id -> partition id seen in earlier rounds (updated here).
    reasons : list of str
        The error replies' reasons this round (from reply validation).

    Returns
    -------
    str or None
        One line naming the round's failure, or ``None`` when a malicious client replied, no
        client replied at all, or the failures cannot be attributed to the malicious clients.
    """
    known.update(info.get("partitions", {}))
    if not malicious or not info.get("failed_replies"):
        return None
    if not info.get("partitions") or any(pid in malicious for pid in info["partitions"].values()):
        return None  # a malicious client replied, or nobody did (a general fault the run survives as before)
    failed = set(info.get("failed_nodes", []))
    failed_mal = {known[n] for n in failed if n in known and known[n] in malicious}
    everyone_sampled = info.get("num_sent", 0) >= len(known) and not (set(known) - failed - set(info["partitions"]))
    if not failed_mal and not everyone_sampled:
        return None
    why = reasons[0] if reasons else "error reply"
    return (
        f"every malicious client failed ({info['failed_replies']} error replies of {info.get('num_sent', 0)}; "
        f"malicious partitions {malicious}), so the attack did not run this round: {why[:300]} "
        "(a transient fault? the run continues from its last checkpoint with resume=true)"
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run federated prompt learning as configured by ``context.run_config``."""
    cfg = check_config(context.run_config)  # the launcher ran the same checks before Flower started
    grid = fast_polling(grid)  # a deployment's grid polls for replies every 0.5 s, not Flower's 3 s
    path = cfg.resolved_run_dir(context.run_id)
    claim(path, cfg.to_dict(), cfg.resume)  # a run directory holds one run
    reopened = RunDir.reopen(path) if cfg.resume else None
    if reopened is not None and reopened[1] == 0:
        reopened = None  # only round 0 was checkpointed: start afresh (keeps one round-0 row)
    done, arrays = (reopened[1], reopened[2]) if reopened else (0, {})
    run_dir = reopened[0] if reopened else RunDir.create(path, cfg.to_dict())
    log(INFO, "[fedsec] run directory: %s%s", run_dir.path, f" (resuming after round {done})" if done else "")
    seed_everything(cfg.seed)
    # Clients run one thread each; the server evaluates while they wait: use every core.
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    num_nodes = _wait_for_nodes(grid, cfg.min_train_nodes)
    check_nodes(cfg, num_nodes)
    evaluation = Evaluation(cfg, run_dir, num_nodes)
    log(INFO, "[fedsec] %d nodes; zero-shot accuracy %.1f%%", num_nodes, 100 * evaluation.zero_shot_acc)

    synthetic = synthetic_provider(cfg, evaluation.classnames, evaluation.clip.image_size, run_dir.path / "attacker")
    sctx = StrategyContext(
        cfg,
        num_nodes,
        server_update=server_root_update(cfg),
        synthetic_data=synthetic,
        arrayrecord_key=ARRAYRECORD_KEY,
        weighted_by_key=WEIGHTED_BY_KEY,
        client_id_key=CLIENT_ID_KEY,
        array_name=PROMPT_ARRAY,
        array_names=tuple(evaluation.init_arrays),  # the learner's arrays: fusion and bounds act on all of them
    )
    known_nodes: dict[int, int] = {}

    def note_round(info: dict) -> None:
        validated = strategy.inner
        reasons = [r for _, r in getattr(validated, "last_rejected", []) if r.startswith("error reply")]
        problem = malicious_failure(info, evaluation.malicious, known_nodes, reasons)
        if problem is not None:
            raise MaliciousClientsFailed(problem)
        evaluation.note_round(info)

    strategy = Recorder(
        _validated(build_strategy(sctx), cfg.max_weight_ratio),
        note_round,
        round_offset=done,
        arrayrecord_key=ARRAYRECORD_KEY,
        client_id_key=CLIENT_ID_KEY,
        metric_keys=RECORDED_METRICS,
    )
    if done:
        evaluation.restore(arrays)
        saved = run_dir.strategy_state(done)
        if saved is not None:
            restore_state(strategy, saved)  # FoolsGold histories, FLAME's generator, global RNGs
        else:
            log(WARNING, "[fedsec] no strategy state for round %d: stateful defenses restart empty", done)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if done and server_round == 0:
            return None  # the checkpointed round was evaluated before the interruption
        if server_round > 0:  # before the round's checkpoint, so a checkpointed round always has its state
            run_dir.write_strategy_state(server_round + done, collect_state(strategy))
        if server_round > 0 and evaluation.shadow_federation:  # the benign-only baseline (fedsec.shadow)
            shadow, replies = shadow_round(
                grid,
                server_round + done,
                evaluation.shadow_arrays,
                evaluation.benign_nodes(),
                arrayrecord_key=ARRAYRECORD_KEY,
                weighted_by_key=WEIGHTED_BY_KEY,
                metricrecord_key=METRICRECORD_KEY,
                timeout=cfg.round_timeout,
                template=strategy.train_content(),
            )
            evaluation.set_shadow(shadow, replies)
        row = evaluation.evaluate_round(server_round + done, {k: a.numpy() for k, a in arrays.items()})
        return MetricRecord({k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and v is not None})

    start = {k: arrays[k] for k in evaluation.init_arrays} if done else evaluation.initial_arrays()
    init = ArrayRecord({k: Array(np.asarray(v)) for k, v in start.items()})  # the learner's arrays, by name
    prepare = getattr(strategy, "initial_arrays", None)  # a wrapper's hook, found through the wrappers' delegation
    if not done and callable(prepare):
        init = prepare(init)  # e.g. server-fusion = "init": the initial prompt pre-trained on the synthetic data
    rounds_left = max(0, cfg.num_server_rounds - done)
    result = strategy.start(
        grid=grid, initial_arrays=init, num_rounds=rounds_left, timeout=cfg.round_timeout, evaluate_fn=evaluate_fn
    )
    final = result.arrays if result.arrays is not None else init
    evaluation.finish({k: a.numpy() for k, a in final.items()})


def server_root_update(cfg: RunConfig):
    """``arrays -> arrays``: the learner trained on the server's small clean root set (FLTrust's reference update).

    The root set is ``fltrust-root-shots`` examples per class drawn (seeded) from
    the clients' pool; it is built lazily, only when a strategy calls it. Every
    learned array is trained, by the honest local step of the run's learner.
    """
    state: dict = {}

    def update(arrays: ArrayRecord) -> ArrayRecord:
        import torch

        from fedsec.data import k_shot_indices, load_dataset, prepare_images
        from fedsec.models.learners import build_learner
        from fedsec.models.prompt import build_prompt_model
        from fedsec.node import clip_for, get_arrays, set_arrays
        from fedsec.training import LocalData, train_learner

        if "model" not in state:
            clip = clip_for(cfg)
            pool = load_dataset(cfg.dataset, "train", cfg.data_root)
            shots = int(cfg.get("fltrust-root-shots"))
            idx = k_shot_indices(pool.labels, np.arange(len(pool)), shots, cfg.seed + 99_991)
            part = pool.subset(idx)
            state["model"] = build_learner(cfg, build_prompt_model(cfg, clip, part.classnames))  # its own model
            images = prepare_images(part.images, clip.image_size, part.fit)
            state["data"] = LocalData(images, torch.from_numpy(part.labels), clip.encode_images_batched(images))
            state.setdefault("calls", 0)
        model = state["model"]
        set_arrays(model, {k: a.numpy() for k, a in arrays.items()})
        state["calls"] += 1
        c = cfg
        seed = cfg.seed * 31 + state["calls"]
        train_learner(
            model, state["data"], c.local_steps, c.batch_size, c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
            seed=seed,
        )  # fmt: skip
        return ArrayRecord({k: Array(v) for k, v in get_arrays(model).items()})

    # The call counter seeds each call: FLTrust checkpoints it through these (strategies.state).
    update.state_dict = lambda: {"calls": np.int64(state.get("calls", 0))}  # type: ignore[attr-defined]
    update.load_state_dict = lambda d: state.__setitem__("calls", int(d["calls"]))  # type: ignore[attr-defined]
    return update


def _validated(strategy, max_weight_ratio: float = 0.0):
    """Wrap ``strategy`` in update validation (reported weights bounded at ``max_weight_ratio`` x the median)."""
    try:
        from strategies.validation import Validated
    except ImportError:
        return strategy
    return Validated(
        strategy, max_weight_ratio=max_weight_ratio, metricrecord_key=METRICRECORD_KEY, client_id_key=CLIENT_ID_KEY
    )
