"""Latency on the packed engine: measure a space's latency model on this CPU, predict a genotype's latency.

``bnas-nni latency profile`` measures; ``bnas-nni latency predict`` predicts (and with ``--measure`` measures) the
latency of a genotype's derived network.

``profile`` writes the model to the per-machine cache (see :mod:`bnas_nni.latency.profile`), where search and
``bnas-nni summary`` find it, and with ``--out`` also to a file. ``predict`` reads ``--table FILE`` or the
cached model of ``--space`` (measuring it first when there is none).
"""
from __future__ import annotations

import argparse
import random
from typing import Any, Dict, Optional

from ..cli import quiet_warnings
from ..errors import ConfigError
from ..io import check_output_file

__all__ = ['register', 'format_model']

#: seed of the --holdout genotypes (the calibration genotypes come from seed 0)
HOLDOUT_SEED = 1000


def _space_network(args: argparse.Namespace) -> Dict[str, Any]:
    """measure_latency_model's keyword arguments for ``--space`` with the network flags applied."""
    from ..networks import network_family
    from ..space import load_space_config
    cfg = load_space_config(args.space)
    family = network_family(cfg.get('dataset', 'cifar10'))
    out = {'ops': tuple(cfg.get('ops') or ()), 'num_nodes': int(cfg.get('num_nodes', 4)),
           'init_channels': args.init_channels or int(cfg.get('init_channels', 16)),
           'layers': args.layers or int(cfg.get('layers', 8)),
           'image_size': args.image_size or (224 if family == 'imagenet' else 32),
           'num_classes': args.num_classes or int(cfg.get('num_classes', 10)), 'family': family,
           'block': {k: cfg[k] for k in ('binarizer', 'activation', 'nonlinearity', 'shortcut') if k in cfg}}
    if not out['ops']:
        from ..ops import PRIMITIVES
        out['ops'] = tuple(PRIMITIVES)
    return out


def format_model(model) -> str:
    """The model as a short report: machine, network, per-slot costs by input class, fixed part and fit."""
    meta = model.meta
    m, n = meta.get('machine', {}), meta.get('network', {})
    lines = [f"latency model: {m.get('cpu', '?')}, {m.get('isa', '?')} path, {m.get('threads', '?')} threads, "
             f"batch {m.get('batch', '?')}",
             f"network: {n.get('family', '?')}, C={n.get('init_channels', '?')}, {n.get('layers', '?')} cells, "
             f"{n.get('image_size', '?')}x{n.get('image_size', '?')}, {n.get('num_classes', '?')} classes, "
             f"{model.num_nodes} nodes, engine {meta.get('engine_version', '?')}"]
    per_slot = meta.get('per_slot_ms') or {}
    if per_slot:
        classes = [c for c in ('normal', 'reduce_s2', 'reduce_s1') if any(k.startswith(c + '/') for k in per_slot)]
        lines.append(f"{'op (ms per slot, all cells)':<28}" + ''.join(f'{c:>11}' for c in classes))
        for op in model.ops:
            if op == 'zeroise':
                continue
            lines.append(f'{op:<28}' + ''.join(f"{per_slot.get(f'{c}/{op}', float('nan')):>11.4f}" for c in classes))
    lines.append(f'fixed part: {model.fixed_ms:.3f} ms'
                 + (f" ({', '.join(f'{k} {v:.3f}' for k, v in meta['fixed_parts_ms'].items())} in one profiled run)"
                    if meta.get('fixed_parts_ms') else ''))
    fit = meta.get('fit') or {}
    if fit.get('calibration_genotypes'):
        before, after = fit.get('rel_error_before', {}), fit.get('rel_error_after', {})
        state = f"{fit.get('kind', 'none')}, chosen by leave-one-out error"
        lines.append(f"fit on {fit['calibration_genotypes']} random genotypes: scale normal "
                     f"{fit['scale']['normal']:.3f}, reduce {fit['scale']['reduce']:.3f}, offset "
                     f"{fit['offset_ms']:+.3f} ms ({state}"
                     f"); error median/worst {100 * before.get('median', 0):.1f}%/{100 * before.get('worst', 0):.1f}%"
                     f" -> {100 * after.get('median', 0):.1f}%/{100 * after.get('worst', 0):.1f}%")
    held = meta.get('holdout')
    if held:
        err = held['rel_error']
        lines.append(f"hold-out: {len(held['measured_ms'])} random genotypes timed with the probes, not fitted: "
                     f"prediction error median {100 * err['median']:.1f}%, worst {100 * err['worst']:.1f}%")
    lines.append(f"uniform expectation: {model.uniform_ms():.3f} ms; measured in {meta.get('measured_s', '?')} s, "
                 f"min of {meta.get('repeats', '?')}+ runs")
    return '\n'.join(lines)


def _holdout_genotypes(net: Dict[str, Any], count: int) -> list:
    if count < 0:
        raise ConfigError(f'--holdout is {count}; give the number of random genotypes to check the model on (>= 0)')
    from .profile import random_genotype
    rng = random.Random(HOLDOUT_SEED)
    return [random_genotype(net['ops'], net['num_nodes'], rng, name=f'holdout-{i}') for i in range(count)]


