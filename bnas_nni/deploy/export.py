"""Network -> deployable description: the only place that looks inside bnas-nni modules.

:func:`describe_network` walks a :class:`~bnas_nni.networks.BNASNetwork` (or a frozen
:class:`~bnas_nni.space.BNASSpace`) through its public attributes and returns a plain description:
dicts, lists, numbers and tensors, in eval semantics (BN running statistics), nothing that needs the
module classes to be read back. :func:`packed_description` turns it into what the packed file stores
(BN before each sign folded into thresholds, binary weights as bits plus one scale per filter); the
ONNX writer uses the description as it is.

Description schema (``T`` = tensor)::

    network = {'family': 'cifar'|'imagenet', 'in_channels': 3, 'num_classes': K,
               'stem': [unit] (cifar) | {'stem0': [prim...], 'stem1': [prim...]} (imagenet),
               'cells': [cell...], 'classifier': {'weight': T, 'bias': T}}
    cell = {'name', 'index', 'reduction', 'preprocess0': unit, 'preprocess1': unit, 'ops': [op...],
            'indices': [...], 'concat': [...], 'residual': None | 'identity' | unit}
    op = unit | {'type': 'zeroise'|'max_pool'|'avg_pool', 'name', 'stride'}
    unit = {'type': 'unit', 'name', 'input': 'sign'|'float', 'bn': bn | None, 'shift': T|None, 'conv': conv,
            'relu': bool, 'prelu': None | {'gamma': T|None, 'slope': T, 'zeta': T|None},
            'shortcut': None | 'identity' | 'avg_pool'}
    prim = {'type': 'conv', **conv} | {'type': 'bn', **bn} | {'type': 'relu'}
    bn = {'weight': T|None, 'bias': T|None, 'mean': T, 'var': T, 'eps': float}
    conv = {'name', 'in', 'out', 'kernel': [kh, kw], 'stride', 'padding', 'dilation', 'bias': T|None,
            'binary': bool, 'weight': T (effective fp32 weights), 'negative': bool T, 'alpha': T (binary only)}

A unit is BN -> input quantizer -> conv [+ shortcut] -> nonlinearity: ``sign`` + binary weights runs on
the packed kernels; ``sign`` + float weights (official precision rules), ``float`` + binary weights (the
residual convs of ``official-2020-08``) and ``float`` + float weights (stems, residual convs) run as float
ops. The ReActNet block (``op_set: react``, :class:`~bnas_nni.ops.ReActConv`) is a unit too: RSign is a sign
input with ``shift`` = its per-channel ``beta`` (folded into the thresholds, so the packed file has no
``shift``); ``scaled_sign`` weights are one scale per filter like ``xnor``'s; RPReLU is ``prelu`` with its
shifts ``gamma`` (before) and ``zeta`` (after), PReLU the same without them, ``relu`` the ReLU flag and
``identity`` neither; ``shortcut`` adds the unit's real-valued input to the conv output before the
nonlinearity (``avg_pool``: 2x2, stride 2, ceil mode, padding not counted, for a stride-2 unit).

Quantizers and nonlinearities are matched by exact class, so a user-registered one (even a subclass of a
known one, whose ``forward`` may differ) gets a one-line refusal naming it.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..checkpoints import describe_model
from ..errors import ConfigError
from ..networks import FixedCell
from ..ops import BNConvReLU, ReActConv, Zeroise
from ..quant import ApproxSign, IdentityQuantizer, RSign, SteSign
from ..quant.nonlinear import IdentityNonlinearity, PReLU, ReLU, RPReLU
from .fold import binary_filters, bn_sign_thresholds, pack_filter_bits, pack_negate

__all__ = ['describe_network', 'packed_description', 'binary_part_sizes', 'SUPPORTED_OPS']

SUPPORTED_OPS = ('zeroise, max_pool_3x3, avg_pool_3x3 and the BN -> sign -> conv -> ReLU ops '
                 '(bin_conv_*, bin_dil_conv_*), also as the react block (rsign, scaled_sign, rprelu, shortcut)')
#: activation quantizers the engine folds: exact classes -> the unit's input kind
SIGN_QUANTIZERS = {SteSign: 'sign', ApproxSign: 'sign', RSign: 'sign', IdentityQuantizer: 'float'}
#: nonlinearities after the conv the engine runs (exact classes)
NONLINEARITIES = (ReLU, IdentityNonlinearity, PReLU, RPReLU)


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return getattr(model, '_orig_mod', model)


def _t(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if x is None else x.detach().float().cpu().clone()


def _bn(bn: nn.Module, name: str) -> Dict[str, Any]:
    if type(bn) is not nn.BatchNorm2d:
        raise ConfigError(f'{name}: expected a BatchNorm2d, found {type(bn).__name__}; the packed engine cannot '
                          'export it')
    if bn.running_mean is None or bn.running_var is None:
        raise ConfigError(f'{name}: batch norm without running statistics (track_running_stats=False) cannot be '
                          'exported; evaluation would use batch statistics')
    return {'weight': _t(bn.weight), 'bias': _t(bn.bias), 'mean': _t(bn.running_mean), 'var': _t(bn.running_var),
            'eps': float(bn.eps)}


def _pair(v, name: str, what: str) -> int:
    v = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    if len(v) != 2 or v[0] != v[1]:
        raise ConfigError(f'{name}: {what} {v} differs between height and width; the packed engine needs it square')
    return int(v[0])


def _conv(conv: nn.Module, name: str) -> Dict[str, Any]:
    if not isinstance(conv, nn.Conv2d):
        raise ConfigError(f'{name}: expected a conv, found {type(conv).__name__}; the packed engine cannot export it')
    if conv.groups != 1 or conv.padding_mode != 'zeros' or isinstance(conv.padding, str):
        raise ConfigError(f'{name}: grouped convs, non-zero padding modes and string paddings are not supported by '
                          'the packed engine')
    quantizer = getattr(conv, 'weight_quantizer', None)
    d: Dict[str, Any] = {
        'name': name, 'in': int(conv.in_channels), 'out': int(conv.out_channels),
        'kernel': [int(k) for k in conv.kernel_size], 'stride': _pair(conv.stride, name, 'stride'),
        'padding': _pair(conv.padding, name, 'padding'), 'dilation': _pair(conv.dilation, name, 'dilation'),
        'bias': _t(conv.bias), 'binary': quantizer is not None,
    }
    with torch.no_grad():
        weight = conv.effective_weight() if hasattr(conv, 'effective_weight') else conv.weight
    d['weight'] = _t(weight)
    if quantizer is not None:
        d['negative'], d['alpha'] = binary_filters(weight, where=f'{name} (binarizer {conv.binarizer})')
    return d


def _input(m: nn.Module, name: str) -> Tuple[str, Optional[torch.Tensor]]:
    """``(input kind, shift)`` of a block's activation quantizer; refuses one the engine cannot fold."""
    q = getattr(m, 'quantizer', None)
    kind = SIGN_QUANTIZERS.get(type(q))
    if kind is None:
        qname = getattr(q, 'name', None) or type(q).__name__
        raise ConfigError(f'{name}: activation quantizer {qname!r} is not supported by the packed engine '
                          '(ste_sign, approx_sign, rsign and identity are)')
    return kind, (_t(q.beta) if type(q) is RSign else None)


