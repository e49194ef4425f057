"""Checkpointable server state: what a resumed run needs to continue exactly like an uninterrupted one.

A stateful rule implements the pair ``state_dict() -> dict[str, ndarray]`` and
``load_state_dict(state)`` (FoolsGold's update histories, FLAME's noise
generator, FLTrust's server-update counter); stateless rules implement
nothing. :func:`collect_state` walks a strategy and its wrappers (``inner`` /
``strategy`` attributes: ``Recorder``, ``Validated``, ``NormClipWrapper``,
Flower's DP wrappers) and gathers every piece, keys prefixed with ``inner:``
per wrapper level, plus the global random generators the server draws from
(Python's ``random`` in Flower's node sampling, NumPy's legacy generator in
Flower's DP noise, torch's). :func:`restore_state` puts it all back. The
values are plain arrays (strings as 0-d unicode arrays), so a state dict is
saved with ``numpy.savez`` and loaded without pickle.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator, Mapping

import numpy as np

StateDict = dict[str, np.ndarray]

#: Key prefix of one wrapper level.
NEST = "inner:"
#: Key prefix of the global random generators.
RNG = "rng:"


def _children(obj: object) -> Iterator[tuple[str, object]]:
    """``(prefix, object)`` for ``obj`` and every strategy it wraps, outermost first."""
    prefix, seen = "", set()
    while obj is not None and id(obj) not in seen:
        seen.add(id(obj))
        yield prefix, obj
        attrs = vars(obj) if hasattr(obj, "__dict__") else {}
        obj = attrs.get("inner") or attrs.get("strategy")
        prefix += NEST


def collect_state(strategy: object, include_rng: bool = True) -> StateDict:
    """The state of ``strategy`` and of every strategy it wraps (and the global RNGs).

    Parameters
    ----------
    strategy : object
        The outermost strategy (e.g. ``Recorder(Validated(FoolsGold))``).
    include_rng : bool
        Also capture the global random generators (see :func:`rng_state`).

    Returns
    -------
    StateDict
        Flat ``name -> array``; empty when nothing is stateful.
    """
    out: StateDict = {}
    for prefix, obj in _children(strategy):
        fn = getattr(type(obj), "state_dict", None)
        if callable(fn):
            for key, value in obj.state_dict().items():  # type: ignore[attr-defined]
                if key.startswith(NEST) or key.startswith(RNG):
                    raise ValueError(f"{type(obj).__name__}.state_dict key {key!r} uses a reserved prefix")
                out[prefix + key] = np.asarray(value)
    if include_rng:
        out.update(rng_state())
    return out


def restore_state(strategy: object, state: Mapping[str, np.ndarray]) -> None:
    """Load a :func:`collect_state` dict back into ``strategy`` (same wrapping) and the global RNGs.

    Parameters
    ----------
    strategy : object
        A freshly built strategy of the same kind and wrapping.
    state : Mapping[str, ndarray]
        What :func:`collect_state` returned (possibly after a save/load round trip).
    """
    for prefix, obj in _children(strategy):
        fn = getattr(type(obj), "load_state_dict", None)
        if not callable(fn):
            continue
        own = {
            k[len(prefix) :]: v
            for k, v in state.items()
            if k.startswith(prefix) and not k[len(prefix) :].startswith((NEST, RNG))
        }
        obj.load_state_dict(own)  # type: ignore[attr-defined]
    set_rng_state({k: v for k, v in state.items() if k.startswith(RNG)})


def json_array(value: object) -> np.ndarray:
    """``value`` as a 0-d unicode array holding its JSON (storable without pickle)."""
    return np.array(json.dumps(value))


def from_json_array(value: np.ndarray) -> object:
    """Inverse of :func:`json_array`."""
    return json.loads(str(np.asarray(value)[()]))


def rng_state() -> StateDict:
    """The global random generators: Python's ``random``, NumPy's legacy ``np.random``, torch's CPU generator.

    Returns
    -------
    StateDict
        ``rng:python``, ``rng:numpy-key``, ``rng:numpy-rest`` and, when torch is
        imported, ``rng:torch``.
    """
    version, internal, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state()
    out: StateDict = {
        RNG + "python": json_array([version, list(internal), gauss]),
        RNG + "numpy-key": np.asarray(key, dtype=np.uint32),
        RNG + "numpy-rest": json_array([name, int(pos), int(has_gauss), float(cached)]),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        out[RNG + "torch"] = torch.get_rng_state().numpy().copy()
    return out


def set_rng_state(state: Mapping[str, np.ndarray]) -> None:
    """Restore what :func:`rng_state` captured (missing entries are left alone)."""
    if RNG + "python" in state:
        version, internal, gauss = from_json_array(state[RNG + "python"])  # type: ignore[misc]
        random.setstate((version, tuple(internal), gauss))
    if RNG + "numpy-key" in state and RNG + "numpy-rest" in state:
        name, pos, has_gauss, cached = from_json_array(state[RNG + "numpy-rest"])  # type: ignore[misc]
        np.random.set_state((name, np.asarray(state[RNG + "numpy-key"], dtype=np.uint32), pos, has_gauss, cached))
    torch = sys.modules.get("torch")
    if torch is not None and RNG + "torch" in state:
        torch.set_rng_state(torch.from_numpy(np.asarray(state[RNG + "torch"], dtype=np.uint8).copy()))
