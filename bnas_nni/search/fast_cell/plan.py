"""Planning: which of a cell's ops run together, decided once when the cell is built.

For each state of the cell a :class:`_StatePlan` sorts the ops reading it (:func:`_classify`): binary ops
(BN -> quantizer -> binary conv -> ReLU) by quantizer and BN (one :class:`~.bn_emulation._BNGroup` each),
pools by kind, zeroise, and anything else (run as a module). The binary ops of one group are merged by
kernel type (:class:`_MergedConv`: one conv over their concatenated weights) and the merged convs and pools
whose outputs go to the same nodes are bundled (:class:`_Bundle`), so that :mod:`.functions` computes a
state's whole bundle in one autograd node. :class:`_ConvSpec` and :class:`_PoolSpec` are what that node
needs of a conv or pool: geometry, and the packed int8 weights of a conv while its latent weights are
unchanged.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ...ops import BNConvReLU, Zeroise
from ...quant import BinaryConv2d
from . import kernels
from .bn_emulation import _BNGroup

__all__ = ['_StatePlan', '_ConvSpec', '_PoolSpec', '_MergedConv', '_FusedPool', '_Bundle', 'build_plans',
           '_classify', '_conv_key']


def _plain_bn(bn: nn.Module) -> bool:
    return type(bn) is nn.BatchNorm2d and not bn.affine


class _ConvSpec:
    """One merged convolution of a bundle: geometry, output channels per op, and the packed int8 weights of
    its last ternary call, reused while the weights are unchanged.

    ``source`` (set by the caller before each forward): the identity and version counters of the latent
    weights the binarized weight was made from. While it equals the key of the cached result, ``ternary``
    returns that result without looking at the weight (the weight step after an architecture step, evaluation
    batches); any in-place change of a latent weight (optimizer step, latent constraint, state-dict load)
    bumps its version. Only stateless binarizers that declare ``exact_ternary_signs`` are cached this way;
    for the others, and when the key changed, the signs are compared and the int8 weights repacked only if
    they differ."""

    __slots__ = ('stride', 'padding', 'dilation', 'groups', 'kernel_size', 'c_out', 'trusted', 'source', '_cpu',
                 '_q', '_packed', '_scale', '_source')

    def __init__(self, conv: BinaryConv2d, trusted: bool) -> None:
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.kernel_size = tuple(conv.kernel_size)
        # stride s == dilation s (the dilated convs of a reduction cell), padding a multiple of s: every tap
        # reads x at s * (o + t) - p, so the conv is the stride-1, dilation-1 conv with padding p / s of the
        # input subsampled by s (x[:, :, ::s, ::s]), the same sums. On CPU oneDNN runs the strided dilated
        # conv's backward about 2x slower than this equivalent one (other devices: not measured, unchanged).
        self._cpu = (1, self.stride, self.padding, self.dilation)
        stride, dilation, padding = tuple(conv.stride), tuple(conv.dilation), conv.padding
        if len(stride) == 2 and stride[0] == stride[1] > 1 and dilation == stride and isinstance(padding, tuple) \
                and all(isinstance(q, int) and q % stride[0] == 0 for q in padding):
            self._cpu = (stride[0], (1, 1), tuple(q // stride[0] for q in padding), (1, 1))
        self.c_out = conv.out_channels
        # binarizers that declare their output sign * per-filter scale (others are checked per call)
        self.trusted = trusted
        self.source: Optional[Tuple] = None
        self._q: Optional[torch.Tensor] = None
        self._packed: Optional[kernels.TernaryConv] = None
        self._scale: Optional[torch.Tensor] = None
        self._source: Optional[Tuple] = None

    def geometry(self, device: torch.device) -> Tuple[int, Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]:
        """``(s, stride, padding, dilation)`` of the conv as it runs on ``device``, on the input subsampled by
        ``s`` (see ``__init__``)."""
        return self._cpu if device.type == 'cpu' else (1, self.stride, self.padding, self.dilation)

    def phase_split(self, out: torch.Tensor) -> int:
        """``d`` when this conv's weight gradient should run over the ``d * d`` polyphase components, else 1.

        A stride-1 conv with dilation ``d`` and padding ``d * (k // 2)`` maps output phase ``(a, b)`` from
        input phase ``(a, b)`` only: it is the undilated conv (padding ``k // 2``) of each phase, and its
        weight gradient the undilated one over the phases stacked along the batch, the same products. Used
        where the dilated kernel spans the whole (even-sized) image, the case oneDNN's dilated
        weight-gradient kernel handles at about half its usual rate (a 5x5 kernel, dilation 2, at 8x8; CPU
        only, other devices not measured)."""
        d = self.dilation[0]
        if out.device.type != 'cpu':
            return 1
        h, w = out.shape[-2:]
        k = self.kernel_size
        if d < 2 or tuple(self.dilation) != (d, d) or tuple(self.stride) != (1, 1) or self.groups != 1 \
                or tuple(self.padding) != (d * (k[0] // 2), d * (k[1] // 2)) or k[0] % 2 == 0 or k[1] % 2 == 0 \
                or h % d or w % d or (k[0] - 1) * d < h or (k[1] - 1) * d < w:
            return 1
        return d

    def ternary(self, w: torch.Tensor) -> Optional[Tuple[kernels.TernaryConv, torch.Tensor]]:
        """The int8 convolution of ``w`` and its per-filter scale, or None if ``w`` is not ternary."""
        if self.source is not None and self.source == self._source:
            return self._packed, self._scale
        tw = kernels.ternary_weight(w, trusted=self.trusted)
        if tw is None:
            self._source = None
            return None
        q, scale = tw
        if self._packed is None or self._q.shape != q.shape or not torch.equal(self._q, q):
            self._packed = kernels.TernaryConv(q, *self._cpu[1:], self.groups)  # CPU only: the CPU geometry
            self._q = q
        self._scale = scale
        self._source = self.source if self.trusted else None
        return self._packed, scale


class _StatePlan:
    """What to compute from one cell state: shared binary-conv groups, shared pools, other ops."""

    def __init__(self) -> None:
        # binary ops: (quantizer share key, eps, C) -> list of (node, op_name, BNConvReLU); one BN group each
        self.binary: Dict[Tuple, List[Tuple[int, str, BNConvReLU]]] = OrderedDict()
        # pools: pool signature -> (pool module, list of (node, op_name, bn))
        self.pools: Dict[Tuple, Tuple[nn.Module, List[Tuple[int, str, nn.BatchNorm2d]]]] = OrderedDict()
        self.generic: List[Tuple[int, str, nn.Module]] = []
        self.zero_nodes: List[int] = []
        self.bn_groups: Dict[Tuple, _BNGroup] = {}
        # per binary key: bundles of merged convs (and pools) whose outputs are summed; see _StateBinaryOps
        self.bundles: Dict[Tuple, List['_Bundle']] = {}
        # pool keys computed inside a bundle in training mode (else by the pool loop)
        self.fused_pools: Dict[Tuple, List[Tuple]] = {}


class _MergedConv:
    """The binary ops of one kernel type leaving a state (one per destination edge), run as one conv."""

    __slots__ = ('spec', 'items')

    def __init__(self, items: List[Tuple[int, str, BNConvReLU]]) -> None:
        self.items = items
        self.spec = _ConvSpec(items[0][2].op[0], trusted=all(_exact_ternary(op.op[0]) for _, _, op in items))

    def source_key(self) -> Optional[Tuple]:
        """What the binarized weight is made from, read now: each conv's latent weight (storage and version
        counter) and binarizer; None unless every binarizer declares exact ternary signs and is stateless
        (its output then depends on the latent weight only)."""
        key = []
        for _, _, op in self.items:
            conv = op.op[0]
            if not (_exact_ternary(conv) and conv.weight_quantizer.stateless):
                return None
            key.append((conv.weight.data_ptr(), conv.weight._version, id(conv.weight_quantizer)))
        return tuple(key)


def _exact_ternary(conv: BinaryConv2d) -> bool:
    """Whether the conv's binarizer declares its output exactly a per-filter scale times signs
    (:attr:`~bnas_nni.quant.WeightBinarizer.exact_ternary_signs`): the int8 path then trusts it unchecked."""
    return bool(getattr(conv.weight_quantizer, 'exact_ternary_signs', False))


class _PoolSpec:
    """A max or average pool followed by a non-affine batch norm, as computed inside a bundle."""

    __slots__ = ('kind', 'kernel_size', 'stride', 'padding', 'dilation', 'ceil_mode', 'count_include_pad',
                 'divisor_override', 'eps')

    def __init__(self, pool: nn.Module, bn: nn.BatchNorm2d) -> None:
        pair = torch.nn.modules.utils._pair
        self.kind = 'max' if type(pool) is nn.MaxPool2d else 'avg'
        self.kernel_size, self.padding = pair(pool.kernel_size), pair(pool.padding)
        self.stride = pair(pool.stride if pool.stride is not None else pool.kernel_size)
        self.dilation = pair(getattr(pool, 'dilation', 1))
        self.ceil_mode = pool.ceil_mode
        self.count_include_pad = getattr(pool, 'count_include_pad', True)
        self.divisor_override = getattr(pool, 'divisor_override', None)
        self.eps = bn.eps

    def shape_key(self, channels: int) -> Optional[Tuple]:
        if self.ceil_mode:
            return None
        return (self.stride, channels, tuple(2 * p - d * (k - 1) for p, d, k in
                                             zip(self.padding, self.dilation, self.kernel_size)))

    def __call__(self, x: torch.Tensor, indices: bool = False):
        if self.kind == 'max':
            fn = torch.ops.aten.max_pool2d_with_indices if indices else torch.ops.aten.max_pool2d
            return fn(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
        return torch.ops.aten.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                                         self.count_include_pad, self.divisor_override)

    def backward(self, g: torch.Tensor, x: torch.Tensor, indices: Optional[torch.Tensor]) -> torch.Tensor:
        if self.kind == 'max':
            return torch.ops.aten.max_pool2d_with_indices_backward(g, x, self.kernel_size, self.stride, self.padding,
                                                                   self.dilation, self.ceil_mode, indices)
        return torch.ops.aten.avg_pool2d_backward(g, x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                                                  self.count_include_pad, self.divisor_override)


class _FusedPool:
    """The pool ops of one kind leaving a state (one per destination edge, each with its own BN)."""

    __slots__ = ('key', 'spec', 'items')

    def __init__(self, key: Tuple, pool: nn.Module, items: List[Tuple[int, str, nn.BatchNorm2d]]) -> None:
        self.key, self.items = key, items
        self.spec = _PoolSpec(pool, items[0][2])


class _Bundle:
    """Ops leaving one state whose outputs are summed: same destination nodes in the same order, same
    output shape. Channel block ``e`` of the bundle's output goes to node ``dests[e]``."""

    __slots__ = ('dests', 'convs', 'pools', 'shape_key')

    def __init__(self, dests: Tuple[int, ...], shape_key: Tuple) -> None:
        self.dests, self.shape_key = dests, shape_key
        self.convs: List[_MergedConv] = []
        self.pools: List[_FusedPool] = []


def _conv_shape_key(conv: BinaryConv2d) -> Tuple:
    # the output size is (H + 2p - d(k-1) - 1) // s + 1: equal for every H when s and 2p - d(k-1) are
    return (conv.stride, conv.out_channels,
            tuple(2 * p - d * (k - 1) for p, d, k in zip(conv.padding, conv.dilation, conv.kernel_size)))


def _bundle(items: List[Tuple[int, str, BNConvReLU]]) -> List[_Bundle]:
    """Group the binary ops of one state by kernel type, then bundle the kernel types whose outputs can be
    summed: same destination nodes in the same order, same stride, channels and output size."""
    by_conv: Dict[Tuple, List[Tuple[int, str, BNConvReLU]]] = OrderedDict()
    for item in items:
        by_conv.setdefault(_conv_key(item[2].op[0]), []).append(item)
    bundles: Dict[Tuple, _Bundle] = OrderedDict()
    for group in by_conv.values():
        dests = tuple(i for i, _, _ in group)
        shape_key = _conv_shape_key(group[0][2].op[0])
        bundles.setdefault((dests, shape_key), _Bundle(dests, shape_key)).convs.append(_MergedConv(group))
    return list(bundles.values())


def _attach_pools(plan: '_StatePlan') -> None:
    """Put each pool kind of the state into the bundle with the same destinations and output shape (so that
    training-mode pools are computed and summed inside the state's fused function)."""
    for key, (pool, items) in plan.pools.items():
        fp = _FusedPool(key, pool, items)
        dests = tuple(i for i, _, _ in items)
        shape_key = fp.spec.shape_key(items[0][2].num_features)
        for bkey, bundles in plan.bundles.items():
            target = next((b for b in bundles if b.dests == dests and b.shape_key == shape_key), None)
            if target is not None:
                target.pools.append(fp)
                plan.fused_pools.setdefault(bkey, []).append(key)
                break


def _conv_key(conv: BinaryConv2d) -> Tuple:
    return (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.padding_mode)


def _pool_key(pool: nn.Module) -> Optional[Tuple]:
    if type(pool) is nn.MaxPool2d:
        return ('max', pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
                pool.return_indices)
    if type(pool) is nn.AvgPool2d:
        return ('avg', pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode, pool.count_include_pad,
                pool.divisor_override)
    return None


def _classify(op: nn.Module):
    """('zero',) | ('binary', key) | ('pool', key, pool, bn) | ('generic',)"""
    if type(op) is Zeroise:
        return ('zero',)
    if type(op) is BNConvReLU and _plain_bn(op.bn) and len(op.op) == 2 and isinstance(op.op[0], BinaryConv2d) \
            and type(op.op[1]) is nn.ReLU and op.op[0].bias is None and op.op[0].padding_mode == 'zeros':
        share = op.quantizer.share_key()
        if share is not None:  # a stateful (e.g. learnable) quantizer runs per op, never shared
            return ('binary', (share, op.bn.eps, op.bn.num_features))
    if type(op) is nn.Sequential and len(op) == 2 and _pool_key(op[0]) is not None and _plain_bn(op[1]) \
            and not getattr(op[0], 'return_indices', False):
        return ('pool', _pool_key(op[0]) + (op[1].eps,), op[0], op[1])
    return ('generic',)


def build_plans(ops, num_predecessors: int, num_nodes: int) -> List[_StatePlan]:
    """One :class:`_StatePlan` per state of a cell whose candidate ops are ``ops[i - P][j]`` (a name -> op
    mapping for the edge from state ``j`` to node ``i``), as ``BinaryMixedCell`` holds them."""
    P = num_predecessors
    n_states = P + num_nodes
    plans = [_StatePlan() for _ in range(n_states)]
    for i in range(P, n_states):
        for j in range(i):
            plan = plans[j]
            for name, op in ops[i - P][j].items():
                kind = _classify(op)
                if kind[0] == 'zero':
                    plan.zero_nodes.append(i)
                elif kind[0] == 'binary':
                    plan.binary.setdefault(kind[1], []).append((i, name, op))
                elif kind[0] == 'pool':
                    plan.pools.setdefault(kind[1], (kind[2], []))[1].append((i, name, kind[3]))
                else:
                    plan.generic.append((i, name, op))
    for plan in plans:
        for key, items in plan.binary.items():
            plan.bn_groups[('binary',) + key] = _BNGroup([op.bn for _, _, op in items])
            plan.bundles[key] = _bundle(items)
        for key, (_, items) in plan.pools.items():
            plan.bn_groups[('pool',) + key] = _BNGroup([bn for _, _, bn in items])
        _attach_pools(plan)
    return plans
