"""Where a spec's model lives on disk: a path as given, or a tiny checkpoint generated once into a cache."""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from r1serve.spec import ModelSpec

log = logging.getLogger(__name__)

CACHE_ENV = "R1SERVE_CACHE"
DEFAULT_CACHE = ".r1serve"
TINY_SEED = 0
# tiny:<preset> -> make_tiny keyword arguments. One preset for now: the default tiny architecture.
TINY_PRESETS: dict[str, dict] = {"default": {}}


def cache_root() -> Path:
    """$R1SERVE_CACHE, else .r1serve in the current directory; always absolute, so other processes agree."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser().resolve()


def checkpoint_dir(model: ModelSpec) -> Path:
    """The checkpoint folder a model spec names (nothing is created)."""
    if model.is_tiny:
        return cache_root() / "models" / f"tiny-{model.tiny_preset}"
    return Path(model.source).expanduser()


def ensure_checkpoint(model: ModelSpec) -> Path:
    """The checkpoint folder, generating a tiny one first if it is missing.

    A file lock makes concurrent callers (several replicas starting on one node) write it once.
    """
    path = checkpoint_dir(model)
    if model.is_tiny and model.tiny_preset not in TINY_PRESETS:
        raise ValueError(f"spec.model.source: unknown tiny preset {model.tiny_preset!r} "
                         f"(known: {', '.join(sorted(TINY_PRESETS))})")
    if not model.is_tiny:
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"spec.model.source: no checkpoint (config.json) in {path}")
        return path
    if (path / "config.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "config.json").is_file():
            from r1serve.runtime.model.tiny import make_tiny

            log.info("writing tiny checkpoint %s to %s", model.tiny_preset, path)
            make_tiny(path, seed=TINY_SEED, overwrite=True, **TINY_PRESETS[model.tiny_preset])
    return path