def _cmd_profile(args: argparse.Namespace) -> int:
    quiet_warnings()
    if args.out:
        check_output_file(args.out, '--out', example='latency.json')
    net = _space_network(args)
    from .profile import cache_dir, measure_latency_model
    model = measure_latency_model(**net, batch=args.batch, threads=args.threads, repeats=args.repeats,
                                  calibration=args.calibration, cache=not args.no_cache,
                                  holdout=_holdout_genotypes(net, args.holdout),
                                  progress=lambda line: print(line, flush=True))
    print(format_model(model))
    if not args.no_cache:
        print(f'cached in {cache_dir()}')
    if args.out:
        model.save(args.out)
        print(f'wrote {args.out}')
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    quiet_warnings()
    from ..genotypes import load_genotype
    genotype = load_genotype(args.genotype)
    if args.table:
        from .model import LatencyModel
        model = LatencyModel.load(args.table)
        net: Optional[Dict[str, Any]] = dict(model.meta.get('network') or {})
        for key in ('init_channels', 'layers', 'image_size', 'num_classes'):
            if getattr(args, key):
                net[key] = getattr(args, key)
        if args.measure and not all(k in net for k in ('init_channels', 'layers', 'image_size')):
            raise ConfigError(f'{args.table} does not record its network; give --init-channels, --layers and '
                              '--image-size to --measure')
        batch = int((model.meta.get('machine') or {}).get('batch', args.batch))
        threads = int((model.meta.get('machine') or {}).get('threads', args.threads))
    else:
        from .profile import measure_latency_model
        net = _space_network(args)
        batch, threads = args.batch, args.threads
        model = measure_latency_model(**net, batch=batch, threads=threads, repeats=args.repeats,
                                      progress=lambda line: print(line, flush=True))
    predicted = model.predict(genotype)
    where = f"batch {batch}, {threads} threads, C={net.get('init_channels', '?')}, {net.get('layers', '?')} cells"
    print(f'predicted latency of {genotype.name or args.genotype}: {predicted:.3f} ms per batch ({where})')
    if args.measure:
        from .profile import measure_genotypes
        measured = measure_genotypes([genotype], init_channels=int(net['init_channels']), layers=int(net['layers']),
                                     image_size=int(net['image_size']), num_classes=int(net.get('num_classes', 10)),
                                     family=net.get('family', 'cifar'), batch=batch, threads=threads,
                                     repeats=args.repeats, block=net.get('block') or {})[0]
        print(f'measured latency: {measured:.3f} ms per batch (min of {args.repeats}+ runs); prediction error '
              f'{100 * (predicted - measured) / measured:+.1f}%')
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {value}')
    return value


def _network_flags(p: argparse.ArgumentParser) -> None:
    from .profile import DEFAULT_REPEATS
    p.add_argument('--threads', type=_positive, default=2, help='CPU threads of the engine (default 2)')
    p.add_argument('--batch', type=_positive, default=1, help='images per batch (default 1)')
    p.add_argument('--init-channels', type=_positive, help="initial channels C (default: the space's)")
    p.add_argument('--layers', type=_positive, help="cells (default: the space's)")
    p.add_argument('--image-size', type=_positive, help='input side (default 32; 224 for ImageNet spaces)')
    p.add_argument('--num-classes', type=_positive, help="classifier outputs (default: the space's)")
    p.add_argument('--repeats', type=_positive, default=DEFAULT_REPEATS,
                   help=f'timed runs per network, the minimum is kept (default {DEFAULT_REPEATS})')


def register(subparsers: Any) -> None:
    """Add ``bnas-nni latency profile`` and ``bnas-nni latency predict``."""
    p = subparsers.add_parser('latency', help='latency model of a space on the packed engine; predict a genotype',
                              description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest='latency_command', metavar='ACTION')
    prof = sub.add_parser('profile', help='measure the latency model of a search space on this CPU',
                          description='Measure every candidate op of the space where derived networks put it, plus '
                                      'the fixed parts, with the packed engine on this CPU; cache the model.')
    prof.add_argument('--space', required=True, help='search space name (search_spaces/NAME.yaml) or YAML path')
    _network_flags(prof)
    prof.add_argument('--calibration', type=int, default=8,
                      help='random genotypes measured whole to fit the per-cell-type correction (default 8; 0: none)')
    prof.add_argument('--holdout', type=int, default=0,
                      help='also time N random genotypes with the probes, kept out of the fit, and print the '
                           "model's error on them (default 0; the cache is then measured again)")
    prof.add_argument('--no-cache', action='store_true', help='measure again and leave the cache as it is')
    prof.add_argument('--out', help='also write the model to this JSON file')
    prof.set_defaults(func=_cmd_profile)
    pred = sub.add_parser('predict', help='predicted (and with --measure measured) latency of a genotype',
                          description='Predicted latency of a genotype\'s derived network on the packed engine.')
    pred.add_argument('genotype', metavar='GENOTYPE', help='genotype name or YAML path')
    src = pred.add_mutually_exclusive_group()
    src.add_argument('--table', help='a saved latency model (bnas-nni latency profile --out)')
    src.add_argument('--space', default='bnas', help='space whose cached model to use or measure (default bnas)')
    _network_flags(pred)
    pred.add_argument('--measure', action='store_true', help='also measure the derived network on the engine')
    pred.set_defaults(func=_cmd_predict)

    def _no_action(args: argparse.Namespace) -> int:
        p.print_help()
        return 2
    p.set_defaults(func=_no_action)
