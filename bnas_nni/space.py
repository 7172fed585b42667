"""The BNAS cell search space as an NNI 3.0 ``ModelSpace``.

Unfrozen, :class:`BNASSpace` is the search network of the paper: a stem, ``layers`` cells built on
``nni.nas.nn.pytorch.Cell`` (``num_nodes`` nodes, two inputs per node, the seven named candidates,
normal and reduction cells each sharing one set of choices, labelled ``normal/...`` and
``reduce/...``), the inter-cell residual, global pooling and a linear head. Ops use their search
variants (non-affine BN, BN after pools) and the cell preprocessing is full precision, as in the
official ``model_search.py``.

Frozen (``space.freeze(arch)``, ``with model_context(arch): BNASSpace(...)``, ``space.random()``), it
builds exactly the derived network: the same modules, names and parameter count as
``BNASNetwork(Genotype.from_arch_dict(arch), ...)``, so weights move freely between the two. Freezing
rebuilds from the constructor arguments, so it also works after a one-shot strategy has turned the
space into a supernet in place.
"""
from __future__ import annotations

import warnings
from functools import partial
from typing import Any, Dict, Optional, Sequence

warnings.filterwarnings('ignore', message='.*is found to be not a nn.Module.*')

import torch
import torch.nn as nn
from nni.nas.nn.pytorch import Cell, ModelSpace
from nni.nas.space import current_model, model_context

from .errors import ConfigError
from .genotypes import Genotype
from .io import load_yaml
from .networks import (
    NetworkForwardMixin,
    apply_precision_rule,
    build_fixed_body,
    build_stem,
    network_family,
    reduction_indices,
)
from .ops import PRIMITIVES, BNConvReLU, check_ops, expand_op_set, make_op
from .paths import resolve_named_file, search_spaces_dir
from .quant import BinaryConv2d, QuantizerSpec

__all__ = ['BNASSpace', 'CellInputs', 'CellOutput', 'SPACE_KEYS', 'load_space_config']

SPACE_KEYS = ('dataset', 'init_channels', 'layers', 'num_nodes', 'ops', 'num_classes', 'binarizer', 'activation',
              'precision_rule', 'op_set', 'nonlinearity', 'shortcut')


class CellInputs(nn.Module):
    """Search-time preprocessing of c_{k-2} and c_{k-1}: full-precision BN -> conv -> ReLU (non-affine);
    a 3x3 stride-2 conv on c_{k-2} when the previous cell reduced."""

    def __init__(self, C_pp: int, C_p: int, C: int, reduction_prev: bool) -> None:
        super().__init__()
        fp = dict(affine=False, binarizer=None, activation='identity')
        if reduction_prev:
            self.preprocess0 = BNConvReLU(C_pp, C, 3, 2, 1, **fp)
        else:
            self.preprocess0 = BNConvReLU(C_pp, C, 1, 1, 0, **fp)
        self.preprocess1 = BNConvReLU(C_p, C, 1, 1, 0, **fp)

    def forward(self, inputs: list) -> list:
        return [self.preprocess0(inputs[0]), self.preprocess1(inputs[1])]


class CellOutput(nn.Module):
    """The inter-cell residual added to the concatenated nodes: identity in normal cells,
    full-precision BN + 2x2 stride-2 conv (with bias) in reduction cells, nothing in cell 0."""

    def __init__(self, cell_index: int, reduction: bool, C_p: int, C_out: int) -> None:
        super().__init__()
        self.cell_index = cell_index
        self.reduction = reduction
        if reduction:
            self.preprocess_res = nn.Sequential(
                nn.BatchNorm2d(C_p, affine=True),
                BinaryConv2d(C_p, C_out, kernel_size=2, stride=2, bias=True, binarizer=None))

    def forward(self, this_cell: torch.Tensor, inputs: list) -> torch.Tensor:
        if self.cell_index == 0:
            return this_cell
        return this_cell + (self.preprocess_res(inputs[1]) if self.reduction else inputs[1])


def _candidate(node_index: int, op_index: int, input_index: Optional[int], *, name: str, C: int, reduction: bool,
               **block: Any) -> nn.Module:
    # input_index is None while the space is built; an int when an edge is materialised
    stride = 2 if reduction and (input_index is None or input_index < 2) else 1
    return make_op(name, C, stride, search=True, **block)


