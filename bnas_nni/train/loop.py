"""The one train loop and the one evaluation loop (trainers, search trials and evaluators all use them),
as in the official ``train``/``infer`` functions.

Log lines keep the official format so logs can be compared side by side::

    epoch 1 lr 2.675926e-03
    train 050 1.234567e+00 55.000000 93.000000      (step, running loss, top-1 %, top-5 %)
    train_acc 57.120000
    valid 000 ...
    valid_acc 61.430000

Training metrics are averaged over this rank's samples while the epoch runs and summed over all
ranks at the end; evaluation metrics are exact over the whole validation set (every rank sees a
disjoint shard, counts are all-reduced).

Non-finite values stop a run at the step where they appear, before the optimizer step, with one line
(:class:`NonFiniteError`): a loss, or (without fp16 loss scaling, which skips such steps by design) a
gradient. Nothing of that step reaches the weights, so the last checkpoint is the last good state.

Gradient clipping (ImageNet recipe): the official code clipped the gradient with respect to the
*binary* weights, before ``BinOp`` rescaled it into the latent-weight gradient. Our binary convs do
that rescale inside autograd, so :func:`clip_binary_grad_norm_` recovers the binary-weight gradient
from the latent one (the map is linear and invertible per filter), measures the official norm, and
scales all gradients by the same coefficient, which is exactly what the official step did.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..console import progress as bar
from ..distributed import DistContext, all_reduce_sums
from ..errors import NonFiniteError
from ..finite import check_finite_grads, check_finite_params, non_finite_message
from ..quant import BinaryConv2d, XnorBinarizer, binary_convs
from ..rundir import LOGGER
from .batch_renorm import batch_renormalization

__all__ = ['AverageMeter', 'accuracy', 'binary_weight_grad', 'clip_binary_grad_norm_', 'autocast_context',
           'train_one_epoch', 'evaluate', 'progress']


class AverageMeter:
    """Running average weighted by sample count (the official ``AvgrageMeter``)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sum = 0.0
        self.cnt = 0
        self.avg = 0.0

    def update(self, val: float, n: int = 1) -> None:
        self.sum += float(val) * n
        self.cnt += n
        self.avg = self.sum / max(self.cnt, 1)


@torch.no_grad()
def accuracy(logits: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1, 5)) -> list:
    """Top-k accuracies in percent; k is capped at the number of classes."""
    maxk = min(max(topk), logits.size(1))
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target.view(-1, 1))
    return [hit[:, :min(k, maxk)].any(dim=1).float().mean().item() * 100.0 for k in topk]


def _correct(logits: torch.Tensor, target: torch.Tensor, k: int) -> int:
    k = min(k, logits.size(1))
    return int(logits.topk(k, dim=1).indices.eq(target.view(-1, 1)).any(dim=1).sum())


# --------------------------------------------------------------------------- gradient clipping


def _constrained(m: BinaryConv2d) -> torch.Tensor:
    return m.weight_quantizer.constrain(m.weight.detach())


@torch.no_grad()
def binary_weight_grad(m: BinaryConv2d) -> torch.Tensor:
    r"""The gradient w.r.t. the binary weights of ``m``, recovered from ``m.weight.grad``.

    For the ``xnor`` binarizer the latent gradient is :math:`h\,c = (\alpha_o g + s\,\overline{s g}_o)\,c`
    with :math:`s = \mathrm{sign}(W)`, :math:`c = (1 - 1/C_{in})\,n`, so per filter
    :math:`\overline{s h} = \overline{s g}(\alpha_o + \overline{s^2})` and
    :math:`g = (h - s\,\overline{s g}) / \alpha_o`. Other binarizers pass the latent gradient through.
    """
    g_lat = m.weight.grad
    if not isinstance(m.weight_quantizer, XnorBinarizer) or g_lat is None:
        return g_lat
    wc = _constrained(m).to(torch.float64)
    n = wc[0].numel()
    c_in = wc.shape[1]
    factor = (1.0 - 1.0 / c_in) * n
    if factor == 0:
        return g_lat
    h = g_lat.to(torch.float64) / factor
    s = torch.sign(wc)
    alpha = wc.abs().sum(dim=(1, 2, 3), keepdim=True) / n
    mean_sh = (s * h).sum(dim=(1, 2, 3), keepdim=True) / n
    mean_s2 = (s * s).sum(dim=(1, 2, 3), keepdim=True) / n
    m_sg = mean_sh / (alpha + mean_s2)
    safe = alpha.clamp_min(1e-30)
    g = torch.where(alpha > 0, (h - s * m_sg) / safe, torch.zeros_like(h))
    return g.to(g_lat.dtype)


