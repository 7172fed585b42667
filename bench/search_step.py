#!/usr/bin/env python
"""Throughput, peak memory and a time breakdown of one BNAS search step on the paper supernet.

For each configuration (mixed-cell implementation and memory layout), batch size and step kind, a fresh
subprocess builds the supernet with ``BinaryDARTS(mixed_cell=...).mutate_model(space)`` (default: the
``bnas`` space, C=16, 8 cells, 4 nodes, 7 ops) and times

* ``weight``: a weight step -- binarized forward, cross-entropy, backward (alphas frozen), latent-weight
  constraint and SGD(0.025, momentum 0.9, wd 3e-4) step;
* ``full``: a full search iteration in the official order -- an architecture step on a validation batch
  (cross-entropy minus the diversity bonus ``diversity_weight(epoch) * mean_edge_entropy``, weights
  frozen, Adam 3e-4, betas (0.5, 0.999), wd 1e-3), then the weight step on a training batch.

Configurations (``--cells``): ``straight`` (:class:`~bnas_nni.search.mixed_cell.BinaryMixedCell`, NCHW),
``straight-cl``, ``fast`` (:class:`~bnas_nni.search.fast_cell.FastBinaryMixedCell`, model and inputs
channels-last, as ``channels_last: true`` runs it), ``fast-nchw`` (NCHW model; the cell converts
internally) and ``fast-ref`` (the fast cell with ``BNAS_FAST_KERNELS=0``: fp32 kernels only, no int8).

Timings are medians after warm-up (wall clock, and the process CPU time of all its threads, which is less
sensitive to other load on a shared machine; the best run is printed too); images/s counts the training
images of one iteration (the batch size), as the official baseline does. Peak memory is the child's RSS
high-water mark and, on CUDA, ``torch.cuda.max_memory_allocated``. glibc malloc is kept from returning
memory to the OS in the children (the variables the official baseline uses) for stable figures.

``--profile`` adds a breakdown of one more step by torch.profiler (self CPU time per category:
convolutions forward fp32/int8, input-gradient and weight-gradient; batch norm; sign/masks/ReLU; pools;
other elementwise and copies; optimizer; Python and autograd). ``--official SRC`` also runs the official
step benchmark (``step.py`` of the official-code scripts, on an unmodified official ``src/`` checkout) in
the same sitting and prints the ratios.

Examples::

    python bench/search_step.py --quick                 # smoke check: batch 8, few repeats
    python bench/search_step.py --profile               # batch 32, CPU, 2 threads, with breakdown
    python bench/search_step.py --official ~/bnas/src   # and the official code, same sitting
    python bench/search_step.py --device cuda --threads 0
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: name -> (cell class, channels-last model and inputs, extra environment)
CELLS = {
    'straight': ('bnas_nni.search.mixed_cell:BinaryMixedCell', False, {}),
    'straight-cl': ('bnas_nni.search.mixed_cell:BinaryMixedCell', True, {}),
    'fast': ('bnas_nni.search.fast_cell:FastBinaryMixedCell', True, {}),
    'fast-nchw': ('bnas_nni.search.fast_cell:FastBinaryMixedCell', False, {}),
    'fast-ref': ('bnas_nni.search.fast_cell:FastBinaryMixedCell', True, {'BNAS_FAST_KERNELS': '0'}),
}
MODES = ('weight', 'full')
MALLOC_ENV = {
    'MALLOC_TRIM_THRESHOLD_': '68719476736',
    'MALLOC_MMAP_THRESHOLD_': '68719476736',
    'MALLOC_TOP_PAD_': '1073741824',
}
# official code, 2-vCPU VM, 2 threads, batch 32 (shared/notes/bnas-original.md section 7, run 2)
OFFICIAL_NOTES_CPU = {'weight': 6.2, 'full': 2.9, 'peak_mib': 4.3 * 1024}

# ------------------------------------------------------------------ profile categories

_CONV_FWD = {'aten::mkldnn_convolution', 'aten::_slow_conv2d_forward', 'aten::thnn_conv2d',
             'aten::_nnpack_spatial_convolution', 'aten::slow_conv_dilated2d', 'aten::convolution',
             'aten::_convolution', 'aten::conv2d', 'aten::cudnn_convolution'}
_BN = {'aten::native_batch_norm', 'aten::native_batch_norm_backward', 'aten::batch_norm',
       'aten::_batch_norm_impl_index', 'aten::_batch_norm_impl_index_backward', 'aten::_native_batch_norm_legit',
       'aten::_native_batch_norm_legit_no_training', 'aten::_batch_norm_with_update',
       'aten::batch_norm_backward', 'aten::_batch_norm_no_update'}
_SIGN = {'aten::sign', 'aten::sign_', 'aten::abs', 'aten::lt', 'aten::gt', 'aten::le', 'aten::ge',
         'aten::threshold_backward', 'aten::where', 'aten::clamp_min', 'aten::clamp_min_', 'aten::relu',
         'aten::relu_', 'aten::threshold', 'aten::hardtanh_backward', 'aten::masked_fill_'}
#: categories in print order
CATEGORIES = ('conv forward fp32', 'conv forward int8', 'conv recompute int8 (backward)', 'int8 weight packing',
              'conv input-grad', 'conv weight-grad', 'conv backward (autograd: input and weight)',
              'batch norm', 'sign / masks / ReLU', 'pooling', 'fused elementwise passes (C++)',
              'other elementwise and copies', 'optimizer', 'Python and autograd')


def _category(ev, cache: Dict[int, Optional[str]]) -> str:
    name = ev.name
    scope = _scope_of(ev, cache)
    if scope == 'optimizer':
        return 'optimizer'
    if name == 'bnas::fused':
        return 'fused elementwise passes (C++)'
    if name == 'onednn::qconv2d_pointwise':
        return 'conv recompute int8 (backward)' if scope == 'bnas::recompute' else 'conv forward int8'
    if name == 'onednn::qconv_prepack':
        return 'int8 weight packing'
    if name == 'aten::convolution_backward':
        if scope == 'bnas::input_grad':
            return 'conv input-grad'
        if scope == 'bnas::weight_grad':
            return 'conv weight-grad'
        return 'conv backward (autograd: input and weight)'
    if name in _CONV_FWD:
        return 'conv forward fp32'
    if name in _BN:
        return 'batch norm'
    if name in _SIGN:
        return 'sign / masks / ReLU'
    if 'pool' in name:
        return 'pooling'
    if name.startswith('aten::') or name.startswith('onednn::'):
        return 'other elementwise and copies'
    return 'Python and autograd'


def _scope_of(ev, cache: Dict[int, Optional[str]]) -> Optional[str]:
    """The innermost enclosing bnas:: scope or the optimizer, walking the profiler's parent links."""
    chain = []
    e = ev.cpu_parent
    found = None
    while e is not None:
        if e.id in cache:
            found = cache[e.id]
            break
        chain.append(e)
        if e.name.startswith('bnas::'):
            found = e.name
            break
        if e.name.startswith('Optimizer.'):
            found = 'optimizer'
            break
        e = e.cpu_parent
    for c in chain:
        cache[c.id] = found
    return found


