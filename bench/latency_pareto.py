#!/usr/bin/env python
"""Accuracy against measured latency: latency-aware BinaryDARTS at several targets, the unconstrained
search, and random cells of the same space, all trained alike and timed on the packed engine.

Steps, each resumable (a point whose result is in ``points.csv`` is skipped; a killed search or training
continues from its checkpoint; ``--remeasure`` times every network again):

1. the latency model of the derived network (the network ``experiments/train_quick_fashion.yaml`` builds:
   C=8, L=5, 32x32, batch 1, 2 threads by default), measured on this CPU with the packed engine
   (:func:`bnas_nni.latency.profile.measure_latency_model`) and saved as ``latency_model.json``; every
   search reads that one file (``latency_table``);
2. the searches (``experiments/search_quick_fashion.yaml``): one without a target and one per target.
   Targets default to levels of the model's range: ``fixed + level * (uniform - fixed)`` ms, where
   ``fixed`` is the all-Zeroise network and ``uniform`` the expectation under uniform alphas (the mean of
   random cells); ``--targets-ms`` gives them in ms;
3. ``--random`` random cells of the same space (per node two distinct inputs, each with a uniformly drawn
   op), seeded;
4. every derived network trained with the same short recipe (``experiments/train_quick_fashion.yaml``,
   ``--train-epochs``), exported as a packed file and timed on the packed engine, all networks
   round-robin in one pass (minimum over ``--repeats`` runs), beside the model's prediction;
5. ``pareto.png`` / ``pareto.svg``: test accuracy against measured latency, searched and random points,
   targets marked; ``points.csv`` holds every point with its seeds.

The machine is shared: latencies are minima of interleaved runs; rerun on a quiet machine for figures to
quote. Defaults take about 20-30 minutes on 2 quiet cores.

Examples::

    python bench/latency_pareto.py                                  # the sweep, runs/latency-pareto
    python bench/latency_pareto.py --quick --run-dir runs/pareto-toy  # a toy run that proves the pipeline
    python bench/latency_pareto.py --targets-ms 1.2 1.6 2.0 --random 8 --train-epochs 3
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # see README, Development: spinning OpenMP threads on a busy box

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SEARCH_PRESET = ROOT / 'experiments' / 'search_quick_fashion.yaml'
TRAIN_PRESET = ROOT / 'experiments' / 'train_quick_fashion.yaml'
FIELDS = ['name', 'kind', 'target_ms', 'latency_weight', 'latency_penalty', 'latency_estimate', 'search_seed',
          'train_seed', 'predicted_ms', 'measured_ms', 'test_acc', 'supernet_val_acc', 'search_seconds',
          'train_seconds', 'genotype']


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--run-dir', default='runs/latency-pareto', help='output folder (resumed when it exists)')
    p.add_argument('--target-levels', type=float, nargs='+', default=[0.2, 0.45, 0.7],
                   help='targets as fixed + level * (uniform - fixed) ms of the latency model (default 0.2 0.45 0.7)')
    p.add_argument('--targets-ms', type=float, nargs='+', default=None, help='targets in ms (instead of levels)')
    p.add_argument('--latency-weight', type=float, default=2.0, help='latency_weight of the searches')
    p.add_argument('--latency-penalty', default='positive', choices=('positive', 'absolute', 'linear'),
                   help='latency_penalty of the searches')
    p.add_argument('--latency-estimate', default='derived', choices=('expected', 'derived'),
                   help='latency_estimate of the searches (default derived: see bnas_nni.search.objective)')
    p.add_argument('--random', type=int, default=4, help='random cells of the space to train (default 4)')
    p.add_argument('--seed', type=int, default=2, help='search seed (all searches) and random-cell seed')
    p.add_argument('--train-seed', type=int, default=0, help='training seed (all networks)')
    p.add_argument('--search-epochs', type=int, default=None, help="search epochs (default: the preset's 5)")
    p.add_argument('--train-epochs', type=int, default=2, help='training epochs of every network (preset: 4)')
    p.add_argument('--train-subset', type=int, default=None, help="training images (default: the preset's 4096)")
    p.add_argument('--batch', type=int, default=1, help='latency batch (model, targets and timing)')
    p.add_argument('--threads', type=int, default=2, help='engine threads (model and timing)')
    p.add_argument('--repeats', type=int, default=30, help='timed runs per network (minimum kept)')
    p.add_argument('--remeasure', action='store_true',
                   help='time every packed network again (e.g. on a quieter machine); nothing is retrained')
    p.add_argument('--model-repeats', type=int, default=None,
                   help="timed runs per probe network of the latency model (default: the profiler's)")
    p.add_argument('--quick', action='store_true',
                   help='toy sizes to prove the pipeline (1 search epoch on 256 images, 1 training epoch on 256 '
                        'images, 2 targets, 2 random cells, few repeats); not figures')
    args = p.parse_args(argv)
    if args.quick:
        args.search_epochs = args.search_epochs or 1
        args.train_epochs = 1
        args.train_subset = args.train_subset or 256
        args.random = min(args.random, 2)
        args.repeats = min(args.repeats, 5)
        args.model_repeats = args.model_repeats or 3
        if args.targets_ms is None:
            args.target_levels = args.target_levels[:2]
    return args


# --------------------------------------------------------------------------- points.csv


def read_points(path: Path) -> Dict[str, Dict[str, str]]:
    if not path.is_file():
        return {}
    with open(path, newline='') as f:
        return {row['name']: row for row in csv.DictReader(f)}


def write_points(path: Path, points: Dict[str, Dict[str, Any]]) -> None:
    from bnas_nni.io import atomic_write_text

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction='ignore')
    w.writeheader()
    for row in points.values():
        w.writerow(row)
    atomic_write_text(path, buf.getvalue())


# --------------------------------------------------------------------------- steps


def latency_model(args: argparse.Namespace, run: Path, log):
    """The latency model of the train preset's derived network, measured once and kept in the run folder."""
    from bnas_nni.config import TRAIN, resolve
    from bnas_nni.latency import LatencyModel
    from bnas_nni.latency.profile import measure_latency_model
    from bnas_nni.search.latency import space_cell
    from bnas_nni.search.run import resolve_search_config

    path = run / 'latency_model.json'
    if path.is_file():
        return LatencyModel.load(path)
    ops, num_nodes = space_cell(resolve_search_config(SEARCH_PRESET))
    train = resolve(TRAIN, TRAIN_PRESET)
    t0 = time.time()
    extra = {'repeats': args.model_repeats} if args.model_repeats else {}
    model = measure_latency_model(ops=ops, num_nodes=num_nodes, init_channels=int(train.init_channels),
                                  layers=int(train.layers), image_size=32, num_classes=10, family='cifar',
                                  batch=args.batch, threads=args.threads, **extra)
    model.save(path)
    log(f'latency model: C={train.init_channels} L={train.layers} 32x32 batch {args.batch}, {args.threads} threads: '
        f'fixed {model.fixed_ms:.3f} ms, uniform {model.uniform_ms():.3f} ms ({time.time() - t0:.0f}s)')
    return model


