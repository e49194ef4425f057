"""Check a whole run config before anything runs: one function for the launcher and the ServerApp.

:func:`check_config` is what ``fedsec run`` calls before it starts any Flower
process and what the ServerApp calls first; a problem raises
:class:`~fedsec.config.ConfigError` with one line naming the key, the value
and the fix. It checks, in order of cost:

1. keys, types, ranges and allowed values (:meth:`RunConfig.from_mapping`);
2. cross-key rules that need no data: ``num-malicious`` and ``malicious-ids``
   against the number of clients, ``min-train-nodes`` against the number of
   SuperNodes (when known);
3. with ``deep=True``: the dataset is present and its class count bounds
   ``target-label``; ``n-ctx`` equals the token count of ``ctx-init`` under
   the model's tokenizer; the model is known and a local checkpoint is
   readable and fits the architecture key for key
   (:func:`fedsec.models.checkpoint.check_checkpoint`).

:func:`check_keys` is a first pass without heavy imports (keys, types, ranges
and the federation rules against the app's ``[tool.flwr.app.config]``
defaults): an unknown key, a string for a number, a value out of range or too
few SuperNodes are reported in well under a second.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from fedsec.config import ConfigError, RunConfig


def check_keys(values: Mapping[str, object], defaults: Mapping[str, object], num_nodes: int | None = None) -> RunConfig:
    """Keys, types, ranges and the federation rules, against a table of defaults (no registries imported).

    Parameters
    ----------
    values : Mapping
        The run config as the user gave it (flat kebab-case).
    defaults : Mapping
        Every known key with its default (``[tool.flwr.app.config]``).
    num_nodes : int, optional
        Federation size, when known: :func:`check_nodes` runs too.

    Returns
    -------
    RunConfig
        Built without the registry checks (allowed values come in :func:`check_config`).

    Raises
    ------
    ConfigError
        Naming the key, the value and what is expected.
    """
    from fedsec.config import _RANGES, _coerce

    core = set(RunConfig.keys())
    kwargs: dict[str, object] = {}
    extra = {k: v for k, v in defaults.items() if k not in core}
    for key, value in values.items():
        if key not in defaults:
            close = _close_keys(key, defaults)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "; see `fedsec config`"
            raise ConfigError(f"unknown run-config key {key!r}{hint}")
        coerced = _coerce(key, value, defaults[key])
        if key in core:
            kwargs[key.replace("-", "_")] = coerced
        else:
            extra[key] = coerced
    cfg = RunConfig(**kwargs, extra=extra)  # type: ignore[arg-type]
    for key, (lo, hi) in _RANGES.items():
        if cfg._has(key):
            v = cfg.get(key)
            if (lo is not None and v < lo) or (hi is not None and v > hi):  # type: ignore[operator]
                raise ConfigError(f"run-config {key}={v!r} is out of range [{lo}, {hi if hi is not None else 'inf'}]")
    if num_nodes is not None:
        check_nodes(cfg, num_nodes)
    return cfg


def _close_keys(key: str, known: Mapping[str, object]) -> list[str]:
    import difflib

    return difflib.get_close_matches(key, list(known), n=2, cutoff=0.75)


def check_nodes(cfg: RunConfig, num_nodes: int) -> None:
    """Rules that need the federation size (``--num-supernodes``, or the nodes connected).

    Raises
    ------
    ConfigError
        ``min-train-nodes`` above the SuperNodes, ``num-malicious`` or a
        ``malicious-ids`` entry outside the clients.
    """
    if num_nodes < 1:
        raise ConfigError(f"--num-supernodes={num_nodes}: a federation needs at least 1 SuperNode")
    if cfg.min_train_nodes > num_nodes:
        raise ConfigError(
            f"run-config min-train-nodes={cfg.min_train_nodes} exceeds the {num_nodes} "
            f"SuperNode{'s' if num_nodes != 1 else ''}: the server "
            f"would wait for nodes that never come; set min-train-nodes <= {num_nodes} or add SuperNodes"
        )
    if cfg.attack == "none":
        return
    fixed = str(cfg.get("malicious-ids")) if cfg._has("malicious-ids") else ""
    if fixed.strip():
        try:
            ids = sorted({int(x) for x in fixed.split(",") if x.strip()})
        except ValueError:
            raise ConfigError(
                f"run-config malicious-ids={fixed!r} must be comma-separated partition ids, e.g. '0,3'"
            ) from None
        bad = [i for i in ids if not 0 <= i < num_nodes]
        if bad:
            raise ConfigError(
                f"run-config malicious-ids={fixed!r}: {bad} not in [0, {num_nodes}) for {num_nodes} clients"
            )
    elif cfg.num_malicious > num_nodes:
        raise ConfigError(
            f"run-config num-malicious={cfg.num_malicious} exceeds the {num_nodes} clients; "
            f"set num-malicious <= {num_nodes} or add SuperNodes"
        )


def dataset_classnames(name: str, root: str) -> list[str]:
    """The class names of a registered dataset, checking its files are present (cheaply where possible).

    Raises
    ------
    ConfigError
        When the data cannot be found, naming ``data-root`` and the fix.
    """
    from fedsec.data import load_dataset

    try:
        if name == "digits":  # ships with scikit-learn: its names, without loading the images
            from importlib.util import find_spec

            if find_spec("sklearn") is None:
                raise ValueError("dataset digits needs scikit-learn (pip install scikit-learn)")
            return ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
        if name == "fashion-mnist":
            from fedsec.data.datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, _find

            base = Path(root or os.environ.get("FEDSEC_FASHION_MNIST", FASHION_MNIST_ROOT))
            for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
                _check_idx_header(_find(base, stem))
            return list(FASHION_MNIST_CLASSES)
        if name == "imagefolder":
            if not root:
                raise ValueError("dataset imagefolder needs a data-root with train/ and test/")
            for split in ("train", "test"):
                if not (Path(root) / split).is_dir():
                    raise FileNotFoundError(
                        f"{Path(root) / split} is not a folder (expected <data-root>/{split}/<class>/*)"
                    )
            classes = sorted(p.name for p in (Path(root) / "train").iterdir() if p.is_dir())
            if not classes:
                raise FileNotFoundError(f"{Path(root) / 'train'} holds no class folders")
            return [c.replace("_", " ") for c in classes]
        return list(load_dataset(name, "test", root).classnames)
    except (OSError, ValueError, RuntimeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"run-config dataset={name!r} data-root={root!r}: {msg}") from exc


def _check_idx_header(path: Path) -> None:
    """Raise ``ValueError`` unless ``path`` (gzipped or not) starts like an unsigned-byte IDX file."""
    import gzip

    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as fh:
            head = fh.read(4)
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path} is unreadable ({type(exc).__name__}: {exc})") from None
    if len(head) < 4 or head[:2] != b"\x00\x00" or head[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (a Fashion-MNIST file is expected)")


def check_model(cfg: RunConfig) -> None:
    """The model is known, its checkpoint readable and fitting, and ``n-ctx`` matches ``ctx-init``.

    Reads the architecture configs and the tokenizer through :mod:`fedsec.models.catalog`, so the
    common case imports neither open_clip nor torchvision. A shipped (``embedded``) checkpoint
    whose SHA-256 equals its manifest's is the file built for that architecture and is not
    loaded here; any other local checkpoint is loaded and compared key by key.

    Raises
    ------
    ConfigError
        Naming ``model``, ``pretrained`` or ``n-ctx``.
    """
    from fedsec.models import catalog
    from fedsec.models.factory import PretrainedUnavailable, resolve_pretrained, sha256_file

    if cfg.model not in catalog.known_models():
        raise ConfigError(
            f"run-config model={cfg.model!r} is not an open_clip model; see open_clip.list_models() "
            "or add a JSON config"
        )
    try:
        source, sha = resolve_pretrained(cfg.model, cfg.pretrained)
        if source and os.path.exists(source):
            if sha and sha256_file(source) != sha:
                raise PretrainedUnavailable(f"checkpoint {source} does not have the SHA-256 {sha} of its manifest")
            if not (sha and cfg.pretrained == "embedded"):
                from fedsec.models.checkpoint import check_checkpoint

                check_checkpoint(cfg.model, source)
        elif source:
            import open_clip

            known = open_clip.list_pretrained_tags_by_model(cfg.model)
            if source not in known:
                raise PretrainedUnavailable(f"tag {source!r} is not known for {cfg.model!r}; known tags: {known}")
    except PretrainedUnavailable as exc:
        raise ConfigError(f"run-config pretrained={cfg.pretrained!r}: {exc}") from exc
    if cfg.ctx_init:
        n_init = catalog.count_tokens(cfg.model, cfg.ctx_init)
        if n_init >= 0 and n_init != cfg.n_ctx:
            raise ConfigError(
                f"run-config n-ctx={cfg.n_ctx} but ctx-init={cfg.ctx_init!r} has {n_init} tokens; "
                f"set n-ctx={n_init}, or ctx-init='' for a random init"
            )


def check_config(values: Mapping[str, object], num_nodes: int | None = None, deep: bool = True) -> RunConfig:
    """Validate a whole run config; return it resolved.

    Parameters
    ----------
    values : Mapping
        Flat kebab-case run config (``context.run_config``, or the launcher's merged values).
    num_nodes : int, optional
        Federation size, when known (``--num-supernodes``).
    deep : bool
        Also check data, model, checkpoint and tokenizer (a few seconds).

    Raises
    ------
    ConfigError
        One line: the key, the value and the fix.
    """
    cfg = RunConfig.from_mapping(values)
    if num_nodes is not None:
        check_nodes(cfg, num_nodes)
    if not deep:
        return cfg
    classes = dataset_classnames(cfg.dataset, cfg.data_root)
    uses_target = cfg.attack != "none"
    if uses_target and cfg.target_label >= len(classes):
        raise ConfigError(
            f"run-config target-label={cfg.target_label} is not a class of {cfg.dataset} "
            f"({len(classes)} classes: 0..{len(classes) - 1}); set target-label < {len(classes)}"
        )
    check_model(cfg)
    check_trigger_geometry(cfg)
    return cfg


def check_trigger_geometry(cfg: RunConfig) -> None:
    """A patch trigger fits the model's input (the malicious clients would crash every round otherwise).

    Raises
    ------
    ConfigError
        Naming ``patch-size`` (or ``dual-embedding-patch-size``), ``patch-top`` / ``patch-left`` and the image size.
    """
    from fedsec.models import catalog

    size = (catalog.model_config(cfg.model) or {}).get("vision_cfg", {}).get("image_size")
    if cfg.attack == "none" or not isinstance(size, int):
        return
    if cfg.attack == "dual-embedding" and cfg._has("dual-embedding-patch-size"):
        keys = ("dual-embedding-patch-size", None, None)
    elif cfg._has("patch-size") and cfg.attack in ("badnets", "badpromptfl", "fm-poison"):
        keys = ("patch-size", "patch-top", "patch-left")
    else:
        return
    patch = int(cfg.get(keys[0]))  # type: ignore[arg-type]
    if not 0 < patch <= size:
        raise ConfigError(
            f"run-config {keys[0]}={patch} does not fit the {size} px input of {cfg.model}; set 1..{size}"
        )
    for key in keys[1:]:
        if key is not None and cfg._has(key):
            at = int(cfg.get(key))  # type: ignore[arg-type]
            pos = at if at >= 0 else size - patch + at + 1
            if not 0 <= pos <= size - patch:
                raise ConfigError(
                    f"run-config {key}={at}: a {patch} px patch there leaves the {size} px image; "
                    f"set {key} in 0..{size - patch}, or -1 for the far edge"
                )