def profile_breakdown(step, wall_s: float) -> Dict[str, float]:
    """Self CPU milliseconds of one call of ``step`` per category, plus the time outside any profiled op
    (interpreter work between ops) under 'Python and autograd'. ``wall_s`` is an unprofiled step's time,
    printed beside the profiled total (the profiler itself adds overhead to every small op)."""
    from torch.profiler import ProfilerActivity, profile
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    profiled = time.perf_counter() - t0
    out = {c: 0.0 for c in CATEGORIES}
    cache: Dict[int, Optional[str]] = {}
    total_self = 0.0
    for ev in prof.events():
        ms = ev.self_cpu_time_total / 1000.0
        total_self += ms
        out[_category(ev, cache)] += ms
    out['Python and autograd'] += max(0.0, profiled * 1000.0 - total_self)
    out['_profiled_ms'] = profiled * 1000.0
    out['_unprofiled_ms'] = wall_s * 1000.0
    return out


def print_breakdown(label: str, bd: Dict[str, float]) -> None:
    total = sum(v for k, v in bd.items() if not k.startswith('_'))
    print(f'  profile of one {label} (self CPU time of the main thread, torch.profiler; profiled step '
          f'{bd["_profiled_ms"] / 1000:.2f} s vs {bd["_unprofiled_ms"] / 1000:.2f} s unprofiled):', flush=True)
    for c in CATEGORIES:
        if bd.get(c, 0.0) > 0:
            print(f'    {c:<44}{bd[c]:>9.0f} ms {100 * bd[c] / total:>5.1f}%', flush=True)


# ------------------------------------------------------------------ the model and the steps


def _load_class(spec: str):
    import importlib
    mod, name = spec.split(':')
    return getattr(importlib.import_module(mod), name)


