"""One rank's place in its TP group: its GPU (or the CPU), the process group that joins it to its peers (NCCL on
GPUs, gloo on CPUs), and the one collective the worker needs for itself (whether a flag holds on any rank).
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def local_gpu_index(rank: int) -> int:
    """This rank's GPU among those the process sees. Under Ray the actor sees every GPU of its node
    (``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES``, which torch's symmetric memory needs: each rank must know its
    peers' devices) and takes the one Ray assigned it; where Ray did restrict the visible devices, that one is
    index 0 of them. Outside Ray (torchrun, tests): LOCAL_RANK, else the rank, modulo the GPUs seen."""
    try:
        import ray
    except ImportError:
        ray = None
    if ray is not None and ray.is_initialized() and ray.get_gpu_ids():
        assigned = str(ray.get_gpu_ids()[0])
        visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        return visible.index(assigned) if assigned in visible else int(assigned)
    return int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class RankGroup:
    """Rank ``rank`` of ``world_size``: its device, then (``join``) its process group."""

    def __init__(self, rank: int, world_size: int, device: str = "auto"):
        self.rank, self.world_size = rank, world_size
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda", local_gpu_index(rank)) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        self.group = None
        self.group_name: str | None = None

    def rendezvous_address(self) -> str:
        """Called on rank 0: an address the other ranks can reach (its node's IP and a free port)."""
        import ray.util

        return f"tcp://{ray.util.get_node_ip_address()}:{free_port()}"

    def join(self, init_method: str) -> None:
        if self.world_size > 1:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            device_id = self.device if self.device.type == "cuda" else None
            dist.init_process_group(backend, init_method=init_method, rank=self.rank, world_size=self.world_size,
                                    device_id=device_id)
            self.group = dist.group.WORLD
            self.group_name = self.group.group_name

    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank of the group (a collective: every rank calls it at the same point)."""
        if self.group is None:
            return flag
        shared = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(shared, op=dist.ReduceOp.MAX, group=self.group)
        return bool(shared.item())

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