def _post(act: nn.Module, name: str) -> Tuple[bool, Optional[Dict[str, Any]]]:
    """``(relu, prelu)`` of the nonlinearity after a react block's conv."""
    if type(act) not in NONLINEARITIES:
        aname = getattr(act, 'name', None) or type(act).__name__
        raise ConfigError(f'{name}: nonlinearity {aname!r} is not supported by the packed engine (relu, prelu, '
                          'rprelu and identity are)')
    if type(act) is RPReLU:
        return False, {'gamma': _t(act.gamma), 'slope': _t(act.slope), 'zeta': _t(act.zeta)}
    if type(act) is PReLU:
        return False, {'gamma': None, 'slope': _t(act.slope), 'zeta': None}
    return type(act) is ReLU, None


def _shortcut(m: nn.Module, name: str) -> Optional[str]:
    sc = m.shortcut
    if sc is None:
        return None
    if type(sc) is nn.Identity:
        return 'identity'
    if (type(sc) is nn.AvgPool2d and sc.kernel_size in (2, (2, 2)) and sc.stride in (2, (2, 2))
            and sc.padding in (0, (0, 0)) and sc.ceil_mode and not sc.count_include_pad
            and sc.divisor_override is None):
        return 'avg_pool'
    raise ConfigError(f'{name}.shortcut: {type(sc).__name__} is not supported by the packed engine (the identity '
                      'and the 2x2 average pool of the react block are)')