def build_supernet(cell_cls, space: str = 'bnas'):
    """The space turned into a DARTS supernet whose cells are ``cell_cls``, by ``BinaryDARTS``."""
    import warnings
    warnings.filterwarnings('ignore', message='.*is found to be not a nn.Module.*')
    from bnas_nni.search.binary_darts import BinaryDARTS
    from bnas_nni.space import BNASSpace
    return BinaryDARTS(mixed_cell=cell_cls).mutate_model(BNASSpace.from_config(space))


def _objective():
    try:  # the search objective's home after the driver restructure
        from bnas_nni.search.objective import diversity_weight, mean_edge_entropy
    except ImportError:
        from bnas_nni.search.binary_darts import diversity_weight, mean_edge_entropy
    return diversity_weight, mean_edge_entropy


class SearchSteps:
    """The supernet, its two optimizers and the two steps of one search iteration (public pieces only)."""

    def __init__(self, cell_cls, *, space: str = 'bnas', batch: int = 32, device='cpu', channels_last: bool = False,
                 seed: int = 0) -> None:
        import torch

        from bnas_nni.quant import attach_latent_constraint
        from bnas_nni.search.binary_darts import alpha_matrices, arch_parameters
        self.torch = torch
        self.diversity_weight, self.mean_edge_entropy = _objective()
        self.alpha_matrices = alpha_matrices
        torch.manual_seed(seed)
        self.device = torch.device(device)
        model = build_supernet(cell_cls, space).to(self.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        self.model = model
        self.alphas = arch_parameters(model)
        alpha_ids = {id(p) for p in self.alphas}
        self.weights = [p for p in model.parameters() if id(p) not in alpha_ids]
        self.w_opt = torch.optim.SGD(self.weights, lr=0.025, momentum=0.9, weight_decay=3e-4)
        attach_latent_constraint(self.w_opt, model)
        self.a_opt = torch.optim.Adam(self.alphas, lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
        g = torch.Generator().manual_seed(seed + 1)
        fmt = torch.channels_last if channels_last else torch.contiguous_format

        def batch_of(n):
            x = torch.randn(n, 3, 32, 32, generator=g).to(self.device).contiguous(memory_format=fmt)
            return x, torch.randint(0, 10, (n,), generator=g).to(self.device)

        self.train_batch, self.val_batch = batch_of(batch), batch_of(batch)
        self.epoch = 0

    def _frozen(self, params):
        from bnas_nni.search.binary_darts import requires_grad_off

        return requires_grad_off(params)

    def arch_step(self) -> None:
        F = self.torch.nn.functional
        x, y = self.val_batch
        with self._frozen(self.weights):
            self.a_opt.zero_grad(set_to_none=True)
            entropy = self.mean_edge_entropy(self.alpha_matrices(self.model).values())
            loss = F.cross_entropy(self.model(x), y) - self.diversity_weight(self.epoch) * entropy
            loss.backward()
            self.a_opt.step()

    def weight_step(self) -> None:
        F = self.torch.nn.functional
        x, y = self.train_batch
        with self._frozen(self.alphas):
            self.w_opt.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(x), y).backward()
            self.w_opt.step()

    def full_iteration(self) -> None:
        self.arch_step()
        self.weight_step()


def _child(args) -> None:
    import resource

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    spec, channels_last, _ = CELLS[args.cell]
    steps = SearchSteps(_load_class(spec), space=args.space, batch=args.batch, device=args.device,
                        channels_last=channels_last)
    device = steps.device
    step = steps.full_iteration if args.mode == 'full' else steps.weight_step

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
        'cell': args.cell, 'mode': args.mode, 'batch': args.batch, 'times': times,
        'median_s': statistics.median(times), 'cpu_s': statistics.median(cpu_times),
        'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,  # KiB on Linux
        'threads': torch.get_num_threads(), 'device': str(device),
    }
    if device.type == 'cuda':
        out['cuda_peak_mib'] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        out['gpu'] = torch.cuda.get_device_name(device)
    if args.profile and device.type == 'cpu':
        out['profile'] = profile_breakdown(step, min(times))
    print('RESULT ' + json.dumps(out), flush=True)


