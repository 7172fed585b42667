"""ONNX export of a binarized BNAS network (opset >= 17), built node by node from the description.

The graph is the float-simulated network, written so that a binary runtime can find the binary layers
without guessing:

* every binary op is ``BatchNormalization -> Sign -> Conv -> Relu``; the ``Sign`` output feeds only that
  ``Conv``, whose weight initializer holds the binary values ``sign(W) * alpha`` (one magnitude per output
  filter) and whose ``doc_string`` says so; ``Sign(0) = 0`` and the Conv's zero padding are the float
  model's semantics (a padded position contributes 0);
* the model's ``metadata_props`` hold ``bnas_nni.binary_convs``: a JSON list of ``{"conv", "sign",
  "weight", "binarizer"}`` node / initializer names, one per binary conv, and ``bnas_nni.architecture``:
  the architecture description (genotype, C, L, per-conv binarizers);
* node names are the PyTorch module paths (``cells.3.ops.1/conv``), full-precision parts (stems,
  residual ``BatchNormalization -> Conv``, pools, the classifier ``Gemm``) are plain ONNX ops, Zeroise is
  ``ConstantOfShape`` of the (strided) input shape, and a node's two ops are added in the float model's
  order before the ``Concat`` and the residual ``Add``.

Convs with float weights behind a ``Sign`` (official precision rules) and binary weights on a float input
(the residual convs of ``official-2020-08``) keep exactly those semantics and are not listed as binary.

The react block (``op_set: react``) is the same pattern with its extra parts as elementwise ops: RSign is
``Sub(beta) -> Sign`` (listed as ``"shift"`` in ``bnas_nni.binary_convs``), the real-valued shortcut an ``Add``
of the block's input (through a 2x2 ``AveragePool``, ceil mode, when the block has stride 2) to the conv
output, and RPReLU ``Sub(gamma) -> PRelu(slope) -> Add(zeta)`` (PReLU: the ``PRelu`` alone); per-channel
constants are ``[C, 1, 1]`` initializers.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..errors import ConfigError

__all__ = ['network_to_onnx', 'MIN_OPSET']

MIN_OPSET = 17


class _Graph:
    def __init__(self) -> None:
        self.nodes: List[Any] = []
        self.inits: List[Any] = []
        self.names: set = set()
        self.binary: List[Dict[str, str]] = []
        self._n = 0

    def init(self, name: str, value: Any, dtype=np.float32) -> str:
        from onnx import numpy_helper

        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        arr = np.asarray(value, dtype=dtype)
        assert name not in self.names, name
        self.names.add(name)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def node(self, op: str, inputs: List[str], name: str, doc: str = '', **attrs: Any) -> str:
        from onnx import helper

        out = f'{name}:out'
        assert out not in self.names, out
        self.names.add(out)
        n = helper.make_node(op, inputs, [out], name=name, **attrs)
        if doc:
            n.doc_string = doc
        self.nodes.append(n)
        return out


def _bn(g: _Graph, x: str, bn: Dict[str, Any], name: str) -> str:
    C = bn['mean'].numel()
    scale = bn['weight'] if bn['weight'] is not None else torch.ones(C)
    bias = bn['bias'] if bn['bias'] is not None else torch.zeros(C)
    ins = [x, g.init(f'{name}.weight', scale), g.init(f'{name}.bias', bias), g.init(f'{name}.running_mean', bn['mean']),
           g.init(f'{name}.running_var', bn['var'])]
    return g.node('BatchNormalization', ins, name, epsilon=float(bn['eps']))


def _conv(g: _Graph, x: str, c: Dict[str, Any], name: str, doc: str = '') -> str:
    ins = [x, g.init(f"{c['name']}.weight", c['weight'])]
    if c['bias'] is not None:
        ins.append(g.init(f"{c['name']}.bias", c['bias']))
    p, s, d = c['padding'], c['stride'], c['dilation']
    return g.node('Conv', ins, name, doc=doc, kernel_shape=list(c['kernel']), pads=[p, p, p, p], strides=[s, s],
                  dilations=[d, d], group=1)


def _channel(g: _Graph, name: str, value: torch.Tensor) -> str:
    """A per-channel constant shaped [C, 1, 1] to broadcast over N x C x H x W."""
    return g.init(name, value.reshape(-1, 1, 1))


def _post(g: _Graph, x: str, y: str, u: Dict[str, Any]) -> str:
    """The react block after its conv ``y``: shortcut from the block input ``x``, then (R)PReLU or ReLU."""
    name = u['name']
    shortcut = u.get('shortcut')
    if shortcut == 'avg_pool':
        x = g.node('AveragePool', [x], f'{name}/shortcut_pool', kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1,
                   count_include_pad=0)
    if shortcut is not None:
        y = g.node('Add', [y, x], f'{name}/shortcut')
    p = u.get('prelu')
    if p is not None:
        if p.get('gamma') is not None:
            y = g.node('Sub', [y, _channel(g, f'{name}.gamma', p['gamma'])], f'{name}/rprelu_shift_in')
        y = g.node('PRelu', [y, _channel(g, f'{name}.slope', p['slope'])], f'{name}/prelu')
        if p.get('zeta') is not None:
            y = g.node('Add', [y, _channel(g, f'{name}.zeta', p['zeta'])], f'{name}/rprelu_shift_out')
    elif u['relu']:
        y = g.node('Relu', [y], f'{name}/relu')
    return y


def _unit(g: _Graph, x: str, u: Dict[str, Any], binarizers: Dict[str, Any]) -> str:
    name = u['name']
    h = _bn(g, x, u['bn'], f'{name}/bn') if u['bn'] is not None else x
    conv = u['conv']
    doc = ''
    shift = None
    if u.get('shift') is not None:
        if u['input'] != 'sign':
            raise ConfigError(f'{name}: a threshold shift on a float input has no ONNX form')
        shift = g.node('Sub', [h, _channel(g, f'{name}.quantizer.beta', u['shift'])], f'{name}/rsign_shift')
        h = shift
    if u['input'] == 'sign':
        h = g.node('Sign', [h], f'{name}/sign')
        if conv['binary']:
            doc = ('bnas-nni binary conv: input from Sign (values -1, 0, +1), weights sign(W) * alpha with one alpha '
                   'per output filter')
    y = _conv(g, h, conv, f'{name}/conv', doc)
    if doc:
        entry = {'conv': f'{name}/conv', 'sign': f'{name}/sign', 'weight': f"{conv['name']}.weight",
                 'binarizer': str(binarizers.get(conv['name'], 'binary'))}
        if shift is not None:
            entry['shift'] = f'{name}/rsign_shift'
        g.binary.append(entry)
    return _post(g, x, y, u)


def _zeros(g: _Graph, x: str, stride: int, name: str) -> str:
    from onnx import TensorProto, helper

    if stride > 1:
        big = np.iinfo(np.int64).max
        x = g.node('Slice', [x, g.init(f'{name}.starts', [0, 0], np.int64),
                             g.init(f'{name}.ends', [big, big], np.int64),
                             g.init(f'{name}.axes', [2, 3], np.int64),
                             g.init(f'{name}.steps', [stride, stride], np.int64)],
                   f'{name}/slice')
    shape = g.node('Shape', [x], f'{name}/shape')
    return g.node('ConstantOfShape', [shape], f'{name}/zeros',
                  value=helper.make_tensor('value', TensorProto.FLOAT, [1], [0.0]))


def _op(g: _Graph, x: str, op: Dict[str, Any], binarizers: Dict[str, Any]) -> Optional[str]:
    if op['type'] == 'unit':
        return _unit(g, x, op, binarizers)
    if op['type'] == 'zeroise':
        return None
    s = int(op['stride'])
    if op['type'] == 'max_pool':
        return g.node('MaxPool', [x], f"{op['name']}/pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[s, s])
    if op['type'] == 'avg_pool':
        return g.node('AveragePool', [x], f"{op['name']}/pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[s, s],
                      count_include_pad=0)
    raise ConfigError(f"{op.get('name')}: op {op['type']!r} has no ONNX form")


def _cell(g: _Graph, c: Dict[str, Any], s0: str, s1: str, binarizers: Dict[str, Any]) -> str:
    states = [_unit(g, s0, c['preprocess0'], binarizers), _unit(g, s1, c['preprocess1'], binarizers)]
    ops, indices = c['ops'], c['indices']
    for i in range(len(ops) // 2):
        parts = []
        for k in (2 * i, 2 * i + 1):
            y = _op(g, states[indices[k]], ops[k], binarizers)
            if y is not None:
                parts.append(y)
        if not parts:
            k = 2 * i
            stride = int(ops[k].get('stride', 1))
            parts.append(_zeros(g, states[indices[k]], stride, f"{c['name']}.node{i + 2}"))
        node = parts[0] if len(parts) == 1 else g.node('Add', parts, f"{c['name']}.node{i + 2}/add")
        states.append(node)
    out = g.node('Concat', [states[j] for j in c['concat']], f"{c['name']}/concat", axis=1)
    res = c['residual']
    if res == 'identity':
        out = g.node('Add', [out, s1], f"{c['name']}/residual")
    elif isinstance(res, dict):
        out = g.node('Add', [out, _unit(g, s1, res, binarizers)], f"{c['name']}/residual")
    return out


def _prims(g: _Graph, x: str, prims: List[Dict[str, Any]], binarizers: Dict[str, Any]) -> str:
    for p in prims:
        if p['type'] == 'conv':
            x = _conv(g, x, p, f"{p['name']}/conv")
        elif p['type'] == 'bn':
            x = _bn(g, x, p, p['name'])
        elif p['type'] == 'relu':
            x = g.node('Relu', [x], f"{p['name']}/relu")
    return x


def network_to_onnx(desc: Dict[str, Any], *, opset: int = MIN_OPSET, image_size: Optional[int] = None):
    """The description of :func:`bnas_nni.deploy.export.describe_network` as a checked ``onnx.ModelProto``.

    Input ``images`` (N x C x H x W, float32; N dynamic, H and W fixed to ``image_size`` when given), output
    ``logits`` (N x classes).
    """
    try:
        # onnx is imported on use (here and in the helpers): its absence becomes the one-line error below
        import onnx
        from onnx import TensorProto, helper
    except ImportError:
        raise ConfigError('ONNX export needs the onnx package (pip install onnx)') from None
    if opset < MIN_OPSET:
        raise ConfigError(f'ONNX opset {opset} is too old; use {MIN_OPSET} or newer')
    net = desc['network']
    binarizers = dict((desc.get('architecture') or {}).get('binarizers') or {})
    g = _Graph()
    if net['family'] == 'imagenet':
        s0 = _prims(g, 'images', net['stem']['stem0'], binarizers)
        s1 = _prims(g, s0, net['stem']['stem1'], binarizers)
    else:
        s0 = s1 = _unit(g, 'images', net['stem'][0], binarizers)
    for c in net['cells']:
        s0, s1 = s1, _cell(g, c, s0, s1, binarizers)
    pooled = g.node('GlobalAveragePool', [s1], 'global_pooling')
    flat = g.node('Flatten', [pooled], 'flatten', axis=1)
    cls = net['classifier']
    logits = g.node('Gemm', [flat, g.init('classifier.weight', cls['weight']), g.init('classifier.bias', cls['bias'])],
                    'classifier', transB=1)
    g.nodes.append(helper.make_node('Identity', [logits], ['logits'], name='output'))
    hw = image_size if image_size else None
    graph = helper.make_graph(
        g.nodes, 'bnas_nni',
        [helper.make_tensor_value_info('images', TensorProto.FLOAT,
                                       ['batch', int(net['in_channels']), hw or 'height', hw or 'width'])],
        [helper.make_tensor_value_info('logits', TensorProto.FLOAT, ['batch', int(net['num_classes'])])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', int(opset))], producer_name='bnas-nni')
    model.ir_version = min(model.ir_version, 9)  # readable by onnxruntime releases of the last years
    helper.set_model_props(model, {'bnas_nni.binary_convs': json.dumps(g.binary),
                                   'bnas_nni.architecture': json.dumps(desc.get('architecture') or {}, default=str)})
    model.doc_string = ('bnas-nni binarized BNAS network: each Sign -> Conv pair listed in metadata '
                        'bnas_nni.binary_convs is a binary conv (weights sign(W) * alpha per filter)')
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        first = (str(exc).strip().splitlines() or ['invalid model'])[0]
        raise ConfigError(f'the exported ONNX graph does not pass onnx.checker: {first}') from None
    return model
