"""Process-group setup for ``torchrun`` and metric reduction across ranks.

``torchrun`` exports ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; with ``WORLD_SIZE > 1``
:func:`init_distributed` starts a process group with NCCL when the trainer runs on CUDA and gloo on
the CPU (set ``GLOO_SOCKET_IFNAME=lo`` for a single machine). Without those variables everything
degrades to one process and the helpers are no-ops, so the same trainer code runs alone, under
torchrun and as an NNI trial.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .errors import ConfigError

__all__ = ['DistContext', 'resolve_device', 'init_distributed', 'all_reduce_sums', 'broadcast_object',
           'ShardSampler', 'broadcast_buffers', 'cleanup']


@dataclass
class DistContext:
    """Where this process sits: ``rank`` of ``world_size`` (``local_rank`` on its node) and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')
    backend: Optional[str] = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only rank 0 logs, writes files and talks to NNI."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def resolve_device(spec: Optional[str], local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else CPU; ``cuda`` means ``cuda:<local_rank>``."""
    spec = (spec or 'auto').lower()
    if spec == 'auto':
        spec = 'cuda' if torch.cuda.is_available() else 'cpu'
    if spec.startswith('cuda'):
        if not torch.cuda.is_available():
            raise ConfigError(f'device {spec!r} requested but CUDA is not available; use device: cpu or auto')
        if spec == 'cuda':
            return torch.device('cuda', local_rank % max(1, torch.cuda.device_count()))
    try:
        return torch.device(spec)
    except RuntimeError:
        raise ConfigError(f'unknown device {spec!r}; use auto, cpu, cuda or cuda:N') from None


def init_distributed(device: Optional[str] = 'auto') -> DistContext:
    """Read the torchrun environment and, for several processes, start the process group."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    dev = resolve_device(device, local_rank)
    ctx = DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)
    if world_size > 1:
        backend = 'nccl' if dev.type == 'cuda' else 'gloo'
        if dev.type == 'cuda':
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, device_id=dev if dev.type == 'cuda' else None)
        ctx.backend = backend
    return ctx


def all_reduce_sums(values: Dict[str, float], ctx: DistContext) -> Dict[str, float]:
    """Sum each value over all ranks (float64 on the communication device), in one collective."""
    if not ctx.distributed:
        return dict(values)
    keys = sorted(values)
    comm_device = ctx.device if ctx.backend == 'nccl' else torch.device('cpu')
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=comm_device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (e.g. the NNI parameters only rank 0 received)."""
    if not ctx.distributed:
        return obj
    box: List[Any] = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src, device=ctx.device if ctx.backend == 'nccl' else None)
    return box[0]


class ShardSampler(Sampler):
    """Every ``world_size``-th index starting at ``rank``, in order and without padding, so summed
    evaluation counts over ranks are exact (``DistributedSampler`` repeats samples to even out)."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def broadcast_buffers(module: torch.nn.Module, ctx: DistContext, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BN running statistics) to every rank.

    DDP syncs buffers only before training forwards, so after an epoch each rank holds the
    statistics of its own last batch; evaluating and checkpointing the same model on all ranks
    needs this first."""
    if not ctx.distributed:
        return
    for buf in module.buffers():
        if ctx.backend == 'nccl' or buf.device.type == 'cpu':
            dist.broadcast(buf, src=src)
        else:
            tmp = buf.detach().cpu()
            dist.broadcast(tmp, src=src)
            buf.copy_(tmp)


def cleanup(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
