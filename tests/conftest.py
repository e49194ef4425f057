"""Shared fixtures: a random-weight tiny CLIP (fast) and the embedded one."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

# Under pytest-xdist (``-n N``) each worker gets its own torch threads, Flower home and SuperLink
# ports, so end-to-end tests in different workers never share a SuperLink or a config file.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
_N_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _N_WORKERS)))
if _WORKER:
    _idx = int(_WORKER.removeprefix("gw") or 0)
    os.environ.setdefault("FLWR_HOME", str(ROOT / ".flwr" / f"xdist-{_WORKER}"))
    os.environ.setdefault("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", str(39091 + 200 + 20 * _idx))
    os.environ.setdefault("FLWR_LOCAL_CONTROL_API_PORT", str(39093 + 200 + 20 * _idx))
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(
    not FMNIST.exists() and not os.environ.get("CI"),
    reason="dataset-fashion-mnist not installed (CI installs it)",
)


@pytest.fixture(autouse=True)
def _gc_sees_only_this_test():
    """Freeze what earlier tests and imports left, so a ``gc.collect()`` inside a test walks only its own objects.

    Flower's ``ArrayRecord.to_numpy_ndarrays(keep_input=False)`` (used by its Bulyan, for one)
    forces a full collection per reply; in a test process holding torch, open_clip, hypothesis
    and session fixtures each one took up to seconds. Unfrozen after the test: the interpreter's
    own generational collection then treats those objects as usual.
    """
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="session")
def random_clip():
    """``fedsec-tiny-clip`` with random weights (no checkpoint)."""
    from fedsec.models.factory import create_clip

    torch.manual_seed(0)
    return create_clip("fedsec-tiny-clip", "none")


@pytest.fixture(scope="session")
def embedded_clip():
    """The shipped, pretrained ``fedsec-tiny-clip``."""
    from fedsec.models.factory import create_clip

    return create_clip("fedsec-tiny-clip", "embedded")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """End-to-end tests first (longest processing time first), unit tests after.

    Under pytest-xdist's ``load`` scheduling, workers take tests in this order as
    they become free, so the long Flower runs start at once and the many short
    unit tests fill the gaps at the end instead of leaving one worker alone with
    a long run.
    """

    def rank(item) -> tuple[int, int]:
        if not item.get_closest_marker("e2e"):
            return (1, 0)
        known = [i for i, prefix in enumerate(_LONGEST_FIRST) if item.nodeid.startswith(prefix)]
        return (0, known[0] if known else len(_LONGEST_FIRST))

    items.sort(key=rank)
    if getattr(config.option, "loadgroup", False):
        # pytest-xdist appends "@group" to the node ids of xdist_group tests (its hook runs before this one);
        # without it, tests that share one Flower run land on different workers and each start their own.
        lost = [i.nodeid for i in items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
        if lost:
            raise pytest.UsageError(
                f"pytest-xdist did not group {lost[0]} (pytest {pytest.__version__}): install pytest<9, "
                "as pyproject.toml's dev extra pins"
            )


#: End-to-end tests, longest first (several Flower starts, or waits on heartbeats), as measured.
_LONGEST_FIRST = [
    "tests/test_resume.py",
    "tests/test_sweep.py::test_sweep_resumes",
    "tests/test_deploy_faults.py",
    "tests/test_hardening_e2e.py::test_simultaneous",
    "tests/test_ray_cluster.py",
    "tests/test_fm_e2e.py",
    "tests/test_deploy.py",
    "tests/test_deploy_warm.py",
    "tests/test_e2e.py",
    "tests/test_hardening_e2e.py",
]
