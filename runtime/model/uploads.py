"""Host values to the device without making the host wait."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def upload(values: torch.Tensor | Sequence, device: torch.device | str,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor (or a list, as `dtype`) on `device`. On CUDA the copy goes through pinned memory and
    does not block: a copy from pageable memory may wait until the device is idle, which overlapped steps
    must avoid."""
    device = torch.device(device)
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda" or tensor.device.type == "cuda":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
