"""The packed CPU engine: a module that runs a packed BNAS network on float image batches.

Activations between ops are float32 tensors in channels-last memory (NHWC), so that the fused C++
kernel can threshold, sign and pack the channels of a pixel with a few vector compares, and a cell's
ops write straight into their channel slice of the cell output (the concat costs nothing; the two ops
of a node accumulate into it, in the float model's order of additions, and the residual is added last).

* **Binary ops** (sign input, binary weights): one C++ call each -- thresholds + sign + bit packing of
  the input into a zero-bordered buffer, then an XNOR/popcount direct convolution over packed words
  with the output channels blocked in vector lanes, threads over output rows, ReLU and the
  accumulation into the node fused. Zero padding and ``sign(0) = 0`` are exact by construction: the
  bit planes hold a sign bit and a non-zero bit, and padded pixels are all-zero (see ``csrc/kernels.h``).
* **Pools** run in C++ on the channels-last tensors.
* **All-binary cells** run as one C++ call each (``csrc/cell.cpp``): image by image per thread, every
  op of the cell on one image before the next, with the same kernels and float order. At batch 1 that
  is one thread per cell, which still beats one Python call per op (BNAS-A: ~25 % less CPU time).
* **Full-precision parts** (stems, residual convs, classifier; convs that keep float weights or see a
  float input under the official precision rules) run as the same PyTorch ops on the same contiguous
  NCHW tensors as the float model, so they produce the same bits. ``set_fp_parts('int8')`` runs the
  residual convs of reduction cells on int8 kernels instead: faster, not bit-exact (``int8.py``).

* **The react block** (RSign -> scaled-sign conv [+ shortcut] -> RPReLU): RSign's threshold is already in
  the unit's thresholds, so the conv is the same packed kernel (without the fused ReLU); the shortcut add and
  the (R)PReLU then compute the float model's elementwise ops on the conv output (same operations in the same
  order, same bits), before the result goes into the node. A cell of such blocks runs as a cell program too
  (``csrc/cell.cpp`` does the epilogue per image); op by op (``CELL_PROGRAM = False``) the epilogue runs as
  the float model's PyTorch ops.

The logits therefore equal the float model's up to the order in which it adds the ``±alpha`` terms of
its binary convs (the engine computes the exact integer count and scales once); see the README's
Deploy section for when that can move a value across a sign threshold.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError
from . import kernels
from .fold import kernel_thresholds, kernel_weight_words, threshold_signs, unpack_filter_bits, unpack_negate
from .int8 import FP_PARTS, Int8Conv, int8_for
from .validate import validate_packed

__all__ = ['PackedNetwork']

CL = torch.channels_last
_EMPTY = torch.empty(0)   # native_batch_norm.out's unused statistics outputs (eval mode leaves them empty)

#: op-by-op path (batch 1, or ``CELL_PROGRAM = False``): bytes of a cell's inputs, preprocessed states and
#: output per thread that a group of images should fit in: a cell then runs group by group and its intermediate
#: tensors stay in cache from one op to the next
#: instead of going through memory (BNAS-A at batch 32: the 32x32 cells run image by image)
CACHE_BUDGET = 3 << 19

#: run all-binary cells as one C++ call each, image by image on each thread (csrc/cell.cpp);
#: False runs them op by op from Python (the same kernels and bits; kept for tests and comparison)
CELL_PROGRAM = True

#: run consecutive all-binary cells as one C++ call (csrc/cell.cpp, run_chain): each image goes through the
#: whole chain on one thread (or, at batch 1, the team), and the threads are woken once per chain instead of
#: once per cell; False runs the cell programs one by one (the same bits; kept for tests and comparison)
CELL_CHAINS = True


#: Float parts (stem, residual convs, head) that run on one thread when the process's OpenMP threads sleep
#: between parallel regions (``OMP_WAIT_POLICY=PASSIVE``, what a shared machine needs): below these sizes per
#: call -- multiply-accumulates of a conv, elements of an elementwise op or layout copy -- waking a sleeping
#: thread (50-250 us on a 2-core VM) costs more than it saves. Measured there: a 2.1M-MAC conv takes 96 us on
#: one thread and 284 us on two, a 147K-element BN 30 and 69 us; from ~20M MACs and ~600K elements two threads
#: win. With spinning threads (libgomp's default policy) every op keeps all threads. The thread count does not
#: change the bits of these ops (each output is computed by one thread, in the same order), with one exception
#: that keeps its threads: PyTorch picks the backend of an unstrided, undilated 1x1 conv by the thread count
#: (oneDNN with several threads, im2col + GEMM with one), and the two round differently.
#: ``tests/test_deploy_network.py`` checks networks and such convs both ways.
ONE_THREAD_MACS = 1 << 24
ONE_THREAD_ELEMENTS = 1 << 19

#: None: small float parts go to one thread when ``OMP_WAIT_POLICY`` is ``PASSIVE`` (read when the OpenMP
#: runtime starts, so it is the policy in force); True / False: always / never (tests and comparisons).
ONE_THREAD_SMALL_OPS: Optional[bool] = None


def _threads_sleep() -> bool:
    if ONE_THREAD_SMALL_OPS is not None:
        return ONE_THREAD_SMALL_OPS
    return os.environ.get('OMP_WAIT_POLICY', '').strip().upper() == 'PASSIVE'


class _OneThread:
    """Torch on one thread inside the block, the caller's thread count restored after (a class: cheaper to enter
    than a generator context, and it runs several times per forward pass)."""

    __slots__ = ('threads',)

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc) -> bool:
        torch.set_num_threads(self.threads)
        return False


def _one_thread() -> _OneThread:
    return _OneThread()


_CALLER_THREADS = contextlib.nullcontext()


def _threads_for(work: int, limit: int):
    """A context for an op of ``work`` units (see ONE_THREAD_MACS / ONE_THREAD_ELEMENTS): one thread when the
    threads sleep and the op is small, else the caller's threads."""
    if work < limit and torch.get_num_threads() > 1 and _threads_sleep():
        return _one_thread()
    return _CALLER_THREADS