def _unit(m: nn.Module, name: str) -> Dict[str, Any]:
    """A BN -> quantizer -> conv -> ReLU op (``BNConvReLU``) or a react block (``ReActConv``) as a unit."""
    kind, shift = _input(m, name)
    seq = m.op
    if type(m) is ReActConv:
        if len(seq) != 2:
            raise ConfigError(f'{name}: expected conv -> nonlinearity after the quantizer; the packed engine cannot '
                              'export it')
        relu, prelu = _post(seq[1], f'{name}.op.1')
        shortcut = _shortcut(m, name)
    else:
        if len(seq) != 2 or type(seq[1]) is not nn.ReLU:
            raise ConfigError(f'{name}: expected conv -> ReLU after the quantizer; the packed engine cannot export it')
        relu, prelu, shortcut = True, None, None
    conv = _conv(seq[0], f'{name}.op.0')
    if shortcut == 'identity' and (conv['stride'] != 1 or conv['in'] != conv['out']):
        raise ConfigError(f'{name}: an identity shortcut needs stride 1 and as many output as input channels')
    if shortcut == 'avg_pool' and (conv['stride'] != 2 or conv['in'] != conv['out']):
        raise ConfigError(f'{name}: a pooled shortcut needs stride 2 and as many output as input channels')
    return {'type': 'unit', 'name': name, 'input': kind, 'bn': _bn(m.bn, f'{name}.bn'), 'shift': shift,
            'conv': conv, 'relu': relu, 'prelu': prelu, 'shortcut': shortcut}


def _bn_conv(seq: nn.Module, name: str) -> Dict[str, Any]:
    """The reduction cells' residual ``Sequential(BN, conv)`` as a float-input unit without ReLU."""
    if not isinstance(seq, nn.Sequential) or len(seq) != 2:
        raise ConfigError(f'{name}: expected Sequential(BatchNorm2d, conv); the packed engine cannot export it')
    return {'type': 'unit', 'name': name, 'input': 'float', 'bn': _bn(seq[0], f'{name}.0'), 'shift': None,
            'conv': _conv(seq[1], f'{name}.1'), 'relu': False, 'prelu': None, 'shortcut': None}


def _prims(seq: nn.Module, name: str) -> List[Dict[str, Any]]:
    out = []
    for i, m in enumerate(seq):
        where = f'{name}.{i}'
        if isinstance(m, nn.Conv2d):
            out.append({'type': 'conv', **_conv(m, where)})
        elif type(m) is nn.BatchNorm2d:
            out.append({'type': 'bn', 'name': where, **_bn(m, where)})
        elif type(m) is nn.ReLU:
            out.append({'type': 'relu', 'name': where})
        else:
            raise ConfigError(f'{where}: {type(m).__name__} in the stem is not supported by the packed engine')
    return out


def _pool_stride(m: nn.Module, name: str) -> int:
    k, s, p = m.kernel_size, m.stride, m.padding
    if any(isinstance(v, (tuple, list)) and len(set(v)) != 1 for v in (k, s, p)):
        raise ConfigError(f'{name}: non-square pooling is not supported by the packed engine')
    k, s, p = [int(v[0] if isinstance(v, (tuple, list)) else v) for v in (k, s, p)]
    ok = k == 3 and p == 1 and not m.ceil_mode
    if isinstance(m, nn.MaxPool2d):
        ok = ok and m.dilation in (1, (1, 1)) and not m.return_indices
    else:
        ok = ok and not m.count_include_pad and m.divisor_override is None
    if not ok:
        raise ConfigError(f'{name}: only 3x3 pools with padding 1 (average: count_include_pad=False) are supported')
    return s


def _op(op: nn.Module, name: str, op_name: str) -> Dict[str, Any]:
    if type(op) is Zeroise:
        return {'type': 'zeroise', 'name': name, 'stride': int(op.stride)}
    if type(op) is nn.MaxPool2d:
        return {'type': 'max_pool', 'name': name, 'stride': _pool_stride(op, name)}
    if type(op) is nn.AvgPool2d:
        return {'type': 'avg_pool', 'name': name, 'stride': _pool_stride(op, name)}
    if type(op) in (BNConvReLU, ReActConv):
        return _unit(op, name)
    raise ConfigError(f'{name}: op {op_name!r} ({type(op).__name__}) is not supported by the packed engine; '
                      f'supported: {SUPPORTED_OPS}')