@torch.no_grad()
def clip_binary_grad_norm_(model: nn.Module, max_norm: float, mode: str = 'binary') -> float:
    """Clip gradients to ``max_norm``; returns the total norm before clipping.

    ``mode='latent'`` is ``torch.nn.utils.clip_grad_norm_`` on the parameters as they are.
    ``mode='binary'`` (official) measures binary convs by the gradient w.r.t. their binary weights and
    scales every gradient by ``min(1, max_norm / (norm + 1e-6))``.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if mode == 'latent':
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    binary = {id(m.weight): m for m in binary_convs(model)}
    sq = torch.zeros((), dtype=torch.float64, device=params[0].device if params else 'cpu')
    for p in params:
        g = binary_weight_grad(binary[id(p)]) if id(p) in binary else p.grad
        sq += g.to(torch.float64).pow(2).sum()
    total = float(sq.sqrt())
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for p in params:
            p.grad.mul_(coef)
    return total


# --------------------------------------------------------------------------- loops


def autocast_context(device: torch.device, amp: Optional[str]):
    """``torch.autocast`` for ``amp`` in (bf16, fp16), else a no-op context."""
    if not amp:
        return contextlib.nullcontext()
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def progress(iterable: Iterable, *, total: Optional[int], desc: str, enabled: bool):
    """A bar when ``enabled`` (rank 0 on a terminal), else the iterable itself (:func:`bnas_nni.console.progress`)."""
    if not enabled:
        return iterable
    return bar(iterable, total=total, desc=desc, enabled=True)


def _limit(loader: Iterable, max_batches: Optional[int]):
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        yield batch


def _lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]['lr'])


def train_one_epoch(model: nn.Module, loader: Any, optimizer: torch.optim.Optimizer, criterion: nn.Module, *,
                    epoch: int, ctx: DistContext, schedule: Any = None, grad_clip: Optional[float] = None,
                    grad_clip_mode: str = 'binary', amp: Optional[str] = None, scaler: Any = None,
                    channels_last: bool = False, report_freq: int = 50, max_batches: Optional[int] = None,
                    show_progress: bool = False, log: Callable[[str], None] = LOGGER.info,
                    on_step: Optional[Callable[[int, int], None]] = None,
                    freeze_bn: bool = False, renorm_bn: bool = False) -> Dict[str, float]:
    """Train for one epoch; returns ``{'loss', 'top1', 'top5', 'n'}`` summed over all ranks.

    ``freeze_bn``: every BatchNorm normalises with its running statistics and leaves them unchanged (its
    affine parameters still learn), so the function trained is the one evaluated (see ``bn_freeze_epochs``).
    ``renorm_bn``: every BatchNorm trains with Batch Renormalization (:mod:`bnas_nni.train.batch_renorm`):
    the forward normalises with the running statistics, the gradient flows through the batch's, and the
    running statistics keep updating (see ``bn_renorm_epochs``).

    ``criterion(logits, target, images)`` is a :class:`~bnas_nni.train.losses.TrainLoss`.

    ``schedule`` is a :class:`~bnas_nni.train.schedules.IterationSchedule`; the latent-weight
    constraint runs from the optimizer's pre-step hook (see :func:`bnas_nni.quant.attach_latent_constraint`).
    ``on_step(epoch, step)`` is called after each optimizer step (fault injection in tests, profiling).
    """
    if freeze_bn and renorm_bn:
        raise ValueError('freeze_bn and renorm_bn exclude each other')
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    with batch_renormalization(model) if renorm_bn else contextlib.nullcontext():
        return _train_epoch(model, loader, optimizer, criterion, epoch=epoch, ctx=ctx, schedule=schedule,
                            grad_clip=grad_clip, grad_clip_mode=grad_clip_mode, amp=amp, scaler=scaler,
                            channels_last=channels_last, report_freq=report_freq, max_batches=max_batches,
                            show_progress=show_progress, log=log, on_step=on_step)


def _train_epoch(model: nn.Module, loader: Any, optimizer: torch.optim.Optimizer, criterion: nn.Module, *,
                 epoch: int, ctx: DistContext, schedule: Any, grad_clip: Optional[float], grad_clip_mode: str,
                 amp: Optional[str], scaler: Any, channels_last: bool, report_freq: int,
                 max_batches: Optional[int], show_progress: bool, log: Callable[[str], None],
                 on_step: Optional[Callable[[int, int], None]]) -> Dict[str, float]:
    criterion.train()
    params = [p for group in optimizer.param_groups for p in group['params']]
    device = ctx.device
    iters = len(loader) if max_batches is None else min(len(loader), max_batches)
    loss_m, top1_m, top5_m = AverageMeter(), AverageMeter(), AverageMeter()
    sums = {'loss': 0.0, 'c1': 0.0, 'c5': 0.0, 'n': 0.0}
    bar = progress(_limit(loader, max_batches), total=iters, desc=f'train {epoch}', enabled=show_progress)
    for step, (x, y) in enumerate(bar):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if schedule is not None:
            schedule.before_step(epoch, step, iters)
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(device, amp):
            logits = model(x)
            loss = criterion(logits, y, x)
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise NonFiniteError(non_finite_message('loss', epoch, step, _lr(optimizer), amp))
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
            if not check_finite_grads(params):
                raise NonFiniteError(non_finite_message('gradient', epoch, step, _lr(optimizer), amp))
        if grad_clip:
            clip_binary_grad_norm_(model, grad_clip, grad_clip_mode)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
            if not check_finite_params(params):
                raise NonFiniteError(non_finite_message('weight update', epoch, step, _lr(optimizer), amp))
        if schedule is not None:
            schedule.after_step()
        n = y.size(0)
        logits = logits.detach().float()
        c1, c5 = _correct(logits, y, 1), _correct(logits, y, 5)
        sums['loss'] += lv * n
        sums['c1'] += c1
        sums['c5'] += c5
        sums['n'] += n
        loss_m.update(lv, n)
        top1_m.update(100.0 * c1 / n, n)
        top5_m.update(100.0 * c5 / n, n)
        if report_freq and step % report_freq == 0:
            log(f'train {step:03d} {loss_m.avg:e} {top1_m.avg:f} {top5_m.avg:f}')
        if show_progress and hasattr(bar, 'set_postfix'):
            bar.set_postfix(loss=f'{loss_m.avg:.3f}', top1=f'{top1_m.avg:.1f}')
        if on_step is not None:
            on_step(epoch, step)
    return _finish(sums, ctx)


#: ``bn_recalibration_mode`` values: how :func:`recalibrate_bn` collects the statistics
RECALIBRATION_MODES = ('eval', 'train')
#: batches up to this size are kept in memory by the layer-by-layer re-estimation (else re-read per BN)
RECALIBRATION_CACHE_BYTES = 2 ** 30


class _StopForward(Exception):
    """Raised by a BN's pre-hook once it has seen its input: the rest of the forward is not needed."""


