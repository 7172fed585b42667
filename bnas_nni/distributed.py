"""Process-group setup for ``torchrun`` and metric reduction across ranks.

``torchrun`` exports ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; with ``WORLD_SIZE > 1``
:func:`init_distributed` starts a process group with NCCL when the trainer runs on CUDA and gloo on
the CPU (on a single machine gloo is pinned to loopback, ``GLOO_SOCKET_IFNAME=lo``, unless the
environment says otherwise), with a timeout on every collective so that a rank that stops answering
ends the job instead of hanging it. Without those variables everything degrades to one process and
the helpers are no-ops, so the same code runs alone, under torchrun and as an NNI trial.

:func:`collective_errors` turns a user mistake seen by some ranks only (a missing dataset on one node)
into the same one-line error on every rank.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .errors import BNASError, CheckpointError, ConfigError, DatasetError

__all__ = ['DistContext', 'resolve_device', 'init_distributed', 'all_reduce_sums', 'broadcast_object',
           'all_gather_objects', 'ShardSampler', 'broadcast_buffers', 'broadcast_module', 'average_buffers',
           'all_reduce_mean_', 'collective_errors', 'cleanup']


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

    @property
    def comm_device(self) -> torch.device:
        """Where tensors for collectives live: the GPU for NCCL, the CPU for gloo."""
        return self.device if self.backend == 'nccl' else torch.device('cpu')

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


def init_distributed(device: Optional[str] = 'auto', timeout: Optional[float] = None) -> DistContext:
    """Read the torchrun environment and, for several processes, start the process group.

    ``timeout`` (seconds) bounds every collective: a rank that waits longer for its peers raises
    instead of hanging. Calling it again while the group exists returns the same context.
    """
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
            if backend == 'gloo' and int(os.environ.get('LOCAL_WORLD_SIZE', world_size)) == world_size:
                os.environ.setdefault('GLOO_SOCKET_IFNAME', 'lo')     # one machine: talk over loopback
            kwargs: Dict[str, Any] = {}
            if timeout:
                kwargs['timeout'] = datetime.timedelta(seconds=float(timeout))
            dist.init_process_group(backend=backend, device_id=dev if dev.type == 'cuda' else None, **kwargs)
        else:
            backend = dist.get_backend()
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


def all_gather_objects(obj: Any, ctx: DistContext) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (small picklable objects)."""
    if not ctx.distributed:
        return [obj]
    out: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


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


def broadcast_module(module: torch.nn.Module, ctx: DistContext, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``module`` (in place), so all ranks
    start from the same weights whatever their random state was."""
    if not ctx.distributed:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.device == ctx.comm_device:
                dist.broadcast(t.data, src=src)
            else:
                tmp = t.detach().to(ctx.comm_device)
                dist.broadcast(tmp, src=src)
                t.data.copy_(tmp)


def all_reduce_mean_(tensors: Sequence[torch.Tensor], ctx: DistContext) -> None:
    """Replace each tensor by its mean over the ranks, in place, in one collective per dtype."""
    if not ctx.distributed or not tensors:
        return
    by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1).to(ctx.comm_device) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= ctx.world_size
        offset = 0
        for t in group:
            n = t.numel()
            t.data.copy_(flat[offset:offset + n].view_as(t))
            offset += n


def average_buffers(module: torch.nn.Module, ctx: DistContext) -> None:
    """Floating-point buffers (BN running statistics) averaged over the ranks, so that every rank
    evaluates and checkpoints the same model; integer buffers (batch counters) agree already."""
    all_reduce_mean_([b for b in module.buffers() if b.is_floating_point()], ctx)


_ERROR_TYPES = {cls.__name__: cls for cls in (BNASError, ConfigError, CheckpointError, DatasetError)}


@contextlib.contextmanager
def collective_errors(ctx: DistContext) -> Iterator[None]:
    """Run the block on every rank; if it raised a :class:`~bnas_nni.errors.BNASError` on any rank,
    raise it on every rank (the first failing rank's message, prefixed ``rank N:`` when N > 0).

    A user mistake that only some ranks see (a dataset missing on one node) then stops all of them at
    the same point with the same line instead of leaving the others waiting in the next collective.
    Every rank must reach the end of the block (it ends with one collective)."""
    error: Optional[BNASError] = None
    try:
        yield
    except BNASError as exc:
        if not ctx.distributed:
            raise
        error = exc
    if not ctx.distributed:
        return
    seen = all_gather_objects(None if error is None else (type(error).__name__, str(error)), ctx)
    for rank, failure in enumerate(seen):
        if failure is not None:
            name, message = failure
            cls = type(error) if rank == ctx.rank and error is not None else _ERROR_TYPES.get(name, BNASError)
            raise cls(message if rank == 0 else f'rank {rank}: {message}')


def cleanup(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
