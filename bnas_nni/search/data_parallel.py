"""Data-parallel search: what BinaryDARTS needs to run on many processes (``torchrun``).

Each rank holds the whole supernet and trains it on its shard of both halves of the training split;
after every backward the step's own gradients are averaged over the ranks, so every rank applies the
same update to the same parameters and the ranks stay bitwise identical:

* :class:`GradientSync` is the ``grad_sync`` seam of
  :class:`~bnas_nni.search.binary_darts.BinaryDartsModule`: one all-reduce of exactly the gradients
  the step computed (alphas in the architecture step, weights in the weight step), plus the step's
  loss. DDP's reducer does not fit the two-optimizer alternation: the architecture step computes no
  weight gradients, and an all-reduce of them would be wasted communication.
* :class:`EpochShardSampler` gives each rank every ``world_size``-th index of the epoch's shuffled
  order. Rank ``r``'s batch ``k`` (per-rank batch ``b/W``) and the single-process batch ``k`` (batch
  ``b``) then hold the same images, so a run on ``W`` ranks follows the run on one process.
* :class:`BatchNormSync` (``sync_bn: true``) normalises training batches with the statistics of the
  whole batch over all ranks (one all-reduce in forward and one in backward per BN). The fast cell's
  shared BNs get it through :meth:`FastBinaryMixedCell.set_batch_norm_sync`; every other
  ``BatchNorm2d`` becomes a :class:`SyncedBatchNorm2d` (same parameters, buffers and state dict).
  PyTorch's ``nn.SyncBatchNorm`` needs a GPU and cannot reach the fast cell's fused BNs.
* :func:`check_same_architecture` compares, once per epoch, checksums of the alphas, the derived
  genotype and the weights over all ranks; a mismatch stops the run with one line naming the epoch.

:func:`lightning_ddp_options` and :func:`check_same_export` do the same for NNI's own one-shot
strategies, which train under Lightning's DDP strategy.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from pytorch_lightning.strategies import DDPStrategy
from torch.autograd.function import once_differentiable
from torch.utils.data import Sampler

from ..distributed import DistContext, all_gather_objects
from ..errors import BNASError, ConfigError, PeerFailureError, RankMismatchError
from .supernet import derive_from_model

__all__ = ['RankMismatchError', 'GradientSync', 'EpochShardSampler', 'BatchNormSync', 'SyncedBatchNorm2d',
           'enable_sync_batch_norm', 'model_fingerprint', 'check_same_architecture', 'check_same_config',
           'check_world_fits', 'quiet_off_main', 'peer_failures', 'PeerFailureError', 'lightning_ddp_options',
           'check_same_export', 'fingerprint']


# --------------------------------------------------------------------------- gradients


class GradientSync:
    """Average the gradients of ``params`` (those that have one) and the step's loss over all ranks.

    Called by :meth:`BinaryDartsModule._checked_backward` right after ``backward`` and before the
    finiteness checks, so every rank checks (and, if need be, stops on) the same averaged values.
    One all-reduce per step: the gradients flattened into one buffer with the loss appended. With
    equal per-rank batches the average is exactly the gradient of the mean loss over the union batch.
    """

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx

    def __call__(self, params: Sequence[torch.Tensor], loss: float) -> float:
        grads = [p.grad for p in params if p.grad is not None]
        dtype = grads[0].dtype if grads else torch.float32
        dev = self.ctx.comm_device
        flat = torch.cat([g.reshape(-1).to(device=dev, dtype=dtype) for g in grads]
                         + [torch.tensor([loss], dtype=dtype, device=dev)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.ctx.world_size
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n
        return float(flat[-1])


# --------------------------------------------------------------------------- data


class EpochShardSampler(Sampler):
    """Rank ``rank``'s shard of one epoch's shuffled order of ``length`` indices.

    The order is ``torch.randperm(length, generator=generator)``, drawn when the sampler is iterated
    (as ``RandomSampler`` does, so with one rank the order is exactly the single-process one), padded
    by wrap-around to a multiple of ``world_size`` (every rank gets the same number of images and of
    steps) and strided: rank ``r`` takes positions ``r, r + W, r + 2W ...``.
    """

    def __init__(self, length: int, rank: int, world_size: int, generator: torch.Generator) -> None:
        self.length, self.rank, self.world_size, self.generator = int(length), int(rank), int(world_size), generator

    def __len__(self) -> int:
        return math.ceil(self.length / self.world_size)

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.length, generator=self.generator).tolist()
        pad = len(self) * self.world_size - self.length
        order += order[:pad]
        return iter(order[self.rank::self.world_size])


def check_world_fits(train_len: int, val_len: int, batch_size: int, ctx: DistContext) -> None:
    """One line when a half of the training split has fewer per-process batches than there are ranks
    (some ranks would only see images repeated from other ranks' shards)."""
    if not ctx.distributed:
        return
    for what, n in (('weight', train_len), ('architecture', val_len)):
        batches = math.ceil(n / batch_size)
        if ctx.world_size > batches:
            raise ConfigError(f'{ctx.world_size} processes but the {what} half has only {batches} batch(es) of '
                              f'batch_size {batch_size} ({n} images) per epoch; use at most {batches} process'
                              f'{"es" if batches > 1 else ""}, a smaller batch_size or more images (train_subset)')


# --------------------------------------------------------------------------- batch norm over all ranks


def _reduce_dims(x: torch.Tensor) -> List[int]:
    return [0] + list(range(2, x.dim()))


def _channel_view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view([1, -1] + [1] * (x.dim() - 2))


class _SyncedNormalize(torch.autograd.Function):
    """Training-mode non-affine batch norm with the statistics of the batch over all ranks.

    Forward: one all-reduce of (sum, sum of squares, count) per channel, accumulated in float64 (as
    the CPU batch-norm kernel accumulates). Backward: one all-reduce of (sum g, sum g * xhat), so the
    gradient is the one of the whole batch. Returns ``(xhat, mean, invstd)``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float, sync: 'BatchNormSync'):  # type: ignore[override]
        dims = _reduce_dims(x)
        c = x.size(1)
        n_local = x.numel() // c
        stats = torch.cat([x.sum(dims, dtype=torch.float64), x.square().sum(dims, dtype=torch.float64),
                           torch.tensor([n_local], dtype=torch.float64, device=x.device)])
        stats = sync.all_reduce(stats)
        n = float(stats[-1])
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        invstd = (var + eps).rsqrt()
        mean, invstd = mean.to(x.dtype), invstd.to(x.dtype)
        xhat = (x - _channel_view(mean, x)) * _channel_view(invstd, x)
        ctx.save_for_backward(x, mean, invstd)
        ctx.sync, ctx.count = sync, n
        ctx.mark_non_differentiable(mean, invstd)
        sync.last_count = n
        return xhat, mean, invstd

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor, _gm, _gi):  # type: ignore[override]
        x, mean, invstd = ctx.saved_tensors
        dims = _reduce_dims(x)
        c = x.size(1)
        xhat = (x - _channel_view(mean, x)) * _channel_view(invstd, x)
        sums = ctx.sync.all_reduce(torch.cat([g.sum(dims, dtype=torch.float64),
                                              (g * xhat).sum(dims, dtype=torch.float64)]))
        mean_g = (sums[:c] / ctx.count).to(g.dtype)
        mean_gx = (sums[c:] / ctx.count).to(g.dtype)
        gx = (g - _channel_view(mean_g, x) - xhat * _channel_view(mean_gx, x)) * _channel_view(invstd, x)
        return gx, None, None


class BatchNormSync:
    """Batch statistics over all ranks for training-mode batch norm (see :class:`_SyncedNormalize`)."""

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        self.last_count = 0.0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if not self.ctx.distributed:
            return t
        if t.device != self.ctx.comm_device:
            moved = t.to(self.ctx.comm_device)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            return moved.to(t.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def normalize(self, x: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """``(xhat, mean, invstd, count)``: ``count`` is the number of values per channel over all ranks
        (what the unbiased running variance divides by)."""
        xhat, mean, invstd = _SyncedNormalize.apply(x, eps, self)
        return xhat, mean, invstd, self.last_count


class SyncedBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training batches are normalised with the statistics over all ranks.

    Same parameters, buffers and state dict; running statistics are updated as ``nn.BatchNorm2d``
    does (momentum or cumulative average, unbiased variance of the whole batch). Made by
    :func:`enable_sync_batch_norm`, which swaps the class of existing modules in place so optimizers
    and references held elsewhere stay valid."""

    sync: Optional[BatchNormSync] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_stats = self.training or self.running_mean is None
        if not batch_stats or self.sync is None:
            return super().forward(x)
        xhat, mean, invstd, n = self.sync.normalize(x, self.eps)
        if self.training and self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                var = (invstd.pow(-2) - self.eps) * (n / max(n - 1, 1))
                self.running_mean.mul_(1 - f).add_(mean, alpha=f)
                self.running_var.mul_(1 - f).add_(var, alpha=f)
        if self.affine:
            return xhat * _channel_view(self.weight, x) + _channel_view(self.bias, x)
        return xhat


def enable_sync_batch_norm(model: nn.Module, ctx: DistContext) -> int:
    """Normalise every training batch of ``model`` with the statistics over all ranks; returns the number
    of BN modules covered. Call after building the model and before building its optimizers."""
    sync = BatchNormSync(ctx)
    covered: Set[int] = set()
    for m in model.modules():
        setter = getattr(m, 'set_batch_norm_sync', None)
        if callable(setter):                      # the fast cell's shared BN groups
            covered.update(id(bn) for bn in setter(sync))
    count = len(covered)
    for m in model.modules():
        if type(m) in (nn.BatchNorm2d, SyncedBatchNorm2d) and id(m) not in covered:
            m.__class__ = SyncedBatchNorm2d
            m.sync = sync
            count += 1
    return count


# --------------------------------------------------------------------------- agreement between ranks


def fingerprint(obj: Any) -> str:
    """A short checksum of arrays/tensors (their exact bytes) or of a JSON-able value."""
    h = hashlib.sha256()
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(t, (torch.Tensor, np.ndarray)) for t in obj):
        for t in obj:
            a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
            h.update(str(a.dtype).encode() + str(a.shape).encode())
            h.update(np.ascontiguousarray(a).tobytes())
    else:
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def model_fingerprint(module: Any) -> Dict[str, str]:
    """Checksums of a :class:`BinaryDartsModule`'s alphas, of the genotype they derive, and of the weights."""
    alphas = module.alphas_now()
    return {'alpha': fingerprint([alphas[k] for k in sorted(alphas)]),
            'genotype': fingerprint(str(derive_from_model(module, alphas=alphas))),
            'weights': fingerprint([p for p in module.weight_parameters()])}


