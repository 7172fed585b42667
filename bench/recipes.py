#!/usr/bin/env python
"""The paper recipe against the react recipe on real data, at the same total epoch budget.

On Fashion-MNIST-32x3 (Debian ``dataset-fashion-mnist``, padded to 32x32 and repeated to 3 channels), with
the BNAS-A cells (``latest_cell_zeroise``) at a small size, for each seed it trains

* ``teacher``: the full-precision version of the same network (``binarizer: none, activation: identity``),
  ``--epochs`` epochs, with Adam and linear decay (``--teacher-optim adam``, the default: the better
  teacher at small budgets) or the paper recipe's SGD one-cycle (``--teacher-optim sgd``);
* ``paper``: the binary network with the paper recipe (``xnor`` weights, ``ste_sign``, ReLU), ``--epochs``;
* ``react``: the binary network with the react recipe (``rsign``, ``scaled_sign``, ``rprelu``; Adam, linear
  decay), step 1 ``--step1-epochs`` and step 2 the rest of ``--epochs``, distilled from that seed's teacher;

then scores each final network on all 10,000 test images and prints, per recipe, the mean +- sample std of
the top-1 over the seeds and the mean training wall time (the react row excludes its teacher's time, which
is the teacher row). Runs go to ``--out/seed<S>/<name>``; a finished run's ``result.json`` is reused when the
bench is started again with the same settings (``--fresh`` retrains), so an interrupted bench continues.

Examples::

    python bench/recipes.py --quick                                   # smoke check (a few minutes)
    python bench/recipes.py --threads 1                               # the README table (C=16, L=5, 8 epochs)
    python bench/recipes.py --epochs 40 --train-subset 60000 --init-channels 16 --layers 8   # a larger budget
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')      # spinning OpenMP threads crawl on a busy machine

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NAMES = ('teacher', 'paper', 'react')
LABELS = {'teacher': '(a) full-precision teacher',
          'paper': '(b) binary, paper recipe (xnor, ste_sign, ReLU; SGD one-cycle)',
          'react': '(c) binary, react recipe (rsign, scaled_sign, RPReLU; 2 steps, Adam, KD)'}


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--epochs', type=int, default=8, help='total epochs of every recipe (react: both steps)')
    p.add_argument('--step1-epochs', type=int, default=None, help='react step 1 (default: half of --epochs)')
    p.add_argument('--train-subset', type=int, default=4096, help='first N of the 60,000 training images')
    p.add_argument('--val-subset', type=int, default=500, help='test images scored after each epoch (the final '
                                                               'score always uses all 10,000)')
    p.add_argument('--init-channels', type=int, default=16)
    p.add_argument('--layers', type=int, default=5)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--paper-lr', type=float, default=None, help='peak lr of the paper recipe (default: its 0.05)')
    p.add_argument('--teacher-optim', choices=('adam', 'sgd'), default='adam',
                   help='teacher: Adam with linear decay, or the paper recipe (SGD one-cycle)')
    p.add_argument('--teacher-lr', type=float, default=None,
                   help='teacher lr (default: 2e-3 with adam, --paper-lr or 0.05 with sgd)')
    p.add_argument('--react-lr', type=float, default=2e-3, help='Adam lr of the react recipe (default 2e-3: the '
                   'recipe\'s own 5e-4 is for 300 + 300 epochs and far too low for a few hundred steps)')
    p.add_argument('--bn-freeze-epochs', type=int, default=None,
                   help='react: the last N epochs of step 2 train with BN statistics fixed (default: the recipe\'s)')
    p.add_argument('--bn-renorm-epochs', type=int, default=None,
                   help='react: the last N epochs of step 2 train with Batch Renormalization (default: the recipe\'s)')
    p.add_argument('--bn-recalibration-mode', choices=('eval', 'train'), default=None,
                   help='react: how BN statistics are re-estimated after each step (default: the recipe\'s, eval: '
                        'layer by layer with everything upstream in eval mode; train: one training-mode pass)')
    p.add_argument('--shortcut', action='store_true', help='react: the real-valued shortcut around binary convs')
    p.add_argument('--only', nargs='+', choices=NAMES, default=list(NAMES))
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--out', default='runs/bench-recipes')
    p.add_argument('--fresh', action='store_true', help='retrain runs that already have a result')
    p.add_argument('--quick', action='store_true', help='smoke check: 1 seed, C=8, L=5, 2 epochs of 512 images')
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.train_subset, args.init_channels, args.layers = [0], 2, 512, 8, 5
    if args.step1_epochs is None:
        args.step1_epochs = max(1, args.epochs // 2)
    if not 1 <= args.step1_epochs < args.epochs:
        p.error('--step1-epochs must leave at least one epoch for step 2')
    if 'react' in args.only and 'teacher' not in args.only:
        args.only = ['teacher'] + list(args.only)       # the react rows distil from the teacher rows
    return args


def run_config(name: str, seed: int, args: argparse.Namespace, out: Path) -> dict:
    """The training overrides of one row (everything else: the recipe's defaults)."""
    cfg = {'model': 'bnas-a', 'init_channels': args.init_channels, 'layers': args.layers, 'dataset': 'fashion-mnist',
           'train_subset': args.train_subset, 'val_subset': args.val_subset, 'batch_size': args.batch_size,
           'workers': 0, 'threads': args.threads, 'progress': 'never', 'tensorboard': False,
           'report_freq': 10 ** 6, 'seed': seed, 'run_dir': str(out / f'seed{seed}' / name)}
    if name == 'teacher':
        cfg.update({'recipe': 'paper', 'epochs': args.epochs, 'binarizer': 'none', 'activation': 'identity'})
        if args.teacher_optim == 'adam':
            cfg.update({'optimizer': 'adam', 'lr': args.teacher_lr or 2e-3, 'lr_min': 0.0, 'schedule': 'linear',
                        'weight_decay': 5e-6, 'drop_path_prob': 0.0})
        elif args.teacher_lr or args.paper_lr:
            cfg['lr'] = args.teacher_lr or args.paper_lr
    elif name == 'paper':
        cfg.update({'recipe': 'paper', 'epochs': args.epochs})
        if args.paper_lr:
            cfg['lr'] = args.paper_lr
    else:
        cfg.update({'recipe': 'react', 'step1_epochs': args.step1_epochs, 'epochs': args.epochs - args.step1_epochs,
                    'teacher': str(out / f'seed{seed}' / 'teacher'), 'shortcut': bool(args.shortcut)})
        if args.react_lr:
            cfg['lr'] = args.react_lr
        if args.bn_freeze_epochs is not None:
            cfg['bn_freeze_epochs'] = args.bn_freeze_epochs
        if args.bn_renorm_epochs is not None:
            cfg['bn_renorm_epochs'] = args.bn_renorm_epochs
        if args.bn_recalibration_mode is not None:
            cfg['bn_recalibration_mode'] = args.bn_recalibration_mode
    return cfg


def _final_checkpoint(name: str, run_dir: Path) -> Path:
    return run_dir / ('step2' if name == 'react' else '') / 'checkpoint.pt'


def train_and_score(name: str, seed: int, args: argparse.Namespace, out: Path) -> dict:
    """Train one row (or reuse its result) and score it on the whole test set."""
    from bnas_nni.checkpoints import read_checkpoint
    from bnas_nni.train.runner import resolve_train_config, run_evaluation, run_training

    cfg = run_config(name, seed, args, out)
    run_dir = Path(cfg['run_dir'])
    result_file = run_dir / 'result.json'
    if result_file.is_file() and not args.fresh:
        result = json.loads(result_file.read_text())
        if result.get('config') == cfg:
            result['cached'] = True
            return result
    if run_dir.exists():
        shutil.rmtree(run_dir)
    quiet = io.StringIO()                    # the per-epoch log stays in the run's log.txt
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(quiet):
        trained = run_training(None, cfg)
    train_seconds = time.perf_counter() - t0
    saved = read_checkpoint(_final_checkpoint(name, run_dir))['config']
    eval_cfg = resolve_train_config(base=saved, overrides={'val_subset': None, 'batch_size': 500})
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(quiet):
        metrics = run_evaluation(eval_cfg, _final_checkpoint(name, run_dir))
    eval_seconds = time.perf_counter() - t0
    result = {'name': name, 'seed': seed, 'top1': metrics['top1'], 'top5': metrics['top5'], 'n': metrics['n'],
              'train_seconds': round(train_seconds, 1), 'eval_seconds': round(eval_seconds, 1),
              'epochs_run': trained['epochs_run'], 'config': cfg}
    result_file.write_text(json.dumps(result, indent=1))
    return result


def _mean_std(values):
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_table(results: list, args: argparse.Namespace) -> str:
    by_name = {n: [r for r in results if r['name'] == n] for n in NAMES}
    lines = [f'Fashion-MNIST-32x3, BNAS-A cells C={args.init_channels} L={args.layers}, {args.train_subset} training '
             f'images, {args.epochs} epochs per recipe (react: {args.step1_epochs} + {args.epochs - args.step1_epochs})'
             f', batch {args.batch_size}, seeds {" ".join(map(str, args.seeds))}; top-1 on the {results[0]["n"]:,} '
             'test images',
             '',
             '| run | top-1 % (mean ± std) | per seed | train wall time per run (mean) |',
             '|---|---|---|---|']
    for name in NAMES:
        rows = by_name[name]
        if not rows:
            continue
        mean, std = _mean_std([r['top1'] for r in rows])
        seeds = ', '.join(f'{r["top1"]:.2f}' for r in rows)
        secs = statistics.fmean(r['train_seconds'] for r in rows)
        lines.append(f'| {LABELS[name]} | {mean:.2f} ± {std:.2f} | {seeds} | {secs:.0f} s |')
    if by_name['paper'] and by_name['react']:
        (mp, sp), (mr, sr) = _mean_std([r['top1'] for r in by_name['paper']]), \
            _mean_std([r['top1'] for r in by_name['react']])
        verdict = 'beats' if mr - mp > sp + sr else 'does NOT beat'
        lines += ['', f'react - paper = {mr - mp:+.2f} points; seed spread: std paper {sp:.2f}, react {sr:.2f}; '
                      f'react {verdict} paper by more than the two spreads together ({sp + sr:.2f})']
    return '\n'.join(lines)


def main(argv=None) -> int:
    args = _parse(argv)
    import torch

    torch.set_num_threads(args.threads)
    from bnas_nni.cli import quiet_warnings

    quiet_warnings()
    out = Path(args.out)
    results = []
    for seed in args.seeds:
        for name in NAMES:
            if name not in args.only:
                continue
            r = train_and_score(name, seed, args, out)
            results.append(r)
            print(f'seed {seed} {name:<8} top-1 {r["top1"]:6.2f}%  train {r["train_seconds"]:7.1f} s  '
                  f'eval {r["eval_seconds"]:5.1f} s' + ('  (cached)' if r.get('cached') else ''), flush=True)
    table = format_table(results, args)
    print()
    print(table)
    (out / 'table.md').write_text(table + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
