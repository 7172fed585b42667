r"""Folding float parameters into the packed engine's exact integer form.

**BN before a sign → two thresholds per channel.** A binary op computes ``sign(BN(x))`` with
``sign(0) = 0``. PyTorch's CPU batch norm is monotone in ``x`` for each channel (non-decreasing when the
BN weight is positive, non-increasing when negative, constant when it is zero), so with ``x' = -x`` for
a negative weight and ``x' = x`` otherwise, ``sign(BN(x))`` is ``-1`` for ``x' < t_zero``, ``0`` for
``t_zero <= x' < t_pos`` and ``+1`` for ``x' >= t_pos``. :func:`bn_sign_thresholds` finds ``t_zero`` (the
smallest float with ``BN >= 0``) and ``t_pos`` (the smallest with ``BN > 0``) by binary searches over the
ordered float32 values, **evaluating PyTorch's own** ``batch_norm``, so the thresholds are exact for
whatever formula and rounding this torch build uses (a fused multiply-add, here). The zero band is
usually empty or one float (``x = -beta/a`` exactly, e.g. ``x = 0`` when ``beta = 0``), but underflow of
``x * a`` can widen it, hence two thresholds. A zero BN weight makes the channel constant: thresholds
``(-inf, -inf)`` (+1), ``(+inf, +inf)`` (-1) or ``(-inf, +inf)`` (0). Inputs are assumed finite.

**RSign's learnable threshold folds in too.** ReActNet's RSign computes ``sign(BN(x) - beta)`` with one
``beta`` per channel. Subtracting a constant keeps ``BN`` monotone, so the same two thresholds exist; the
searches evaluate ``batch_norm(x) - beta`` in float32 exactly as the float model does (``shift``), and the
engine needs nothing else: an RSign unit costs what a plain sign unit costs.

**Binary weights → bits + one scale per filter.** :func:`binary_filters` reads the effective weights
of a conv (``BinaryConv2d.effective_weight()``) and checks that every filter has a single magnitude
``alpha`` (zero filters are allowed): that is what makes ``sum(w * a) = alpha * sum(sign(w) * a)`` exact.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = ['bn_sign_thresholds', 'kernel_thresholds', 'threshold_signs', 'binary_filters', 'pack_filter_bits',
           'unpack_filter_bits', 'kernel_weight_words', 'pack_negate', 'unpack_negate']

_MAX_KEY = 0x7F7FFFFF  # ordered key of the largest finite float32
_PROBE = 16            # probe width: a full vector of PyTorch's CPU kernel


def _keys_to_float(keys: np.ndarray) -> np.ndarray:
    """Ordered int keys -> float32 (key 0 = +0.0; negative keys mirror positive floats)."""
    mag = np.abs(keys).astype(np.uint32)
    bits = mag | np.where(keys < 0, np.uint32(0x80000000), np.uint32(0))
    return bits.view(np.float32)


def _bn_eval(x: np.ndarray, weight, bias, mean, var, eps: float) -> np.ndarray:
    """PyTorch's eval batch norm of one value per channel (repeated across a vector-sized row)."""
    t = (torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).view(1, -1, 1, 1)
         .expand(1, -1, 1, _PROBE).contiguous())
    y = F.batch_norm(t, mean, var, weight, bias, training=False, momentum=0.0, eps=eps)
    return y[0, :, 0, 0].numpy().copy()


def _smallest(pred, C: int) -> np.ndarray:
    """Per channel the smallest finite float ``u`` with ``pred(u)`` (``pred`` monotone false -> true), +inf if none."""
    lo = np.full(C, -_MAX_KEY, np.int64)
    hi = np.full(C, _MAX_KEY, np.int64)
    none = ~pred(_keys_to_float(hi))
    for _ in range(34):                            # 2 * 0x7f7fffff < 2**33
        active = lo < hi
        if not active.any():
            break
        mid = (lo + hi) // 2
        ok = pred(_keys_to_float(mid))
        hi = np.where(active & ok, mid, hi)
        lo = np.where(active & ~ok, mid + 1, lo)
    return np.where(none, np.float32(np.inf), _keys_to_float(lo)).astype(np.float32)


