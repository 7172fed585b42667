"""Fixed BNAS networks (CIFAR and ImageNet families) built from a genotype.

Full-precision rule (one place, ``standard``): the stem convs, the residual (``preprocess_res``)
convs of reduction cells and the classifier keep real weights; every other conv is binary. The
official release's two rules are reproduced by :func:`apply_precision_rule` for checkpoint
compatibility:

* ``official-2020-11`` (HEAD ``675ecc7``): the ``num_skip`` leading convs, the residual convs *and*
  the last ``k`` convs in module order (``k`` = number of residual convs) stay full precision; the
  last group is an artefact of the index range in ``bin_utils.BinOp``;
* ``official-2020-08`` (first release): the name filter is ineffective, so residual convs are
  binarized; the ``num_skip`` leading and the last ``k`` convs stay full precision.

Module names follow the official state-dict layout (``stem``, ``cells.N.preprocess0``,
``cells.N.ops.K.op.0``, ``preprocess_res.1``, ``classifier``) up to two renames handled by
:mod:`bnas_nni.checkpoints` (``_ops`` -> ``ops``; ``preprocess*_red`` -> ``preprocess*``).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn

from .errors import ConfigError
from .genotypes import Genotype, load_genotype
from .io import load_yaml
from .ops import BNConvReLU, binary_block, expand_op_set, make_op
from .paths import search_spaces_dir
from .quant import BinaryConv2d, Quantizer, QuantizerSpec, make_activation, make_binarizer, make_nonlinearity

__all__ = ['FixedCell', 'BNASNetwork', 'drop_path', 'build_model', 'load_model_configs', 'model_config', 'check_block',
           'apply_precision_rule', 'PRECISION_RULES', 'count_parameters', 'network_family', 'reduction_indices']

PRECISION_RULES = ('standard', 'official-2020-11', 'official-2020-08')
FAMILIES = ('cifar', 'imagenet')


def network_family(dataset: str) -> str:
    """ImageNet-style stems for ImageNet-like data; the CIFAR stem for 32x32 data."""
    return 'imagenet' if dataset.lower() in ('imagenet', 'imagefolder') else 'cifar'


def reduction_indices(layers: int) -> tuple:
    return (layers // 3, 2 * layers // 3)


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Per-sample drop path, out of place (the official in-place version fails on modern torch)."""
    if drop_prob <= 0.0:
        return x
    keep = 1.0 - drop_prob
    mask = torch.empty(x.size(0), 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x / keep * mask


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class FixedCell(nn.Module):
    """A derived BNAS cell: two ops per node, concat of the nodes, plus the inter-cell residual
    (identity in normal cells, BN + 2x2 stride-2 conv with bias in reduction cells, none in cell 0)."""

    def __init__(self, genotype: Genotype, cell_index: int, C_pp: int, C_p: int, C: int, reduction: bool,
                 reduction_prev: bool, *, family: str = 'cifar', binarizer: QuantizerSpec = 'xnor',
                 activation: QuantizerSpec = 'ste_sign', nonlinearity: QuantizerSpec = 'relu',
                 shortcut: bool = False) -> None:
        super().__init__()
        q = dict(binarizer=binarizer, activation=activation, nonlinearity=nonlinearity, shortcut=shortcut)
        self.cell_index = cell_index
        self.reduction = reduction
        if reduction_prev:
            # the official CIFAR net uses a non-affine BN here; the ImageNet net an affine one
            self.preprocess0 = binary_block(C_pp, C, 3, 2, 1, affine=family == 'imagenet', **q)
        else:
            self.preprocess0 = binary_block(C_pp, C, 1, 1, 0, **q)
        self.preprocess1 = binary_block(C_p, C, 1, 1, 0, **q)
        entries = genotype.reduce if reduction else genotype.normal
        concat = genotype.reduce_concat if reduction else genotype.normal_concat
        self.multiplier = len(concat)
        if reduction:
            self.preprocess_res = nn.Sequential(
                nn.BatchNorm2d(C_p, affine=True),
                BinaryConv2d(C_p, self.multiplier * C, kernel_size=2, stride=2, bias=True, binarizer=None))
        self.ops = nn.ModuleList(make_op(op, C, 2 if reduction and j < 2 else 1, **q) for op, j in entries)
        self.indices = tuple(j for _, j in entries)
        self.concat = tuple(concat)
        self.op_names = tuple(op for op, _ in entries)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float = 0.0) -> torch.Tensor:
        res = s1
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        apply_drop = self.training and drop_prob > 0.0
        for i in range(len(self.ops) // 2):
            node = 0
            for k in (2 * i, 2 * i + 1):
                h = self.ops[k](states[self.indices[k]])
                node = node + (drop_path(h, drop_prob) if apply_drop else h)
            states.append(node)
        out = torch.cat([states[i] for i in self.concat], dim=1)
        if self.cell_index == 0:
            return out
        return out + (self.preprocess_res(res) if self.reduction else res)


def build_stem(family: str, C: int):
    """Full-precision stems. CIFAR: BN -> 3x3 conv -> ReLU to 3C channels. ImageNet: the DARTS stem."""
    if family == 'cifar':
        return {'stem': BNConvReLU(3, 3 * C, 3, 1, 1, affine=True, binarizer=None,
                                   activation='identity')}, 3 * C, 3 * C, False
    fp = dict(bias=False, binarizer=None)
    stem0 = nn.Sequential(
        BinaryConv2d(3, C // 2, 3, stride=2, padding=1, **fp), nn.BatchNorm2d(C // 2), nn.ReLU(),
        BinaryConv2d(C // 2, C, 3, stride=2, padding=1, **fp), nn.BatchNorm2d(C))
    stem1 = nn.Sequential(nn.ReLU(), BinaryConv2d(C, C, 3, stride=2, padding=1, **fp), nn.BatchNorm2d(C))
    return {'stem0': stem0, 'stem1': stem1}, C, C, True


class NetworkForwardMixin:
    """Forward shared by :class:`BNASNetwork` and a frozen :class:`bnas_nni.space.BNASSpace`."""

    drop_path_prob: float = 0.0

    def run_stem(self, x: torch.Tensor):
        if hasattr(self, 'stem0'):
            s0 = self.stem0(x)
            return s0, self.stem1(s0)
        s = self.stem(x)
        return s, s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0, s1 = self.run_stem(x)
        for cell in self.cells:
            if isinstance(cell, FixedCell):
                s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            else:
                s0, s1 = s1, cell(s0, s1)
        out = self.global_pooling(s1)
        return self.classifier(out.flatten(1))


def build_fixed_body(module: nn.Module, genotype: Genotype, *, C: int, layers: int, num_classes: int,
                     family: str, binarizer: QuantizerSpec, activation: QuantizerSpec,
                     nonlinearity: QuantizerSpec = 'relu', shortcut: bool = False) -> None:
    """Attach stem, cells, pooling and classifier of a fixed network to ``module``."""
    if family not in FAMILIES:
        raise ConfigError(f'unknown network family {family!r}; choose one of {FAMILIES}')
    if binarizer is not None:
        make_binarizer(binarizer, channels=1)     # a wrong name or option fails here, in one line
    make_activation(activation, channels=1)
    make_nonlinearity(nonlinearity, channels=1)
    stems, C_pp, C_p, reduction_prev = build_stem(family, C)
    for name, m in stems.items():
        setattr(module, name, m)
    cells = nn.ModuleList()
    C_curr = C
    for i in range(layers):
        reduction = i in reduction_indices(layers)
        if reduction:
            C_curr *= 2
        cell = FixedCell(genotype, i, C_pp, C_p, C_curr, reduction, reduction_prev, family=family,
                         binarizer=binarizer, activation=activation, nonlinearity=nonlinearity, shortcut=shortcut)
        cells.append(cell)
        reduction_prev = reduction
        C_pp, C_p = C_p, cell.multiplier * C_curr
    module.cells = cells
    module.global_pooling = nn.AdaptiveAvgPool2d(1)
    module.classifier = nn.Linear(C_p, num_classes)


class BNASNetwork(NetworkForwardMixin, nn.Module):
    """A derived BNAS network.

    Attributes: ``stem`` (CIFAR) or ``stem0``/``stem1`` (ImageNet), ``cells`` (``FixedCell``s with
    reductions at ``layers // 3`` and ``2 * layers // 3``), ``global_pooling``, ``classifier``, and
    ``drop_path_prob`` (set by the trainer each epoch).

    ``binarizer``, ``activation``, ``nonlinearity`` and ``shortcut`` choose the binary block (see
    :mod:`bnas_nni.ops`; the defaults are the paper's ops, ``op_set: react`` in a model config the ReActNet
    ones).
    """

    def __init__(self, genotype: Genotype | str, *, init_channels: int = 36, layers: int = 20, num_classes: int = 10,
                 dataset: str = 'cifar10', binarizer: QuantizerSpec = 'xnor', activation: QuantizerSpec = 'ste_sign',
                 precision_rule: str = 'standard', num_skip: Optional[int] = None,
                 nonlinearity: QuantizerSpec = 'relu', shortcut: bool = False) -> None:
        super().__init__()
        self.genotype = load_genotype(genotype)
        self.family = network_family(dataset)
        build_fixed_body(self, self.genotype, C=init_channels, layers=layers, num_classes=num_classes,
                         family=self.family, binarizer=binarizer, activation=activation, nonlinearity=nonlinearity,
                         shortcut=bool(shortcut))
        if num_skip is None:
            num_skip = 3 if self.family == 'imagenet' else 1
        apply_precision_rule(self, precision_rule, num_skip=num_skip, binarizer=binarizer)
        #: plain-types constructor arguments: ``BNASNetwork.from_config(net.config)`` rebuilds this network
        self.config = {'genotype': self.genotype.to_dict(), 'init_channels': int(init_channels), 'layers': int(layers),
                       'num_classes': int(num_classes), 'dataset': str(dataset), 'binarizer': _plain_spec(binarizer),
                       'activation': _plain_spec(activation), 'precision_rule': precision_rule,
                       'num_skip': int(num_skip), 'nonlinearity': _plain_spec(nonlinearity),
                       'shortcut': bool(shortcut)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> 'BNASNetwork':
        """Rebuild a network from its :attr:`config` (as stored in bnas-nni checkpoints)."""
        cfg = dict(config)
        genotype = cfg.pop('genotype')
        if isinstance(genotype, Mapping):
            genotype = Genotype.from_dict(genotype, name=str(genotype.get('name') or ''))
        return cls(genotype, **cfg)


def _plain_spec(spec: QuantizerSpec) -> Any:
    """A quantizer spec as plain data (a name or a mapping) for configs and checkpoints."""
    if isinstance(spec, Quantizer):
        return spec.spec()
    if isinstance(spec, type) and issubclass(spec, Quantizer):
        return spec.name
    return dict(spec) if isinstance(spec, Mapping) else spec


def apply_precision_rule(model: nn.Module, rule: str, *, num_skip: int = 1, binarizer: QuantizerSpec = 'xnor',
                         search: bool = False) -> None:
    """Choose which convs of ``model`` binarize their weights (see the module docstring)."""
    if rule not in PRECISION_RULES:
        raise ConfigError(f'unknown precision rule {rule!r}; choose one of {", ".join(PRECISION_RULES)}')
    if rule == 'standard' or binarizer is None:
        return
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    excluded = lambda n: 'res' in n or (search and 'preprocess' in n)
    count = sum(1 for n, _ in convs if not excluded(n))
    for index, (n, m) in enumerate(convs, start=1):
        binary = num_skip + 1 <= index <= count
        if rule == 'official-2020-11':
            binary = binary and not excluded(n)
        if binary and not isinstance(m, BinaryConv2d):
            raise ConfigError(f'conv {n} cannot be binarized under rule {rule!r}')
        if isinstance(m, BinaryConv2d):
            m.binarizer = binarizer if binary else None


# --------------------------------------------------------------------------- model configs

_CONFIG_KEYS = {'genotype', 'dataset', 'init_channels', 'layers', 'num_classes', 'num_skip', 'binarizer',
                'activation', 'precision_rule', 'op_set', 'nonlinearity', 'shortcut'}


def load_model_configs() -> Dict[str, Dict[str, Any]]:
    data = load_yaml(search_spaces_dir() / 'models.yaml') or {}
    return {str(k): dict(v) for k, v in data.items()}


def model_config(name: str, **overrides: Any) -> Dict[str, Any]:
    """The named config (``bnas-a``, ``bnas-d`` .. ``bnas-h``) with ``overrides`` applied."""
    configs = load_model_configs()
    if name not in configs:
        raise ConfigError(f'unknown model config {name!r}; choose one of {", ".join(configs)}')
    cfg = dict(configs[name])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(cfg) - _CONFIG_KEYS
    if unknown:
        raise ConfigError(f'unknown model config keys {sorted(unknown)}; allowed: {sorted(_CONFIG_KEYS)}')
    check_block(cfg)
    return cfg


def check_block(cfg: Mapping[str, Any]) -> None:
    """The op set and the block's quantizer / nonlinearity specs of a model config exist and take their
    options (cheap: one-channel modules), so a typo fails before a network is built."""
    block = expand_op_set({k: cfg.get(k) for k in ('op_set', 'binarizer', 'activation', 'nonlinearity')})
    if block.get('binarizer') is not None:
        make_binarizer(block['binarizer'], channels=1)
    if block.get('activation') is not None:
        make_activation(block['activation'], channels=1)
    if block.get('nonlinearity') is not None:
        make_nonlinearity(block['nonlinearity'], channels=1)


def build_model(config: str | Mapping[str, Any], **overrides: Any) -> BNASNetwork:
    """Build a network from a config name or mapping (keys as in ``search_spaces/models.yaml``)."""
    cfg = model_config(config, **overrides) if isinstance(config, str) else {**config, **{
        k: v for k, v in overrides.items() if v is not None}}
    unknown = set(cfg) - _CONFIG_KEYS
    if unknown:
        raise ConfigError(f'unknown model config keys {sorted(unknown)}; allowed: {sorted(_CONFIG_KEYS)}')
    if 'genotype' not in cfg:
        raise ConfigError('model config needs a "genotype" (a name in search_spaces/genotypes or a YAML path)')
    cfg = expand_op_set(cfg)            # op_set: react -> its binarizer, activation, nonlinearity (unless given)
    return BNASNetwork(cfg['genotype'], **{k: v for k, v in cfg.items() if k != 'genotype'})