def _mismatch(parts: Sequence[Dict[str, str]]) -> Optional[Tuple[List[int], List[str]]]:
    ranks = [r for r, p in enumerate(parts) if p != parts[0]]
    if not ranks:
        return None
    keys = sorted({k for r in ranks for k in parts[0] if parts[r].get(k) != parts[0].get(k)})
    return ranks, keys


def check_same_architecture(module: Any, epoch: int, epochs: int, ctx: DistContext) -> None:
    """Every rank holds the same alphas, genotype and weights after ``epoch`` (0-based), or one line."""
    if not ctx.distributed:
        return
    parts = all_gather_objects(model_fingerprint(module), ctx)
    bad = _mismatch(parts)
    if bad:
        ranks, keys = bad
        raise RankMismatchError(
            f'epoch {epoch + 1}/{epochs}: rank {", ".join(map(str, ranks))} holds different {" and ".join(keys)} '
            f'than rank 0 ({keys[0]} checksum {parts[ranks[0]][keys[0]]} vs {parts[0][keys[0]]}); the ranks '
            'diverged, so the search stops here (the checkpoint of the previous epoch is intact)')


#: keys that may differ between the ranks of one job: each rank's own execution settings, and outputs
#: that rank 0 alone writes (``name`` defaults to the config file's name); ``data`` may be a node-local
#: path (the datasets' sizes are compared instead)
RANK_LOCAL_KEYS = ('threads', 'device', 'workers', 'progress', 'tensorboard', 'description', 'run_dir', 'save',
                   'out', 'name', 'data', 'dist_timeout')