def _conv_threads(x: torch.Tensor, weight_shape, stride: int, padding: int, dilation: int):
    """_threads_for a float conv of ``x``; an unstrided, undilated 1x1 conv keeps the caller's threads (its
    backend, and so its bits, depend on the thread count; see ONE_THREAD_MACS)."""
    O, C, KH, KW = weight_shape
    if (KH, KW) == (1, 1) and stride == 1 and dilation == 1:
        return _CALLER_THREADS
    oh = kernels.conv_output_size(x.shape[2], KH, stride, padding, dilation)
    ow = kernels.conv_output_size(x.shape[3], KW, stride, padding, dilation)
    return _threads_for(x.shape[0] * O * max(oh, 0) * max(ow, 0) * C * KH * KW, ONE_THREAD_MACS)


class _Workspace(threading.local):
    """Float32 buffers that the engine's forward passes lend and give back, kept from one pass to the next
    (one set per calling thread, so concurrent callers never share one).

    Why: a fresh tensor of a few MB comes from fresh pages, and the kernel maps each 4 KiB page on its first
    write (about a microsecond each): BNAS-A at batch 32 asks for ~100 MB of intermediate maps per pass, which
    cost about a fifth of the pass in page faults. A buffer is lent by :meth:`take` and given back by
    :meth:`give` once nothing reads it any more. A request gets the smallest free buffer that holds it (its
    first elements, in any shape), so a pass at a smaller batch reuses a larger pass's buffers; :meth:`end`
    keeps only the buffers that this pass or the one before used, so that passes of ever new sizes do not pile
    up buffers while two alternating sizes keep theirs. Tensors that were not lent here are ignored by
    :meth:`give`.
    """

    def __init__(self) -> None:
        self.free: List[torch.Tensor] = []
        self._sizes: List[int] = []               # numel of each free buffer (a Python int: no call per look)
        self._views: Dict[Tuple[int, Tuple[int, ...], bool], torch.Tensor] = {}   # (data_ptr, shape, CL) -> view
        self.lent: Dict[int, torch.Tensor] = {}   # data_ptr -> the flat buffer
        self.last_used: Dict[int, int] = {}      # data_ptr -> the pass that last lent it
        self.passes = 0

    def begin(self) -> None:
        """A new pass: anything a failed pass left lent is dropped, not reused."""
        self.lent.clear()
        self.passes += 1

    def take(self, shape: Tuple[int, ...], memory_format: torch.memory_format = torch.contiguous_format
             ) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= int(d)
        best, best_size = -1, 0
        for i, size in enumerate(self._sizes):
            if size >= numel and (best < 0 or size < best_size):
                best, best_size = i, size
        if best >= 0:
            flat = self.free.pop(best)
            del self._sizes[best]
        else:
            flat = torch.empty(numel)
        ptr = flat.data_ptr()
        self.lent[ptr] = flat
        self.last_used[ptr] = self.passes
        cl = memory_format == CL and len(shape) == 4
        key = (ptr, tuple(shape), cl)
        view = self._views.get(key)   # kept: a pass asks for the same shapes each time (three tensor ops saved)
        if view is None:
            head = flat[:numel]
            if cl:
                N, C, H, W = shape
                view = head.view(N, H, W, C).permute(0, 3, 1, 2)
            else:
                view = head.view(shape)
            self._views[key] = view
        return view

    def give(self, *tensors: Optional[torch.Tensor]) -> None:
        for t in tensors:
            flat = None if t is None else self.lent.pop(t.data_ptr(), None)
            if flat is not None:
                self.free.append(flat)
                self._sizes.append(flat.numel())

    def end(self) -> None:
        """The pass is over: free buffers that neither it nor the pass before used are released."""
        ptrs = [t.data_ptr() for t in self.free]
        keep = [i for i, p in enumerate(ptrs) if self.last_used.get(p, 0) >= self.passes - 1]
        if len(keep) < len(self.free):
            self.free = [self.free[i] for i in keep]
            self._sizes = [self._sizes[i] for i in keep]
        self.last_used = {ptrs[i]: self.last_used[ptrs[i]] for i in keep}
        # views of released buffers would keep them alive; views of lent ones are still in use
        alive = set(self.last_used) | set(self.lent)
        if len(self._views) > 0 and any(k[0] not in alive for k in self._views):
            self._views = {k: v for k, v in self._views.items() if k[0] in alive}

    def retained(self) -> int:
        """Elements held in free buffers."""
        return sum(self._sizes)

    def clear(self) -> None:
        self.free = []
        self._sizes = []
        self._views = {}
        self.lent.clear()
        self.last_used = {}


