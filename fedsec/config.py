"""The run configuration: one typed, validated object built from ``context.run_config``.

Defaults live here and, identically, in ``[tool.flwr.app.config]`` of
``pyproject.toml`` (a test keeps the two in sync). Every value is checked up
front; an unknown key or value raises :class:`ConfigError` naming the key and
the allowed values.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from fedsec.registry import Param


class ConfigError(ValueError):
    """A run-config key has a wrong type or value."""


def _choice(*allowed: str) -> Callable[[], list[str]]:
    return lambda: list(allowed)


def _names(kind: str) -> Callable[[], list[str]]:
    """The registered names of a kind of component (looked up when a value is checked, never at import)."""

    def names() -> list[str]:
        from fedsec.registry import registry

        return registry(kind).names()

    return names


# Core keys whose allowed values come from a registry or a fixed list.
_CHOICES: dict[str, Callable[[], list[str]]] = {
    "dataset": _names("dataset"),
    "partitioner": _names("partitioner"),
    "strategy": _names("strategy"),
    "attack": _names("attack"),
    "learner": _names("learner"),
    "class-token-position": _choice("end", "middle", "front"),
    "device": _choice("auto", "cpu", "cuda"),
}

# (min, max) inclusive bounds of numeric core keys; None = unbounded.
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "num-server-rounds": (1, None),
    "n-ctx": (1, 64),
    "num-malicious": (0, None),
    "target-label": (0, None),
    "k-shot": (0, None),
    "local-steps": (1, None),
    "batch-size": (1, None),
    "lr": (0.0, None),
    "momentum": (0.0, 1.0),
    "weight-decay": (0.0, None),
    "dirichlet-alpha": (1e-6, None),
    "classes-per-client": (1, None),
    "fraction-train": (0.0, 1.0),
    "fraction-evaluate": (0.0, 1.0),
    "min-train-nodes": (1, None),
    "round-timeout": (1.0, None),
    "max-weight-ratio": (0.0, None),
    "seed": (0, None),
    "eval-samples": (0, None),
    "asr-eval-samples": (0, None),
}

#: One line per core key (components document theirs in their ``Param`` declarations).
_DOCS: dict[str, str] = {
    "num-server-rounds": "FL rounds",
    "run-dir": "run directory (absolute; relative ones and the empty default go under $FEDSEC_RUNS_ROOT)",
    "resume": "continue an interrupted run from the newest checkpoint in run-dir",
    "seed": "seeds partitions, prompt init, client training and the malicious choice",
    "dataset": "the task's dataset",
    "data-root": "data folder (empty: the dataset's default location)",
    "partitioner": "how the pool is split among the clients (flwr-datasets partitioners)",
    "dirichlet-alpha": "concentration of the dirichlet partitioner",
    "classes-per-client": "classes per client of the pathological partitioner",
    "k-shot": "shots per class kept from each client's partition (0 = all)",
    "model": "open_clip model name",
    "pretrained": "embedded, an open_clip tag, a local checkpoint path, or none",
    "n-ctx": "context vectors of the prompt (the token count of ctx-init)",
    "ctx-init": "words the context is initialised from (empty: random init)",
    "class-token-position": "where the class token goes in the prompt",
    "class-specific": "one context per class (CoOp's CSC)",
    "prompt-template": "hand-written prompt of the zero-shot baseline ({} = class name)",
    "learner": "what clients learn: coop (text context), vpt-shallow / vpt-deep (visual prompts), clip-adapter, "
    "or a plug-in's",
    "device": "auto (CUDA if present), cpu or cuda",
    "local-steps": "local SGD steps per round",
    "batch-size": "local batch size",
    "lr": "local learning rate",
    "momentum": "local SGD momentum",
    "weight-decay": "local weight decay",
    "strategy": "aggregation rule / defense",
    "fraction-train": "fraction of nodes sampled for training each round",
    "fraction-evaluate": "fraction sampled for federated evaluation (0 = none)",
    "min-train-nodes": "fewest nodes a training round needs",
    "round-timeout": "seconds the server waits for a round's replies",
    "max-weight-ratio": "reported num-examples bounded at this x the round's median (0 = off)",
    "eval-samples": "server test images (0 = all)",
    "asr-eval-samples": "non-target test images for the per-round attack success rate",
    "shadow-federation": "benign clients also train the benign-only shadow prompt each round (trigger_only_asr)",
    "attack": "what the malicious clients (or the FM attacker) do",
    "num-malicious": "malicious clients (a seeded choice)",
    "target-label": "backdoor target class",
}


@dataclass(frozen=True)
class RunConfig:
    """Every run-config key, kebab-case in TOML, snake_case here.

    See docs/config.md for what each key means.
    """

    num_server_rounds: int = 20
    run_dir: str = ""
    resume: bool = False
    seed: int = 0
    # data
    dataset: str = "fashion-mnist"
    data_root: str = ""
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    classes_per_client: int = 2
    k_shot: int = 16
    # model and prompt
    model: str = "fedsec-tiny-clip-v2"
    pretrained: str = "embedded"
    n_ctx: int = 4
    ctx_init: str = "a photo of a"
    class_token_position: str = "end"
    class_specific: bool = False
    prompt_template: str = "a photo of a {}."
    learner: str = "coop"
    device: str = "auto"
    # local training
    local_steps: int = 25
    batch_size: int = 32
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 0.0
    # server
    strategy: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    min_train_nodes: int = 2
    round_timeout: float = 3600.0  # seconds the server waits for a round's replies (Flower's default)
    max_weight_ratio: float = 2.0  # reported num-examples bounded at this x the round's median (0 = off)
    # evaluation
    eval_samples: int = 0
    asr_eval_samples: int = 2000
    shadow_federation: bool = True
    # attack
    attack: str = "none"
    num_malicious: int = 0
    target_label: int = 0
    # extra keys known to later components (attack/defense parameters)
    extra: dict = field(default_factory=dict, compare=False)

    # ------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        """Kebab-case names of every key."""
        return [f.name.replace("_", "-") for f in fields(cls) if f.name != "extra"]

    @classmethod
    def defaults(cls) -> dict[str, object]:
        """Kebab-case defaults (what ``[tool.flwr.app.config]`` holds)."""
        inst = cls()
        return {k: getattr(inst, k.replace("-", "_")) for k in cls.keys()}

    @classmethod
    def from_mapping(cls, values: Mapping[str, object], extra_keys: Mapping[str, object] | None = None) -> RunConfig:
        """Build and validate from a flat kebab-case mapping.

        Parameters
        ----------
        values : Mapping
            Usually ``context.run_config``. Keys not in :meth:`keys` must be in
            ``extra_keys`` (defaults of component parameters), else it is an error.
        extra_keys : Mapping, optional
            Known extra keys and their defaults (from the attack/strategy registries).
        """
        known = set(cls.keys())
        extra_defaults = dict(extra_keys if extra_keys is not None else all_extra_defaults())
        kwargs: dict[str, object] = {}
        extra: dict[str, object] = dict(extra_defaults)
        defaults = cls.defaults()
        for key, value in values.items():
            if key in known:
                kwargs[key.replace("-", "_")] = _coerce(key, value, defaults[key])
            elif key in extra_defaults:
                extra[key] = _coerce(key, value, extra_defaults[key])
            else:
                raise ConfigError(
                    f"unknown run-config key {key!r}; known keys: {', '.join(sorted(known | set(extra_defaults)))}"
                )
        cfg = cls(**kwargs, extra=extra)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check ranges and allowed values of core and component keys; raise :class:`ConfigError`."""
        for param in core_params():
            if (problem := param.problem(self.get(param.key))) is not None:
                raise ConfigError(problem)
        for param in component_params() if self.extra else ():
            if self._has(param.key) and (problem := param.problem(self.get(param.key))) is not None:
                raise ConfigError(problem)
        if "{}" not in self.prompt_template:
            raise ConfigError("run-config prompt-template must contain '{}' for the class name")
        if self.attack != "none" and self.extra:
            from fedsec.attacks import get_attack

            attack = get_attack(self.attack)
            problem = attack.config_problem(self) or attack.learner_problem(self)
            if problem:
                raise ConfigError(problem)
        elif self.attack != "none" and self.num_malicious == 0:
            raise ConfigError(f"run-config attack={self.attack!r} needs num-malicious >= 1")
        if self.extra:
            self._check_learner()

    def _check_learner(self) -> None:
        """Every active strategy wrapper runs with an image-path learner, or its ``learner_problem`` says why not."""
        from fedsec.models.learners import learns_image_path
        from fedsec.registry import registry

        if not learns_image_path(self.learner):
            return
        wrappers = registry("strategy wrapper")
        for name in wrappers.names():
            check = getattr(wrappers.get(name), "learner_problem", None)
            if check is not None and (problem := check(self)):
                raise ConfigError(problem)

    def _has(self, key: str) -> bool:
        """Whether ``key`` (kebab-case) is a core field or a declared component key of this config."""
        return key in self.extra or hasattr(self, key.replace("-", "_"))

    def get(self, key: str) -> object:
        """Value of any key, core or extra (kebab-case)."""
        if key in self.extra:
            return self.extra[key]
        return getattr(self, key.replace("-", "_"))

    def to_dict(self) -> dict[str, object]:
        """Flat kebab-case dict of every resolved value (core and extra)."""
        out = {k: getattr(self, k.replace("-", "_")) for k in self.keys()}
        out.update(self.extra)
        return out

    def with_updates(self, **changes: object) -> RunConfig:
        """A copy with snake_case fields changed."""
        return dataclasses.replace(self, **changes)

    def resolved_run_dir(self, run_id: int | None = None) -> Path:
        """The absolute run directory.

        An empty ``run-dir`` becomes ``$FEDSEC_RUNS_ROOT/run-<run_id>-<attack>-<strategy>``
        (the ServerApp and every ClientApp of a run know its Flower ``run_id``, so
        they agree; without one, a time stamp), ``FEDSEC_RUNS_ROOT`` defaulting to
        ``./runs``; a relative one is resolved against ``FEDSEC_RUNS_ROOT`` too.
        Pass absolute paths with ``flwr run``: the SuperLink's working directory
        is not the app's.
        """
        root = Path(os.environ.get("FEDSEC_RUNS_ROOT", os.path.join(os.getcwd(), "runs")))
        if not self.run_dir:
            tag = f"run-{run_id}" if run_id is not None else time.strftime("%Y%m%d-%H%M%S")
            return (root / f"{tag}-{self.attack}-{self.strategy}").resolve()
        p = Path(self.run_dir).expanduser()
        return p if p.is_absolute() else (root / p).resolve()