def check_same_config(cfg: Mapping[str, Any], ctx: DistContext, extra: Optional[Mapping[str, Any]] = None) -> None:
    """Every rank resolved the same config (and ``extra`` facts, e.g. dataset sizes), or one line naming
    the keys that differ and the ranks that differ from rank 0."""
    if not ctx.distributed:
        return
    mine = {k: fingerprint(v) for k, v in cfg.items() if k not in RANK_LOCAL_KEYS}
    mine.update({f'<{k}>': fingerprint(v) for k, v in (extra or {}).items()})
    parts = all_gather_objects(mine, ctx)
    bad = _mismatch(parts)
    if bad:
        ranks, keys = bad
        shown = ', '.join(k.strip('<>') for k in keys[:6]) + (f' (+{len(keys) - 6} more)' if len(keys) > 6 else '')
        raise RankMismatchError(f'the ranks were given different settings: {shown} differ between rank 0 and rank '
                                f'{", ".join(map(str, ranks))}; give every process the same config files, '
                                'flags and data')


_PEER_FAILURE = ('Timed out', 'timed out', 'Connection closed by peer', 'Connection reset by peer', 'Broken pipe')


@contextlib.contextmanager
def peer_failures(ctx: DistContext, timeout: Optional[float]) -> Iterator[None]:
    """Turn a collective that timed out or lost its peer into one line on every surviving rank (rank 0
    may be the one that is gone, so every rank says it, naming itself)."""
    try:
        yield
    except RuntimeError as exc:
        if not ctx.distributed or not (isinstance(exc, getattr(dist, 'DistError', ())) or
                                       any(s in str(exc) for s in _PEER_FAILURE)):
            raise
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        detail = detail.split('] ', 1)[-1][:160]
        raise PeerFailureError(f'rank {ctx.rank}: no answer from the other processes within dist_timeout '
                               f'({float(timeout or 0):g}s): {detail}; a process stalled or died, the run directory '
                               'keeps the last finished epoch (continue it with --resume)') from None


