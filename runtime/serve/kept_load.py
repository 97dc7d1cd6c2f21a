"""A replica's side of the kept expert load (r1serve.spec.expert_load): read at start-up, offered while serving.

On Kubernetes the Ray pods mount the R1Deployment's ConfigMap (read-only; the operator writes it from what the
replicas report). On one machine the load lives in a file under the local cache, which the replicas write
themselves, whole files only (written beside, then renamed over the old one).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from r1serve.spec import expert_load as E

from .checkpoint import cache_root

log = logging.getLogger(__name__)

# A replica offers its load this often, once it has seen at least MIN_TOKENS token copies in one layer (less
# says little about which experts are busy).
OFFER_EVERY_S = 30.0
MIN_TOKENS = 256


def mounted(mount: str | Path = E.MOUNT_PATH) -> bool:
    """The pod mounts the ConfigMap's volume (present even while the ConfigMap is not)."""
    return Path(mount).is_dir()


def kept_load_path(resource: str, pool: str, mount: str | Path = E.MOUNT_PATH) -> Path:
    if mounted(mount):
        return Path(mount) / E.pool_key(pool)
    return cache_root() / "expert-load" / resource / E.pool_key(pool)


def read_kept_load(path: Path, *, num_experts: int, layers: Sequence[int]) -> dict[int, list[float]] | None:
    """The kept load of a pool, or None when there is none yet or it does not fit this model (said in the log:
    the replica then starts from the uniform placement)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        load = E.decode(text, num_experts=num_experts, layers=layers)
    except E.ExpertLoadError as exc:
        log.warning("ignoring the kept expert load in %s: %s", path, exc)
        return None
    log.info("starting from the expert load kept in %s (%d layers)", path, len(load))
    return load


def worth_keeping(load: Mapping[int, Sequence[float]]) -> bool:
    return any(sum(counts) >= MIN_TOKENS for counts in load.values())


def keep_locally(path: Path, load: Mapping[int, Sequence[float]]) -> None:
    """Write the load file whole: a reader sees the old file or the new one, never part of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(E.encode(load))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