def _relayout(x: torch.Tensor, memory_format: torch.memory_format, isa: int,
              workspace: Optional[_Workspace] = None) -> torch.Tensor:
    """``x.contiguous(memory_format=...)``: between NCHW and channels-last by the engine's transpose (a copy,
    several times faster than PyTorch's on these shapes; into a buffer lent by ``workspace`` when given),
    anything else by PyTorch."""
    if x.is_contiguous(memory_format=memory_format):
        return x
    src = CL if memory_format == torch.contiguous_format else torch.contiguous_format
    if x.dim() == 4 and x.dtype == torch.float32 and x.is_contiguous(memory_format=src):
        out = (torch.empty(x.shape, memory_format=memory_format) if workspace is None else
               workspace.take(tuple(x.shape), memory_format))
        with _threads_for(x.numel(), ONE_THREAD_ELEMENTS):
            kernels.extension().relayout(x, out, isa)
        return out
    with _threads_for(x.numel(), ONE_THREAD_ELEMENTS):
        return x.contiguous(memory_format=memory_format)


def _cl(x: torch.Tensor, isa: int, workspace: Optional[_Workspace] = None) -> torch.Tensor:
    return _relayout(x, CL, isa, workspace)


def _check(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise CheckpointError(f'packed model: {where}: {what}; the file does not match this bnas-nni, re-export it')


def _tensor(d: Dict[str, Any], key: str, where: str, dtype: torch.dtype, shape: Optional[Tuple[int, ...]] = None):
    t = d.get(key)
    _check(isinstance(t, torch.Tensor), where, f'missing tensor {key!r}')
    _check(t.dtype == dtype, where, f'{key} has dtype {t.dtype}, expected {dtype}')
    if shape is not None:
        _check(tuple(t.shape) == tuple(shape), where, f'{key} has shape {tuple(t.shape)}, expected {tuple(shape)}')
    return t.contiguous()


def _conv_weight(conv: Dict[str, Any],
                 where: str) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
    """(negative bits as bool [O, C, KH, KW] or None, alpha or None, float weight [O, C, KH, KW])."""
    O, C = int(conv['out']), int(conv['in'])
    KH, KW = (int(k) for k in conv['kernel'])
    if conv['binary']:
        nbytes = (KH * KW * C + 7) // 8
        bits = _tensor(conv, 'bits', where, torch.uint8, (O, nbytes))
        alpha = _tensor(conv, 'alpha', where, torch.float32, (O,))
        negative = unpack_filter_bits(bits, (O, C, KH, KW))
        # exactly the float model's effective weight sign(W) * alpha
        weight = torch.where(negative, -alpha.view(-1, 1, 1, 1), alpha.view(-1, 1, 1, 1)).contiguous()
        return negative, alpha, weight
    return None, None, _tensor(conv, 'weight', where, torch.float32, (O, C, KH, KW))


class _Timer:
    """Per-layer wall-clock and process CPU times when profiling (``records`` is a list), nothing otherwise."""

    def __init__(self) -> None:
        self.records: Optional[List[Tuple[str, str, float, float]]] = None

    def run(self, name: str, kind: str, fn, *args, **kwargs):
        if self.records is None:
            return fn(*args, **kwargs)
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        self.records.append((name, kind, time.perf_counter() - t0, time.process_time() - c0))
        return out


class _Unit:
    """BN -> quantizer -> conv -> (ReLU): on the packed kernels when it is sign x binary, else as float ops."""

    int8: Optional[Int8Conv] = None   # set by PackedNetwork.set_fp_parts('int8') on float-input units

    def __init__(self, d: Dict[str, Any]) -> None:
        where = d.get('name', 'unit')
        self.name = where
        conv = d['conv']
        self.in_ch, self.out_ch = int(conv['in']), int(conv['out'])
        self.kernel = tuple(int(k) for k in conv['kernel'])
        self.stride, self.padding, self.dilation = int(conv['stride']), int(conv['padding']), int(conv['dilation'])
        self.relu = bool(d['relu'])
        self.sign = d['input'] == 'sign'
        _check(d['input'] in ('sign', 'float'), where, f"unknown input kind {d['input']!r}")
        negative, alpha, weight = _conv_weight(conv, where)
        self.bias = conv.get('bias')
        if self.bias is not None:
            self.bias = _tensor(conv, 'bias', where, torch.float32, (self.out_ch,))
        if self.sign:
            self.thresholds = _tensor(d, 'thresholds', where, torch.float32, (2, self.in_ch))
            negate_bits = _tensor(d, 'negate', where, torch.uint8, ((self.in_ch + 7) // 8,))
            self.negate = unpack_negate(negate_bits, self.in_ch)
        else:
            bn = d['bn']
            self.bn = {k: (None if bn.get(k) is None else _tensor(bn, k, f'{where}.bn', torch.float32, (self.in_ch,)))
                       for k in ('weight', 'bias', 'mean', 'var')}
            _check(self.bn['mean'] is not None and self.bn['var'] is not None, where, 'BN statistics missing')
            self.eps = float(bn['eps'])
        self._react_parts(d, where)
        self.packed = self.sign and negative is not None and self.bias is None
        if self.packed:
            self.t_zero, self.t_pos, self.flip = kernel_thresholds(self.thresholds, self.negate)
            self.words = kernel_weight_words(negative)
            self.alpha = torch.zeros(self.words.shape[1], dtype=torch.float32)
            self.alpha[:self.out_ch] = alpha
        else:
            self.weight = weight
        kind = 'binary' if self.packed else ('sign-input float' if self.sign else
                                             ('float-input binary' if negative is not None else 'float'))
        k = f'{self.kernel[0]}x{self.kernel[1]}'
        self.kind = f'{kind} conv {k}' + (f' dil {self.dilation}' if self.dilation > 1 else '') + \
            (f' stride {self.stride}' if self.stride > 1 else '') + \
            (' + ' + ' + '.join(filter(None, [self.shortcut and 'shortcut', self.prelu is not None and (
                'rprelu' if self.prelu['gamma'] is not None else 'prelu')])) if self.epilogue else '')

    def _react_parts(self, d: Dict[str, Any], where: str) -> None:
        """The react block's optional (R)PReLU and shortcut: ``self.epilogue`` is whether the unit has them."""
        prelu = d.get('prelu')
        self.prelu = None
        if prelu is not None:
            self.prelu = {k: (None if prelu.get(k) is None else
                              _tensor(prelu, k, f'{where}.prelu', torch.float32, (self.out_ch,)).view(1, -1, 1, 1))
                          for k in ('gamma', 'zeta')}
            self.prelu['slope'] = _tensor(prelu, 'slope', f'{where}.prelu', torch.float32, (self.out_ch,))
        self.shortcut = d.get('shortcut')
        _check(self.shortcut in (None, 'identity', 'avg_pool'), where, f'unknown shortcut {self.shortcut!r}')
        self.epilogue = self.prelu is not None or self.shortcut is not None

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Shortcut add, then the nonlinearity, as the float block computes them (``y``: the conv output)."""
        if self.shortcut == 'identity':
            y = y + x
        elif self.shortcut == 'avg_pool':
            y = y + F.avg_pool2d(x.contiguous(), 2, 2, ceil_mode=True, count_include_pad=False)
        if self.prelu is not None:
            p = self.prelu
            if p['gamma'] is not None:
                y = y - p['gamma']
            y = F.prelu(y, p['slope'])
            if p['zeta'] is not None:
                y = y + p['zeta']
        elif self.relu:
            y = F.relu(y)
        return y

    def out_hw(self, h: int, w: int) -> Tuple[int, int]:
        KH, KW = self.kernel
        return (kernels.conv_output_size(h, KH, self.stride, self.padding, self.dilation),
                kernels.conv_output_size(w, KW, self.stride, self.padding, self.dilation))

    def __call__(self, x: torch.Tensor, isa: int, out: Optional[torch.Tensor] = None, accumulate: bool = False,
                 layout: str = 'cl', workspace: Optional[_Workspace] = None) -> torch.Tensor:
        """The unit's output (into ``out`` when given). ``workspace``: where the float path's temporaries come from
        (the input's NCHW copy and the BN output, given back before returning) and its channels-last output."""
        if x.shape[1] != self.in_ch:
            raise ConfigError(f'{self.name}: input has {x.shape[1]} channels, the layer expects {self.in_ch}')
        if self.packed and not self.epilogue:
            if out is None:
                oh, ow = self.out_hw(x.shape[2], x.shape[3])
                out = torch.empty((x.shape[0], self.out_ch, oh, ow), memory_format=CL)
            kernels.extension().binary_conv(x, self.t_zero, self.t_pos, self.flip, self.words, self.alpha, out,
                                            self.kernel[0], self.kernel[1], self.stride, self.padding, self.dilation,
                                            self.relu, accumulate, isa)
            return out
        if self.packed:   # the react block: the packed conv, then its shortcut and (R)PReLU
            oh, ow = self.out_hw(x.shape[2], x.shape[3])
            y = torch.empty((x.shape[0], self.out_ch, oh, ow), memory_format=CL)
            kernels.extension().binary_conv(x, self.t_zero, self.t_pos, self.flip, self.words, self.alpha, y,
                                            self.kernel[0], self.kernel[1], self.stride, self.padding, self.dilation,
                                            False, False, isa)
            y = self._finish(y, x)
            if out is None:
                return _cl(y, isa)
            if accumulate:
                out.add_(y)
            else:
                out.copy_(y)
            return out
        if self.int8 is not None:   # fp_parts='int8' (int8.py): not the float model's bits
            y = self.int8(x, isa)
            if out is None:
                return y
            return out.add_(y) if accumulate else out.copy_(y)
        with _threads_for(x.numel(), ONE_THREAD_ELEMENTS):
            xn = _relayout(x, torch.contiguous_format, isa, workspace)
            if self.sign:
                h = threshold_signs(xn, self.thresholds, self.negate)
            else:   # the kernel F.batch_norm runs in eval mode (the same bits), into a buffer lent when it can be
                b = self.bn
                h = torch.empty_like(xn) if workspace is None else workspace.take(tuple(xn.shape))
                torch.ops.aten.native_batch_norm.out(xn, b['weight'], b['bias'], b['mean'], b['var'], False, 0.0,
                                                     self.eps, out=h, save_mean=_EMPTY, save_invstd=_EMPTY)
        with _conv_threads(h, self.weight.shape, self.stride, self.padding, self.dilation):
            y = F.conv2d(h, self.weight, self.bias, self.stride, self.padding, self.dilation)
        if workspace is not None:
            workspace.give(h)
        with _threads_for(y.numel(), ONE_THREAD_ELEMENTS):
            if self.epilogue:
                y = self._finish(y, xn)
            elif self.relu:
                y = F.relu(y)
            if workspace is not None and xn is not x:
                workspace.give(xn)
            if out is None:
                return _cl(y, isa, workspace) if layout == 'cl' else y
            if accumulate:
                out.add_(y)
            else:
                out.copy_(y)
            return out


class _Pool:
    def __init__(self, d: Dict[str, Any]) -> None:
        self.name, self.stride, self.is_max = d.get('name', 'pool'), int(d['stride']), d['type'] == 'max_pool'
        self.kind = f"{'max' if self.is_max else 'avg'} pool 3x3" + (' stride 2' if self.stride == 2 else '')

    def __call__(self, x: torch.Tensor, isa: int, out: torch.Tensor, accumulate: bool) -> torch.Tensor:
        if x.stride(1) != 1:
            x = _cl(x, isa)
        kernels.extension().pool2d(x, out, 3, self.stride, 1, self.is_max, accumulate, isa)
        return out


def _prim_fn(p: Dict[str, Any], where: str):
    """A float stem primitive (conv / bn / relu) as a function of an NCHW tensor (on one thread when small,
    see ONE_THREAD_MACS)."""
    def elementwise(fn):
        def run(x: torch.Tensor) -> torch.Tensor:
            with _threads_for(x.numel(), ONE_THREAD_ELEMENTS):
                return fn(x)
        return run

    if p['type'] == 'relu':
        return elementwise(F.relu)
    if p['type'] == 'bn':
        C = int(p['mean'].numel()) if isinstance(p.get('mean'), torch.Tensor) else 0
        b = {k: (None if p.get(k) is None else _tensor(p, k, where, torch.float32, (C,)))
             for k in ('weight', 'bias', 'mean', 'var')}
        eps = float(p['eps'])
        return elementwise(lambda x: F.batch_norm(x, b['mean'], b['var'], b['weight'], b['bias'], False, 0.0, eps))
    if p['type'] == 'conv':
        _, _, w = _conv_weight(p, where)
        bias = None if p.get('bias') is None else _tensor(p, 'bias', where, torch.float32, (int(p['out']),))
        s, pad, dil = int(p['stride']), int(p['padding']), int(p['dilation'])

        def conv(x: torch.Tensor) -> torch.Tensor:
            with _conv_threads(x, w.shape, s, pad, dil):
                return F.conv2d(x, w, bias, s, pad, dil)
        return conv
    raise CheckpointError(f"packed model: {where}: unknown stem layer {p['type']!r}; re-export it")


#: the cell program's shortcut codes (csrc/cell.cpp, CellProgram::set_epilogue)
_SHORTCUTS = {None: 0, 'identity': 1, 'avg_pool': 2}


def _flat(t: Optional[torch.Tensor]) -> torch.Tensor:
    """A per-channel vector as the cell program takes it (an empty tensor: absent)."""
    return torch.empty(0) if t is None else t.reshape(-1).contiguous()


class _Cell:
    def __init__(self, d: Dict[str, Any]) -> None:
        self.name = d['name']
        self.reduction = bool(d['reduction'])
        self.pre0, self.pre1 = _Unit(d['preprocess0']), _Unit(d['preprocess1'])
        self.ops: List[Any] = []
        for op in d['ops']:
            if op['type'] == 'unit':
                self.ops.append(_Unit(op))
            elif op['type'] in ('max_pool', 'avg_pool'):
                self.ops.append(_Pool(op))
            elif op['type'] == 'zeroise':
                self.ops.append(None)
            else:
                raise CheckpointError(f"packed model: {op.get('name')}: unknown op {op['type']!r}; re-export it")
        self.indices = [int(j) for j in d['indices']]
        self.concat = [int(c) for c in d['concat']]
        _check(len(self.ops) == len(self.indices) and len(self.ops) % 2 == 0, self.name,
               'ops and inputs do not pair up')
        res = d['residual']
        self.residual = _Unit(res) if isinstance(res, dict) else res
        self.C = self.pre1.out_ch
        units = [self.pre0, self.pre1] + [op for op in self.ops if isinstance(op, _Unit)]
        # a cell whose ops are all packed kernels (paper or react blocks) runs as a cell program, or op by op a
        # few images at a time (see CACHE_BUDGET); one with float convs inside runs the whole batch at once, as
        # the float model does
        self.chunkable = all(u.packed for u in units)
        self._program = None
        self._program_units = units
        #: threads that shared each image in the last cell-program call (1: whole images per thread; more at
        #: batch sizes below the thread count, see csrc/cell.cpp)
        self.team = 0

    def program(self):
        """The cell as one C++ call (csrc/cell.cpp), built on first use: for an all-packed cell only (paper or
        react blocks)."""
        if self._program is None:
            units = self._program_units
            index = {id(u): i for i, u in enumerate(units)}
            specs = [(u.t_zero, u.t_pos, u.flip, u.words, u.alpha, u.in_ch, u.out_ch, u.kernel[0], u.kernel[1],
                      u.stride, u.padding, u.dilation, u.relu) for u in units]
            ops = []
            for op, idx in zip(self.ops, self.indices):
                if op is None:
                    ops.append((0, -1, 1, idx))
                elif isinstance(op, _Unit):
                    ops.append((1, index[id(op)], op.stride, idx))
                else:
                    ops.append((2 if op.is_max else 3, -1, op.stride, idx))
            program = kernels.extension().CellProgram(
                specs, 0, 1, ops, self.concat, self.C, 2 if self.reduction else 1, self.residual == 'identity')
            for i, u in enumerate(units):
                if u.epilogue:
                    p = u.prelu or {}
                    program.set_epilogue(i, _SHORTCUTS[u.shortcut], u.prelu is not None, _flat(p.get('gamma')),
                                         _flat(p.get('slope')), _flat(p.get('zeta')))
            self._program = program
        return self._program

    def residual_of(self, s1: torch.Tensor, isa: int, timer: _Timer,
                    workspace: Optional[_Workspace] = None) -> Optional[torch.Tensor]:
        """The residual conv's output (None for none or identity): on the full batch, as the float model runs it."""
        if isinstance(self.residual, _Unit):
            return timer.run(f'{self.name}.residual', self.residual.kind, self.residual, s1, isa, layout='any',
                             workspace=workspace)
        return None

    def __call__(self, s0: torch.Tensor, s1: torch.Tensor, isa: int, timer: _Timer,
                 res: Optional[torch.Tensor] = None, workspace: Optional[_Workspace] = None) -> torch.Tensor:
        """The cell's output (lent by ``workspace`` when given); ``res``: its residual conv's output, computed
        beforehand (see residual_of)."""
        N, _, H, W = s1.shape
        stride = 2 if self.reduction else 1
        C = self.C
        shape = (N, len(self.concat) * C, (H - 1) // stride + 1, (W - 1) // stride + 1)
        out = torch.empty(shape, memory_format=CL) if workspace is None else workspace.take(shape, CL)
        if res is None:
            res = self.residual_of(s1, isa, timer, workspace)
        if self.chunkable and CELL_PROGRAM:
            self._run_program(s0, s1, out, res, isa, timer)
            return out
        chunk = N
        if self.chunkable:
            per_image = 4 * (s0[0].numel() + s1[0].numel() + out[0].numel() + 2 * C * H * W)
            chunk = max(1, min(N, torch.get_num_threads() * CACHE_BUDGET // per_image))
        for i in range(0, N, chunk):
            j = min(N, i + chunk)
            self._run(s0[i:j], s1[i:j], out[i:j], None if res is None else res[i:j], isa, timer)
        return out

    def _run_program(self, s0: torch.Tensor, s1: torch.Tensor, out: torch.Tensor, res: Optional[torch.Tensor],
                     isa: int, timer: _Timer) -> None:
        program = self.program()
        s0, s1 = (s if s.stride(1) == 1 else _cl(s, isa) for s in (s0, s1))
        if res is not None and res.shape != out.shape:   # broadcast as out.add_(res) does (odd map sizes)
            res = res.expand_as(out)
        if timer.records is None:
            self.team = program.run(s0, s1, out, res, isa, None)
            return
        times = torch.zeros(program.timing_slots(), dtype=torch.float64)
        t0 = time.perf_counter()
        self.team = program.run(s0, s1, out, res, isa, times)
        _program_records(timer, [self], [times], time.perf_counter() - t0)

    def _run(self, s0: torch.Tensor, s1: torch.Tensor, out: torch.Tensor, res: Optional[torch.Tensor], isa: int,
             timer: _Timer) -> None:
        p0 = timer.run(f'{self.name}.preprocess0', self.pre0.kind, self.pre0, s0, isa)
        p1 = timer.run(f'{self.name}.preprocess1', self.pre1.kind, self.pre1, s1, isa)
        C = self.C
        N, _, OH, OW = out.shape
        slot_of: Dict[int, int] = {}
        for slot, idx in enumerate(self.concat):
            slot_of.setdefault(idx, slot)
        states = [p0, p1]
        for i in range(len(self.ops) // 2):
            node = i + 2
            if node in slot_of:
                s = slot_of[node]
                target = out[:, s * C:(s + 1) * C]
            else:
                target = torch.empty((N, C, OH, OW), memory_format=CL)
            written = False
            for k in (2 * i, 2 * i + 1):
                op = self.ops[k]
                if op is None:
                    continue
                timer.run(f'{self.name}.ops.{k}', op.kind, op, states[self.indices[k]], isa, out=target,
                          accumulate=written)
                written = True
            if not written:
                kernels.extension().zero_fill(target)
            states.append(target)
        for slot, idx in enumerate(self.concat):
            if slot_of.get(idx) != slot or idx < 2:
                out[:, slot * C:(slot + 1) * C].copy_(states[idx])
        if self.residual == 'identity':
            timer.run(f'{self.name}.residual', 'residual add', out.add_, s1)
        elif res is not None:
            timer.run(f'{self.name}.residual', 'residual add', out.add_, res)


def _program_records(timer: _Timer, cells: List[_Cell], times: List[torch.Tensor], wall: float) -> None:
    """Profile entries of cell programs (one call, or one chain): each program timed its ops per image on
    whichever thread ran them; a layer's entry is its thread-seconds (the CPU column) and its share of the call's
    wall time by those seconds (the wall-clock column)."""
    busy = max(sum(float(t.sum()) for t in times), 1e-12)
    for cell, ts in zip(cells, times):
        names = [(f'{cell.name}.preprocess0', cell.pre0.kind), (f'{cell.name}.preprocess1', cell.pre1.kind)]
        names += [(f'{cell.name}.ops.{k}', op.kind if op is not None else 'zeroise') for k, op in enumerate(cell.ops)]
        names.append((f'{cell.name}.residual', 'concat + residual add'))
        for (name, kind), t in zip(names, ts.tolist()):
            if t > 0:
                timer.records.append((name, kind, wall * t / busy, t))


class PackedNetwork(nn.Module):
    """A packed BNAS network: ``forward(images)`` -> logits, float32 on the CPU.

    ``isa`` picks the kernel path (``avx512``, ``avx2``, ``portable``; default: ``$BNAS_DEPLOY_ISA`` or the
    fastest this CPU supports); :meth:`set_isa` switches it later. :meth:`profile` returns per-layer times.
    """

    def __init__(self, packed: Dict[str, Any], isa: Optional[str] = None, source: str = 'packed model') -> None:
        super().__init__()
        validate_packed(packed, source)   # before any kernel sees a field (one-line CheckpointError)
        net = packed['network']
        self.architecture: Dict[str, Any] = dict(packed.get('architecture') or {})
        try:
            self.family = net['family']
            self.in_channels = int(net['in_channels'])
            self.num_classes = int(net['num_classes'])
            if self.family == 'imagenet':
                self.stem0 = [_prim_fn(p, f'stem0.{i}') for i, p in enumerate(net['stem']['stem0'])]
                self.stem1 = [_prim_fn(p, f'stem1.{i}') for i, p in enumerate(net['stem']['stem1'])]
            else:
                _check(self.family == 'cifar', 'network', f'unknown family {self.family!r}')
                self.stem = _Unit(net['stem'][0])
            self.cells = [_Cell(c) for c in net['cells']]
            cls = net['classifier']
            self.fc_weight = _tensor(cls, 'weight', 'classifier', torch.float32)
            self.fc_bias = _tensor(cls, 'bias', 'classifier', torch.float32, (self.num_classes,))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CheckpointError(f'packed model: malformed network description ({type(exc).__name__}: {exc}); '
                                  're-export it') from None
        self._timer = _Timer()
        self._workspace = _Workspace()
        self.set_isa(isa)

    def release_buffers(self) -> None:
        """Free the intermediate buffers this thread's forward passes keep for the next pass (see ``_Workspace``);
        the next pass allocates them again."""
        self._workspace.clear()

    def set_isa(self, isa: Optional[str] = None) -> None:
        """Switch the kernel path (see :func:`bnas_nni.deploy.kernels.resolve_isa`)."""
        self.isa = kernels.resolve_isa(isa)
        self._isa_id = kernels.isa_id(self.isa)

    fp_parts = 'float'

    def set_fp_parts(self, fp_parts: str = 'float') -> None:
        """``'float'`` (default): full-precision convs as the float model's PyTorch ops (its bits); ``'int8'``:
        the residual convs of reduction cells on int8 kernels, faster but not bit-exact (int8.py). The stem
        stays float: it holds few MACs, and its rounding would reach every later sign decision."""
        if fp_parts not in FP_PARTS:
            raise ConfigError(f'unknown fp_parts {fp_parts!r}; choose {" or ".join(FP_PARTS)}')
        units = [c.residual for c in self.cells if isinstance(c.residual, _Unit)]
        for u in units:
            u.int8 = int8_for(u) if fp_parts == 'int8' else None
        self.fp_parts = fp_parts

    def extra_repr(self) -> str:
        g = (self.architecture.get('genotype') or {}).get('name', '?')
        return (f'genotype={g}, family={self.family}, cells={len(self.cells)}, classes={self.num_classes}, '
                f'isa={self.isa}')

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ConfigError(f'the packed model takes N x {self.in_channels} x H x W images, got {shape}')
        if x.device.type != 'cpu':
            raise ConfigError('the packed engine runs on the CPU; move the images there first (x.cpu())')
        x = x.float()
        isa, timer, workspace = self._isa_id, self._timer, self._workspace
        workspace.begin()
        try:
            s0, s1 = timer.run('stem', 'float stem', self._stem, x.contiguous(), isa, workspace)
            s0, s1 = self._cells(s0, s1, isa, timer, workspace)
            logits = timer.run('head', 'float head', self._head, s1, isa, workspace)
            workspace.give(s0, s1)
            workspace.end()
            return logits
        except RuntimeError as exc:   # an argument check of a kernel or a torch op (e.g. images too small)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ConfigError(f'the packed model cannot run on images of shape {tuple(x.shape)}: {first}') from None

    def _cells(self, s0: torch.Tensor, s1: torch.Tensor, isa: int, timer: _Timer,
               workspace: _Workspace) -> Tuple[torch.Tensor, torch.Tensor]:
        """All cells. A chain of all-binary cells (one that may have a float residual conv, and the following ones
        without) runs as one C++ call, image by image through every cell of the chain, its float residual conv
        computed beforehand on the whole batch, as the float model does. Every image gets the same operations
        as cell by cell, so the same bits. Cell outputs are lent by ``workspace`` and given back once no later
        cell reads them."""
        k = 0
        while k < len(self.cells):
            cell = self.cells[k]
            if not (cell.chunkable and CELL_PROGRAM and CELL_CHAINS):
                new = (s1, cell(s0, s1, isa, timer, workspace=workspace))
                k += 1
            else:
                end = k + 1
                while end < len(self.cells) and self.cells[end].chunkable and not isinstance(self.cells[end].residual,
                                                                                             _Unit):
                    end += 1
                new = self._chain(self.cells[k:end], s0, s1, isa, timer, workspace)
                k = end
            kept = {t.data_ptr() for t in new}
            workspace.give(*(t for t in (s0, s1) if t.data_ptr() not in kept))
            s0, s1 = new
        return s0, s1

    def _chain(self, cells: List[_Cell], s0: torch.Tensor, s1: torch.Tensor, isa: int,
               timer: _Timer, workspace: _Workspace) -> Tuple[torch.Tensor, torch.Tensor]:
        """The chain's last two outputs (the next cells' inputs), from one ``run_chain`` call."""
        given_s0 = s0
        s0, s1 = (s if s.stride(1) == 1 else _cl(s, isa, workspace) for s in (s0, s1))
        N = s1.shape[0]
        shapes = []   # each cell's output: (channels, H, W); a cell's map follows its s1 input's
        H, W = s1.shape[2], s1.shape[3]
        for cell in cells:
            stride = 2 if cell.reduction else 1
            H, W = (H - 1) // stride + 1, (W - 1) // stride + 1
            shapes.append((len(cell.concat) * cell.C, H, W))
        res = cells[0].residual_of(s1, isa, timer, workspace)
        if res is not None and tuple(res.shape[1:]) != shapes[0]:   # broadcast as out.add_(res) does (odd maps)
            res = res.expand((N,) + shapes[0])
        out_last = workspace.take((N,) + shapes[-1], CL)
        out_prev = workspace.take((N,) + shapes[-2], CL) if len(cells) > 1 else None
        programs = [c.program() for c in cells]
        times = None if timer.records is None else [torch.zeros(p.timing_slots(), dtype=torch.float64)
                                                    for p in programs]
        t0 = time.perf_counter()
        team = kernels.extension().run_chain(programs, s0, s1, res, out_prev, out_last, isa, times)
        if s0 is not given_s0:   # its channels-last copy: read by the chain only
            workspace.give(s0)
        if times is not None:
            _program_records(timer, cells, times, time.perf_counter() - t0)
        for cell in cells:
            cell.team = team
        return (s1 if out_prev is None else out_prev), out_last

    def _stem(self, x: torch.Tensor, isa: int, workspace: _Workspace) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.family == 'imagenet':
            s0 = x
            for f in self.stem0:
                s0 = f(s0)
            s1 = s0
            for f in self.stem1:
                s1 = f(s1)
            return _cl(s0, isa, workspace), _cl(s1, isa, workspace)
        s = self.stem(x, isa, workspace=workspace)
        return s, s

    def _head(self, s: torch.Tensor, isa: int, workspace: _Workspace) -> torch.Tensor:
        with _threads_for(s.numel(), ONE_THREAD_ELEMENTS):
            nchw = _relayout(s, torch.contiguous_format, isa, workspace)
            pooled = F.adaptive_avg_pool2d(nchw, 1).flatten(1)
            if nchw is not s:
                workspace.give(nchw)
            return F.linear(pooled, self.fc_weight, self.fc_bias)

    def profile(self, x: torch.Tensor, cpu: bool = False) -> Tuple[torch.Tensor, List[Tuple]]:
        """``(logits, [(layer, kind, seconds), ...])`` of one forward pass, in execution order (a layer that ran
        group by group, see ``CACHE_BUDGET``, is summed over its groups); with ``cpu=True`` each entry also has
        the process CPU seconds (all threads) spent in the layer."""
        self._timer.records = []
        try:
            logits = self(x)
            merged: Dict[Tuple[str, str], List[float]] = {}
            for name, kind, t, c in self._timer.records:
                acc = merged.setdefault((name, kind), [0.0, 0.0])
                acc[0] += t
                acc[1] += c
            return logits, [(name, kind, t, c) if cpu else (name, kind, t) for (name, kind), (t, c) in merged.items()]
        finally:
            self._timer.records = None
