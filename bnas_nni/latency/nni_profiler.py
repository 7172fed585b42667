r"""The latency model as an NNI profiler, so NNI's own latency machinery drives a search with it.

:class:`PackedLatencyProfiler` is an :class:`nni.nas.profiler.ExpressionProfiler`: its ``expression`` is a
symbolic expression over the choices of a :class:`~bnas_nni.space.BNASSpace` (``normal/op_{n}_{s}``,
``normal/input_{n}_{s}``, the same for ``reduce``; node ``n`` counts from 2, slot ``s`` is 0 or 1) whose value
on a sample is :meth:`LatencyModel.predict` of that sample's genotype:

.. math::

   \mathrm{lat}(x) = T_{fixed} + \sum_{t} \sum_{n} \sum_{s \in \{0, 1\}} T^t_{(n,\, x[t/input_{n}_{s}]),\
       x[t/op_{n}_{s}]}

Each term depends on one op choice and one input choice, so NNI evaluates it on a frozen sample
(:class:`~nni.nas.oneshot.pytorch.profiler.RangeProfilerFilter`, multi-trial strategies) and takes its expectation
term by term under independent categorical distributions
(:class:`~nni.nas.oneshot.pytorch.profiler.ExpectationProfilerPenalty`). Under uniform input probabilities the
two slots of node :math:`i` keep each of its :math:`2+i` inputs with probability :math:`2/(2+i)` in all, which is
:meth:`LatencyModel.expected_ms`'s :math:`w_e`.

The input choices of NNI's ``Cell`` are ``CategoricalMultiple`` (one chosen, sampled as ``[j]``); the expression
reads them as plain ``Categorical`` leaves of the same label so that NNI's expectation can enumerate them, and a
term accepts both ``j`` and ``[j]``.
"""
from __future__ import annotations

import operator
from typing import Any, Mapping, Optional, Sequence

from nni.mutable import Categorical, MutableExpression
from nni.mutable.utils import label_scope
from nni.nas.profiler import ExpressionProfiler

from ..errors import ConfigError
from ..genotypes import CELL_TYPES
from .model import LatencyModel, edge_nodes

__all__ = ['PackedLatencyProfiler', 'latency_expression']


class _EdgeCost:
    """Milliseconds of one (op, input) choice of a node slot: a row per input of that node, a column per op."""

    def __init__(self, rows: Sequence[Sequence[float]], ops: Sequence[str]) -> None:
        self.rows = [[float(v) for v in row] for row in rows]
        self.column = {op: k for k, op in enumerate(ops)}

    def __call__(self, op: str, inp: Any) -> float:
        if isinstance(inp, (list, tuple)):
            if len(inp) != 1:
                raise ValueError(f'an input choice of a BNAS cell picks one input, got {inp!r}')
            inp = inp[0]
        return self.rows[int(inp)][self.column[op]]

    def __repr__(self) -> str:
        return 'edge_ms'


def latency_expression(model: LatencyModel, labels: Sequence[str] = CELL_TYPES) -> MutableExpression:
    """The symbolic expression of :meth:`LatencyModel.predict` over NNI ``Cell`` labels ``labels`` (the labels of
    the normal and the reduction cell, in that order)."""
    rows = {pair: r for r, pair in enumerate(edge_nodes(model.num_nodes))}
    terms = []
    for label, t in zip(labels, CELL_TYPES):
        table = model.edge_ms[t].tolist()
        for i in range(model.num_nodes):
            node = i + 2
            cost = _EdgeCost([table[rows[(i, j)]] for j in range(node)], model.ops)
            for slot in (0, 1):
                with label_scope(label):    # NNI builds hierarchical labels ('normal/op_2_0') in a scope
                    op = Categorical(list(model.ops), label=f'op_{node}_{slot}')
                    inp = Categorical(list(range(node)), label=f'input_{node}_{slot}')
                terms.append(MutableExpression(cost, f'{label}_ms[{node}]({{}}, {{}})', [op, inp]))
    expression: Any = terms[0]
    for term in terms[1:]:
        expression = MutableExpression(operator.add, '{} + {}', [expression, term])
    return MutableExpression(operator.add, '{} + {}', [expression, float(model.fixed_ms)])


class PackedLatencyProfiler(ExpressionProfiler):
    """Predicted latency (ms per batch on the packed engine) of a sample of a BNAS space.

    ``latency_model`` is a :class:`LatencyModel` or the path of a saved one; without it the model is measured on
    this machine for the space's own derived network (cached; see :func:`bnas_nni.latency.profile.
    measure_latency_model`) at ``batch`` and ``threads``. The space's ops and node count must match the model's.

    Use it as NNI's profilers are used::

        profiler = PackedLatencyProfiler(space, 'latency.json')
        RangeProfilerFilter(profiler, max=5.0)                   # reject samples over 5 ms
        ExpectationProfilerPenalty(profiler, baseline=5.0)        # one-shot latency penalty
    """

    expression: MutableExpression

    def __init__(self, model_space: Any, latency_model: Optional[LatencyModel | str] = None, *, batch: int = 1,
                 threads: int = 2, image_size: Optional[int] = None, labels: Sequence[str] = CELL_TYPES) -> None:
        super().__init__(model_space)
        if latency_model is None:
            latency_model = _measure_for_space(model_space, batch=batch, threads=threads, image_size=image_size)
        elif not isinstance(latency_model, LatencyModel):
            latency_model = LatencyModel.load(latency_model)
        _check_space(model_space, latency_model, labels)
        self.latency_model = latency_model
        self.expression = latency_expression(latency_model, labels)


def _space_attrs(space: Any) -> Mapping[str, Any]:
    kwargs = dict(getattr(space, 'trace_kwargs', None) or {})
    return kwargs


def _check_space(space: Any, model: LatencyModel, labels: Sequence[str]) -> None:
    ops = tuple(getattr(space, 'ops', model.ops))
    if ops != tuple(model.ops):
        raise ConfigError(f'the latency model covers ops {", ".join(model.ops)} but the space has {", ".join(ops)}; '
                          'profile this space (bnas-nni latency profile)')
    nodes = getattr(space, 'num_nodes', model.num_nodes)
    if nodes != model.num_nodes:
        raise ConfigError(f'the latency model is for cells of {model.num_nodes} nodes, the space has {nodes}; '
                          'profile this space (bnas-nni latency profile)')
    if hasattr(space, 'simplify'):
        known = set(space.simplify())
        missing = [f'{label}/op_2_0' for label in labels if f'{label}/op_2_0' not in known]
        if missing:
            raise ConfigError(f'the space has no choice {missing[0]!r}; pass labels= with its cell labels')


def _measure_for_space(space: Any, *, batch: int, threads: int, image_size: Optional[int]) -> LatencyModel:
    from ..networks import network_family
    from .profile import measure_latency_model
    kw = _space_attrs(space)
    family = network_family(kw.get('dataset', 'cifar10'))
    block = {k: kw[k] for k in ('binarizer', 'activation', 'nonlinearity', 'shortcut') if k in kw}
    return measure_latency_model(ops=tuple(space.ops), num_nodes=space.num_nodes,
                                 init_channels=kw.get('init_channels', 16), layers=kw.get('layers', 8),
                                 image_size=image_size or (224 if family == 'imagenet' else 32),
                                 num_classes=kw.get('num_classes', 10), family=family, batch=batch,
                                 threads=threads, block=block)