def _cell(cell: nn.Module, name: str) -> Dict[str, Any]:
    if not isinstance(cell, FixedCell):
        raise ConfigError(f'{name}: {type(cell).__name__} is not a derived cell (FixedCell); export a fixed network '
                          '(BNASNetwork or a frozen BNASSpace)')
    op_names = getattr(cell, 'op_names', ('?',) * len(cell.ops))
    d: Dict[str, Any] = {
        'name': name, 'index': int(cell.cell_index), 'reduction': bool(cell.reduction),
        'preprocess0': _unit(cell.preprocess0, f'{name}.preprocess0'),
        'preprocess1': _unit(cell.preprocess1, f'{name}.preprocess1'),
        'ops': [_op(op, f'{name}.ops.{k}', op_names[k]) for k, op in enumerate(cell.ops)],
        'indices': [int(j) for j in cell.indices], 'concat': [int(c) for c in cell.concat],
    }
    if cell.cell_index == 0:
        d['residual'] = None
    elif cell.reduction:
        d['residual'] = _bn_conv(cell.preprocess_res, f'{name}.preprocess_res')
    else:
        d['residual'] = 'identity'
    return d


@torch.no_grad()
def describe_network(model: nn.Module) -> Dict[str, Any]:
    """The deployable description of a fixed BNAS network (see the module docstring); eval semantics."""
    model = _unwrap(model)
    for attr in ('cells', 'classifier', 'global_pooling'):
        if not hasattr(model, attr):
            raise ConfigError(f'{type(model).__name__} has no {attr!r}; export needs a BNAS network '
                              '(bnas_nni.networks.BNASNetwork or a frozen BNASSpace)')
    pool = model.global_pooling
    if not (type(pool) is nn.AdaptiveAvgPool2d and pool.output_size in (1, (1, 1))):
        raise ConfigError('global_pooling must be AdaptiveAvgPool2d(1) for export')
    if type(model.classifier) is not nn.Linear:
        raise ConfigError(f'classifier must be nn.Linear for export, found {type(model.classifier).__name__}')
    if hasattr(model, 'stem0'):
        family = 'imagenet'
        stem: Any = {'stem0': _prims(model.stem0, 'stem0'), 'stem1': _prims(model.stem1, 'stem1')}
        in_channels = next(p for p in stem['stem0'] if p['type'] == 'conv')['in']
    else:
        family = 'cifar'
        stem = [_unit(model.stem, 'stem')]
        in_channels = stem[0]['conv']['in']
    cells = [_cell(c, f'cells.{i}') for i, c in enumerate(model.cells)]
    return {
        'architecture': describe_model(model),
        'network': {
            'family': family, 'in_channels': int(in_channels), 'num_classes': int(model.classifier.out_features),
            'stem': stem, 'cells': cells,
            'classifier': {'weight': _t(model.classifier.weight), 'bias': _t(model.classifier.bias)},
        },
    }


def _fold_all(units: List[Dict[str, Any]]) -> Dict[int, Any]:
    """Thresholds of every sign unit's BN, searched for all channels of a network at once (one batch-norm
    probe per search step instead of one per layer); keyed by ``id(unit)``."""
    by_eps: Dict[float, List[Dict[str, Any]]] = {}
    for u in units:
        by_eps.setdefault(u['bn']['eps'], []).append(u)
    out: Dict[int, Any] = {}
    for eps, group in by_eps.items():
        def cat(key: str, fill: float) -> torch.Tensor:
            return torch.cat([u['bn'][key] if u['bn'][key] is not None else torch.full_like(u['bn']['mean'], fill)
                              for u in group])
        shift = None
        if any(u.get('shift') is not None for u in group):   # x - 0 == x: a plain sign unit keeps its thresholds
            shift = torch.cat([u['shift'] if u.get('shift') is not None else torch.zeros_like(u['bn']['mean'])
                               for u in group])
        th, negate = bn_sign_thresholds(cat('weight', 1.0), cat('bias', 0.0), cat('mean', 0.0), cat('var', 1.0), eps,
                                        where=', '.join(u['name'] for u in group[:2])
                                              + (' ...' if len(group) > 2 else ''), shift=shift)
        start = 0
        for u in group:
            C = u['bn']['mean'].numel()
            out[id(u)] = (th[:, start:start + C].contiguous(), negate[start:start + C].contiguous())
            start += C
    return out


