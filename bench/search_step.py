#!/usr/bin/env python
"""Throughput and peak memory of one BNAS search step on the paper supernet, per mixed-cell implementation.

For each cell implementation (the straightforward :class:`~bnas_nni.search.mixed_cell.BinaryMixedCell` and
:class:`~bnas_nni.search.fast_cell.FastBinaryMixedCell`), batch size and step kind, a fresh subprocess
builds the supernet (default: the ``bnas`` space, C=16, 8 cells, 4 nodes, 7 ops) and times

* ``weight``: a weight step -- binarized forward, cross-entropy, backward, latent-weight constraint and
  SGD(0.025, momentum 0.9, wd 3e-4) step;
* ``full``: a full search iteration in the official order -- an architecture step on a validation batch
  (cross-entropy minus the diversity bonus lambda * mean entropy * exp(-epoch / tau), Adam 3e-4,
  betas (0.5, 0.999), wd 1e-3), then the weight step on a training batch.

Timings are medians after warm-up (wall clock, and the process CPU time of all its threads, which is less
sensitive to other load on a shared machine; the best run is printed too, for machines whose other load
makes single steps many times slower); images/s counts the training images of one iteration (the batch size),
as the official baseline does. Peak memory is the child's RSS high-water mark (``resource.getrusage``) and,
on CUDA, ``torch.cuda.max_memory_allocated``. glibc malloc is kept from returning memory to the OS in the
children (the variables the official baseline used) for stable figures.

Examples::

    python bench/search_step.py --quick                 # smoke check: batch 8, few repeats
    python bench/search_step.py                         # batch 32 and 64, CPU, 2 threads
    python bench/search_step.py --device cuda --threads 0
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

CELLS = {
    'straight': 'bnas_nni.search.mixed_cell:BinaryMixedCell',
    'fast': 'bnas_nni.search.fast_cell:FastBinaryMixedCell',
    'fast-cl': 'bnas_nni.search.fast_cell:FastBinaryMixedCell',  # channels-last variant
}
MODES = ('weight', 'full')
MALLOC_ENV = {
    'MALLOC_TRIM_THRESHOLD_': '68719476736',
    'MALLOC_MMAP_THRESHOLD_': '68719476736',
    'MALLOC_TOP_PAD_': '1073741824',
}
# official code, 2-vCPU VM, 2 torch threads, batch 32 (shared/notes/bnas-original.md section 7, run 2)
OFFICIAL_CPU = {'weight': 6.2, 'full': 2.9, 'peak_mib': 4.3 * 1024}


def _load_class(spec: str):
    import importlib
    mod, name = spec.split(':')
    return getattr(importlib.import_module(mod), name)


def build_supernet(cell_cls, space: str = 'bnas'):
    """The space turned into a DARTS supernet whose cells are ``cell_cls`` (no experiment needed)."""
    import warnings
    warnings.filterwarnings('ignore', message='.*is found to be not a nn.Module.*')
    from nni.nas.oneshot.pytorch.supermodule.differentiable import DifferentiableMixedCell
    from nni.nas.strategy import DARTS

    from bnas_nni.space import BNASSpace

    class _Strategy(DARTS):
        def default_mutation_hooks(self):
            return [cell_cls.mutate if getattr(h, '__self__', None) is DifferentiableMixedCell else h
                    for h in super().default_mutation_hooks()]

    return _Strategy().mutate_model(BNASSpace.from_config(space))


def _child(args) -> None:
    import resource

    import torch
    import torch.nn.functional as F

    from bnas_nni.quant import attach_latent_constraint
    from bnas_nni.search.mixed_cell import BinaryMixedCell

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cell_cls = _load_class(CELLS[args.cell])
    if args.cell == 'fast-cl':
        cell_cls = type('FastBinaryMixedCellCL', (cell_cls,), {'channels_last': True})
    model = build_supernet(cell_cls, args.space).to(device)
    model.train()

    cells = [m for m in model.modules() if isinstance(m, BinaryMixedCell)]
    alphas = list({id(p): p for c in cells for p in c.arch_parameters()}.values())
    alpha_ids = {id(p) for p in alphas}
    weights = [p for p in model.parameters() if id(p) not in alpha_ids]
    w_opt = torch.optim.SGD(weights, lr=0.025, momentum=0.9, weight_decay=3e-4)
    attach_latent_constraint(w_opt, model)
    a_opt = torch.optim.Adam(alphas, lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    by_label = {}
    for c in cells:
        by_label.setdefault(c.label, c)
    lam, tau, epoch = 1.0, 7.7, 0

    g = torch.Generator().manual_seed(1)
    b = args.batch
    x_t = torch.randn(b, 3, 32, 32, generator=g).to(device)
    y_t = torch.randint(0, 10, (b,), generator=g).to(device)
    x_v = torch.randn(b, 3, 32, 32, generator=g).to(device)
    y_v = torch.randint(0, 10, (b,), generator=g).to(device)

    def entropy():
        rows = torch.cat([c.alpha_matrix() for c in by_label.values()])
        p = rows.softmax(-1)
        return -(p * p.log()).sum(-1).mean()

    def weight_step():
        w_opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x_t), y_t).backward()
        w_opt.step()

    def arch_step():
        a_opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x_v), y_v) - lam * entropy() * math.exp(-epoch / tau)
        loss.backward()
        a_opt.step()

    def step():
        if args.mode == 'full':
            arch_step()
        weight_step()

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu_times = [], []
    for k in range(args.warmup + args.repeats):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        if k >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    out = {
        'cell': args.cell, 'mode': args.mode, 'batch': b, 'times': times,
        'median_s': statistics.median(times), 'cpu_s': statistics.median(cpu_times),
        'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,  # KiB on Linux
        'threads': torch.get_num_threads(), 'device': str(device),
    }
    if device.type == 'cuda':
        out['cuda_peak_mib'] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        out['gpu'] = torch.cuda.get_device_name(device)
    print('RESULT ' + json.dumps(out), flush=True)


def _run_child(args, cell: str, mode: str, batch: int) -> dict:
    env = dict(os.environ, **MALLOC_ENV)
    here = os.path.dirname(os.path.abspath(__file__))
    env['PYTHONPATH'] = os.pathsep.join([os.path.dirname(here)] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    if args.threads > 0:
        env.setdefault('OMP_NUM_THREADS', str(args.threads))
    cmd = [sys.executable, '-W', 'ignore', os.path.abspath(__file__), '--child', '--cell', cell, '--mode', mode,
           '--batch', str(batch), '--device', args.device, '--threads', str(args.threads), '--repeats',
           str(args.repeats), '--warmup', str(args.warmup), '--space', args.space]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith('RESULT '):
            return json.loads(line[len('RESULT '):])
    raise RuntimeError(f'{cell}/{mode}/b{batch} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}')


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--device', default='cpu', help='cpu or cuda (or cuda:N)')
    ap.add_argument('--threads', type=int, default=None, help='torch threads (default 2 on CPU; 0 = leave as is)')
    ap.add_argument('--repeats', type=int, default=None, help='timed steps per configuration (default 5)')
    ap.add_argument('--warmup', type=int, default=None, help='untimed steps first (default 2)')
    ap.add_argument('--batch', type=int, nargs='+', default=None, help='batch sizes (default 32 64)')
    ap.add_argument('--cells', nargs='+', default=['straight', 'fast'], choices=sorted(CELLS))
    ap.add_argument('--modes', nargs='+', default=list(MODES), choices=MODES)
    ap.add_argument('--space', default='bnas', help='search space config (default: the paper supernet)')
    ap.add_argument('--quick', action='store_true', help='smoke check: batch 8, 1 warm-up, 2 repeats')
    ap.add_argument('--json', help='also write all results to this file')
    ap.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    ap.add_argument('--cell', help=argparse.SUPPRESS)
    ap.add_argument('--mode', help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads is None:
        args.threads = 2 if args.device == 'cpu' else 0
    if args.child:
        args.batch = args.batch[0]
        _child(args)
        return 0
    if args.batch is None:
        args.batch = [8] if args.quick else [32, 64]
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.device.startswith('cuda'):
        import torch
        if not torch.cuda.is_available():
            print('error: --device cuda but CUDA is not available', file=sys.stderr)
            return 2

    print(f'# search step bench: space={args.space} device={args.device} threads={args.threads or "default"} '
          f'warmup={args.warmup} repeats={args.repeats} (median); one fresh process per row', flush=True)
    results = []
    header = (f'{"mode":<7}{"batch":>6}  {"cell":<9}{"median s":>10}{"img/s":>9}{"best img/s":>12}{"CPU s":>8}'
              f'{"peak RSS MiB":>14}')
    if args.device != 'cpu':
        header += f'{"CUDA peak MiB":>15}'
    print(header + '   timed runs (s)', flush=True)
    for mode in args.modes:
        for batch in args.batch:
            row = {}
            for cell in args.cells:
                r = _run_child(args, cell, mode, batch)
                r['img_s'] = batch / r['median_s']
                r['best_img_s'] = batch / min(r['times'])
                results.append(r)
                row[cell] = r
                line = (f'{mode:<7}{batch:>6}  {cell:<9}{r["median_s"]:>10.3f}{r["img_s"]:>9.2f}'
                        f'{r["best_img_s"]:>12.2f}{r["cpu_s"]:>8.2f}{r["peak_rss_mib"]:>14.0f}')
                if 'cuda_peak_mib' in r:
                    line += f'{r["cuda_peak_mib"]:>15.0f}'
                print(line + '   ' + ' '.join(f'{t:.2f}' for t in r['times']), flush=True)
            base = row.get('straight')
            for cell, r in row.items():
                if base is not None and cell != 'straight':
                    msg = (f'{"":<13}  ratio {cell}/straight: speed x{r["img_s"] / base["img_s"]:.2f} '
                           f'(best-of x{r["best_img_s"] / base["best_img_s"]:.2f}, '
                           f'CPU time x{base["cpu_s"] / r["cpu_s"]:.2f}), '
                           f'peak RSS x{r["peak_rss_mib"] / base["peak_rss_mib"]:.2f}')
                    if 'cuda_peak_mib' in r:
                        msg += f', CUDA peak x{r["cuda_peak_mib"] / base["cuda_peak_mib"]:.2f}'
                    print(msg, flush=True)
    if args.device == 'cpu':
        print(f'# for scale, official code at batch 32 on a 2-vCPU VM, 2 threads (notes, not measured here): '
              f'weight step {OFFICIAL_CPU["weight"]} img/s, full iteration {OFFICIAL_CPU["full"]} img/s, '
              f'peak ~{OFFICIAL_CPU["peak_mib"]:.0f} MiB', flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
