#!/usr/bin/env python
"""One epoch of the paper search through the real ``bnas-nni search`` code path, optionally beside the
official ``src/search.py`` on the same images in the same sitting.

Ours: ``bnas-nni search --config experiments/search_cifar10_paper.yaml --set dataset=fashion-mnist
--set train_subset=N --epochs 1 --run-dir TMP`` in a subprocess: the preset as it ships (its defaults are
the fast path: ``mixed_cell: fast``, ``channels_last: true``; ``--set`` adds overrides); the epoch time is the one
the search writes to ``log.txt`` (``epoch 1/1 ... (Xs)``: weight and
architecture steps, evaluation, logging). The first N Fashion-MNIST training images, padded to 32x32x3,
are the data; the preset's ``train_portion: 0.5`` splits them into weight and architecture halves.

Official (``--official SRC``, an unmodified official ``src/`` checkout): ``search_epoch.py N BATCH`` of the
official-code scripts folder (shims only; its own loop, data loading and evaluation), which prints the
seconds of ``train()`` + ``infer()``.

Both run with ``OMP_NUM_THREADS`` = ``--threads`` and the glibc malloc variables of the official baseline,
one after the other. Printed: seconds per epoch, images per second (the N images of the epoch), peak RSS
of each side (its process tree's largest process), the ratios, and (unless ``--no-profile``) a breakdown
of one full search iteration of the same supernet at the same batch size (``bench/search_step.py
--profile``), with the part of the epoch outside the iterations (data loading, evaluation, driver).

    python bench/search_epoch.py --images 1280 --official ~/bnas/src
    python bench/search_epoch.py --official ~/bnas/src --repeats 3 --no-profile   # alternating, medians
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import search_step  # noqa: E402  (bench/search_step.py: the step bench, its profile and environment)

REPO = search_step.REPO

# run a command, then print the peak RSS (KiB) of its process tree's largest process
_PEAK = ('import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); '
         'print("PEAK_RSS_KIB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); '
         'sys.exit(rc)')


def _env(threads: int, passive: bool) -> Dict[str, str]:
    env = dict(os.environ, **search_step.MALLOC_ENV)
    env['OMP_NUM_THREADS'] = str(threads)
    env['PYTHONPATH'] = os.pathsep.join([REPO] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    if passive:
        env['OMP_WAIT_POLICY'] = 'PASSIVE'
    return env


def _run_measured(cmd: List[str], env: Dict[str, str], cwd: Optional[str] = None) -> Dict[str, object]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, '-c', _PEAK] + cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    peak = None
    for line in proc.stdout.splitlines():
        if line.startswith('PEAK_RSS_KIB '):
            peak = int(line.split()[1]) / 1024.0
    return {'rc': proc.returncode, 'stdout': proc.stdout, 'stderr': proc.stderr, 'wall_s': wall, 'peak_mib': peak}


def epoch_seconds_from_log(run_dir: str) -> Optional[float]:
    """The ``(Xs)`` of the last ``epoch k/n`` line of the run's log.txt."""
    logs = sorted(glob.glob(os.path.join(run_dir, '**', 'log.txt'), recursive=True))
    seconds = None
    for path in logs:
        with open(path) as f:
            for line in f:
                m = re.match(r'\s*epoch \d+/\d+ .*\(([\d.]+)s\)\s*$', line)
                if m:
                    seconds = float(m.group(1))
    return seconds


def run_ours(args, env) -> Dict[str, object]:
    with tempfile.TemporaryDirectory(prefix='bnas-epoch-') as run_dir:
        return _run_ours(args, env, run_dir)


def _run_ours(args, env, run_dir: str) -> Dict[str, object]:
    # the Fashion-MNIST files the official side reads too ($BNAS_FASHION_MNIST or Debian's); the preset's CIFAR-10
    # data path follows the dataset
    sets = ['dataset=fashion-mnist', f'train_subset={args.images}', f'batch_size={args.batch}'] + args.set
    cmd = [sys.executable, '-W', 'ignore', '-m', 'bnas_nni.cli', 'search', '--config', args.config, '--epochs', '1',
           '--run-dir', os.path.join(run_dir, 'run')]
    for item in sets:
        cmd += ['--set', item]
    r = _run_measured(cmd, env, cwd=REPO)
    if r['rc'] != 0:
        raise RuntimeError(f'bnas-nni search failed (exit {r["rc"]}):\n{str(r["stderr"])[-3000:]}')
    r['epoch_s'] = epoch_seconds_from_log(run_dir)
    if r['epoch_s'] is None:
        raise RuntimeError(f'no "epoch 1/1 ... (Xs)" line in a log.txt under {run_dir}')
    r['command'] = 'bnas-nni ' + ' '.join(cmd[cmd.index('search'):])
    return r


def run_official(args, env) -> Dict[str, object]:
    scripts = args.official_scripts or search_step.default_official_scripts()
    script = os.path.join(scripts, 'search_epoch.py')
    env = dict(env, BNAS_SRC=os.path.abspath(args.official))
    with tempfile.TemporaryDirectory(prefix='bnas-official-') as cwd:
        r = _run_measured([sys.executable, '-W', 'ignore', script, str(args.images), str(args.batch)], env, cwd=cwd)
    m = re.search(r'official epoch seconds: ([\d.]+)', str(r['stdout']))
    if r['rc'] != 0 or not m:
        raise RuntimeError(f'official search epoch failed (exit {r["rc"]}):\n{str(r["stderr"])[-3000:]}')
    r['epoch_s'] = float(m.group(1))
    t = re.search(r'official train seconds: ([\d.]+), infer seconds: ([\d.]+)', str(r['stdout']))
    if t:
        r['train_s'], r['infer_s'] = float(t.group(1)), float(t.group(2))
    return r