def _coerce(key: str, value: object, default: object) -> object:
    """Coerce ``value`` to the type of ``default``; raise a clear error if impossible."""
    want = type(default)
    if want is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif want is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif want is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"run-config {key}={value!r} must be of type {want.__name__}")


def core_params() -> list[Param]:
    """The core keys as :class:`~fedsec.registry.Param` (default, doc, choices, range)."""
    return [
        Param(k, v, _DOCS.get(k, ""), choices=_CHOICES.get(k), range=_RANGES.get(k))  # type: ignore[arg-type]
        for k, v in RunConfig.defaults().items()
    ]


def component_params() -> list[Param]:
    """Every run-config key declared by a component (discovers the components on first use)."""
    from fedsec.registry import all_params

    return all_params()


def all_extra_defaults() -> dict[str, object]:
    """Parameter defaults declared by every component (attacks, strategies, wrappers, sources...)."""
    return {p.key: p.default for p in component_params()}


def pyproject_table() -> str:
    """The ``[tool.flwr.app.config]`` body: every key with its default, as TOML."""
    import json as _json

    def fmt(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return _json.dumps(v)

    lines = [f"{k} = {fmt(v)}" for k, v in RunConfig.defaults().items()]
    lines += [f"{k} = {fmt(v)}" for k, v in sorted(all_extra_defaults().items())]
    return "\n".join(lines) + "\n"


def config_reference_markdown() -> str:
    """``docs/config-reference.md``: every key with default, type, allowed values and doc, by component."""
    from fedsec.registry import GROUPS, registry

    def cell(p: Param) -> str:
        allowed = None if callable(p.choices) else p.allowed()
        if callable(p.choices):  # registry names: listed by `fedsec config`, not frozen here
            limits = "a registered name"
        elif allowed is not None:
            limits = ", ".join(f"`{a}`" for a in allowed)
        elif p.range is not None:
            lo, hi = p.range
            limits = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        else:
            limits = ""
        default = json.dumps(p.default) if isinstance(p.default, (bool, str)) else repr(p.default)
        return f"| `{p.key}` | `{default}` | {p.type.__name__} | {limits} | {p.doc} |"

    head = "| key | default | type | allowed | meaning |\n|---|---|---|---|---|"
    out = [
        "# Run-config reference",
        "",
        "Generated by `fedsec config --markdown > docs/config-reference.md` from the declarations",
        "(`RunConfig` for the core keys, each component's `Param`s); `tests/test_config.py` keeps it current.",
        "",
        "## Core keys",
        "",
        head,
        *(cell(p) for p in core_params()),
    ]
    for kind in GROUPS:
        reg = registry(kind)
        if reg.common:
            out += ["", f"## Every {kind}", "", head, *(cell(p) for p in reg.common)]
        for comp in reg.components():
            if comp.params:
                out += ["", f"## {kind} `{comp.name}`", "", comp.doc, "", head, *(cell(p) for p in comp.params)]
    return "\n".join(out) + "\n"


def save_config(cfg: RunConfig, path: Path) -> None:
    """Write the resolved config as JSON."""
    path.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
