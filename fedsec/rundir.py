"""The run directory: what every run writes, and what sweeps and outside tools read.

Layout (all paths relative to the absolute run directory)::

    config.json           resolved run config (flat kebab-case keys)
    metrics.jsonl         one JSON object per round (round 0 = before training)
    summary.json          final figures (clean_acc, asr, zero_shot_acc, wall_s, ...)
    final_prompt.npz      the final global ctx (key "ctx")
    final_prompt.json     what re-evaluating it needs: model, checkpoint + SHA-256,
                          class names, prompt layout, dataset and split identity
    checkpoints/round_NNNN.npz   global ctx after every round (+ "round")
    checkpoints/strategy_NNNN.npz   the strategy's state after that round (FoolsGold's
                          histories, FLAME's noise generator, the global RNGs;
                          written before round_NNNN.npz, read on resume; the two newest)
    attacker/             the colluding attackers' store (trigger), if any
    flwr.log              the Flower log of the run (when started by fedsec.launch)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _clean(value):
    """JSON-safe values: numpy scalars to Python, NaN/inf to None."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class RunDir:
    """Writer and reader of one run directory."""

    path: Path

    @classmethod
    def create(cls, path: Path, config: dict) -> RunDir:
        """Create (or reuse) ``path`` and write ``config.json``.

        ``metrics.jsonl`` is truncated: a run directory holds one run.
        """
        path = Path(path)
        if not path.is_absolute():
            raise ValueError(f"run directory must be absolute, got {path}")
        (path / "checkpoints").mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(_clean(config), indent=2, sort_keys=True) + "\n")
        (path / "metrics.jsonl").write_text("")
        return cls(path)

    @classmethod
    def reopen(cls, path: Path) -> tuple[RunDir, int, dict[str, np.ndarray]] | None:
        """Reopen an interrupted run at its newest checkpoint.

        Metric rows after the checkpointed round (a round cut off midway) are
        dropped. Returns ``(run_dir, round, arrays)``, or ``None`` when the
        directory holds no checkpoint.
        """
        rd = cls(Path(path))
        last = rd.last_checkpoint() if (rd.path / "checkpoints").exists() else None
        if last is None:
            return None
        rnd, arrays = last
        rows = [r for r in rd.metrics() if r.get("round", 0) <= rnd]
        (rd.path / "metrics.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        return rd, rnd, arrays

    # ------------------------------------------------------------- writing
    def append_metrics(self, row: dict) -> None:
        """Append one round's metrics as a JSON line."""
        with open(self.path / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(_clean(row), sort_keys=True) + "\n")

    def write_checkpoint(self, server_round: int, arrays: dict[str, np.ndarray]) -> Path:
        """Save the global arrays after ``server_round`` (atomically: a killed writer leaves no torn file)."""
        out = self.path / "checkpoints" / f"round_{server_round:04d}.npz"
        _savez_atomic(out, round=np.int64(server_round), **arrays)
        return out

    def write_strategy_state(self, server_round: int, state: dict[str, np.ndarray]) -> Path:
        """Save the strategy's state after ``server_round`` (see :mod:`strategies.state`).

        Written before the round's ``round_NNNN.npz``, so every checkpointed
        round has its strategy state. Only the two newest are kept (a resume
        needs the state of the newest ``round_NNNN.npz``, which may still be
        the previous round's); FoolsGold's histories grow with the federation.
        """
        out = self.path / "checkpoints" / f"strategy_{server_round:04d}.npz"
        _savez_atomic(out, **state)
        for old in (self.path / "checkpoints").glob("strategy_*.npz"):
            if int(old.stem.split("_")[1]) < server_round - 1:
                old.unlink(missing_ok=True)
        return out

    def write_json(self, name: str, obj: dict) -> None:
        """Write ``obj`` as ``name`` (e.g. ``summary.json``)."""
        (self.path / name).write_text(json.dumps(_clean(obj), indent=2, sort_keys=True) + "\n")

    def write_final_prompt(self, ctx: np.ndarray, identity: dict, **arrays: np.ndarray) -> None:
        """Save the final ctx (and any other learned array, e.g. ``vpt``) and what re-evaluating it needs."""
        np.savez(self.path / "final_prompt.npz", ctx=ctx, **arrays)
        self.write_json("final_prompt.json", identity)

    # ------------------------------------------------------------- reading
    def config(self) -> dict:
        """The resolved config."""
        return json.loads((self.path / "config.json").read_text())

    def metrics(self) -> list[dict]:
        """All metric rows, in order."""
        text = (self.path / "metrics.jsonl").read_text() if (self.path / "metrics.jsonl").exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def summary(self) -> dict | None:
        """``summary.json`` or ``None`` if the run has not finished."""
        p = self.path / "summary.json"
        return json.loads(p.read_text()) if p.exists() else None

    def strategy_state(self, server_round: int) -> dict[str, np.ndarray] | None:
        """The strategy state saved after ``server_round``, or ``None`` (a run from before it was saved)."""
        p = self.path / "checkpoints" / f"strategy_{server_round:04d}.npz"
        if not p.exists():
            return None
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def last_checkpoint(self) -> tuple[int, dict[str, np.ndarray]] | None:
        """The newest per-round checkpoint, or ``None``."""
        ckpts = sorted((self.path / "checkpoints").glob("round_*.npz"))
        if not ckpts:
            return None
        with np.load(ckpts[-1]) as z:
            arrays = {k: z[k] for k in z.files if k != "round"}
            return int(z["round"]), arrays


class RunDirError(ValueError):
    """A run directory belongs to another run, is finished, or holds nothing to resume."""


#: Files a launcher or a failed start may leave in a directory that holds no run yet.
_STARTUP_FILES = {"flwr.log", "config.json", "metrics.jsonl", "checkpoints", "attacker"}
#: Keys that may differ between a run and its resumption.
RESUME_FREE_KEYS = ("resume",)


def config_diff(old: dict, new: dict, ignore: tuple[str, ...] = RESUME_FREE_KEYS) -> list[str]:
    """``key: old -> new`` for every key whose value differs (JSON-compared), sorted.

    Parameters
    ----------
    old, new : dict
        Flat kebab-case configs (``config.json`` and the resolved new config).
    ignore : tuple of str
        Keys not compared.
    """
    a, b = json.loads(json.dumps(_clean(old))), json.loads(json.dumps(_clean(new)))
    out = []
    for key in sorted(set(a) | set(b)):
        if key in ignore or a.get(key, "<absent>") == b.get(key, "<absent>"):
            continue
        out.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return out


def run_progress(path: Path) -> dict:
    """What a directory holds: ``finished``, ``rounds`` checkpointed, ``triggers`` saved, ``config``."""
    path = Path(path)
    ckpts = sorted((path / "checkpoints").glob("round_*.npz")) if (path / "checkpoints").is_dir() else []
    triggers = list((path / "attacker").rglob("*.pt")) if (path / "attacker").is_dir() else []
    cfg_file = path / "config.json"
    try:
        config = json.loads(cfg_file.read_text()) if cfg_file.exists() else None
    except (OSError, ValueError):
        config = {}
    rows = RunDir(path).metrics() if (path / "metrics.jsonl").exists() else []
    return {
        "finished": (path / "summary.json").exists(),
        "rounds": [int(p.stem.split("_")[1]) for p in ckpts],
        "triggers": len(triggers),
        "rows": len(rows),
        "config": config,
        "foreign": sorted(p.name for p in path.iterdir() if p.name not in _STARTUP_FILES) if path.is_dir() else [],
    }


def claim(path: Path, config: dict, resume: bool) -> str:
    """Decide whether a run with ``config`` may write into ``path``; raise :class:`RunDirError` if not.

    A run directory is owned by one run. Nothing is written or removed here.

    * ``resume=false``: ``path`` must be missing, empty, or hold only what a
      start that failed before round 0 left (``flwr.log``, ``config.json``,
      an empty ``metrics.jsonl``); a finished run, an unfinished run with
      checkpoints, or unrelated files are refused.
    * ``resume=true``: ``path`` must hold an unfinished run with a checkpoint
      and the same config (every key but ``resume``); the differing keys are
      listed otherwise.

    Parameters
    ----------
    path : Path
        The absolute run directory.
    config : dict
        The new run's resolved config (flat kebab-case).
    resume : bool
        The run config's ``resume``.

    Returns
    -------
    str
        ``"new"`` or ``"resume"``.
    """
    path = Path(path)
    state = run_progress(path)
    moved = "fedsec run --overwrite moves it aside"
    if resume:
        if not path.is_dir():
            raise RunDirError(f"resume=true but run-dir {path} does not exist; drop resume=true to start a fresh run")
        if state["finished"]:
            raise RunDirError(
                f"resume=true but run-dir {path} holds a finished run (summary.json); nothing to resume "
                "(choose another run-dir for a new run)"
            )
        if not state["rounds"] or state["config"] is None:
            raise RunDirError(
                f"resume=true but run-dir {path} holds no checkpoint (checkpoints/round_*.npz and config.json); "
                "check the path, or drop resume=true to start a fresh run"
            )
        diff = config_diff(state["config"], config)
        if diff:
            raise RunDirError(
                f"resume=true but the config differs from the run in {path}: {'; '.join(diff)}; "
                "resume with the run's own config (its config.json), or choose another run-dir"
            )
        return "resume"
    if state["finished"]:
        raise RunDirError(
            f"run-dir {path} holds a finished run (summary.json); choose another run-dir, or {moved} "
            "and starts a new run there"
        )
    if state["rounds"] or state["triggers"] or state["rows"]:
        done = f"rounds up to {max(state['rounds'])}" if state["rounds"] else "partial output"
        raise RunDirError(f"run-dir {path} holds an unfinished run ({done}); continue it with resume=true, or {moved}")
    if state["foreign"]:
        listed = ", ".join(state["foreign"][:3]) + (", ..." if len(state["foreign"]) > 3 else "")
        raise RunDirError(
            f"run-dir {path} is not empty and holds no fedsec run ({listed}); choose an empty or new folder"
        )
    return "new"


def move_aside(path: Path) -> Path | None:
    """Rename an existing run directory to ``<path>.replaced-<time>`` (nothing is deleted); return the new name."""
    import time

    path = Path(path)
    if not path.exists():
        return None
    target = path.with_name(f"{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    path.rename(target)
    return target


def _savez_atomic(path: Path, **arrays: np.ndarray) -> None:
    """``numpy.savez`` to a temporary file beside ``path``, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)
