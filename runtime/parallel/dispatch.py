"""All-to-all dispatch and combine: routed token copies travel to the ranks holding their experts and back."""

from __future__ import annotations

import torch
import torch.distributed as dist

from r1serve.runtime.model.moe import RoutedExperts, combine

from .placement import ExpertPlacement


class AllToAllDispatcher:
    """The expert-parallel ExpertDispatcher of one MoE layer on one rank.

    Token copies are sorted by destination rank and exchanged with `all_to_all_single` (split sizes are
    exchanged first, as they differ per step); each rank runs its experts on what it received, grouped by
    expert; the inverse all-to-all brings results home, where they are weighted and summed in token order.
    An expert with several copies gets its tokens spread over them by token index.
    """

    def __init__(self, placement: ExpertPlacement, group: dist.ProcessGroup | None = None):
        self.group = group
        if dist.is_initialized():
            self.regroup(placement)
        else:  # a rank that joins a running group builds its model first; it takes its place when it joins
            self.rank, self.world_size = None, placement.world_size
            self.set_placement(placement)

    def regroup(self, placement: ExpertPlacement) -> None:
        """This rank's place in the group and the placement over it; again when the group was formed without a
        lost rank (expert load is per logical expert, so it carries over)."""
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        if placement.world_size != self.world_size:
            raise ValueError(f"placement for {placement.world_size} ranks used in a group of {self.world_size}")
        self.set_placement(placement)

    def set_placement(self, placement: ExpertPlacement) -> None:
        self.placement = placement
        self._table, self._counts = placement.replica_table()
        self.bytes_moved = 0
        if not hasattr(self, "load"):  # per logical expert, so both survive placement changes: copies routed
            self.load = torch.zeros(placement.num_experts, dtype=torch.long, device="cpu")  # since take_load
            self.total_load = torch.zeros_like(self.load)  # and in all, for metrics

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                 experts: RoutedExperts) -> torch.Tensor:
        """x [T, hidden], weights/ids [T, k] -> [T, hidden]"""
        t, k = ids.shape
        hidden, device = x.shape[1], x.device
        flat = ids.reshape(-1).cpu()
        routed = torch.bincount(flat, minlength=self.placement.num_experts)
        self.load += routed
        self.total_load += routed
        token = torch.arange(t * k, device="cpu") // k
        physical = self._table[flat, token % self._counts[flat]]
        dest = physical // self.placement.slots_per_rank
        order = torch.argsort(dest, stable=True)
        send_counts = torch.bincount(dest, minlength=self.world_size)
        recv_counts = torch.empty_like(send_counts)
        self._exchange(recv_counts, send_counts.to(device), None, None, device)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()

        wire = _wire_dtype(x.dtype, device)
        send_x = x[token[order].to(device)].to(wire)
        recv_x = x.new_empty(sum(recv_splits), hidden, dtype=wire)
        self._exchange(recv_x, send_x, recv_splits, send_splits, device)
        local_slot = (physical % self.placement.slots_per_rank)[order]
        recv_slot = torch.empty(sum(recv_splits), dtype=torch.long, device="cpu")
        self._exchange(recv_slot, local_slot, recv_splits, send_splits, device)

        y = experts(recv_x.to(x.dtype), recv_slot.to(device)).to(wire)
        back = x.new_empty(t * k, hidden, dtype=wire)
        self._exchange(back, y, send_splits, recv_splits, device)
        self.bytes_moved += 2 * (send_x.numel() + y.numel()) * send_x.element_size()
        copies = torch.empty_like(back)
        copies[order.to(device)] = back
        return combine(copies.to(x.dtype).view(t, k, hidden), weights).to(x.dtype)

    def _exchange(self, out, inp, out_splits, in_splits, device) -> None:
        # gloo exchanges CPU tensors; NCCL needs them on the GPU. The same call serves both.
        on = device if dist.get_backend(self.group) == "nccl" else "cpu"
        result = out.to(on) if out.device != torch.device(on) else out
        dist.all_to_all_single(result, inp.to(on), out_splits, in_splits, group=self.group)
        if result is not out:
            out.copy_(result)

    def take_load(self) -> torch.Tensor:
        """Token copies per logical expert since the last call (this rank's routing), then reset."""
        load, self.load = self.load, torch.zeros_like(self.load)
        return load


def _wire_dtype(dtype: torch.dtype, device) -> torch.dtype:
    # gloo has no bfloat16 reductions or exchanges on every build: widen on the wire, exactly.
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu":
        return torch.float32
    return dtype
