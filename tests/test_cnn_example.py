"""The CNN example app: fedsec's FLAME, reply validation and activation bounds in a plain PyTorch Flower app.

One Flower simulation (4 nodes, 2 rounds, Ray backend) of
``experiments/examples/cnn_app``: partition 2 sends a boosted sign-flipped
update, partition 3 sends NaN weights in round 2.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch

from tests.conftest import ROOT

# One simulation serves every test here: keep them on one xdist worker (--dist loadgroup), so it runs once.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("cnn-example")]

NUM_NODES, NUM_ROUNDS = 4, 2


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict[str, np.ndarray], float]:
    """Run the app once; return its ``result.json``, ``final.npz`` and the wall time."""
    from flwr.simulation import run_simulation

    from experiments.examples.cnn_app.client_app import app as client_app
    from experiments.examples.cnn_app.server_app import make_server_app

    out = tmp_path_factory.mktemp("cnn_app")
    # the Ray actors import the ClientApp by module name: they need the repository on their path
    paths = [str(ROOT), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    t0 = time.perf_counter()
    try:
        run_simulation(
            server_app=make_server_app(out, num_rounds=NUM_ROUNDS, num_nodes=NUM_NODES),
            client_app=client_app,
            num_supernodes=NUM_NODES,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": 2, "num_gpus": 0, "include_dashboard": False},
            },
        )
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    wall = time.perf_counter() - t0
    if not (out / "result.json").exists():
        pytest.fail("the CNN app's ServerApp wrote no result (see the Flower log above)")
    with np.load(out / "final.npz") as final:
        arrays = {k: final[k] for k in final.files}
    return json.loads((out / "result.json").read_text()), arrays, wall


def test_the_simulation_completes_its_rounds(cnn_run):
    # Prepare / Execute: the module's one run
    result, _, _ = cnn_run

    # Assert: both rounds aggregated, each with every node's reply; the model learned the digits
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    assert all(r["replies"] == NUM_NODES for r in result["rounds"])
    assert result["central"]["2"]["accuracy"] > result["central"]["0"]["accuracy"] + 0.3


def test_flame_reports_the_sign_flipping_partition_as_excluded(cnn_run):
    # Prepare / Execute
    result, _, _ = cnn_run

    # Assert: FLAME's detection, mapped to partitions, leaves out partition 2 in both rounds and no one else
    assert [r["excluded"] for r in result["rounds"]] == [[2], [2]]


def test_validation_rejects_the_malformed_reply(cnn_run):
    # Prepare / Execute
    result, _, _ = cnn_run

    # Assert: round 1 rejects nothing; round 2 rejects partition 3's NaN weights, and the metrics count it
    first, second = result["rounds"]
    assert first["rejected"] == [] and first["train"]["rejected-replies"] == 0
    assert [p for p, _ in second["rejected"]] == [3] and "NaN" in second["rejected"][0][1]
    assert second["train"]["rejected-replies"] == 1


def test_bounds_are_learned_per_conv_channel_and_clip_activations(cnn_run):
    # Prepare: the final CNN and bounds, and the server's digits
    from experiments.examples.cnn_app.task import BOUNDS_KEY, SmallCNN, load_arrays, server_split
    from fedsec.activation_bounds import ActivationBounds, bounded

    result, final, _ = cnn_run
    bounds = {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith(BOUNDS_KEY + "/")}
    model = load_arrays(SmallCNN(), {k: v for k, v in final.items() if "/" not in k}).eval()
    images, _ = server_split()
    seen: list[torch.Tensor] = []
    hook = model.pool.register_forward_pre_hook(lambda m, a: seen.append(a[0]))  # act2's output, after any clamp

    # Execute: the final CNN without and with the clamps
    with torch.no_grad():
        model(images)
        with bounded(model, ActivationBounds.from_arrays(bounds)):
            model(images)
    hook.remove()
    plain, clamped = seen

    # Assert: one bound per conv channel (8 and 16), learned in both rounds
    assert result["bounds"] == {"act1": [8, 1, 1], "act2": [16, 1, 1]}
    assert all("bound-loss" in r["train"] for r in result["rounds"])
    # the clamps changed some activations, none above its channel's bound
    per_channel_max = plain.amax(dim=(0, 2, 3)).numpy()
    assert (per_channel_max > bounds["act2"].ravel()).any()
    assert (clamped.amax(dim=(0, 2, 3)).numpy() <= bounds["act2"].ravel() + 1e-6).all()
    # the clients clipped activations under the bounds they received (round 1 had none yet when training)
    assert result["clients"]["1"]["clipped-fraction"] > 0.0
    assert result["central"]["2"]["clipped-fraction"] > 0.0
