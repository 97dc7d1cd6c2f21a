"""Which implementation runs the model's hot loops: the torch path (CPU, and the reference) or Triton kernels."""

from __future__ import annotations

import os
from typing import Literal

import torch

KernelChoice = Literal["auto", "torch", "triton"]
KernelPath = Literal["torch", "triton"]
KERNEL_CHOICES: tuple[str, ...] = ("auto", "torch", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreted() -> bool:
    """Triton's interpreter is on: kernels run on CPU tensors (how CI tests them)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_kernels(choice: str, device: torch.device | str) -> KernelPath:
    """auto: Triton on CUDA when triton is installed, else torch. triton: Triton or a clear error."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"kernels: must be one of {', '.join(KERNEL_CHOICES)} (got {choice!r})")
    on_cuda = torch.device(device).type == "cuda"
    if choice == "torch":
        return "torch"
    if choice == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise ValueError("kernels: triton was asked for but the triton package is not installed")
    if not on_cuda and not interpreted():
        raise ValueError(f"kernels: triton needs a CUDA device (the model is on {torch.device(device)}); "
                         "use auto or torch, or set TRITON_INTERPRET=1 to run the kernels interpreted")
    return "triton"