class BNASSpace(NetworkForwardMixin, ModelSpace):
    """BNAS cell space (see the module docstring).

    Attributes
    ----------
    ops : tuple of str
        The candidate ops, in alpha column order (default: all seven ``PRIMITIVES``).
    num_nodes : int
        Intermediate nodes per cell (4 in the paper); 2 inputs per node.
    family : str
        ``'cifar'`` (3x3 stem, 32x32 input) or ``'imagenet'`` (DARTS ImageNet stem).
    cells : nn.ModuleList
        NNI ``Cell`` modules when unfrozen, :class:`~bnas_nni.networks.FixedCell` when frozen.
    """

    def __init__(self, *, dataset: str = 'cifar10', init_channels: int = 16, layers: int = 8, num_nodes: int = 4,
                 ops: Sequence[str] = PRIMITIVES, num_classes: int = 10, binarizer: QuantizerSpec = 'xnor',
                 activation: QuantizerSpec = 'ste_sign', precision_rule: str = 'standard',
                 nonlinearity: QuantizerSpec = 'relu', shortcut: bool = False) -> None:
        super().__init__()
        self.ops = check_ops(list(ops), where='the space')
        if len(self.ops) < 1:
            raise ConfigError('the space needs at least one op')
        if layers < 1 or num_nodes < 1 or init_channels < 2:
            raise ConfigError('layers and num_nodes must be >= 1 and init_channels >= 2')
        self.num_nodes = num_nodes
        self.family = network_family(dataset)
        self.dataset = dataset
        block = dict(binarizer=binarizer, activation=activation, nonlinearity=nonlinearity, shortcut=bool(shortcut))
        arch = current_model()
        if arch is not None and 'normal/op_2_0' in arch:
            genotype = Genotype.from_arch_dict(arch)
            outside = genotype.ops_used() - set(self.ops)
            if outside:
                raise ConfigError(f'architecture uses ops {sorted(outside)} outside this space ({", ".join(self.ops)})')
            self.genotype = genotype
            build_fixed_body(self, genotype, C=init_channels, layers=layers, num_classes=num_classes,
                             family=self.family, **block)
            apply_precision_rule(self, precision_rule, num_skip=3 if self.family == 'imagenet' else 1,
                                 binarizer=binarizer)
        else:
            self._build_supernet(init_channels, layers, num_classes, block)

    def _build_supernet(self, C: int, layers: int, num_classes: int, block: Dict[str, Any]) -> None:
        stems, C_pp, C_p, reduction_prev = build_stem(self.family, C)
        for name, m in stems.items():
            setattr(self, name, m)
        self.cells = nn.ModuleList()
        C_curr = C
        for i in range(layers):
            reduction = i in reduction_indices(layers)
            if reduction:
                C_curr *= 2
            candidates = {name: partial(_candidate, name=name, C=C_curr, reduction=reduction, **block)
                          for name in self.ops}
            C_out = self.num_nodes * C_curr
            self.cells.append(Cell(candidates, num_nodes=self.num_nodes, num_ops_per_node=2, num_predecessors=2,
                                   merge_op='all', preprocessor=CellInputs(C_pp, C_p, C_curr, reduction_prev),
                                   postprocessor=CellOutput(i, reduction, C_p, C_out),
                                   label='reduce' if reduction else 'normal'))
            reduction_prev = reduction
            C_pp, C_p = C_p, C_out
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_p, num_classes)

    def freeze(self, sample: Dict[str, Any]) -> 'BNASSpace':
        """The derived network for ``sample`` (an NNI architecture dict), rebuilt from scratch."""
        with model_context(sample):
            return type(self)(*self.trace_args, **self.trace_kwargs)

    @classmethod
    def from_config(cls, config: str | Dict[str, Any] = 'bnas', **overrides: Any) -> 'BNASSpace':
        """Build from a ``search_spaces/*.yaml`` name/path or a mapping, with keyword overrides."""
        return cls(**load_space_config(config, **overrides))


def load_space_config(config: str | Dict[str, Any] = 'bnas', **overrides: Any) -> Dict[str, Any]:
    """Resolve a space config (YAML name/path or mapping) plus overrides into ``BNASSpace`` kwargs."""
    if isinstance(config, dict):
        data, where = dict(config), 'space config'
    else:
        path = resolve_named_file(config, search_spaces_dir(), 'search space')
        data, where = load_yaml(path) or {}, str(path)
        if not isinstance(data, dict):
            raise ConfigError(f'{where}: a search space must be a mapping of {", ".join(SPACE_KEYS)}')
    data.pop('description', None)
    data.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(data) - set(SPACE_KEYS))
    if unknown:
        raise ConfigError(f'{where}: unknown keys {unknown}; allowed: {", ".join(SPACE_KEYS)}')
    if 'ops' in data:
        data['ops'] = check_ops(list(data['ops']), where=where)
    return expand_op_set(data)          # op_set: react -> its binarizer, activation, nonlinearity (unless given)
