"""The MoE layer as a pipeline: route (gate) -> dispatch -> grouped experts -> combine, plus shared experts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .fp8 import FP8_DTYPE, scale_shape
from .fp8_moe import check_fp8_experts, fp8_experts_torch, fp8_experts_triton
from .fused_moe import fused_experts
from .kernels import KernelPath
from .layers import MLP


class TopKGate(nn.Module):
    """DeepSeek-V3 routing: sigmoid scores, a bias that steers only the choice, group-limited top-k."""

    def __init__(self, config: ModelConfig, device=None):
        super().__init__()
        c = config
        self.top_k, self.n_group, self.topk_group = c.num_experts_per_tok, c.n_group, c.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = c.norm_topk_prob, c.routed_scaling_factor
        # Routing runs in float32 whatever the model dtype, as the reference does, so experts match.
        self.weight = nn.Parameter(torch.zeros(c.n_routed_experts, c.hidden_size, device=device), requires_grad=False)
        self.register_buffer("e_score_correction_bias", torch.zeros(c.n_routed_experts, device=device))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (weights [T, k] float32, expert ids [T, k] long)"""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        if self.n_group > 1:
            choice = self._mask_groups(choice)
        ids = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, ids

    def _mask_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Keep only the `topk_group` groups whose two best experts score highest."""
        t, e = choice.shape
        grouped = choice.view(t, self.n_group, e // self.n_group)
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1)[0].sum(dim=-1)
        keep = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        return grouped.masked_fill(~mask[:, :, None], float("-inf")).view(t, e)


class RoutedExperts(nn.Module):
    """The routed experts this process holds, stacked so that each expert's tokens run as one matmul.

    `expert_ids` are the logical (checkpoint) ids held here, in slot order; a logical id may be held in
    several slots when redundant copies are placed on the same rank. `kernels` picks the implementation:
    the torch path below (CPU, and the reference) or the fused Triton kernels, which read only the
    experts that received tokens.

    With `fp8`, the weights stay as an FP8 checkpoint stores them (e4m3, with `w13_scale_inv` and
    `w2_scale_inv`: one float32 multiplier per 128x128 block of each slot's matrices) and run through the FP8
    expert path (fp8_moe.py). `tensors()` are the per-slot tensors either way, which expert moves copy.
    """

    kernels: KernelPath = "torch"

    def __init__(self, config: ModelConfig, expert_ids: Sequence[int], dtype: torch.dtype, device=None,
                 fp8: bool = False):
        super().__init__()
        n, h, i = len(expert_ids), config.hidden_size, config.moe_intermediate_size
        self.expert_ids = tuple(expert_ids)
        self.intermediate = i
        weight_dtype = FP8_DTYPE if fp8 else dtype
        self.w13 = nn.Parameter(torch.empty(n, 2 * i, h, dtype=weight_dtype, device=device), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(n, h, i, dtype=weight_dtype, device=device), requires_grad=False)
        if fp8:
            check_fp8_experts(i)
            self.w13_scale_inv = nn.Parameter(torch.ones(n, *scale_shape((2 * i, h)), device=device),
                                              requires_grad=False)
            self.w2_scale_inv = nn.Parameter(torch.ones(n, *scale_shape((h, i)), device=device), requires_grad=False)
        self.num_experts = config.n_routed_experts
        self.register_buffer("slot_of", _slot_lookup(self.expert_ids, self.num_experts, device), persistent=False)

    def reset_buffers(self) -> None:
        self.slot_of = _slot_lookup(self.expert_ids, self.num_experts, self.slot_of.device)

    def reassign(self, expert_ids: Sequence[int]) -> None:
        """Hold other experts in the same slots (a rebalance); fill them with the model's load_tensor.

        The weights and the lookup are overwritten in place, never reallocated, so CUDA graphs captured
        over them stay valid.
        """
        if len(expert_ids) != self.num_slots:
            raise ValueError(f"expert_ids: {len(expert_ids)} experts for {self.num_slots} slots; a rebalance "
                             "keeps the number of slots per rank")
        self.expert_ids = tuple(expert_ids)
        self.slot_of.copy_(_slot_lookup(self.expert_ids, self.num_experts, self.slot_of.device))

    TENSORS = ("w13", "w2", "w13_scale_inv", "w2_scale_inv")

    @property
    def fp8(self) -> bool:
        return self.w13.dtype == FP8_DTYPE

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The per-slot tensors, slot first: (w13, w2), and with FP8 weights their multipliers too."""
        return tuple(getattr(self, name) for name in self.TENSORS[: 4 if self.fp8 else 2])

    def empty_slots(self, n: int, device=None) -> tuple[torch.Tensor, ...]:
        """Uninitialised tensors like `tensors()` for `n` slots (on `device`, default the layer's)."""
        return tuple(torch.empty((n, *t.shape[1:]), dtype=t.dtype, device=t.device if device is None else device)
                     for t in self.tensors())

    def resize(self, expert_ids: Sequence[int], *tensors: torch.Tensor) -> None:
        """Hold `expert_ids` with these per-slot tensors (as `tensors()`), in as many slots as there are ids
        (an expert-parallel group that lost a rank or grew back): reallocated, unlike `reassign`."""
        if len(tensors) != len(self.tensors()) or any(t.shape[0] != len(expert_ids) for t in tensors):
            raise ValueError(f"expert_ids: {len(expert_ids)} experts for weights of {tensors[0].shape[0]} slots")
        self.expert_ids = tuple(expert_ids)
        for name, tensor in zip(self.TENSORS, tensors):
            setattr(self, name, nn.Parameter(tensor, requires_grad=False))
        self.slot_of = _slot_lookup(self.expert_ids, self.num_experts, self.slot_of.device)

    @property
    def num_slots(self) -> int:
        return len(self.expert_ids)

    # Above this many token copies per expert (prefill) contiguous per-expert matmuls beat one padded
    # batched matmul, whose padding to the busiest expert then costs more than the loop's overhead.
    LOOP_THRESHOLD = 32

    def forward(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """x [N, hidden] token copies, slots [N] local slot of each -> [N, hidden] expert outputs (unweighted).

        Grouped execution: one sort puts each expert's tokens together. Few tokens (decode): all experts
        run as two batched matmuls, padded to the busiest expert. Many (prefill): one matmul pair per
        expert over its contiguous rows.
        """
        if self.fp8:
            fp8_experts = fp8_experts_triton if self.kernels == "triton" else fp8_experts_torch
            return fp8_experts(x, slots, self.w13, self.w13_scale_inv, self.w2, self.w2_scale_inv)
        if self.kernels == "triton":
            return fused_experts(x, slots, self.w13, self.w2, self.intermediate)
        n, hidden = x.shape
        if n == 0:
            return torch.empty_like(x)
        order = torch.argsort(slots, stable=True)
        counts = torch.bincount(slots, minlength=self.num_slots)
        if n >= self.LOOP_THRESHOLD * self.num_slots:
            return self._contiguous(x, order, counts)
        first = torch.cumsum(counts, 0) - counts
        rank = torch.arange(n, device=x.device) - first[slots[order]]  # position within its expert's group
        padded = x.new_zeros(self.num_slots, int(counts.max()), hidden)
        padded[slots[order], rank] = x[order]
        gate, up = torch.bmm(padded, self.w13.transpose(1, 2)).split(self.intermediate, dim=-1)
        down = torch.bmm(F.silu(gate) * up, self.w2.transpose(1, 2))  # [slots, capacity, hidden]
        out = torch.empty_like(x)
        out[order] = down[slots[order], rank]
        return out

    def _contiguous(self, x: torch.Tensor, order: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        grouped = x[order]
        out_sorted = torch.empty_like(grouped)
        start = 0
        for slot, count in enumerate(counts.tolist()):
            if count:
                rows = slice(start, start + count)
                gate, up = F.linear(grouped[rows], self.w13[slot]).split(self.intermediate, dim=-1)
                out_sorted[rows] = F.linear(F.silu(gate) * up, self.w2[slot])
                start += count
        out = torch.empty_like(x)
        out[order] = out_sorted
        return out

    def _dequantized_only(self, what: str) -> None:
        if self.fp8:
            raise ValueError(f"{what}: runs dequantized experts only; FP8 experts have fp8_moe.fp8_experts_torch")

    def forward_per_expert(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The same with a Python loop over experts, one small matmul pair each (how simple MoE code
        runs): the baseline that benchmarks/moe.py measures the grouped path against."""
        self._dequantized_only("forward_per_expert")
        out = torch.empty_like(x)
        for slot in torch.unique(slots).tolist():
            rows = (slots == slot).nonzero().squeeze(1)
            gate, up = F.linear(x[rows], self.w13[slot]).split(self.intermediate, dim=-1)
            out[rows] = F.linear(F.silu(gate) * up, self.w2[slot])
        return out

    def forward_naive(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The same, one token at a time: the reference twin that the grouped path is tested against."""
        self._dequantized_only("forward_naive")
        out = torch.empty_like(x)
        for row in range(x.shape[0]):
            gate, up = F.linear(x[row], self.w13[slots[row]]).split(self.intermediate, dim=-1)
            out[row] = F.linear(F.silu(gate) * up, self.w2[slots[row]])
        return out


class ExpertDispatcher(Protocol):
    """Moves routed token copies to the experts that hold them and brings the results back."""

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                 experts: RoutedExperts) -> torch.Tensor:
        """x [T, hidden], weights/ids [T, k] -> [T, hidden]: sum over k of weight * expert(x)."""
        ...


class LocalDispatcher:
    """Every expert lives in this process: dispatch is a gather, combine a weighted sum."""

    def __call__(self, x, weights, ids, experts: RoutedExperts) -> torch.Tensor:
        t, k = ids.shape
        copies = experts(x.repeat_interleave(k, dim=0), experts.slot_of[ids.reshape(-1)])
        return combine(copies.view(t, k, x.shape[1]), weights).to(x.dtype)


def combine(copies: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """copies [T, k, hidden], weights [T, k] -> [T, hidden], summed in at least float32.

    Rounding the routing weights or the partial sums to bf16 would cost accuracy for nothing.
    """
    compute = torch.promote_types(copies.dtype, torch.float32)
    return (copies.to(compute) * weights.to(compute)[:, :, None]).sum(dim=1)


def _slot_lookup(expert_ids: Sequence[int], num_experts: int, device) -> torch.Tensor:
    """logical expert id -> the first local slot holding it (-1 where not held here)"""
    lookup = torch.full((max(num_experts, max(expert_ids, default=-1) + 1),), -1, dtype=torch.long)
    for slot, eid in reversed(list(enumerate(expert_ids))):
        lookup[eid] = slot
    return lookup.to(device)


class ExpertLayout(Protocol):
    """Which routed experts a process holds in each MoE layer, and how tokens reach them."""

    def expert_ids(self, layer: int) -> Sequence[int]: ...

    def dispatcher(self, layer: int) -> ExpertDispatcher: ...


@dataclass(frozen=True)
class LocalExperts:
    """One process holds `ids` (all experts by default) and dispatch is local."""

    num_experts: int
    ids: tuple[int, ...] | None = None

    def expert_ids(self, layer: int) -> Sequence[int]:
        return range(self.num_experts) if self.ids is None else self.ids

    def dispatcher(self, layer: int) -> ExpertDispatcher:
        return LocalDispatcher()


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device, expert_ids: Sequence[int],
                 dispatcher: ExpertDispatcher):
        super().__init__()
        self.gate = TopKGate(config, device)
        self.experts = RoutedExperts(config, expert_ids, dtype, device)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, dtype, device)
            if config.n_shared_experts
            else None
        )
        self.dispatcher = dispatcher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]"""
        weights, ids = self.gate(x)
        out = self.dispatcher(x, weights, ids, self.experts)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