def targets(args: argparse.Namespace, model) -> List[float]:
    if args.targets_ms:
        return [float(t) for t in args.targets_ms]
    lo, mid = model.fixed_ms, model.uniform_ms()
    return [round(lo + level * (mid - lo), 4) for level in args.target_levels]


def search(name: str, target: Optional[float], args: argparse.Namespace, run: Path, log) -> Dict[str, Any]:
    from bnas_nni.search.run import resolve_search_config, run_search

    folder = run / 'search' / name
    overrides: Dict[str, Any] = {'run_dir': str(folder), 'name': name, 'seed': args.seed, 'progress': 'never',
                                 'latency_table': str(run / 'latency_model.json'), 'latency_target_ms': target,
                                 'latency_weight': args.latency_weight, 'latency_penalty': args.latency_penalty,
                                 'latency_estimate': args.latency_estimate, 'threads': args.threads}
    if args.search_epochs:
        overrides['epochs'] = args.search_epochs
    if args.quick:
        overrides['train_subset'] = 256
    cfg = resolve_search_config(SEARCH_PRESET, overrides)
    t0 = time.time()
    summary = run_search(cfg, resume=(folder / 'checkpoint.pt').is_file(), log=log)
    acc = summary.get('supernet_val_acc')
    return {'genotype_path': folder / 'genotype.yaml', 'genotype': summary['genotype'],
            'supernet_val_acc': None if acc is None or acc < 0 else round(float(acc), 2),
            'search_seconds': round(time.time() - t0, 1)}