def _batches_on_device(loader: Any, batches: int, ctx: DistContext, channels_last: bool):
    for step, (x, _) in enumerate(loader):
        if step >= batches:
            break
        x = x.to(ctx.device, non_blocking=True)
        yield x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def recalibrate_bn(net: nn.Module, loader: Any, batches: int, *, ctx: DistContext, amp: Optional[str] = None,
                   channels_last: bool = False, mode: str = 'eval') -> int:
    r"""Re-estimate every BatchNorm's running statistics from ``batches`` training batches of the final
    weights (precise BN); returns the images seen. ``net`` is the bare network
    (:func:`bnas_nni.checkpoints.unwrap`), not a DDP wrapper: no gradient bookkeeping is wanted.

    Why: eval-mode BN uses running averages (momentum 0.1) of statistics of weights that kept moving. A
    binary network turns a small shift of a BN mean into many flipped signs, so at a high learning rate
    the eval accuracy swings from epoch to epoch while the train accuracy rises smoothly; statistics of
    the final weights remove that noise. No gradients, no optimizer step; drop path is off meanwhile.

    ``mode='train'``: one pass with the network in training mode; each running mean / variance becomes the
    plain average over the batches of the batch mean / unbiased variance. Every BN then holds the
    statistics of its input *when all BNs upstream normalise with batch statistics*.

    ``mode='eval'`` (default): layer by layer in forward order, each BN gets the statistics of its input
    *when everything upstream runs in eval mode with the statistics already re-estimated*, i.e. of the
    function that is evaluated: for BN :math:`k`, :math:`\mu_k = \frac{1}{B}\sum_b \mathrm{mean}(x_{k,b})`,
    :math:`\sigma^2_k = \frac{1}{B}\sum_b \mathrm{var}(x_{k,b})` with
    :math:`x_{k,b} = f_{<k}^{\mathrm{eval}}(\mathrm{batch}_b)`. In a binary network the two differ: a
    shift of an upstream normalisation flips signs, which moves every later distribution; one seed of
    ``bench/recipes.py`` lost 4.6 points of test accuracy to that with ``'train'`` (74.26 against 78.86 %).
    Costs one partial
    forward per BN and batch (about #BN / 2 eval forwards of the batches); the batches are kept in memory
    when they fit in 1 GiB, else the loader is read again for each BN (it must yield the same batches
    each time, as a sampler without ``set_epoch`` does). A BN called twice in one forward gets the
    statistics of its first call.
    """
    if mode not in RECALIBRATION_MODES:
        raise ValueError(f'mode must be one of {RECALIBRATION_MODES}, not {mode!r}')
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or batches <= 0:
        return 0
    saved = [m.momentum for m in bns]
    drop = getattr(net, 'drop_path_prob', None)
    was_training = net.training
    seen = 0
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None                      # cumulative moving average: the mean over the batches
        if drop is not None:
            net.drop_path_prob = 0.0
        if mode == 'train':
            net.train()
            for x in _batches_on_device(loader, batches, ctx, channels_last):
                with autocast_context(ctx.device, amp):
                    net(x)
                seen += x.size(0)
        else:
            net.eval()
            seen = _recalibrate_layer_by_layer(net, bns, loader, batches, ctx, amp, channels_last)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        if drop is not None:
            net.drop_path_prob = drop
        net.train(was_training)
    return seen


