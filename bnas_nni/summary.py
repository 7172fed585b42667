"""Model summary: parameters, binary vs full-precision MACs, OPs and packed model size.

``bnas-nni summary bnas-a`` (or any model config, genotype name or genotype YAML) builds the network,
runs one real forward pass at the model's input size (32x32 for the CIFAR family, 224x224 for
ImageNet) with hooks on every ``Conv2d`` and ``Linear``, and reports:

* **parameters**, per layer (``--verbose``) and in total;
* **binary MACs** (= BOPs): MACs of convs whose ``binarizer`` is set. The weight bit width comes from
  conv's binarizer module (its ``precision``); the activation side is 1 bit because
  every binary op binarizes its input with sign. BOPs = MACs x weight bits (= MACs for 1-bit weights);
* **full-precision MACs** (= FLOPs): all other convs plus the classifier ``Linear``; pools, BN,
  ReLU and additions are not counted (the usual convention), nor are the elementwise RSign shift,
  RPReLU and ReActNet shortcut of the ``react`` op set (``--op-set react``), whose thresholds and
  slopes count as full-precision parameters;
* **OPs = BOPs / 64 + FLOPs** (the Bi-Real / XNOR-Net convention);
* **model size**: binary weights packed at their bit width plus one fp32 scale per output filter
  when the binarizer scales (its ``scaled`` attribute), and
  fp32 for everything else that inference needs (full-precision weights, biases, BN affine
  parameters and running statistics); compared with the same model stored all in fp32.
* **latency** on the packed engine, when this machine has a cached latency model of the network
  (``bnas-nni latency profile``) or ``--latency FILE`` names one: predicted, and with ``--measure``
  measured (min of several runs) at ``--batch`` and ``--threads``.

Reference figures (``bnas-original.md`` §5.4, counted from the official code at HEAD) and ours:

=====================  ===========  =======  =======  =========================================
model, rule            binary MACs  FP MACs  OPs      vs §5.4
=====================  ===========  =======  =======  =========================================
BNAS-A, 2020-11        6.73e8       1.12e8   1.22e8   equal (the rule §5.4 counts with)
BNAS-A, standard       6.97e8       8.79e7   9.88e7   the last cell's two convs are binary
BNAS-A, 2020-08        7.58e8       2.69e7   3.87e7   residual convs binary; last two convs FP
bnas-d, 2020-11        2.87e9       3.62e8   4.07e8   equal
bnas-d, standard       2.93e9       3.04e8   3.50e8   the last cell's two convs are binary
bnas-d, 2020-08        3.08e9       1.56e8   2.05e8   residual convs binary; last two convs FP
=====================  ===========  =======  =======  =========================================

Our default rule (``standard``) keeps exactly the stem convs, the residual convs of reduction cells
and the classifier in full precision. The official HEAD rule also leaves the last ``k`` convs in
module order in full precision (``k`` = number of residual convs, an artefact of its index range);
``official-2020-08`` binarizes the residual convs instead. Use ``--precision-rule`` to reproduce
either.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from .errors import ConfigError
from .genotypes import list_genotypes, load_genotype
from .networks import PRECISION_RULES, build_model, load_model_configs
from .quant import BinaryConv2d

__all__ = ['LayerStats', 'ModelSummary', 'summarize', 'input_size_for', 'format_summary',
           'build_from_spec', 'register']

BOPS_PER_OP = 64
FP_BITS = 32


@dataclass
class LayerStats:
    """One module that owns parameters/buffers or does MACs."""

    name: str
    kind: str
    params: int = 0
    weight_bits: int = FP_BITS
    binarizer: Optional[str] = None
    binary_macs: int = 0
    fp_macs: int = 0
    size_bits: int = 0
    fp32_bits: int = 0
    output_shape: Optional[List[int]] = None


@dataclass
class ModelSummary:
    """Totals and per-layer rows; MACs are per image."""

    input_shape: List[int]
    params: int
    binary_macs: int
    fp_macs: int
    bops: int
    ops: float
    size_bytes: float
    fp32_bytes: float
    binary_convs: int
    fp_convs: int
    linears: int
    binarizers: List[str]
    layers: List[LayerStats] = field(default_factory=list)

    @property
    def compression(self) -> float:
        return self.fp32_bytes / self.size_bytes if self.size_bytes else float('nan')

    def to_dict(self, layers: bool = True) -> Dict[str, Any]:
        out = asdict(self)
        out['compression'] = self.compression
        if not layers:
            out.pop('layers')
        return out


def input_size_for(model: nn.Module) -> int:
    """224 for ImageNet-family networks, 32 for the CIFAR family."""
    family = getattr(model, 'family', None)
    if family is None:
        family = 'imagenet' if hasattr(model, 'stem0') else 'cifar'
    return 224 if family == 'imagenet' else 32


def _is_binary(m: nn.Module) -> bool:
    return isinstance(m, BinaryConv2d) and m.binarizer is not None


def _storage_bits(m: nn.Module) -> tuple:
    """(packed bits, fp32 bits) of the tensors ``m`` itself owns (not its children)."""
    packed = fp32 = 0
    for pname, p in m.named_parameters(recurse=False):
        fp32 += p.numel() * FP_BITS
        if pname == 'weight' and _is_binary(m):
            packed += p.numel() * m.weight_quantizer.precision
            if m.weight_quantizer.scaled:
                packed += p.shape[0] * FP_BITS
        else:
            packed += p.numel() * FP_BITS
    for _, b in m.named_buffers(recurse=False):
        if b is not None and b.is_floating_point():  # running stats; not the integer step counter
            fp32 += b.numel() * FP_BITS
            packed += b.numel() * FP_BITS
    return packed, fp32


@torch.no_grad()
def summarize(model: nn.Module, input_size: Optional[int] = None, *, in_channels: int = 3) -> ModelSummary:
    """Count parameters, MACs (hooks on a real forward of one image) and storage of ``model``."""
    size = input_size or input_size_for(model)
    rows: Dict[str, LayerStats] = {}
    handles = []

    def hook(name: str):
        def fn(m: nn.Module, inputs, output) -> None:
            row = rows[name]
            batch = output.shape[0]
            if isinstance(m, nn.Conv2d):
                macs = output.numel() // batch * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
            else:
                macs = output.numel() // batch * m.in_features
            if _is_binary(m):
                row.binary_macs += macs
            else:
                row.fp_macs += macs
            row.output_shape = list(output.shape[1:])
        return fn

    for name, m in model.named_modules():
        owns = any(True for _ in m.parameters(recurse=False)) or any(
            b is not None and b.is_floating_point() for b in m.buffers(recurse=False))
        computes = isinstance(m, (nn.Conv2d, nn.Linear))
        if not (owns or computes):
            continue
        packed, fp32 = _storage_bits(m)
        row = LayerStats(name=name, kind=type(m).__name__, params=sum(p.numel() for p in m.parameters(recurse=False)),
                         size_bits=packed, fp32_bits=fp32)
        if _is_binary(m):
            row.binarizer = m.binarizer
            row.weight_bits = m.weight_quantizer.precision
        rows[name] = row
        if computes:
            handles.append(m.register_forward_hook(hook(name)))

    was_training = model.training
    model.eval()
    try:
        device = next((p.device for p in model.parameters()), torch.device('cpu'))
        x = torch.zeros(1, in_channels, size, size, device=device)
        model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    layers = list(rows.values())
    binary_macs = sum(r.binary_macs for r in layers)
    bops = sum(r.binary_macs * r.weight_bits for r in layers)
    fp_macs = sum(r.fp_macs for r in layers)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return ModelSummary(
        input_shape=[1, in_channels, size, size],
        params=sum(p.numel() for p in model.parameters()),
        binary_macs=binary_macs, fp_macs=fp_macs, bops=bops, ops=bops / BOPS_PER_OP + fp_macs,
        size_bytes=sum(r.size_bits for r in layers) / 8, fp32_bytes=sum(r.fp32_bits for r in layers) / 8,
        binary_convs=sum(1 for _, m in convs if _is_binary(m)),
        fp_convs=sum(1 for _, m in convs if not _is_binary(m)),
        linears=sum(1 for m in model.modules() if isinstance(m, nn.Linear)),
        binarizers=sorted({m.binarizer for _, m in convs if _is_binary(m)}),
        layers=layers,
    )


# --------------------------------------------------------------------------- text output


def _mib(nbytes: float) -> str:
    return f'{nbytes / 2**20:.2f} MiB'


def format_summary(s: ModelSummary, title: str = '', verbose: bool = False) -> str:
    """Human-readable report; ``verbose`` adds one row per layer."""
    lines = []
    if title:
        lines.append(title)
    lines.append(f'input                  {"x".join(map(str, s.input_shape))}')
    lines.append(f'parameters             {s.params:,}')
    bits = {r.binarizer: r.weight_bits for r in s.layers if r.binarizer}
    bins = ', '.join(f'{b} ({bits.get(b, 1)}-bit)' for b in s.binarizers) or 'none'
    lines.append(f'binary MACs (BOPs)     {s.binary_macs:.3e}  ({s.binary_convs} binary convs; binarizer {bins})')
    lines.append(f'full-precision MACs    {s.fp_macs:.3e}  ({s.fp_convs} full-precision convs, {s.linears} linear)')
    lines.append(f'OPs = BOPs/64 + FLOPs  {s.ops:.3e}')
    lines.append(f'model size             {_mib(s.size_bytes)} with packed binary weights vs {_mib(s.fp32_bytes)} '
                 f'all fp32 ({s.compression:.1f}x smaller)')
    if verbose:
        lines.append('')
        header = (f'{"layer":<40} {"type":<14} {"params":>10} {"bits":>4} {"binary MACs":>12} {"FP MACs":>12} '
                  f'{"size KiB":>9}  output')
        lines.append(header)
        lines.append('-' * len(header))
        for r in s.layers:
            shape = 'x'.join(map(str, r.output_shape)) if r.output_shape else ''
            lines.append(f'{r.name or "<model>":<40} {r.kind:<14} {r.params:>10,} {r.weight_bits:>4} '
                         f'{r.binary_macs:>12,} {r.fp_macs:>12,} {r.size_bits / 8192:>9.1f}  {shape}')
    return '\n'.join(lines)


# --------------------------------------------------------------------------- CLI

def _registered_classes(dataset: str) -> Optional[int]:
    """The class count the dataset registry knows without reading data (ImageNet's 1000 from its family);
    None for one that counts its folders (``folder``). An unknown name is one line listing the known ones."""
    from .data import get_dataset_spec
    spec = get_dataset_spec(dataset)
    if spec.num_classes is not None:
        return int(spec.num_classes)
    return 1000 if spec.family == 'imagenet' else None


def _looks_like_path(spec: str) -> bool:
    """A YAML file name or a path (rather than a config or genotype name)."""
    return spec.endswith(('.yaml', '.yml')) or os.sep in spec or '/' in spec or Path(spec).is_file()


def build_from_spec(model: str, *, genotype: Optional[str] = None, layers: Optional[int] = None,
                    init_channels: Optional[int] = None, precision_rule: Optional[str] = None,
                    dataset: Optional[str] = None, num_classes: Optional[int] = None,
                    binarizer: Optional[str] = None, op_set: Optional[str] = None) -> tuple:
    """Build a network from a model config name or a genotype (name or YAML path).

    Returns ``(network, description)``. Flags override the config; a genotype alone uses CIFAR-10,
    C=36, L=20 unless told otherwise.
    """
    overrides = dict(genotype=genotype, layers=layers, init_channels=init_channels, precision_rule=precision_rule,
                     dataset=dataset, num_classes=num_classes, binarizer=binarizer, op_set=op_set)
    configs = load_model_configs()
    if model in configs:
        cfg = {**configs[model], **{k: v for k, v in overrides.items() if v is not None}}
        if dataset is not None and num_classes is None:
            cfg['num_classes'] = _registered_classes(dataset) or cfg.get('num_classes', 10)
        label = model
    else:
        spec = genotype or model
        if _looks_like_path(spec):
            # a file the user wrote: its own problem (YAML syntax at file:line, unknown op and the allowed
            # ops, an entry without its input) is the message, not "not a model config"
            if not Path(spec).is_file():
                raise ConfigError(f'genotype file not found: {spec}; check the path (model configs: '
                                  f'{", ".join(configs)})')
            g = load_genotype(spec)
        else:
            try:
                g = load_genotype(spec)
            except ConfigError:
                raise ConfigError(f'unknown model {model!r}: not a model config ({", ".join(configs)}) nor a '
                                  f'genotype name ({", ".join(list_genotypes())}) or genotype YAML file') from None
        ds = dataset or 'cifar10'
        cfg = {'genotype': g, 'dataset': ds, 'init_channels': init_channels or 36, 'layers': layers or 20,
               'num_classes': num_classes or _registered_classes(ds) or 10}
        if precision_rule is not None:
            cfg['precision_rule'] = precision_rule
        if binarizer is not None:
            cfg['binarizer'] = binarizer
        if op_set is not None:
            cfg['op_set'] = op_set
        label = g.name or model
    for key in ('layers', 'init_channels', 'num_classes'):
        if cfg.get(key) is not None and int(cfg[key]) < 1:
            raise ConfigError(f'--{key.replace("_", "-")} must be a positive integer, got {cfg[key]}')
    net = build_model(cfg)
    gname = getattr(net.genotype, 'name', '') or str(cfg['genotype'])
    desc = (f'{label}: genotype {gname}, {net.family}, C={cfg["init_channels"]}, L={cfg["layers"]}, '
            f'{cfg["num_classes"]} classes, precision rule {cfg.get("precision_rule", "standard")}')
    return net, desc


def latency_report(net: nn.Module, *, table: Optional[str] = None, measure: bool = False, batch: int = 1,
                   threads: int = 2) -> Dict[str, Any]:
    """Predicted latency of ``net`` on the packed engine from ``table`` (a saved latency model) or the cached model
    of this machine (``{}`` when there is none), and with ``measure`` the engine's measured latency."""
    from .latency import LatencyModel
    from .latency.profile import cached_model, measure_genotypes

    if batch < 1 or threads < 1:
        raise ConfigError(f'--batch and --threads must be positive integers, got {batch} and {threads}')
    cfg = getattr(net, 'config', None) or {}
    genotype = getattr(net, 'genotype', None)
    if genotype is None or cfg.get('precision_rule', 'standard') != 'standard':
        if table or measure:
            raise ConfigError('latency is modelled for derived networks under the standard precision rule; drop '
                              '--precision-rule to use --latency or --measure')
        return {}
    network = dict(init_channels=int(cfg['init_channels']), layers=int(cfg['layers']), image_size=input_size_for(net),
                   num_classes=int(cfg['num_classes']), family=net.family,
                   block={k: cfg[k] for k in ('binarizer', 'activation', 'nonlinearity', 'shortcut') if k in cfg})
    out: Dict[str, Any] = {}
    model = LatencyModel.load(table) if table else cached_model(
        ops=sorted(genotype.ops_used()), num_nodes=genotype.num_nodes, batch=batch, threads=threads, cover=True,
        **network)
    if model is not None:
        m = model.meta.get('machine') or {}
        n = model.meta.get('network') or {}
        out.update(predicted_ms=model.predict(genotype), batch=m.get('batch', batch), threads=m.get('threads', threads),
                   isa=m.get('isa'), table_network={k: n.get(k) for k in ('init_channels', 'layers', 'image_size')})
        batch, threads = int(out['batch']), int(out['threads'])
    if measure:
        out['measured_ms'] = measure_genotypes([genotype], batch=batch, threads=threads, **network)[0]
        out.setdefault('batch', batch)
        out.setdefault('threads', threads)
    return out


def _latency_line(lat: Dict[str, Any]) -> str:
    parts = []
    if 'predicted_ms' in lat:
        n = lat['table_network']
        parts.append(f"predicted {lat['predicted_ms']:.3f} ms (table: C={n['init_channels']}, {n['layers']} cells, "
                     f"{n['image_size']}px, {lat['isa']})")
    if 'measured_ms' in lat:
        parts.append(f"measured {lat['measured_ms']:.3f} ms")
    return f"Latency (packed engine, batch {lat['batch']}, {lat['threads']} threads): " + ', '.join(parts)


def _run(args: argparse.Namespace) -> int:
    net, desc = build_from_spec(args.model, genotype=args.genotype, layers=args.layers,
                                init_channels=args.init_channels, precision_rule=args.precision_rule,
                                dataset=args.dataset, num_classes=args.num_classes, binarizer=args.binarizer,
                                op_set=args.op_set)
    s = summarize(net)
    lat = latency_report(net, table=args.latency, measure=args.measure, batch=args.batch, threads=args.threads)
    if args.json:
        out = s.to_dict(layers=args.verbose)
        out['model'] = desc
        if lat:
            out['latency'] = lat
        print(json.dumps(out, indent=2))
    else:
        print(format_summary(s, title=desc, verbose=args.verbose))
        if lat:
            print(_latency_line(lat))
    return 0


def register(subparsers: Any) -> None:
    """Add ``bnas-nni summary``."""
    p = subparsers.add_parser('summary', help='parameters, binary/full-precision MACs, OPs and model size',
                              description='Parameters, binary vs full-precision MACs, OPs = BOPs/64 + FLOPs and '
                                          'model size (1-bit packed vs fp32) of a model config or genotype.')
    p.add_argument('model', metavar='MODEL',
                   help='model config (bnas-a, bnas-d .. bnas-h) or genotype name / YAML path')
    p.add_argument('--genotype', help='use this genotype instead of the config\'s')
    p.add_argument('--layers', type=int, help='number of cells L')
    p.add_argument('--init-channels', type=int, help='initial channels C')
    p.add_argument('--dataset', help='cifar10, cifar100 or imagenet (stem, classes and input size)')
    p.add_argument('--num-classes', type=int, help='classifier outputs')
    p.add_argument('--precision-rule', choices=PRECISION_RULES,
                   help='which convs stay full precision (default standard)')
    p.add_argument('--binarizer', help='weight binarizer from the registry (default xnor)')
    p.add_argument('--op-set', help='binary block: paper (default) or react (RSign, scaled_sign, RPReLU)')
    p.add_argument('--verbose', action='store_true', help='one row per layer')
    p.add_argument('--json', action='store_true', help='machine-readable output')
    p.add_argument('--latency', metavar='FILE',
                   help='predict latency with this latency model (default: the cached one of this machine, if any)')
    p.add_argument('--measure', action='store_true', help='also measure the latency on the packed engine')
    p.add_argument('--batch', type=int, default=1, help='batch size of the latency (default 1)')
    p.add_argument('--threads', type=int, default=2, help='engine threads of the latency (default 2)')
    p.set_defaults(func=_run)