def random_cells(count: int, seed: int, ops: Sequence[str], num_nodes: int):
    """Seeded genotypes drawn uniformly from the space: per node two distinct inputs, each a uniform op."""
    from bnas_nni.latency.profile import random_genotype

    rng = random.Random(seed)
    return [random_genotype(ops, num_nodes, rng, name=f'random-{k}') for k in range(count)]


def train(name: str, genotype_path: Path, args: argparse.Namespace, run: Path) -> Dict[str, Any]:
    """Train the derived network with the short recipe; returns its test accuracy (%) and the run folder."""
    from bnas_nni.train.runner import run_training

    folder = run / 'train' / name
    overrides: Dict[str, Any] = {'genotype': str(genotype_path), 'run_dir': str(folder), 'name': name,
                                 'seed': args.train_seed, 'epochs': args.train_epochs, 'progress': 'never',
                                 'tensorboard': False, 'threads': args.threads}
    if args.train_subset:
        overrides['train_subset'] = args.train_subset
    if args.quick:
        overrides['val_subset'] = 256
    t0 = time.time()
    result = run_training(TRAIN_PRESET, overrides, resume=(folder / 'checkpoint.pt').is_file() or None)
    return {'test_acc': round(float(result['final']['valid_top1']), 2), 'train_seconds': round(time.time() - t0, 1),
            'folder': folder}


