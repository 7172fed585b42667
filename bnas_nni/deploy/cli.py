"""``bnas-nni export``: a checkpoint as a packed 1-bit file or ONNX; ``--check`` reads a packed file back.

The network is rebuilt from the checkpoint (a bnas-nni checkpoint describes its own architecture;
``--model``/``--arch``/``--official`` as ``bnas-nni eval`` takes them for other files), converted, written
to a temporary file beside ``--out``, verified against the float model on random images and only then
renamed into place, so a failed export leaves no output file.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..cli import quiet_warnings
from ..errors import ConfigError
from ..io import atomic_path, check_output_file

__all__ = ['register']

_FLAGS = (
    ('--model', 'model', str, 'model config (search_spaces/models.yaml): bnas-a, bnas-d .. bnas-h'),
    ('--arch', 'genotype', str, 'genotype name or YAML path (overrides the model config\'s)'),
    ('--layers', 'layers', int, 'number of cells'),
    ('--init-channels', 'init_channels', int, 'initial channels C'),
    ('--num-classes', 'num_classes', int, 'classifier outputs'),
    ('--precision-rule', 'precision_rule', str, 'standard | official-2020-11 | official-2020-08'),
    ('--dataset', 'dataset', str, 'cifar10 | imagenet (network family) when building from --model'),
)
#: the float model and the engine may differ by float reassociation only (docs: Packed format and engine, Exactness)
TOLERANCE = 1e-4


def _mb(n: int) -> str:
    return f'{n / 1e6:.2f} MB' if n >= 1e5 else f'{n / 1e3:.1f} kB'


def _verify_images(family: str, in_channels: int, image_size: Any):
    # torch, the deploy machinery and onnxruntime are imported on use: keeps `bnas-nni --help` fast
    import torch

    size = image_size or (224 if family == 'imagenet' else 32)
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, in_channels, size, size, generator=g), size


def _float_logits(model, x):
    import torch

    with torch.no_grad():
        return model(x)


def _report_diff(what: str, diff: float) -> None:
    note = '' if diff <= TOLERANCE else (f'  (warning: above {TOLERANCE:g}; a value within float rounding of a sign '
                                         'threshold can flip; see the docs, Packed format and engine)')
    print(f'verified {what}: max |logit difference| vs the float model {diff:.2e}{note}')


def _cmd_export(args: argparse.Namespace) -> int:
    quiet_warnings()
    if args.check:
        return _cmd_check(args)
    if not args.checkpoint or not args.out:
        raise ConfigError('export needs --checkpoint and --out (or --check PACKED_FILE)')
    check_output_file(args.out, '--out', example='net.bnp')     # before the checkpoint is read
    from . import network_from_checkpoint, state_dict_bytes
    from .export import binary_part_sizes, describe_network, packed_description

    overrides = {key: getattr(args, key) for _, key, _, _ in _FLAGS if key != 'model'}
    model = network_from_checkpoint(args.checkpoint, model=args.model, official=args.official, **overrides)
    desc = describe_network(model)
    net = desc['network']
    x, size = _verify_images(net['family'], net['in_channels'], args.image_size)
    out = Path(args.out)
    fp32 = state_dict_bytes(model)
    if args.format == 'packed':
        from . import load
        from .format import write_packed

        packed = packed_description(desc)
        with atomic_path(out) as tmp:
            write_packed(packed, tmp)
            engine = load(tmp)
            if not args.no_verify:
                diff = float((engine(x) - _float_logits(model, x)).abs().max())
        sizes = binary_part_sizes(desc, packed)
        nbytes = out.stat().st_size
        print(f'wrote {out} (packed, {_mb(nbytes)}; fp32 state dict {_mb(fp32)}: {fp32 / nbytes:.1f}x smaller)')
        if sizes['packed_bytes']:
            print(f"binary convs: {sizes['binary_convs']}, {_mb(sizes['packed_bytes'])} packed (bits, scales, "
                  f"thresholds) vs {_mb(sizes['fp32_bytes'])} fp32 weights + BN: "
                  f"{sizes['fp32_bytes'] / sizes['packed_bytes']:.1f}x smaller")
        if not args.no_verify:
            _report_diff(f'on 2 random {size}x{size} images with the {engine.isa} kernels', diff)
        return 0
    from .onnx_export import network_to_onnx

    proto = network_to_onnx(desc, opset=args.opset, image_size=args.image_size)
    with atomic_path(out) as tmp:
        tmp.write_bytes(proto.SerializeToString())
        diff = None
        if not args.no_verify:
            try:
                import onnxruntime as ort
            except ImportError:
                print('onnxruntime is not installed; skipped the check against it')
            else:
                sess = ort.InferenceSession(str(tmp), providers=['CPUExecutionProvider'])
                y = sess.run(None, {'images': x.numpy()})[0]
                diff = float(abs(y - _float_logits(model, x).numpy()).max())
    nbytes = out.stat().st_size
    print(f'wrote {out} (ONNX opset {args.opset}, {_mb(nbytes)}; fp32 state dict {_mb(fp32)})')
    if diff is not None:
        _report_diff(f'with onnxruntime on 2 random {size}x{size} images', diff)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    import torch

    from . import load
    from .kernels import supported_isas

    engine = load(args.check)
    arch = engine.architecture
    g = (arch.get('genotype') or {}).get('name') or '<unnamed>'
    print(f"{args.check}: genotype {g}, {engine.family}, C={arch.get('init_channels')}, L={len(engine.cells)}, "
          f'{engine.num_classes} classes, {_mb(Path(args.check).stat().st_size)}')
    x, size = _verify_images(engine.family, engine.in_channels, args.image_size)
    ref = None
    for isa in supported_isas():
        engine.set_isa(isa)
        y = engine(x)
        ref = y if ref is None else ref
        same = 'identical' if torch.equal(y, ref) else f'max |difference| {float((y - ref).abs().max()):.2e}'
        print(f'  {isa:9s} logits on 2 random {size}x{size} images: {same}')
    return 0


def register(subparsers: Any) -> None:
    """Add ``export`` to the ``bnas-nni`` command line."""
    p = subparsers.add_parser('export', help='a checkpoint as a packed 1-bit file (CPU engine) or ONNX',
                              description='Export a checkpoint as a packed 1-bit file for the CPU engine, or as ONNX; '
                                          'the result is checked against the float model before it is renamed '
                                          'into place. --check reads a packed file back.')
    p.add_argument('--checkpoint', default=None, help='checkpoint file or run directory (bnas-nni, or the official '
                                                       'code\'s with --official)')
    p.add_argument('--format', choices=('packed', 'onnx'), default='packed', help='packed (default) or onnx')
    p.add_argument('--out', default=None, help='output file (e.g. model.bnp or model.onnx)')
    for flag, key, typ, help_ in _FLAGS:
        p.add_argument(flag, dest=key, type=typ, default=None, help=help_)
    p.add_argument('--official', action='store_true',
                   help='the checkpoint comes from gistvision/bnas (precision rule official-2020-08 unless '
                        '--precision-rule says otherwise)')
    p.add_argument('--opset', type=int, default=17, help='ONNX opset (>= 17)')
    p.add_argument('--image-size', type=int, default=None,
                   help='image size for the check (and a fixed ONNX input size); default 32 CIFAR, 224 ImageNet')
    p.add_argument('--no-verify', action='store_true', help='skip the comparison with the float model')
    p.add_argument('--check', default=None, metavar='PACKED_FILE',
                   help='instead of exporting: load a packed file and run it on every instruction-set path')
    p.set_defaults(func=_cmd_export)
