"""Components by name: one way to declare them, found through entry points.

Attacks, strategies (aggregation rules), strategy wrappers, server fusions,
synthetic-data sources, datasets, partitioners, fm-poison triggers and learners each live
in a :class:`Registry`. A component is declared once, with its run-config keys::

    @register_strategy("my-rule", params=(Param("my-rule-beta", 0.1, "how much to trim", range=(0, 0.5)),))
    def my_rule(sctx): ...

Every key a component reads is a :class:`Param`: its default (which fixes its
type), a one-line doc, and the allowed choices or numeric range. ``fedsec
config`` prints them all, ``fedsec config --markdown`` writes the reference
(``docs/config-reference.md``) from them, and :class:`fedsec.config.RunConfig`
checks every value against them.

Discovery
---------
A registry finds its components in two places, the first time one is looked up:

* **entry points** of its group (``fedsec.strategies``, ``fedsec.attacks``...,
  see :data:`GROUPS`): any installed distribution registers components by
  declaring, in its own ``pyproject.toml``::

      [project.entry-points."fedsec.strategies"]
      my-rules = "my_package.rules"

  The named module is imported (its decorators register). When it names a
  *package*, every module of that package that registers a component (a
  top-level ``@register_...(...)`` or ``@<REGISTRY>.register(...)`` decorator,
  found without importing the others) is imported.
* **its built-in packages**: fedsec's own components are the modules of
  ``strategies``, ``fedsec.attacks``, ``fedsec.synthetic``... found the same
  way. fedsec's pyproject declares the same packages as entry points; the
  built-in scan also works where fedsec runs from an unpacked Flower app
  bundle (a SuperNode) without being installed. A new rule in fedsec is one
  file in ``strategies/`` and nothing else.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from logging import WARNING
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")

#: Entry-point groups, one per kind of component.
GROUPS = {
    "attack": "fedsec.attacks",
    "strategy": "fedsec.strategies",
    "strategy wrapper": "fedsec.wrappers",
    "server fusion": "fedsec.fusions",
    "synthetic source": "fedsec.synthetic",
    "dataset": "fedsec.datasets",
    "partitioner": "fedsec.partitioners",
    "fm-poison trigger": "fedsec.triggers",
    "learner": "fedsec.learners",
}

Value = bool | int | float | str


@dataclass(frozen=True)
class Param:
    """One run-config key a component reads.

    Attributes
    ----------
    key : str
        Kebab-case run-config key.
    default : bool, int, float or str
        Its default; a value given in the run config is coerced to its type.
    doc : str
        One line on what it does.
    choices : tuple of str or callable, optional
        The allowed values (a callable returning them, for values that are
        themselves registry names).
    range : tuple, optional
        ``(low, high)`` inclusive bounds of a number; ``None`` = unbounded side.
    path : bool
        The value is a file or folder path: a relative one that exists is made
        absolute at launch (the SuperLink's working directory is not the user's).
    check : callable, optional
        ``value -> str | None``: why a value of the right type is not allowed
        (e.g. a list written as a string that does not parse), checked up front
        with the range and the choices.
    """

    key: str
    default: Value
    doc: str
    choices: tuple[str, ...] | Callable[[], Sequence[str]] | None = None
    range: tuple[float | None, float | None] | None = None
    path: bool = False
    check: Callable[[Value], str | None] | None = None

    @property
    def type(self) -> type:
        """The value type (that of the default)."""
        return type(self.default)

    def allowed(self) -> list[str] | None:
        """The allowed values, or ``None`` when any value of the type is."""
        if self.choices is None:
            return None
        return list(self.choices() if callable(self.choices) else self.choices)

    def problem(self, value: object) -> str | None:
        """Why ``value`` is not allowed (out of range, not a choice), or ``None``."""
        if self.range is not None:
            lo, hi = self.range
            if (lo is not None and value < lo) or (hi is not None and value > hi):  # type: ignore[operator]
                return f"run-config {self.key}={value!r} is out of range [{lo}, {hi if hi is not None else 'inf'}]"
        names = self.allowed()
        if names is not None and value not in names:
            renamed = [r._renamed[value] for r in _REGISTRIES.values() if value in r._renamed]
            hint = f" ({value!r} was renamed {renamed[0]!r})" if renamed and renamed[0] in names else ""
            return f"run-config {self.key}={value!r} is not allowed{hint}; allowed values: {', '.join(names)}"
        if self.check is not None:
            why = self.check(value)
            if why:
                return f"run-config {self.key}={value!r}: {why}"
        return None


@dataclass(frozen=True)
class Component(Generic[T]):
    """A registered component: its name, the object, its keys, its doc and (wrappers) its order."""

    name: str
    obj: T
    params: tuple[Param, ...] = ()
    doc: str = ""
    order: int = 0


def merge_params(params: Sequence[Param], kind: str = "component") -> list[Param]:
    """``params`` without repeats; a key declared twice must have one default (else ``ValueError``)."""
    out: dict[str, Param] = {}
    for p in params:
        if p.key in out and out[p.key].default != p.default:
            raise ValueError(f"{kind} parameter {p.key!r} declared twice with different defaults")
        out.setdefault(p.key, p)
    return list(out.values())


#: Every registry created, by kind (filled as registry modules are imported).
_REGISTRIES: dict[str, Registry] = {}


class Registry(Generic[T]):
    """Map names to components; discover them through entry points and built-in packages.

    Parameters
    ----------
    kind : str
        What is registered (error messages; the key of :data:`GROUPS`), e.g. ``"attack"``.
    packages : sequence of str
        fedsec's own packages (or modules) holding components of this kind.
    common : sequence of Param
        Run-config keys every component of this kind shares.
    """

    def __init__(self, kind: str, packages: Sequence[str] = (), common: Sequence[Param] = ()) -> None:
        self.kind = kind
        self.group = GROUPS.get(kind)
        self.packages = tuple(packages)
        self.common = tuple(common)
        self._items: dict[str, Component[T]] = {}
        self._renamed: dict[str, str] = {}
        self._loaded = False
        _REGISTRIES[kind] = self

    def register(
        self, name: str, *, params: Sequence[Param] = (), doc: str | None = None, order: int = 0
    ) -> Callable[[T], T]:
        """A decorator registering its argument under ``name`` with its run-config keys.

        Parameters
        ----------
        name : str
            The component's name (the run-config value that picks it).
        params : sequence of Param
            The run-config keys it reads.
        doc : str, optional
            One line on what it is (default: the first line of the object's docstring).
        order : int
            Position among wrappers (ascending = innermost first); unused by other kinds.
        """

        def deco(obj: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            line = doc if doc is not None else ((getattr(obj, "__doc__", None) or "").strip().splitlines() or [""])[0]
            self._items[name] = Component(name, obj, tuple(params), line, order)
            return obj

        return deco

    def rename(self, old: str, new: str) -> None:
        """Record that ``old`` is now called ``new`` (looking up ``old`` then says so)."""
        self._renamed[old] = new

    # -- discovery -----------------------------------------------------------------
    def load(self) -> None:
        """Import the components of the built-in packages and of the entry points (once)."""
        if self._loaded:
            return
        self._loaded = True
        for target in self.packages:
            import_components(target)
        if self.group is None:
            return
        for ep in entry_points(group=self.group):
            try:
                import_components(ep.value.split(":")[0])
            except Exception as exc:  # noqa: BLE001 - one broken plug-in must not hide the others
                from flwr.common.logger import log

                log(WARNING, "[fedsec] entry point %s = %r (%s) failed: %s", ep.name, ep.value, self.group, exc)

    # -- lookup ----------------------------------------------------------------------
    def get(self, name: str) -> T:
        """The object registered under ``name``.

        Raises
        ------
        KeyError
            With the list of known names when ``name`` is unknown.
        """
        self.load()
        try:
            return self._items[name].obj
        except KeyError:
            if name in self._renamed:
                raise KeyError(
                    f"{self.kind} {name!r} was renamed {self._renamed[name]!r}; known: {', '.join(self.names())}"
                ) from None
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def component(self, name: str) -> Component[T]:
        """The :class:`Component` registered under ``name``."""
        self.get(name)
        return self._items[name]

    def names(self) -> list[str]:
        """Sorted registered names."""
        self.load()
        return sorted(self._items)

    def components(self) -> list[Component[T]]:
        """Every component, sorted by ``(order, name)``."""
        self.load()
        return sorted(self._items.values(), key=lambda c: (c.order, c.name))

    def params(self) -> list[Param]:
        """The shared keys, then every component's keys (each once)."""
        return merge_params([*self.common, *(p for c in self.components() for p in c.params)], self.kind)

    def param_defaults(self, base: dict[str, object] | None = None) -> dict[str, object]:
        """``base`` plus every declared key with its default."""
        out = dict(base or {})
        for p in self.params():
            if p.key in out and out[p.key] != p.default:
                raise ValueError(f"{self.kind} parameter {p.key!r} declared twice with different defaults")
            out[p.key] = p.default
        return out

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def registry(kind: str) -> Registry:
    """The registry of ``kind`` (imports fedsec's module defining it on first use)."""
    if kind not in _REGISTRIES:
        importlib.import_module(_HOMES[kind])
    return _REGISTRIES[kind]


#: Where fedsec defines each registry (imported only when the registry is asked for).
_HOMES = {
    "attack": "fedsec.attacks.base",
    "strategy": "strategies.registry",
    "strategy wrapper": "strategies.registry",
    "server fusion": "strategies.fusion",
    "synthetic source": "fedsec.synthetic.base",
    "dataset": "fedsec.data.datasets",
    "partitioner": "fedsec.data.partition",
    "fm-poison trigger": "fedsec.attacks.fm_poison",
    "learner": "fedsec.models.learners",
}


def all_params() -> list[Param]:
    """Every component's run-config keys, kind by kind (each key once)."""
    return merge_params([p for kind in GROUPS for p in registry(kind).params()])


def import_components(target: str) -> None:
    """Import ``target``; when it is a package, each of its modules that registers a component.

    A module registers a component when one of its top-level definitions has a
    ``@register_...(...)`` or ``@<name>.register(...)`` decorator; the others
    (helpers, the ServerApp...) are not imported.
    """
    spec = importlib.util.find_spec(target)
    if spec is None:
        raise ModuleNotFoundError(f"no module named {target!r}")
    module = importlib.import_module(target)
    if spec.submodule_search_locations is None:
        return
    for info in sorted(pkgutil.iter_modules(spec.submodule_search_locations), key=lambda m: m.name):
        if info.ispkg or info.name.startswith("_"):
            continue
        path = Path(info.module_finder.path) / f"{info.name}.py"  # type: ignore[union-attr]
        if path.is_file() and registers_components(path.read_text(encoding="utf-8")):
            importlib.import_module(f"{module.__name__}.{info.name}")


def registers_components(source: str) -> bool:
    """Whether a module's top level has a ``@register_...(...)`` or ``@<x>.register(...)`` decorator."""
    for node in ast.parse(source).body:
        for deco in getattr(node, "decorator_list", []):
            func = deco.func if isinstance(deco, ast.Call) else None
            if isinstance(func, ast.Name) and func.id.startswith("register"):
                return True
            if isinstance(func, ast.Attribute) and func.attr == "register":
                return True
    return False
