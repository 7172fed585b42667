"""Checking a packed network description before the engine builds anything from it.

The C++ kernels index memory with the geometry and channel counts of the header, so a header edited by
hand or by an attacker must be refused here, in Python, with one line naming the field -- not found out
by the kernels. :func:`validate_packed` checks everything the engine reads:

* every field's type and domain: integers are ints (not ``'0'``, ``1.5`` or ``true``), flags are
  booleans (or 0/1), names and kinds come from fixed lists, tensors have the dtype and shape their conv
  or BN needs;
* geometry: strides and dilations >= 1, kernels of 1 .. ``MAX_KERNEL``, and the padding of every conv
  that keeps the map size (all but the reduction cells' residual convs) exactly ``dilation * (k - 1) / 2``,
  so that every op of a cell maps its input onto the node's shape for any image size;
* the wiring: channel counts follow from the stem through every cell to the classifier; a cell's
  preprocess strides match its inputs' resolutions and its ops' strides its type (2 on the cell
  inputs of a reduction cell, else 1); op inputs and concat entries name existing states; the residual
  is absent in cell 0, a conv in a reduction cell and the identity elsewhere;
* the architecture description, where present: reduction cells, and the genotype's ops, inputs and
  concat against the cells;
* the react block's unit fields (format version 3 only): ``prelu`` holds a float32 ``slope`` per output
  channel and either both RPReLU shifts ``gamma`` and ``zeta`` or neither, all finite, and no ReLU beside it;
  ``shortcut`` is ``identity`` (stride 1) or ``avg_pool`` (stride 2) on a conv with as many output as
  input channels.

Every refusal is a :class:`~bnas_nni.errors.CheckpointError` of one line: ``<file>: <field> = <value>
<problem>; <fix>``, the field written as ``cells[0].preprocess1.conv.padding``.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import CheckpointError

__all__ = ['validate_packed', 'MAX_CHANNELS', 'MAX_KERNEL', 'MAX_DILATION', 'MAX_STRIDE']

MAX_CHANNELS = 1 << 16
MAX_CLASSES = 1 << 20
MAX_KERNEL = 11
MAX_DILATION = 8
MAX_STRIDE = 2
MAX_CELLS = 1024
MAX_NODES = 64
MAX_STEM_LAYERS = 64

_FIX = 're-export the model with bnas-nni export (the file was changed after export or not written by bnas-nni)'
_OP_TYPES = ('unit', 'zeroise', 'max_pool', 'avg_pool')
_CONV_OP = re.compile(r'bin_(dil_)?conv_(\d+)x(\d+)$')
_FIXED_OPS = {'zeroise': 'zeroise', 'none': 'zeroise', 'zero': 'zeroise',
              'max_pool_3x3': 'max_pool', 'avg_pool_3x3': 'avg_pool'}

State = Tuple[int, int]   # (channels, downsampling factor of the image)


def _show(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f'tensor {str(value.dtype).replace("torch.", "")} {list(value.shape)}'
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + '...'


class _Checker:
    def __init__(self, source: str, react: bool = True) -> None:
        self.source = source
        #: whether units may hold the react fields (format version 3, or an in-memory description)
        self.react = react

    def fail(self, field: str, problem: str, value: Any = ..., fix: str = _FIX) -> None:
        shown = '' if value is ... else f' = {_show(value)}'
        raise CheckpointError(f'{self.source}: {field}{shown} {problem}; {fix}')

    # -- plain fields --------------------------------------------------------------------------------------

    def get(self, d: Dict[str, Any], key: str, field: str) -> Any:
        if key not in d:
            self.fail(field, 'is missing')
        return d[key]

    def mapping(self, value: Any, field: str) -> Dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(field, 'must be a mapping', value)
        return value

    def seq(self, value: Any, field: str, lo: int, hi: int) -> List[Any]:
        if not isinstance(value, list):
            self.fail(field, 'must be a list', value)
        if not lo <= len(value) <= hi:
            self.fail(field, f'has {len(value)} entries, expected {lo}' + (f' to {hi}' if hi != lo else ''))
        return value

    def integer(self, d: Dict[str, Any], key: str, field: str, lo: int, hi: int) -> int:
        return self.int_value(self.get(d, key, field), field, lo, hi)

    def int_value(self, v: Any, field: str, lo: int, hi: int) -> int:
        if type(v) is not int:
            self.fail(field, f'must be an integer from {lo} to {hi}', v)
        if not lo <= v <= hi:
            self.fail(field, f'is out of range (allowed: {lo} to {hi})', v)
        return v

    def flag(self, d: Dict[str, Any], key: str, field: str) -> bool:
        v = self.get(d, key, field)
        if not (type(v) is bool or (type(v) is int and v in (0, 1))):
            self.fail(field, 'must be true or false', v)
        return bool(v)

    def choice(self, d: Dict[str, Any], key: str, field: str, allowed: Sequence[str]) -> str:
        v = self.get(d, key, field)
        if not isinstance(v, str) or v not in allowed:
            self.fail(field, f'is not one of {", ".join(allowed)}', v)
        return v

    def text(self, d: Dict[str, Any], key: str, field: str) -> str:
        v = self.get(d, key, field)
        if not isinstance(v, str) or len(v) > 400:
            self.fail(field, 'must be a short string', v)
        return v

    def positive_float(self, d: Dict[str, Any], key: str, field: str) -> float:
        v = self.get(d, key, field)
        if type(v) not in (int, float) or not math.isfinite(v) or v <= 0:
            self.fail(field, 'must be a positive finite number', v)
        return float(v)

    def tensor(self, d: Dict[str, Any], key: str, field: str, dtype: torch.dtype, shape: Tuple[int, ...],
               optional: bool = False) -> Optional[torch.Tensor]:
        v = d.get(key)
        if v is None and optional:
            return None
        if not isinstance(v, torch.Tensor):
            self.fail(field, 'is missing' if v is None else 'must be a tensor', *(() if v is None else (v,)))
        if v.dtype != dtype or tuple(v.shape) != tuple(shape):
            want = str(dtype).replace('torch.', '')
            self.fail(field, f'does not fit its layer (expected {want} {list(shape)})', v)
        return v

    # -- layers --------------------------------------------------------------------------------------------

    def conv(self, conv: Dict[str, Any], field: str, in_ch: int, out_ch: Optional[int], stride: Optional[int],
             same: bool) -> Tuple[int, int]:
        """Checks a conv description; ``(out channels, stride)``. ``same``: it must keep the map size (up to
        its stride) for any input size, as every conv the cells run on the packed kernels must."""
        cin = self.integer(conv, 'in', f'{field}.in', 1, MAX_CHANNELS)
        if cin != in_ch:
            self.fail(f'{field}.in', f'does not match the {in_ch} channels of its input', cin)
        cout = self.integer(conv, 'out', f'{field}.out', 1, MAX_CHANNELS)
        if out_ch is not None and cout != out_ch:
            self.fail(f'{field}.out', f'does not match the {out_ch} channels this layer must give', cout)
        kernel = self.seq(self.get(conv, 'kernel', f'{field}.kernel'), f'{field}.kernel', 2, 2)
        kh, kw = (self.int_value(k, f'{field}.kernel[{i}]', 1, MAX_KERNEL) for i, k in enumerate(kernel))
        s = self.integer(conv, 'stride', f'{field}.stride', 1, MAX_STRIDE)
        if stride is not None and s != stride:
            self.fail(f'{field}.stride', f'must be {stride} here (the resolution of its input and output)', s)
        dil = self.integer(conv, 'dilation', f'{field}.dilation', 1, MAX_DILATION)
        pad = self.integer(conv, 'padding', f'{field}.padding', 0, dil * (max(kh, kw) - 1))
        if same and (kh != kw or dil * (kh - 1) % 2):
            self.fail(f'{field}.kernel', 'must be square and odd (after dilation) so that the conv keeps the map '
                      'size', kernel)
        if same and 2 * pad != dil * (kh - 1):
            self.fail(f'{field}.padding', f'does not keep the map size of a {kh}x{kw} kernel with dilation {dil} '
                      f'(needs padding {dil * (kh - 1) // 2})', pad)
        binary = self.flag(conv, 'binary', f'{field}.binary')
        self.tensor(conv, 'bias', f'{field}.bias', torch.float32, (cout,), optional=True)
        if binary:
            self.tensor(conv, 'bits', f'{field}.bits', torch.uint8, (cout, (kh * kw * cin + 7) // 8))
            self.tensor(conv, 'alpha', f'{field}.alpha', torch.float32, (cout,))
        else:
            self.tensor(conv, 'weight', f'{field}.weight', torch.float32, (cout, cin, kh, kw))
        return cout, s

    def bn(self, bn: Dict[str, Any], field: str, ch: int) -> None:
        for key in ('weight', 'bias', 'mean', 'var'):
            self.tensor(bn, key, f'{field}.{key}', torch.float32, (ch,), optional=key in ('weight', 'bias'))
        self.positive_float(bn, 'eps', f'{field}.eps')

    def unit(self, value: Any, field: str, state: State, out_ch: Optional[int], stride: Optional[int],
             same: bool = True) -> State:
        """BN / thresholds -> conv -> ReLU; the state it produces."""
        d = self.mapping(value, field)
        self.choice(d, 'type', f'{field}.type', ('unit',))
        self.text(d, 'name', f'{field}.name')
        kind = self.choice(d, 'input', f'{field}.input', ('sign', 'float'))
        self.flag(d, 'relu', f'{field}.relu')
        ch, scale = state
        cout, s = self.conv(self.mapping(self.get(d, 'conv', f'{field}.conv'), f'{field}.conv'), f'{field}.conv',
                            ch, out_ch, stride, same)
        if kind == 'sign':
            self.tensor(d, 'thresholds', f'{field}.thresholds', torch.float32, (2, ch))
            self.tensor(d, 'negate', f'{field}.negate', torch.uint8, ((ch + 7) // 8,))
        else:
            self.bn(self.mapping(self.get(d, 'bn', f'{field}.bn'), f'{field}.bn'), f'{field}.bn', ch)
        self.react_fields(d, field, ch, cout, s)
        return cout, scale * s

    def react_fields(self, d: Dict[str, Any], field: str, cin: int, cout: int, stride: int) -> None:
        """The react block's optional ``prelu`` and ``shortcut`` of a unit."""
        prelu, shortcut = d.get('prelu'), d.get('shortcut')
        if not self.react and (prelu is not None or shortcut is not None):
            self.fail(f"{field}.{'prelu' if prelu is not None else 'shortcut'}", 'is a format version 3 field in '
                      'a version 2 file')
        if prelu is not None:
            p = self.mapping(prelu, f'{field}.prelu')
            unknown = sorted(set(p) - {'gamma', 'slope', 'zeta'})
            if unknown:
                self.fail(f'{field}.prelu.{unknown[0]}', 'is not a field of a (R)PReLU')
            for key in ('gamma', 'slope', 'zeta'):
                t = self.tensor(p, key, f'{field}.prelu.{key}', torch.float32, (cout,), optional=key != 'slope')
                if t is not None and not bool(torch.isfinite(t).all()):
                    self.fail(f'{field}.prelu.{key}', 'must be finite', t)
            if (p.get('gamma') is None) != (p.get('zeta') is None):
                self.fail(f'{field}.prelu', 'must hold both shifts gamma and zeta (RPReLU) or neither (PReLU)')
            if d.get('relu'):
                self.fail(f'{field}.relu', 'must be false beside a prelu', d['relu'])
        if shortcut is not None:
            kind = self.choice(d, 'shortcut', f'{field}.shortcut', ('identity', 'avg_pool'))
            want = 1 if kind == 'identity' else 2
            if stride != want or cin != cout:
                self.fail(f'{field}.shortcut', f'needs a conv of stride {want} with as many output as input channels '
                          f'(this one: stride {stride}, {cin} -> {cout} channels)', kind)

    def prims(self, value: Any, field: str, state: State) -> State:
        """An ImageNet stem: conv / bn / relu layers run as float ops."""
        layers = self.seq(value, field, 1, MAX_STEM_LAYERS)
        ch, scale = state
        for j, p in enumerate(layers):
            where = f'{field}[{j}]'
            p = self.mapping(p, where)
            kind = self.choice(p, 'type', f'{where}.type', ('conv', 'bn', 'relu'))
            if kind == 'conv':
                ch, s = self.conv(p, where, ch, None, None, same=True)
                scale *= s
            elif kind == 'bn':
                self.bn(p, where, ch)
        return ch, scale

    def cell(self, value: Any, i: int, s0: State, s1: State, arch: Dict[str, Any]) -> State:
        field = f'cells[{i}]'
        d = self.mapping(value, field)
        self.text(d, 'name', f'{field}.name')
        index = self.integer(d, 'index', f'{field}.index', 0, MAX_CELLS)
        if index != i:
            self.fail(f'{field}.index', f'must be {i} (the position of the cell)', index)
        reduction = self.flag(d, 'reduction', f'{field}.reduction')
        expected = arch.get('reduction_cells')
        if expected is not None and reduction != (i in expected):
            self.fail(f'{field}.reduction', f'disagrees with architecture.reduction_cells {expected}', reduction)
        ratio = s1[1] // s0[1] if s1[1] % s0[1] == 0 else 0
        if ratio not in (1, 2):
            self.fail(f'{field}.preprocess0.conv.stride', f'cannot bring its input (1/{s0[1]} of the image) to '
                      f'the resolution of the other input (1/{s1[1]})')
        C = self.unit(self.get(d, 'preprocess1', f'{field}.preprocess1'), f'{field}.preprocess1', s1, None, 1)[0]
        self.unit(self.get(d, 'preprocess0', f'{field}.preprocess0'), f'{field}.preprocess0', s0, C, ratio)
        ops = self.seq(self.get(d, 'ops', f'{field}.ops'), f'{field}.ops', 2, 2 * MAX_NODES)
        if len(ops) % 2:
            self.fail(f'{field}.ops', f'has {len(ops)} entries; a cell has two ops per node')
        indices = self.seq(self.get(d, 'indices', f'{field}.indices'), f'{field}.indices', len(ops), len(ops))
        nodes = len(ops) // 2
        scale = s1[1] * (2 if reduction else 1)
        for k, op in enumerate(ops):
            j = self.int_value(indices[k], f'{field}.indices[{k}]', 0, 1 + k // 2)
            stride = 2 if reduction and j < 2 else 1
            where = f'{field}.ops[{k}]'
            op = self.mapping(op, where)
            kind = self.choice(op, 'type', f'{where}.type', _OP_TYPES)
            if kind == 'unit':
                self.unit(op, where, (C, scale // stride), C, stride)
            else:
                self.text(op, 'name', f'{where}.name')
                s = self.integer(op, 'stride', f'{where}.stride', 1, MAX_STRIDE)
                if s != stride:
                    on = 'a cell input' if j < 2 else 'a node'
                    self.fail(f'{where}.stride', f'must be {stride} for an op on {on} of a '
                              f'{"reduction" if reduction else "normal"} cell', s)
        concat = self.seq(self.get(d, 'concat', f'{field}.concat'), f'{field}.concat', 1, 2 + nodes)
        for k, c in enumerate(concat):
            self.int_value(c, f'{field}.concat[{k}]', 0, 1 + nodes)
        out = (len(concat) * C, scale)
        res = self.get(d, 'residual', f'{field}.residual')
        if i == 0:
            if res is not None:
                self.fail(f'{field}.residual', 'must be null: the first cell has no residual', res)
        elif reduction:
            if not isinstance(res, dict):
                self.fail(f'{field}.residual', 'must be a conv unit: a reduction cell adds a downsampled residual', res)
            self.unit(res, f'{field}.residual', s1, out[0], 2, same=False)
        elif res != 'identity':
            self.fail(f'{field}.residual', "must be 'identity': a normal cell adds its input", res)
        elif s1 != out:
            self.fail(f'{field}.residual', f'needs the cell input ({s1[0]} channels) to have the shape of its '
                      f'output ({out[0]} channels)', res)
        self.genotype_cell(arch, field, reduction, ops, indices, concat)
        return out

    def genotype_cell(self, arch: Dict[str, Any], field: str, reduction: bool, ops: List[Any], indices: List[int],
                      concat: List[int]) -> None:
        genotype = arch.get('genotype')
        if not isinstance(genotype, dict) or 'normal' not in genotype or 'reduce' not in genotype:
            return
        key = 'reduce' if reduction else 'normal'
        g = f'architecture.genotype.{key}'
        entries = self.seq(genotype[key], g, len(ops), len(ops))
        for k, entry in enumerate(entries):
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
                self.fail(f'{g}[{k}]', 'must be an [op, input] pair', entry)
            name, j = entry
            if j != indices[k] or type(j) is not int:
                self.fail(f'{field}.indices[{k}]', f'disagrees with {g}[{k}] = {_show(entry)}', indices[k])
            want = _op_signature(name)
            if want is not None and want != _signature(ops[k]):
                self.fail(f'{field}.ops[{k}]', f'({_describe(ops[k])}) is not the {name} of {g}[{k}]')
        c = genotype.get(f'{key}_concat')
        if c is not None and c != concat:
            self.fail(f'{field}.concat', f'disagrees with architecture.genotype.{key}_concat = {_show(c)}', concat)


def _op_signature(name: str) -> Optional[Tuple]:
    if name in _FIXED_OPS:
        return (_FIXED_OPS[name],)
    m = _CONV_OP.match(name)
    if m is None or m.group(2) != m.group(3):
        return None   # an op the checks do not know (a user-registered conv op): its own fields were checked
    return ('unit', int(m.group(2)), 2 if m.group(1) else 1)


def _signature(op: Dict[str, Any]) -> Tuple:
    if op['type'] != 'unit':
        return (op['type'],)
    return ('unit', op['conv']['kernel'][0], op['conv']['dilation'])


def _describe(op: Dict[str, Any]) -> str:
    sig = _signature(op)
    return sig[0] if len(sig) == 1 else f'a {sig[1]}x{sig[1]} conv, dilation {sig[2]}'


def validate_packed(packed: Any, source: str = 'packed model') -> None:
    """Refuse (one-line :class:`CheckpointError`) a packed description the engine must not run; see the
    module docstring for what is checked. ``packed``: ``{'architecture', 'network'}`` with tensors in place."""
    c = _Checker(source)
    packed = c.mapping(packed, 'header')
    # a file says its version (load_packed accepted it); an in-memory description may hold every field
    version = packed.get('version')
    c.react = version is None or (type(version) is int and version >= 3)
    arch = packed.get('architecture')
    arch = {} if arch is None else c.mapping(arch, 'architecture')
    genotype = arch.get('genotype')
    if genotype is not None:
        c.mapping(genotype, 'architecture.genotype')
        if 'name' in genotype:
            c.text(genotype, 'name', 'architecture.genotype.name')
        for key in ('normal_concat', 'reduce_concat'):
            if key in genotype:
                c.seq(genotype[key], f'architecture.genotype.{key}', 0, 2 + MAX_NODES)
    net = c.mapping(c.get(packed, 'network', 'network'), 'network')
    family = c.choice(net, 'family', 'network.family', ('cifar', 'imagenet'))
    in_ch = c.integer(net, 'in_channels', 'network.in_channels', 1, MAX_CHANNELS)
    classes = c.integer(net, 'num_classes', 'network.num_classes', 1, MAX_CLASSES)
    cells = c.seq(c.get(net, 'cells', 'cells'), 'cells', 1, MAX_CELLS)
    if 'reduction_cells' in arch:
        reds = c.seq(arch['reduction_cells'], 'architecture.reduction_cells', 0, len(cells))
        for k, r in enumerate(reds):
            c.int_value(r, f'architecture.reduction_cells[{k}]', 0, len(cells) - 1)
    if 'family' in arch and arch['family'] != family:
        c.fail('network.family', f'disagrees with architecture.family = {_show(arch["family"])}', family)
    stem = c.get(net, 'stem', 'stem')
    if family == 'cifar':
        s0 = s1 = c.unit(c.seq(stem, 'stem', 1, 1)[0], 'stem[0]', (in_ch, 1), None, None)
    else:
        stem = c.mapping(stem, 'stem')
        s0 = c.prims(c.get(stem, 'stem0', 'stem.stem0'), 'stem.stem0', (in_ch, 1))
        s1 = c.prims(c.get(stem, 'stem1', 'stem.stem1'), 'stem.stem1', s0)
    for i, cell in enumerate(cells):
        s0, s1 = s1, c.cell(cell, i, s0, s1, arch)
    cls = c.mapping(c.get(net, 'classifier', 'classifier'), 'classifier')
    c.tensor(cls, 'weight', 'classifier.weight', torch.float32, (classes, s1[0]))
    c.tensor(cls, 'bias', 'classifier.bias', torch.float32, (classes,))