def child_env(cell: str, threads: int, passive: bool = False) -> Dict[str, str]:
    env = dict(os.environ, **MALLOC_ENV, **CELLS[cell][2])
    if passive:
        env['OMP_WAIT_POLICY'] = 'PASSIVE'

    env['PYTHONPATH'] = os.pathsep.join([REPO] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    if threads > 0:
        env.setdefault('OMP_NUM_THREADS', str(threads))
    return env


def _run_child(args, cell: str, mode: str, batch: int) -> dict:
    cmd = [sys.executable, '-W', 'ignore', os.path.abspath(__file__), '--child', '--cell', cell, '--mode', mode,
           '--batch', str(batch), '--device', args.device, '--threads', str(args.threads), '--repeats',
           str(args.repeats), '--warmup', str(args.warmup), '--space', args.space] + (['--profile'] if args.profile
                                                                                     else [])
    proc = subprocess.run(cmd, env=child_env(cell, args.threads, args.passive), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith('RESULT '):
            return json.loads(line[len('RESULT '):])
    raise RuntimeError(f'{cell}/{mode}/b{batch} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}')


# ------------------------------------------------------------------ the official code, same sitting


def default_official_scripts() -> str:
    """The official-code scripts (``step.py``, ``search_epoch.py``): ``$BNAS_OFFICIAL_SCRIPTS`` or the
    ``shared/bench-official`` folder beside the checkout."""
    return os.environ.get('BNAS_OFFICIAL_SCRIPTS') or os.path.join(os.path.dirname(REPO), 'shared', 'bench-official')


def run_official_step(src: str, scripts: str, threads: int, passive: bool = False) -> Dict[str, float]:
    """Run the official step bench (batch 32, medians of 5 after 2) and parse its img/s and peak RSS."""
    env = dict(os.environ, **MALLOC_ENV, BNAS_SRC=os.path.abspath(src))
    if passive:
        env['OMP_WAIT_POLICY'] = 'PASSIVE'
    env.setdefault('OMP_NUM_THREADS', str(threads or 2))
    proc = subprocess.run([sys.executable, '-W', 'ignore', os.path.join(scripts, 'step.py'), 'search'], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: Dict[str, float] = {}
    for line in proc.stdout.splitlines():
        m = re.match(r'search (weight step|full iter).*median ([\d.]+) ms/iter -> ([\d.]+) img/s', line)
        if m:
            key = 'weight' if m.group(1) == 'weight step' else 'full'
            out[key + '_s'] = float(m.group(2)) / 1000.0
            out[key] = 32 / out[key + '_s']
        m = re.match(r'max RSS \(GiB\): ([\d.]+)', line)
        if m:
            out['peak_mib'] = float(m.group(1)) * 1024
    if 'full' not in out:
        raise RuntimeError(f'official step bench failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}')
    return out


# ------------------------------------------------------------------ main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--device', default='cpu', help='cpu or cuda (or cuda:N)')
    ap.add_argument('--threads', type=int, default=None, help='torch threads (default 2 on CPU; 0 = leave as is)')
    ap.add_argument('--repeats', type=int, default=None, help='timed steps per configuration (default 5)')
    ap.add_argument('--warmup', type=int, default=None, help='untimed steps first (default 2)')
    ap.add_argument('--batch', type=int, nargs='+', default=None, help='batch sizes (default 32)')
    ap.add_argument('--cells', nargs='+', default=['straight', 'fast'], choices=sorted(CELLS))
    ap.add_argument('--modes', nargs='+', default=list(MODES), choices=MODES)
    ap.add_argument('--space', default='bnas', help='search space config (default: the paper supernet)')
    ap.add_argument('--profile', action='store_true', help='print a time breakdown of one more step per row')
    ap.add_argument('--official', metavar='SRC', help='also run the official step bench on this official src/')
    ap.add_argument('--official-scripts', metavar='DIR', default=None,
                    help='folder of the official-code scripts (default: $BNAS_OFFICIAL_SCRIPTS or '
                         '../shared/bench-official beside the checkout)')
    ap.add_argument('--passive', action='store_true',
                    help='OMP_WAIT_POLICY=PASSIVE on every side (steadier on a machine shared with other work)')
    ap.add_argument('--rounds', type=int, default=1,
                    help='run the official bench and every row this many times, alternating, and print the '
                         'medians over rounds and their ratio (steadier on a machine whose speed drifts)')
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
        args.batch = [8] if args.quick else [32]
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.device.startswith('cuda'):
        import torch
        if not torch.cuda.is_available():
            print('error: --device cuda but CUDA is not available', file=sys.stderr)
            return 2
    if args.official and not os.path.isfile(os.path.join(args.official, 'model_search.py')):
        print(f'error: --official {args.official}: not an official BNAS src/ folder (no model_search.py)',
              file=sys.stderr)
        return 2
    scripts = args.official_scripts or default_official_scripts()
    if args.official and not os.path.isfile(os.path.join(scripts, 'step.py')):
        print(f'error: no step.py in {scripts}; pass --official-scripts DIR', file=sys.stderr)
        return 2

    print(f'# search step bench: space={args.space} device={args.device} threads={args.threads or "default"} '
          f'warmup={args.warmup} repeats={args.repeats} (median); one fresh process per row'
          f'{"; passive OpenMP waits" if args.passive else ""}', flush=True)
    if args.rounds < 1:
        print(f'error: --rounds {args.rounds}: give 1 or more', file=sys.stderr)
        return 2
    results = []
    officials: List[Dict[str, float]] = []
    for rnd in range(args.rounds):
        if args.rounds > 1:
            print(f'# round {rnd + 1} of {args.rounds}', flush=True)
        official = _bench_round(args, scripts, results)
        if official is not None:
            officials.append(official)
    if args.rounds > 1:
        _print_rounds(results, officials)
    if args.device == 'cpu' and not officials:
        print(f'# for scale, official code at batch 32 on a 2-vCPU VM, 2 threads (notes, not measured here): '
              f'weight step {OFFICIAL_NOTES_CPU["weight"]} img/s, full iteration {OFFICIAL_NOTES_CPU["full"]} img/s, '
              f'peak ~{OFFICIAL_NOTES_CPU["peak_mib"]:.0f} MiB; --official SRC measures it here', flush=True)
    if args.json:
        if REPO not in sys.path:
            sys.path.insert(0, REPO)
        from bnas_nni.io import atomic_write_text  # a killed bench leaves no half-written file
        atomic_write_text(args.json, json.dumps({'official': officials, 'rows': results}, indent=1))
    return 0


def _print_rounds(results: List[dict], officials: List[Dict[str, float]]) -> None:
    """Medians over the rounds of each side's per-round median, and the ratio of those."""
    print(f'# over {len(officials) or "the"} rounds (median of the per-round medians)', flush=True)
    rows: Dict[tuple, List[dict]] = {}
    for r in results:
        rows.setdefault((r['mode'], r['batch'], r['cell']), []).append(r)
    for mode in MODES:
        if officials:
            times = [o[mode + '_s'] for o in officials]
            print(f'official  {mode:<7} b32  {statistics.median(times):.3f} s  rounds: '
                  + ' '.join(f'{t:.2f}' for t in times), flush=True)
        for (m, batch, cell), rs in rows.items():
            if m != mode:
                continue
            med = statistics.median(r['median_s'] for r in rs)
            line = (f'{cell:<9} {mode:<7} b{batch:<3} {med:.3f} s  rounds: '
                    + ' '.join(f'{r["median_s"]:.2f}' for r in rs))
            if officials and batch == 32:
                ratio = statistics.median(o[mode + '_s'] for o in officials) / med
                per = [o[mode + '_s'] / r['median_s'] for o, r in zip(officials, rs)]
                line += (f'   ratio {cell}/official: speed x{ratio:.2f} (per round '
                         + ' '.join(f'x{x:.2f}' for x in per) + ')')
            print(line, flush=True)


def _bench_round(args, scripts: str, results: List[dict]) -> Optional[Dict[str, float]]:
    """One round: the official step bench (with --official), then every row; appends the rows' results."""
    official = None
    if args.official:
        print('# official step bench (same sitting) ...', flush=True)
        official = run_official_step(args.official, scripts, args.threads, args.passive)
        print(f'official  batch 32: weight step {official["weight"]:.2f} img/s, full iteration '
              f'{official["full"]:.2f} img/s ({official["full_s"]:.2f} s), peak RSS {official["peak_mib"]:.0f} MiB',
              flush=True)
    header = (f'{"mode":<7}{"batch":>6}  {"cell":<12}{"median s":>10}{"img/s":>9}{"best img/s":>12}{"CPU s":>8}'
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
                line = (f'{mode:<7}{batch:>6}  {cell:<12}{r["median_s"]:>10.3f}{r["img_s"]:>9.2f}'
                        f'{r["best_img_s"]:>12.2f}{r["cpu_s"]:>8.2f}{r["peak_rss_mib"]:>14.0f}')
                if 'cuda_peak_mib' in r:
                    line += f'{r["cuda_peak_mib"]:>15.0f}'
                print(line + '   ' + ' '.join(f'{t:.2f}' for t in r['times']), flush=True)
                if 'profile' in r:
                    print_breakdown('full iteration' if mode == 'full' else 'weight step', r['profile'])
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
                if official is not None and batch == 32:
                    print(f'{"":<13}  ratio {cell}/official: speed x{r["img_s"] / official[mode]:.2f} '
                          f'(best-of x{r["best_img_s"] / official[mode]:.2f}), '
                          f'peak RSS x{r["peak_rss_mib"] / official["peak_mib"]:.2f}', flush=True)
    return official


if __name__ == '__main__':
    sys.exit(main())
