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
from fedsec.rundir import RunDir
from fedsec.synthetic import synthetic_provider
from strategies.recorder import Recorder
from strategies.registry import StrategyContext, build_strategy
from strategies.state import collect_state, restore_state

app = ServerApp()


def _wait_for_nodes(grid: Grid, minimum: int, timeout_s: float = 300.0) -> int:
    t0 = time.time()
    while True:
        n = len(list(grid.get_node_ids()))
        if n >= minimum or time.time() - t0 > timeout_s:
            return n
        time.sleep(1.0)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run federated prompt learning as configured by ``context.run_config``."""
    cfg = RunConfig.from_mapping(context.run_config)
    grid = fast_polling(grid)  # a deployment's grid polls for replies every 0.5 s, not Flower's 3 s
    path = cfg.resolved_run_dir(context.run_id)
    reopened = RunDir.reopen(path) if cfg.resume else None
    done, arrays = (reopened[1], reopened[2]) if reopened else (0, {})
    run_dir = reopened[0] if reopened else RunDir.create(path, cfg.to_dict())
    log(INFO, "[fedsec] run directory: %s%s", run_dir.path, f" (resuming after round {done})" if done else "")
    seed_everything(cfg.seed)
    # Clients run one thread each; the server evaluates while they wait: use every core.
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    num_nodes = _wait_for_nodes(grid, cfg.min_train_nodes)
    evaluation = Evaluation(cfg, run_dir, num_nodes)
    log(INFO, "[fedsec] %d nodes; zero-shot accuracy %.1f%%", num_nodes, 100 * evaluation.zero_shot_acc)

    synthetic = synthetic_provider(cfg, evaluation.classnames, evaluation.clip.image_size, run_dir.path / "attacker")
    sctx = StrategyContext(cfg, num_nodes, server_update=server_root_update(cfg), synthetic_data=synthetic)
    strategy = Recorder(_validated(build_strategy(sctx)), evaluation.note_round, round_offset=done)
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
        row = evaluation.evaluate_round(server_round + done, arrays["ctx"].numpy())
        return MetricRecord({k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and v is not None})

    init = ArrayRecord({"ctx": Array(arrays["ctx"] if done else evaluation.initial_ctx())})
    rounds_left = max(0, cfg.num_server_rounds - done)
    result = strategy.start(
        grid=grid, initial_arrays=init, num_rounds=rounds_left, timeout=cfg.round_timeout, evaluate_fn=evaluate_fn
    )
    final = result.arrays["ctx"].numpy() if result.arrays is not None else init["ctx"].numpy()
    evaluation.finish(np.asarray(final))


def server_root_update(cfg: RunConfig):
    """``ctx -> ctx`` trained on the server's small clean root set (FLTrust's reference update).

    The root set is ``fltrust-root-shots`` examples per class drawn (seeded) from
    the clients' pool; it is built lazily, only when a strategy calls it.
    """
    state: dict = {}

    def update(arrays: ArrayRecord) -> ArrayRecord:
        import torch

        from fedsec.data import k_shot_indices, load_dataset, prepare_images
        from fedsec.models.prompt import PromptCLIP, PromptLearner
        from fedsec.node import clip_for, get_ctx, set_ctx
        from fedsec.training import train_on_features

        if "model" not in state:
            clip = clip_for(cfg)
            pool = load_dataset(cfg.dataset, "train", cfg.data_root)
            shots = int(cfg.get("fltrust-root-shots"))
            idx = k_shot_indices(pool.labels, np.arange(len(pool)), shots, cfg.seed + 99_991)
            part = pool.subset(idx)
            learner = PromptLearner(
                clip.model,
                clip.tokenizer,
                list(part.classnames),
                cfg.n_ctx,
                cfg.ctx_init,
                cfg.class_token_position,
                cfg.class_specific,
                cfg.seed,
            )
            state["model"] = PromptCLIP(clip, learner.to(clip.device))
            state["features"] = clip.encode_images_batched(prepare_images(part.images, clip.image_size, part.fit))
            state["labels"] = torch.from_numpy(part.labels)
            state.setdefault("calls", 0)
        model = state["model"]
        set_ctx(model, arrays["ctx"].numpy())
        state["calls"] += 1
        train_on_features(
            model,
            state["features"],
            state["labels"],
            cfg.local_steps,
            cfg.batch_size,
            cfg.lr,
            cfg.momentum,
            cfg.weight_decay,
            cfg.seed * 31 + state["calls"],
        )
        return ArrayRecord({"ctx": Array(get_ctx(model))})

    # The call counter seeds each call: FLTrust checkpoints it through these (strategies.state).
    update.state_dict = lambda: {"calls": np.int64(state.get("calls", 0))}  # type: ignore[attr-defined]
    update.load_state_dict = lambda d: state.__setitem__("calls", int(d["calls"]))  # type: ignore[attr-defined]
    return update


def _validated(strategy):
    """Wrap ``strategy`` in update validation when available."""
    try:
        from strategies.validation import Validated
    except ImportError:
        return strategy
    return Validated(strategy)
