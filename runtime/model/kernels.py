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


def dot_options(dtype: torch.dtype) -> dict:
    """The compile-time switches of a kernel's dots for operands of `dtype`.

    Triton's default for float32 dots is TF32 (10-bit mantissa); float32 must be float32 to match the
    torch path, so it gets IEEE dots. bf16/fp16 operands take the default (tensor-core dots, float32
    accumulation). Triton's interpreter computes dots on bf16 operands wrongly (numpy has no bf16):
    there the loaded tiles are upcast to float32, which gives the products a bf16 dot would.
    """
    precision = "ieee" if dtype == torch.float32 else None
    upcast = dtype == torch.bfloat16 and interpreted()
    return {"DOT_PRECISION": precision, "UPCAST": upcast}
