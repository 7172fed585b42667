"""The fast cell itself: :class:`FastBinaryMixedCell`, the same function as ``BinaryMixedCell`` computed per
state (see the package docstring)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from nni.nas.oneshot.pytorch.supermodule.sampling import preprocess_cell_inputs

from ...ops import BNConvReLU
from ...quant import SteSign
from ..mixed_cell import BinaryMixedCell
from . import kernels
from .functions import _binary_state_forward, _ConvReLUScale, _FromChannelsLast, _StateBinaryOps
from .plan import _conv_key, _StatePlan, build_plans

__all__ = ['FastBinaryMixedCell']


class FastBinaryMixedCell(BinaryMixedCell):
    """Same function, parameters, state dict and API as :class:`BinaryMixedCell`, computed per state.

    See the package docstring (:mod:`bnas_nni.search.fast_cell`) for what is shared and merged. A drop-in
    subclass: ``_arch_alpha`` sharing per label, :meth:`alpha_matrix`, :meth:`export`, :meth:`export_probs`
    and the ``mutate`` hook are inherited.

    Class attributes
    ----------------
    channels_last : bool or None
        Run the cell in channels-last memory format. ``None`` (default): on CPU when the fast kernels are on
        (the int8 ternary convolution wants NHWC, and PyTorch's NHWC dilated convs and pools are faster).
        The cell returns its output in the layout of its input either way; a model run channels-last end
        to end (``model.to(memory_format=torch.channels_last)`` and channels-last inputs) converts nothing.
    recompute_relu_masks : bool
        With int8 convs, recompute ``ReLU(conv)`` in backward instead of keeping it (fp32) for the
        architecture step's softmax-weight gradient and the weight step's ReLU backward. Off by default: on
        the paper supernet at batch 64 keeping it costs ~1.1 GiB of peak memory and saves ~10% of a full
        search iteration on CPU (docs: Benchmarks).
    pool_channels_last : bool
        Pool in channels-last layout on CPU (on by default: PyTorch's NHWC max/avg pooling kernels are several
        times faster there; the result is the same).
    """

    channels_last: Optional[bool] = None
    pool_channels_last: bool = True
    recompute_relu_masks: bool = False

    def __init__(self, op_factory, num_nodes, num_ops_per_node, num_predecessors, preprocessor, postprocessor,
                 concat_dim, memo, mutate_kwargs, label):
        super().__init__(op_factory, num_nodes, num_ops_per_node, num_predecessors, preprocessor, postprocessor,
                         concat_dim, memo, mutate_kwargs, label)
        # plain (non-module) bookkeeping; the modules stay where BinaryMixedCell put them (same state dict)
        self._plans: List[_StatePlan] = self._build_plans()
        self._index_cache: Dict[Tuple, torch.Tensor] = {}

    def _build_plans(self) -> List[_StatePlan]:
        return build_plans(self.ops, self.num_predecessors, self.num_nodes)

    def forward(self, *inputs):
        processed_inputs: List[torch.Tensor] = preprocess_cell_inputs(self.num_predecessors, *inputs)
        states: List[torch.Tensor] = list(self.preprocessor(processed_inputs))
        cl = self.channels_last
        if cl is None:
            cl = kernels.fast_kernels_enabled() and states[0].device.type == 'cpu' and states[0].dim() == 4
        given = processed_inputs[-1]
        caller_cl = given.dim() == 4 and given.is_contiguous(memory_format=torch.channels_last) \
            and not given.is_contiguous()
        if cl:
            states = [s.contiguous(memory_format=torch.channels_last) for s in states]
        P, N = self.num_predecessors, self.num_nodes
        col = {name: k for k, name in enumerate(self.op_names)}
        # every edge's softmax at once (rows in edge order). Zeroise's column is never read: its logit takes
        # softmax mass and gets its gradient through the softmax, as in BinaryMixedCell.
        probs = self._softmax(torch.stack([self._arch_alpha[e] for e in self.edge_labels()]))
        n_ops = probs.size(1)
        row = {ij: r for r, ij in enumerate((i, j) for i in range(P, P + N) for j in range(i))}
        # contributions to each node, summed as they come (no stacking of op outputs)
        acc: Dict[int, Optional[torch.Tensor]] = {i: None for i in range(P, P + N)}
        owned = set()  # nodes whose sum is a tensor made here (added to in place; never a view of an op output)

        def add(i: int, t: torch.Tensor) -> None:
            if acc[i] is None:
                acc[i] = t
            elif i in owned:
                acc[i].add_(t)
            else:
                acc[i] = acc[i] + t
                owned.add(i)

        training = self.training
        for j in range(P + N - 1):  # the last node feeds no edge
            if j >= P:  # node j is complete: every edge into it comes from an earlier state
                states.append(acc[j] if acc[j] is not None else self._zero_state(states, j))
            x = states[j]
            plan = self._plans[j]
            # binary ops: one normalisation and sign per BN group, one conv per kernel type
            done_pools: set = set()
            for key, items in plan.binary.items():
                for i, part in self._binary_ops(plan, key, items, x, probs, row, col, j, done_pools):
                    add(i, part)
            # pools: pooled once, normalised once, weighted per edge
            # (on CPU in channels-last layout: PyTorch's NHWC pooling kernels are ~5x faster than NCHW ones)
            x_pool = x.contiguous(memory_format=torch.channels_last) if len(plan.pools) > len(done_pools) \
                and self.pool_channels_last \
                and x.device.type == 'cpu' and x.dim() == 4 else x
            for key, (pool, items) in plan.pools.items():
                if key in done_pools:
                    continue
                idx = self._index([row[(i, j)] * n_ops + col[name] for i, name, _ in items], x.device)
                pw = probs.reshape(-1).index_select(0, idx).to(x.dtype)
                pooled = pool(x_pool)
                if x_pool is not x:
                    pooled = _FromChannelsLast.apply(pooled)
                for (i, _, _), t in zip(items, plan.bn_groups[('pool',) + key].normalize_weighted(pooled, training,
                                                                                                 pw)):
                    add(i, t)
            # anything else runs as in BinaryMixedCell
            for i, name, op in plan.generic:
                y = op(x)
                add(i, y * probs[row[(i, j)], col[name]].to(y.dtype))
        last = P + N - 1
        states.append(acc[last] if acc[last] is not None else self._zero_state(states, last))

        this_cell = torch.cat(states[P:], self.concat_dim)
        if cl and not caller_cl:
            this_cell = this_cell.contiguous()
        return self.postprocessor(this_cell, processed_inputs)

    def set_batch_norm_sync(self, sync) -> List[nn.BatchNorm2d]:
        """Normalise training batches of this cell's shared BN groups with ``sync`` (see :class:`_BNGroup`;
        None restores per-process statistics). Returns the BN modules covered; BNs of ops the fast path
        does not recognise run as modules and are not covered."""
        covered: List[nn.BatchNorm2d] = []
        for plan in self._plans:
            for group in plan.bn_groups.values():
                group.sync = sync
                covered.extend(group.bns)
        return covered

    def _binary_ops_plain(self, plan: '_StatePlan', key: Tuple, items, x: torch.Tensor, probs: torch.Tensor,
                          row, col, j: int):
        """The binary ops of one BN group, per kernel type (eval mode with unequal BN statistics, quantizers
        other than ``ste_sign``, ``BNAS_FAST_KERNELS=0``): yields ``(node, contribution)``."""
        training = self.training
        n_ops = probs.size(1)
        quantizer = items[0][2].quantizer
        signed = plan.bn_groups[('binary',) + key].normalize_quantize(x, training, quantizer)
        convs: Dict[Tuple, List[Tuple[int, str, BNConvReLU]]] = OrderedDict()
        inputs: Dict[int, torch.Tensor] = {}
        for (i, name, op), sx in zip(items, signed):
            inputs[id(sx)] = sx
            convs.setdefault((id(sx), _conv_key(op.op[0])), []).append((i, name, op))
        # the sign is saved once per state as int8 for the weight gradients (exact: values -1, 0, 1)
        compact = {sid: sx.to(torch.int8) if type(quantizer) is SteSign and torch.is_grad_enabled() else None
                   for sid, sx in inputs.items()}
        for (sid, _), group in convs.items():
            conv0 = group[0][2].op[0]
            idx = self._index([row[(i, j)] * n_ops + col[name] for i, name, _ in group], x.device)
            pw = probs.reshape(-1).index_select(0, idx).to(x.dtype).repeat_interleave(conv0.out_channels)
            if torch.is_grad_enabled():
                y = _ConvReLUScale.apply(inputs[sid], self._merged_weight(group), pw, conv0.stride,
                                         conv0.padding, conv0.dilation, conv0.groups, compact[sid])
            else:  # evaluation: nothing to keep for backward
                y = F.conv2d(inputs[sid], self._merged_weight(group), None, conv0.stride, conv0.padding,
                             conv0.dilation, conv0.groups).clamp_min_(0).mul_(pw.view(1, -1, 1, 1))
            # split (one backward node concatenating the grads), not slicing (a zero-filled
            # full-size grad per slice)
            for (i, _, _), part in zip(group, y.split(conv0.out_channels, 1) if len(group) > 1 else [y]):
                yield i, part

    def _binary_ops(self, plan: '_StatePlan', key: Tuple, items, x: torch.Tensor, probs: torch.Tensor, row, col,
                    j: int, done_pools: set):
        """The binary ops of one BN group (all reading ``x``): yields ``(node, contribution)``.

        Fused (:class:`_StateBinaryOps`) when the BNs normalise alike (training mode, or eval mode with
        equal running statistics) and the quantizer is ``ste_sign``; else per kernel type. In training mode
        the fused function also computes the pools attached to its bundles; their keys go into
        ``done_pools``."""
        quantizer = items[0][2].quantizer
        group = plan.bn_groups[('binary',) + key]
        training = self.training
        # a synced BN normalises through its group (all ranks' statistics): the per-kernel-type path
        fused = kernels.fast_kernels_enabled() and type(quantizer) is SteSign and x.dim() == 4 and group.sync is None
        eval_stats = None
        if fused and not training:
            # eval: one normalisation only if every BN keeps the same running statistics; no gradients
            eval_stats = group.common_running_stats()
            fused = eval_stats is not None and not torch.is_grad_enabled()
        if not fused:
            yield from self._binary_ops_plain(plan, key, items, x, probs, row, col, j)
            return
        bundles = plan.bundles[key]
        with_pools = training  # eval-mode pools normalise with their own running statistics: the pool loop
        n_ops = probs.size(1)
        flat = probs.reshape(-1)
        p_list = []
        for bundle in bundles:
            rows = [c.items for c in bundle.convs] + ([fp.items for fp in bundle.pools] if with_pools else [])
            idx = self._index([row[(i, j)] * n_ops + col[name] for items_ in rows for i, name, _ in items_],
                              x.device)
            p_list.append(flat.index_select(0, idx).view(len(rows), -1).to(x.dtype))
        weights = []
        for bundle in bundles:
            for c in bundle.convs:
                c.spec.source = c.source_key()
                weights.append(self._merged_weight(c.items))
        specs = [([c.spec for c in bundle.convs], [fp.spec for fp in bundle.pools] if with_pools else [])
                 for bundle in bundles]
        int8 = x.dtype == torch.float32 and x.device.type == 'cpu' and kernels.ternary_conv_supported()
        if torch.is_grad_enabled():
            res = _StateBinaryOps.apply(x, group.eps, specs, len(bundles), int8, self.recompute_relu_masks,
                                        *p_list, *weights)
            nb = len(bundles)
            ys, mean, invstd, pool_stats = res[:nb], res[nb], res[nb + 1], res[nb + 2:]
        else:
            ys, mean, invstd, pool_stats = _binary_state_forward(None, x, group.eps, specs, p_list, weights, int8,
                                                                 [], eval_stats=eval_stats)
        if training:
            tracked = [bn for bn in group.bns if bn.track_running_stats and bn.running_mean is not None]
            if tracked:
                group._update_running_stats(x.numel() // x.size(1), mean, invstd, tracked)
            done_pools.update(fp.key for bundle in bundles for fp in bundle.pools)
            k = 0
            for bundle in bundles:
                for fp in bundle.pools:
                    pgroup = plan.bn_groups[('pool',) + fp.key]
                    tracked = [bn for bn in pgroup.bns if bn.track_running_stats and bn.running_mean is not None]
                    if tracked:
                        pgroup._update_running_stats(ys[0].numel() // ys[0].size(1), pool_stats[k], pool_stats[k + 1],
                                                     tracked)
                    k += 2
        for bundle, y in zip(bundles, ys):
            c_out = bundle.convs[0].spec.c_out
            for i, part in zip(bundle.dests, y.split(c_out, 1) if len(bundle.dests) > 1 else [y]):
                yield i, part

    def _index(self, values: List[int], device: torch.device) -> torch.Tensor:
        key = (tuple(values), device)
        t = self._index_cache.get(key)
        if t is None:
            t = self._index_cache[key] = torch.tensor(values, dtype=torch.long, device=device)
        return t

    def _merged_weight(self, group) -> torch.Tensor:
        """The binarized weights of the convs in ``group``, concatenated along output channels."""
        convs = [op.op[0] for _, _, op in group]
        if len(convs) == 1:
            return convs[0].effective_weight()
        q = convs[0].weight_quantizer
        key = q.share_key() if q is not None and q.per_filter else None
        if key is not None and all(c.weight_quantizer is not None and c.weight_quantizer.share_key() == key
                                   for c in convs):
            return q(torch.cat([c.weight for c in convs], 0))
        return torch.cat([c.effective_weight() for c in convs], 0)

    def _zero_state(self, states: List[torch.Tensor], i: int) -> torch.Tensor:
        """A node all of whose candidate ops are Zeroise: zeros of the node's shape."""
        op = next(iter(self.ops[i - self.num_predecessors][0].values()))
        with torch.no_grad():
            return op(states[0]) * 0