def run_profile(args, env) -> dict:
    cmd = [sys.executable, '-W', 'ignore', os.path.join(REPO, 'bench', 'search_step.py'), '--child', '--cell',
           'fast', '--mode', 'full', '--batch', str(args.batch),
           '--device', 'cpu', '--threads', str(args.threads), '--repeats', '3', '--warmup', '1', '--space', 'bnas',
           '--profile']
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith('RESULT '):
            return json.loads(line[len('RESULT '):])
    raise RuntimeError(f'step profile failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}')


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--images', type=int, default=1280, help='first N Fashion-MNIST training images (default 1280)')
    ap.add_argument('--batch', type=int, default=64, help='batch size (default 64, the preset\'s)')
    ap.add_argument('--config', default='experiments/search_cifar10_paper.yaml', help='search preset (ours)')
    ap.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help='more overrides for ours')
    ap.add_argument('--official', metavar='SRC', help='also run the official search.py on this official src/')
    ap.add_argument('--official-scripts', metavar='DIR', default=None,
                    help='folder of the official-code scripts (default: $BNAS_OFFICIAL_SCRIPTS or '
                         '../shared/bench-official beside the checkout)')
    ap.add_argument('--threads', type=int, default=2, help='OMP_NUM_THREADS of both sides (default 2)')
    ap.add_argument('--passive', action='store_true',
                    help='OMP_WAIT_POLICY=PASSIVE on both sides (steadier on a machine shared with other work)')
    ap.add_argument('--repeats', type=int, default=1,
                    help='runs per side, alternating ours / official; medians are compared (default 1)')
    ap.add_argument('--no-profile', action='store_true', help='skip the breakdown of one search iteration')
    ap.add_argument('--json', help='also write the figures to this file')
    args = ap.parse_args(argv)
    if args.images < 2 * args.batch:
        print(f'error: --images {args.images} gives less than one batch of {args.batch} per half; '
              f'use at least {2 * args.batch}', file=sys.stderr)
        return 2
    if args.official and not os.path.isfile(os.path.join(args.official, 'search.py')):
        print(f'error: --official {args.official}: not an official BNAS src/ folder (no search.py)', file=sys.stderr)
        return 2
    env = _env(args.threads, args.passive)
    iterations = math.ceil((args.images // 2) / args.batch)
    print(f'# search epoch bench: {args.images} images (train_portion 0.5: {iterations} iterations of batch '
          f'{args.batch}), {args.threads} threads{", passive OpenMP waits" if args.passive else ""}', flush=True)
    out: Dict[str, object] = {'images': args.images, 'batch': args.batch, 'threads': args.threads}
    if args.repeats < 1:
        print(f'error: --repeats must be >= 1, got {args.repeats}', file=sys.stderr)
        return 2
    ours_runs, off_runs = [], []
    for r in range(args.repeats):      # alternate the sides: drift of a shared machine hits both alike
        ours = run_ours(args, env)
        ours_runs.append(ours)
        print(f'bnas-nni  run {r + 1}: epoch {ours["epoch_s"]:.1f} s  {args.images / ours["epoch_s"]:.2f} images/s  '
              f'peak RSS {ours["peak_mib"]:.0f} MiB  (process {ours["wall_s"]:.0f} s incl. start-up)', flush=True)
        if r == 0:
            print(f'          {ours["command"]}', flush=True)
        if args.official:
            off = run_official(args, env)
            off_runs.append(off)
            print(f'official  run {r + 1}: epoch {off["epoch_s"]:.1f} s  {args.images / off["epoch_s"]:.2f} images/s  '
                  f'peak RSS {off["peak_mib"]:.0f} MiB  (train {off.get("train_s", float("nan")):.1f} s + infer '
                  f'{off.get("infer_s", float("nan")):.1f} s; process {off["wall_s"]:.0f} s)', flush=True)
    ours = {'epoch_s': statistics.median(o['epoch_s'] for o in ours_runs),
            'peak_mib': max(o['peak_mib'] for o in ours_runs), 'command': ours_runs[0]['command'],
            'runs_s': [o['epoch_s'] for o in ours_runs]}
    out['ours'] = ours
    if args.official:
        off = {'epoch_s': statistics.median(o['epoch_s'] for o in off_runs),
               'peak_mib': max(o['peak_mib'] for o in off_runs), 'runs_s': [o['epoch_s'] for o in off_runs]}
        out['official'] = off
        label = f'medians of {args.repeats} runs per side' if args.repeats > 1 else 'one run per side'
        print(f'ratio     epoch speed x{off["epoch_s"] / ours["epoch_s"]:.2f} ({label}: {ours["epoch_s"]:.1f} vs '
              f'{off["epoch_s"]:.1f} s), peak RSS x{ours["peak_mib"] / off["peak_mib"]:.2f}', flush=True)
    if not args.no_profile:
        prof = run_profile(args, env)
        step_s = prof['median_s']
        out['iteration_s'] = step_s
        out['profile'] = prof.get('profile')
        rest = ours['epoch_s'] - iterations * step_s
        print(f'one full search iteration (batch {args.batch}, same supernet, bench/search_step.py): median '
              f'{step_s:.2f} s; {iterations} iterations = {iterations * step_s:.1f} s of the {ours["epoch_s"]:.1f} s '
              f'epoch; the other {rest:.1f} s: data loading, evaluation of the validation half, driver', flush=True)
        if prof.get('profile'):
            search_step.print_breakdown('full iteration', prof['profile'])
    if args.json:
        if REPO not in sys.path:
            sys.path.insert(0, REPO)
        from bnas_nni.io import atomic_write_text  # a killed bench leaves no half-written file
        atomic_write_text(args.json, json.dumps(out, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