def _recalibrate_layer_by_layer(net: nn.Module, bns: List[nn.Module], loader: Any, batches: int, ctx: DistContext,
                                amp: Optional[str], channels_last: bool) -> int:
    """``mode='eval'`` of :func:`recalibrate_bn` (``net`` in eval mode, running statistics reset)."""
    cached: Optional[List[torch.Tensor]] = []
    size = 0
    for x in _batches_on_device(loader, batches, ctx, channels_last):
        size += x.numel() * x.element_size()
        if size > RECALIBRATION_CACHE_BYTES:
            cached = None
            break
        cached.append(x)

    def batches_again():
        return iter(cached) if cached is not None else _batches_on_device(loader, batches, ctx, channels_last)

    # forward order: the order in which the BNs first see an input
    order: List[nn.Module] = []
    noted = set()

    def note(module, _inputs):
        if id(module) not in noted:
            noted.add(id(module))
            order.append(module)

    handles = [m.register_forward_pre_hook(note) for m in bns]
    try:
        for x in batches_again():
            with autocast_context(ctx.device, amp):
                net(x)
            break
    finally:
        for h in handles:
            h.remove()
    seen = 0
    for bn in order:
        means: List[torch.Tensor] = []
        variances: List[torch.Tensor] = []

        def collect(module, inputs):
            x = inputs[0].float()
            dims = [d for d in range(x.dim()) if d != 1]
            means.append(x.mean(dims))
            variances.append(x.var(dims, unbiased=x.numel() // x.size(1) > 1))
            raise _StopForward

        handle = bn.register_forward_pre_hook(collect)
        seen = 0
        try:
            for x in batches_again():
                try:
                    with autocast_context(ctx.device, amp):
                        net(x)
                except _StopForward:
                    pass
                seen += x.size(0)
        finally:
            handle.remove()
        if means:
            bn.running_mean.copy_(torch.stack(means).mean(0))
            bn.running_var.copy_(torch.stack(variances).mean(0))
            bn.num_batches_tracked.fill_(len(means))
    return seen


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, *, ctx: DistContext, amp: Optional[str] = None,
             channels_last: bool = False, report_freq: int = 50, max_batches: Optional[int] = None,
             show_progress: bool = False, log: Callable[[str], None] = LOGGER.info) -> Dict[str, float]:
    """Top-1/top-5 and mean (plain) cross entropy over the whole (sharded) loader, exact over all ranks."""
    model.eval()
    device = ctx.device
    sums = {'loss': 0.0, 'c1': 0.0, 'c5': 0.0, 'n': 0.0}
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    bar = progress(_limit(loader, max_batches), total=total, desc='valid', enabled=show_progress)
    for step, (x, y) in enumerate(bar):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp):
            logits = model(x)
        logits = logits.float()
        loss = F.cross_entropy(logits, y)
        n = y.size(0)
        sums['loss'] += float(loss) * n
        sums['c1'] += _correct(logits, y, 1)
        sums['c5'] += _correct(logits, y, 5)
        sums['n'] += n
        if report_freq and step % report_freq == 0:
            k = max(sums['n'], 1)
            log(f"valid {step:03d} {sums['loss'] / k:e} {100 * sums['c1'] / k:f} {100 * sums['c5'] / k:f}")
    return _finish(sums, ctx)


def _finish(sums: Dict[str, float], ctx: DistContext) -> Dict[str, float]:
    tot = all_reduce_sums(sums, ctx)
    n = max(tot['n'], 1.0)
    return {'loss': tot['loss'] / n, 'top1': 100.0 * tot['c1'] / n, 'top5': 100.0 * tot['c5'] / n, 'n': int(tot['n'])}