@torch.no_grad()
def bn_sign_thresholds(weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], mean: torch.Tensor,
                       var: torch.Tensor, eps: float, where: str = 'batch norm',
                       shift: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact per-channel thresholds of ``sign(batch_norm(x) - shift)`` (``shift``: RSign's ``beta``, default
    none): ``(thresholds float32 [2, C], negate bool [C])``, rows ``t_zero`` and ``t_pos`` (see the module
    docstring)."""
    weight, bias, mean, var = [None if p is None else p.detach().float().cpu() for p in (weight, bias, mean, var)]
    C = mean.numel()
    w = np.ones(C, np.float32) if weight is None else weight.numpy()
    if not np.all(np.isfinite(w)):
        raise ConfigError(f'{where}: non-finite BN weight; cannot fold it into sign thresholds')
    if shift is not None:
        shift_np = shift.detach().float().cpu().reshape(-1).numpy()
        if shift_np.shape != (C,) or not np.all(np.isfinite(shift_np)):
            raise ConfigError(f'{where}: the sign threshold (RSign beta) must be {C} finite values; cannot fold it')
    g = np.where(w < 0, np.float32(-1), np.float32(1))

    def bn(u: np.ndarray) -> np.ndarray:   # non-decreasing in u
        y = _bn_eval(g * u, weight, bias, mean, var, eps)
        return y if shift is None else (y - shift_np).astype(np.float32)   # float32 subtraction, as torch's

    t_zero = _smallest(lambda u: bn(u) >= 0, C)
    t_pos = _smallest(lambda u: bn(u) > 0, C)
    const = w == 0
    if const.any():
        beta = _bn_eval(np.zeros(C, np.float32), weight, bias, mean, var, eps)
        if shift is not None:
            beta = (beta - shift_np).astype(np.float32)
        inf = np.float32(np.inf)
        t_zero = np.where(const, np.where(beta < 0, inf, -inf), t_zero).astype(np.float32)
        t_pos = np.where(const, np.where(beta > 0, -inf, inf), t_pos).astype(np.float32)
    negate = (g < 0) & ~const
    return torch.from_numpy(np.stack([t_zero, t_pos])), torch.from_numpy(negate)


def kernel_thresholds(thresholds: torch.Tensor,
                      negate: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The engine's arguments ``(t_zero, t_pos, flip)``: ``flip`` is the float sign bit (as int32) where negated."""
    flip = torch.where(negate.bool(), torch.tensor(-2 ** 31, dtype=torch.int32), torch.tensor(0, dtype=torch.int32))
    return thresholds[0].contiguous(), thresholds[1].contiguous(), flip.contiguous()


def threshold_signs(x: torch.Tensor, thresholds: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
    """``sign(BN(x))`` from the folded thresholds, as a float tensor of x's shape (N, C, H, W)."""
    shape = (1, -1, 1, 1)
    xs = torch.where(negate.bool().view(shape), -x, x)
    pos = (xs >= thresholds[1].view(shape)).to(x.dtype)
    not_neg = (xs >= thresholds[0].view(shape)).to(x.dtype)
    return pos + not_neg - 1.0


def pack_negate(negate: torch.Tensor) -> torch.Tensor:
    """Per-channel flags as bits (uint8, little-endian)."""
    return torch.from_numpy(np.packbits(negate.numpy().astype(bool), bitorder='little'))


def unpack_negate(bits: torch.Tensor, channels: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=channels, bitorder='little').astype(bool))


@torch.no_grad()
def binary_filters(effective_weight: torch.Tensor, where: str = 'conv') -> Tuple[torch.Tensor, torch.Tensor]:
    """``(negative bool [O, C, KH, KW], alpha float32 [O])`` of a per-filter scaled sign weight."""
    w = effective_weight.detach().float().cpu()
    mag = w.abs().flatten(1)
    alpha = mag.amax(dim=1)
    single = (mag == alpha[:, None]).all(dim=1) | (alpha == 0)
    if not bool(single.all()) or not bool(torch.isfinite(alpha).all()):
        o = int((~single).nonzero()[0]) if not bool(single.all()) else 0
        raise ConfigError(f'{where}: filter {o} of its binarized weights has more than one magnitude (or a zero '
                          'weight); the packed engine needs sign(W) times one scale per filter')
    return w < 0, alpha.contiguous()


def pack_filter_bits(negative: torch.Tensor) -> torch.Tensor:
    """Bits of ``negative [O, C, KH, KW]`` laid out per filter as [KH][KW][C], little-endian within each byte,
    each filter padded to whole bytes: uint8 [O, ceil(KH*KW*C / 8)]."""
    O = negative.shape[0]
    flat = negative.permute(0, 2, 3, 1).reshape(O, -1).numpy()
    return torch.from_numpy(np.packbits(flat, axis=1, bitorder='little'))


def unpack_filter_bits(bits: torch.Tensor, shape: Tuple[int, int, int, int]) -> torch.Tensor:
    """Inverse of :func:`pack_filter_bits`: ``negative bool [O, C, KH, KW]``."""
    O, C, KH, KW = shape
    flat = np.unpackbits(bits.numpy(), axis=1, count=KH * KW * C, bitorder='little').astype(bool)
    return torch.from_numpy(flat.reshape(O, KH, KW, C)).permute(0, 3, 1, 2).contiguous()


def kernel_weight_words(negative: torch.Tensor) -> torch.Tensor:
    """The engine's weight layout: int64 [KH * KW * ceil(C/64), ceil(O/8) * 8] (see csrc/kernels.h)."""
    O, C, KH, KW = negative.shape
    Kw = (C + 63) // 64
    Opad = (O + 7) // 8 * 8
    a = np.zeros((O, KH, KW, Kw * 64), dtype=bool)
    a[..., :C] = negative.permute(0, 2, 3, 1).numpy()
    words = np.packbits(a, axis=-1, bitorder='little').view('<u8').reshape(O, KH * KW * Kw)
    out = np.zeros((KH * KW * Kw, Opad), dtype='<u8')
    out[:, :O] = words.T
    return torch.from_numpy(out.view(np.int64))
