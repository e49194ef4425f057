"""A small on-disk cache of tensors, for what a fresh ClientApp process would otherwise rebuild.

In a Flower deployment every ClientApp message runs in a new ``flwr-clientapp``
process, so the per-process caches of :mod:`fedsec.node` start empty each round.
This cache keeps the values that are expensive to rebuild and cheap to store
(a client's k-shot images, labels and frozen image features; a parsed dataset
split) in files, one per value, named by a SHA-256 of everything that
determines the value (the *key*).

Files live in ``$FEDSEC_CACHE_DIR/<kind>/`` (default ``~/.cache/fedsec/<kind>/``);
``FEDSEC_DISK_CACHE=0`` turns the cache off. A file is::

    MAGIC (8 bytes) | SHA-256 of the body (32 bytes) | body

where the body is ``torch.save({"key": <canonical JSON of the key>, "payload": {...}})``.
A file is written to a temporary name in the same folder and renamed into place
(atomic on POSIX), so concurrent writers (several SuperNodes on one machine) and
readers never see a partial file. On load, the checksum, the stored key (the full
key, not only its hash) and the payload's structure are checked and the body is
read with ``torch.load(weights_only=True)`` (no arbitrary pickles); a file that
fails any check is ignored (a miss) and overwritten by the next store.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

#: First bytes of every cache file (format version 1).
MAGIC = b"FSCACHE1"
_DIGEST_BYTES = 32
#: Values of ``FEDSEC_DISK_CACHE`` that turn the cache off.
_OFF = ("0", "false", "no", "off")

Payload = dict[str, Any]


def canonical_key(key: Mapping[str, Any]) -> str:
    """The key as canonical JSON (sorted keys, no spaces); what its hash and the stored copy are made of.

    Parameters
    ----------
    key : Mapping
        JSON-serialisable values (str, int, float, bool, None, lists and nested mappings).

    Raises
    ------
    TypeError
        If a value is not JSON-serialisable (a key must never be guessed from ``repr``).
    """
    return json.dumps(key, sort_keys=True, separators=(",", ":"), allow_nan=True)


def key_digest(key: Mapping[str, Any]) -> str:
    """SHA-256 hex digest of :func:`canonical_key`."""
    return hashlib.sha256(canonical_key(key).encode()).hexdigest()


def file_digest(paths: list[Path]) -> str:
    """SHA-256 over the contents of ``paths`` (e.g. the source files that compute a cached value)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(Path(p).read_bytes())
    return h.hexdigest()


class DiskCache:
    """Files of verified tensor payloads under ``root``, one per key.

    Parameters
    ----------
    root : Path
        The cache folder; created on the first store.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, kind: str, key: Mapping[str, Any]) -> Path:
        """Where the value of ``key`` lives (``<root>/<kind>/<sha256 of key>.pt``)."""
        return self.root / kind / f"{key_digest(key)}.pt"

    def load(
        self, kind: str, key: Mapping[str, Any], validate: Callable[[Payload], bool] | None = None
    ) -> Payload | None:
        """The stored payload of ``key``, or ``None`` (missing, corrupted, another key, or not ``validate``-d).

        Parameters
        ----------
        kind : str
            Sub-folder (one per kind of value).
        key : Mapping
            Everything that determines the value.
        validate : callable, optional
            Extra check of the payload's structure (shapes, types); ``False`` makes it a miss.
        """
        path = self.path(kind, key)
        try:
            blob = path.read_bytes()
        except OSError:
            return None
        try:
            start = len(MAGIC) + _DIGEST_BYTES
            head, digest, body = blob[: len(MAGIC)], blob[len(MAGIC) : start], blob[start:]
            if head != MAGIC or hashlib.sha256(body).digest() != digest:
                raise ValueError("bad magic or checksum")
            stored = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
            if not isinstance(stored, dict) or stored.get("key") != canonical_key(key):
                raise ValueError("stored key differs")
            payload = stored.get("payload")
            if not isinstance(payload, dict) or (validate is not None and not validate(payload)):
                raise ValueError("payload fails validation")
        except Exception as exc:  # any damage is a miss, never an error
            log.warning("fedsec disk cache: ignoring %s (%s)", path, exc)
            return None
        return payload

    def store(self, kind: str, key: Mapping[str, Any], payload: Payload) -> Path | None:
        """Write ``payload`` for ``key`` atomically; the path, or ``None`` when it could not be written."""
        path = self.path(kind, key)
        buf = io.BytesIO()
        torch.save({"key": canonical_key(key), "payload": payload}, buf)
        body = buf.getvalue()
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as fh:
                fh.write(MAGIC + hashlib.sha256(body).digest() + body)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            tmp = None
        except OSError as exc:  # a read-only or full disk only costs speed
            log.warning("fedsec disk cache: cannot write %s (%s)", path, exc)
            return None
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
        return path

    def get_or_build(
        self,
        kind: str,
        key: Mapping[str, Any],
        build: Callable[[], Payload],
        validate: Callable[[Payload], bool] | None = None,
    ) -> tuple[Payload, bool]:
        """The stored payload of ``key``, else ``build()`` stored for next time.

        Returns
        -------
        tuple
            ``(payload, hit)``.
        """
        payload = self.load(kind, key, validate)
        if payload is not None:
            return payload, True
        payload = build()
        self.store(kind, key, payload)
        return payload, False


def default_cache() -> DiskCache | None:
    """The process's cache (``$FEDSEC_CACHE_DIR`` or ``~/.cache/fedsec``), or ``None`` if ``FEDSEC_DISK_CACHE=0``."""
    if os.environ.get("FEDSEC_DISK_CACHE", "1").strip().lower() in _OFF:
        return None
    root = os.environ.get("FEDSEC_CACHE_DIR") or str(Path.home() / ".cache" / "fedsec")
    return DiskCache(Path(root).expanduser())


def cached(
    kind: str,
    key: Mapping[str, Any] | None,
    build: Callable[[], Payload],
    validate: Callable[[Payload], bool] | None = None,
) -> Payload:
    """``build()`` through :func:`default_cache`; ``key=None`` or a disabled cache just builds.

    Parameters
    ----------
    kind : str
        Sub-folder of the cache.
    key : Mapping or None
        Everything that determines the value; ``None`` when it cannot be keyed (never cached).
    build : callable
        Computes the payload (a dict of tensors, strings and numbers).
    validate : callable, optional
        Structural check of a loaded payload.
    """
    cache = default_cache() if key is not None else None
    if cache is None:
        return build()
    return cache.get_or_build(kind, key, build, validate)[0]