def measure(names: Sequence[str], run: Path, args: argparse.Namespace) -> Dict[str, float]:
    """Export each trained network as a packed file and time them all round-robin (min ms per batch)."""
    import torch

    from bnas_nni.deploy import export_packed, load, network_from_checkpoint

    nets = []
    for name in names:
        path = run / 'packed' / f'{name}.bnp'
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            export_packed(network_from_checkpoint(run / 'train' / name), path)
        nets.append(load(path))
    x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    old = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with torch.no_grad():
            for net in nets:
                net(x)
            best = [float('inf')] * len(nets)
            for _ in range(args.repeats):
                for i, net in enumerate(nets):
                    t0 = time.perf_counter()
                    net(x)
                    best[i] = min(best[i], (time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_num_threads(old)
    return dict(zip(names, best))


def plot(points: Dict[str, Dict[str, Any]], target_list: Sequence[float], run: Path) -> List[Path]:
    from matplotlib.figure import Figure

    from bnas_nni.plot import save_figure

    fig = Figure(figsize=(6.4, 4.4), dpi=100, layout='constrained')
    ax = fig.add_subplot()
    groups = {'random': ('random cells', 'o', '#9e9e9e'), 'unconstrained': ('BinaryDARTS, no target', 's', '#1f77b4'),
              'target': ('BinaryDARTS with a latency target', 'D', '#d62728')}
    for kind, (label, marker, color) in groups.items():
        pts = [p for p in points.values() if p['kind'] == kind and p.get('measured_ms') not in (None, '')]
        if not pts:
            continue
        xs, ys = [float(p['measured_ms']) for p in pts], [float(p['test_acc']) for p in pts]
        ax.scatter(xs, ys, marker=marker, color=color, label=label, zorder=3)
        if kind == 'target':
            for p, x, y in zip(pts, xs, ys):
                ax.annotate(f'{float(p["target_ms"]):.2f}', (x, y), textcoords='offset points', xytext=(4, 4),
                            fontsize=8, color=color)
    for t in target_list:
        ax.axvline(t, color='#d62728', alpha=0.25, linestyle='--', linewidth=1)
    ax.set_xlabel('measured latency on the packed engine (ms per batch)')
    ax.set_ylabel('test accuracy (%)')
    ax.set_title('Fashion-MNIST: accuracy vs latency (dashed: targets)', fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return [save_figure(fig, run / f'pareto.{fmt}') for fmt in ('png', 'svg')]


# --------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    import warnings

    warnings.filterwarnings('ignore', message='.*is found to be not a nn.Module.*')
    from bnas_nni.console import log as console_log
    from bnas_nni.errors import BNASError
    from bnas_nni.genotypes import save_genotype
    from bnas_nni.io import append_text
    from bnas_nni.search.latency import space_cell
    from bnas_nni.search.run import resolve_search_config

    args = parse_args(argv)
    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        console_log(line)
        append_text(run / 'log.txt', line + '\n')

    try:
        model = latency_model(args, run, log)
        target_list = targets(args, model)
        log(f'targets (ms): {", ".join(f"{t:g}" for t in target_list)}; fixed {model.fixed_ms:.3f}, uniform '
            f'{model.uniform_ms():.3f}')
        csv_path = run / 'points.csv'
        points: Dict[str, Dict[str, Any]] = dict(read_points(csv_path))
        jobs = [('unconstrained', None)] + [(f'target-{t:g}ms', t) for t in target_list]
        genotypes: Dict[str, Path] = {}
        for name, target in jobs:
            if name in points and points[name].get('test_acc') not in (None, ''):
                genotypes[name] = run / 'search' / name / 'genotype.yaml'
                continue
            log(f'[{name}] search (target {target if target is not None else "none"})')
            found = search(name, target, args, run, log)
            genotypes[name] = found['genotype_path']
            points[name] = {'name': name, 'kind': 'unconstrained' if target is None else 'target', 'target_ms': target,
                            'latency_weight': None if target is None else args.latency_weight,
                            'latency_penalty': None if target is None else args.latency_penalty,
                            'latency_estimate': None if target is None else args.latency_estimate,
                            'search_seed': args.seed, 'train_seed': args.train_seed,
                            'predicted_ms': round(model.predict(found['genotype']), 4),
                            'supernet_val_acc': found['supernet_val_acc'], 'search_seconds': found['search_seconds'],
                            'genotype': str(found['genotype'])}
            write_points(csv_path, points)
        ops, num_nodes = space_cell(resolve_search_config(SEARCH_PRESET))
        for g in random_cells(args.random, args.seed, ops, num_nodes):
            path = run / 'random' / f'{g.name}.yaml'
            if not path.is_file():
                save_genotype(g, path, source='bench/latency_pareto.py', seed=args.seed)
            genotypes[g.name] = path
            if g.name not in points:
                points[g.name] = {'name': g.name, 'kind': 'random', 'search_seed': args.seed,
                                  'train_seed': args.train_seed, 'predicted_ms': round(model.predict(g), 4),
                                  'genotype': str(g)}
        write_points(csv_path, points)
        for name, path in genotypes.items():
            if points[name].get('test_acc') not in (None, ''):
                continue
            log(f'[{name}] train {args.train_epochs} epoch(s)')
            result = train(name, path, args, run)
            points[name].update(test_acc=result['test_acc'], train_seconds=result['train_seconds'])
            write_points(csv_path, points)
            log(f'[{name}] test acc {result["test_acc"]:.2f}%')
        names = [n for n in genotypes if args.remeasure or points[n].get('measured_ms') in (None, '')]
        if names:
            log(f'timing {len(names)} packed network(s), batch {args.batch}, {args.threads} threads, '
                f'{args.repeats} round-robin runs')
            for name, ms in measure(names, run, args).items():
                points[name]['measured_ms'] = round(ms, 4)
            write_points(csv_path, points)
        pictures = plot(points, target_list, run)
    except BNASError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    log('')
    log(f'{"point":<22} {"target":>8} {"predicted":>10} {"measured":>9} {"test acc":>9}')
    for p in points.values():
        target = f'{float(p["target_ms"]):.3f}' if p.get('target_ms') not in (None, '') else '-'
        log(f'{p["name"]:<22} {target:>8} {float(p["predicted_ms"]):>10.3f} {float(p["measured_ms"]):>9.3f} '
            f'{float(p["test_acc"]):>8.2f}%')
    errors = [abs(float(p['predicted_ms']) / float(p['measured_ms']) - 1) for p in points.values()]
    log(f'prediction error over {len(errors)} networks: median {100 * statistics.median(errors):.1f}%, '
        f'worst {100 * max(errors):.1f}%')
    for p in points.values():
        if p['kind'] == 'target':
            ratio = float(p['measured_ms']) / float(p['target_ms'])
            verdict = 'below the target' if ratio <= 1 else ('within 15%' if ratio <= 1.15 else 'MISSED (> +15%)')
            log(f'{p["name"]}: measured / target = {ratio:.3f} ({verdict})')
    log(f'points: {csv_path}; pictures: {", ".join(str(p) for p in pictures)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