def _pack_unit(u: Dict[str, Any], folded: Dict[int, Any]) -> Dict[str, Any]:
    conv = dict(u['conv'])
    # the react fields only where set: a paper network's file stays exactly what format version 2 wrote
    out = {k: v for k, v in u.items() if k not in ('bn', 'conv', 'shift', 'prelu', 'shortcut')}
    if u.get('prelu') is not None:
        out['prelu'] = {k: v for k, v in u['prelu'].items() if v is not None}
    if u.get('shortcut') is not None:
        out['shortcut'] = u['shortcut']
    if u['input'] == 'sign':
        out['thresholds'], negate = folded[id(u)]
        out['negate'] = pack_negate(negate)
    else:
        if u.get('shift') is not None:
            raise ConfigError(f"{u['name']}: a threshold shift on a float input cannot be exported")
        out['bn'] = u['bn']
    if conv['binary']:
        conv['bits'] = pack_filter_bits(conv.pop('negative'))
        del conv['weight']
    out['conv'] = conv
    return out


def _pack_prim(p: Dict[str, Any]) -> Dict[str, Any]:
    p = dict(p)
    if p['type'] == 'conv' and p['binary']:
        p['bits'] = pack_filter_bits(p.pop('negative'))
        del p['weight']
    return p


def packed_description(desc: Dict[str, Any]) -> Dict[str, Any]:
    """What the packed file stores: the description with sign inputs folded into thresholds and binary weights as
    bits (``conv['bits']`` uint8, one filter per row, [KH][KW][C] little-endian) plus ``conv['alpha']``."""
    net = desc['network']
    folded = _fold_all([u for u in _units(net) if u['input'] == 'sign'])
    unit = lambda u: _pack_unit(u, folded)  # noqa: E731
    if net['family'] == 'imagenet':
        stem: Any = {k: [_pack_prim(p) for p in v] for k, v in net['stem'].items()}
    else:
        stem = [unit(net['stem'][0])]
    cells = []
    for c in net['cells']:
        pc = dict(c)
        pc['preprocess0'] = unit(c['preprocess0'])
        pc['preprocess1'] = unit(c['preprocess1'])
        pc['ops'] = [unit(op) if op['type'] == 'unit' else dict(op) for op in c['ops']]
        if isinstance(c['residual'], dict):
            pc['residual'] = unit(c['residual'])
        cells.append(pc)
    return {'architecture': desc['architecture'],
            'network': {**net, 'stem': stem, 'cells': cells}}


def _units(net: Dict[str, Any]):
    if net['family'] == 'cifar':
        yield from net['stem']
    for c in net['cells']:
        yield c['preprocess0']
        yield c['preprocess1']
        yield from (op for op in c['ops'] if op['type'] == 'unit')
        if isinstance(c['residual'], dict):
            yield c['residual']


def _nbytes(*tensors: Optional[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def binary_part_sizes(desc: Dict[str, Any], packed: Dict[str, Any]) -> Dict[str, int]:
    """Bytes of the binary convs (sign input, binary weights) with their BN: fp32 (weights + BN state incl.
    ``num_batches_tracked``) vs packed (bits + scales + thresholds + negate flags); counts of each."""
    fp32 = packed_bytes = count = 0
    for raw, pk in zip(_units(desc['network']), _units(packed['network'])):
        if raw['input'] != 'sign' or not raw['conv']['binary']:
            continue
        count += 1
        bn = raw['bn']
        fp32 += _nbytes(raw['conv']['weight'], raw['conv']['bias'], bn['weight'], bn['bias'], bn['mean'], bn['var']) + 8
        c = pk['conv']
        packed_bytes += _nbytes(c['bits'], c['alpha'], c['bias'], pk['thresholds'], pk['negate'])
    return {'binary_convs': count, 'fp32_bytes': fp32, 'packed_bytes': packed_bytes}