@contextlib.contextmanager
def quiet_off_main(ctx: DistContext) -> Iterator[None]:
    """Let rank 0 alone print a user mistake: the other ranks exit with status 2 without a line.
    (Every rank raises the same error, see :func:`bnas_nni.distributed.collective_errors`.)"""
    try:
        yield
    except PeerFailureError:
        raise
    except BNASError:
        if ctx.distributed and not ctx.is_main:
            raise SystemExit(2) from None
        raise


# --------------------------------------------------------------------------- NNI's strategies under Lightning


def lightning_ddp_options(ctx: DistContext, timeout: Optional[float] = None) -> Dict[str, Any]:
    """``Trainer`` keywords that run a one-shot strategy data-parallel inside this torchrun job.

    Lightning's ``DDPStrategy`` with ``find_unused_parameters`` (a differentiable step leaves the other
    step's parameters without gradients, a sampling one the unsampled paths); it reuses the process
    group started by :func:`bnas_nni.distributed.init_distributed` and shards the loaders itself."""
    kwargs: Dict[str, Any] = {'process_group_backend': ctx.backend, 'find_unused_parameters': True}
    if timeout:
        kwargs['timeout'] = datetime.timedelta(seconds=float(timeout))
    local = int(os.environ.get('LOCAL_WORLD_SIZE', ctx.world_size))
    return {'strategy': DDPStrategy(**kwargs), 'devices': local, 'num_nodes': max(1, ctx.world_size // local),
            'accelerator': 'gpu' if ctx.device.type == 'cuda' else 'cpu'}


def oneshot_fingerprint(module: nn.Module) -> Dict[str, str]:
    """Checksums of a one-shot module's architecture parameters (if any) and of all its other parameters."""
    arch = list(module.arch_parameters()) if hasattr(module, 'arch_parameters') else []
    arch_ids = {id(p) for p in arch}
    names = {id(p): n for n, p in module.named_parameters()}
    arch = sorted(arch, key=lambda p: names.get(id(p), ''))      # NNI returns them in set order
    weights = [p for p in module.parameters() if id(p) not in arch_ids]
    return {'alpha': fingerprint(arch) if arch else '-', 'weights': fingerprint(weights)}


def check_same_export(arch: Mapping[str, Any], parts: Mapping[str, str], strategy: str, ctx: DistContext) -> None:
    """Every rank trained the same supernet (``parts``: :func:`oneshot_fingerprint`) and exports the same
    architecture ``arch``, or one line."""
    if not ctx.distributed:
        return
    gathered = all_gather_objects({**parts, 'export': fingerprint(dict(arch))}, ctx)
    bad = _mismatch(gathered)
    if bad:
        ranks, keys = bad
        raise RankMismatchError(f'{strategy}: rank {", ".join(map(str, ranks))} ended with different '
                                f'{" and ".join(keys)} than rank 0; the data-parallel search diverged')
