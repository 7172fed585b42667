#!/usr/bin/env python
"""Images/s of a data-parallel BinaryDARTS search iteration, 1 vs 2 processes (torchrun, gloo or NCCL).

For each supernet (``tiny``: the quick preset's ``bnas-tiny`` space on 16x16 images; ``paper``: the ``bnas``
space, C=16, 8 cells, 4 nodes, on 32x32 images) a fresh job times full search iterations of the real
driver (:class:`~bnas_nni.search.driver.SearchDriver`: an architecture step on a validation batch, then a
weight step on a training batch, gradients averaged over the ranks) on random images:

* ``1 proc x T threads``: one process, the global batch ``B``;
* ``2 procs x 1 thread``: torchrun, per-rank batch ``B/2`` (the same global batch: what a data-parallel
  run that follows the single-process one does), with and without ``sync_bn``.

images/s = ``B`` / median iteration time (wall clock, rank 0, after warm-up). Scaling efficiency =
images/s of 2 processes / (2 x images/s of 1 process with 1 thread); "vs 1 proc x 2 threads" compares
with the same cores used by one process. Figures on a shared 2-core machine are noisy: repeat and
compare within one sitting.

Examples::

    python bench/search_ddp.py --quick                  # few iterations, both supernets
    python bench/search_ddp.py --nets paper --iters 6
    python bench/search_ddp.py --device cuda --threads 0   # a machine with 2 GPUs: NCCL
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NETS = {'tiny': {'space': 'bnas-tiny', 'image_size': 16, 'batch': 64},
        'paper': {'space': 'bnas', 'image_size': 32, 'batch': 32}}


def worker(args: argparse.Namespace) -> None:
    """One rank: build the driver on random images and time ``--iters`` iterations after ``--warmup``."""
    import torch

    from bnas_nni.search.driver import SearchDriver
    from bnas_nni.search.run import build_space, resolve_search_config, search_context
    from bnas_nni.search.strategies import build_strategy
    from bnas_nni.seeding import seed_everything

    if args.threads:
        torch.set_num_threads(args.threads)
    net = NETS[args.net]
    cfg = resolve_search_config(None, {'space': net['space'], 'device': args.device, 'dist_timeout': 600})
    ctx = search_context(cfg)
    per_rank = args.batch // ctx.world_size
    g = torch.Generator().manual_seed(0)
    n = per_rank * ctx.world_size * 2
    images = torch.randn(n, 3, net['image_size'], net['image_size'], generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    data = torch.utils.data.TensorDataset(images, labels)
    seed_everything(2)
    with tempfile.TemporaryDirectory() as tmp:
        driver = SearchDriver(build_space(cfg), build_strategy(cfg), train_data=data, val_data=data, run_dir=tmp,
                              epochs=1, batch_size=per_rank, tensorboard=False, log=lambda *_: None,
                              device=ctx.device, dist=ctx, sync_bn=args.sync_bn)
        dev = ctx.device
        x, y = images[:per_rank].to(dev), labels[:per_rank].to(dev)
        xv, yv = images[per_rank:2 * per_rank].to(dev), labels[per_rank:2 * per_rank].to(dev)
        times = []
        for i in range(args.warmup + args.iters):
            if dev.type == 'cuda':
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            driver.arch_step(xv, yv, 0)
            driver.weight_step(x, y, 0)
            if dev.type == 'cuda':
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    if ctx.is_main:
        Path(args.out).write_text(json.dumps({'times': times, 'world': ctx.world_size, 'per_rank': per_rank}))
    from bnas_nni.distributed import cleanup

    cleanup(ctx)


def _torchrun(nproc: int):
    exe = Path(sys.executable).with_name('torchrun')
    base = [str(exe)] if exe.exists() else [sys.executable, '-m', 'torch.distributed.run']
    return [*base, '--nnodes=1', f'--nproc_per_node={nproc}', '--rdzv-backend=c10d', '--rdzv-endpoint=127.0.0.1:0']


def measure(net: str, nproc: int, threads: int, sync_bn: bool, a: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / 'out.json'
        args = [str(Path(__file__).resolve()), '--worker', '--net', net, '--threads', str(threads), '--out', str(out),
                '--iters', str(a.iters), '--warmup', str(a.warmup), '--device', a.device, '--batch',
                str(a.batch or NETS[net]['batch'])] + (['--sync-bn'] if sync_bn else [])
        cmd = (_torchrun(nproc) if nproc > 1 else [sys.executable]) + args
        # passive OpenMP waiting, as the CLI sets it: spinning threads crawl on a busy machine
        env = {'OMP_WAIT_POLICY': 'PASSIVE', **os.environ, 'OMP_NUM_THREADS': str(max(threads, 1)),
               'GLOO_SOCKET_IFNAME': 'lo',
               'PYTHONPATH': os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')]))}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0 or not out.exists():
            raise SystemExit(f'{net} x{nproc} failed:\n{(proc.stdout + proc.stderr)[-2000:]}')
        result = json.loads(out.read_text())
    t = statistics.median(result['times'])
    return {'ips': (a.batch or NETS[net]['batch']) / t, 'median_s': t, 'best_s': min(result['times'])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--nets', default='tiny,paper')
    p.add_argument('--batch', type=int, default=0, help='global batch (default: tiny 64, paper 32)')
    p.add_argument('--iters', type=int, default=8)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--threads', type=int, default=2,
                   help='threads of the single process compared with (0: torch default)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--quick', action='store_true', help='3 iterations after 1 warm-up')
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--net', default='tiny', help=argparse.SUPPRESS)
    p.add_argument('--sync-bn', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--out', help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        a.threads = a.threads or 0
        return worker(a)
    if a.quick:
        a.iters, a.warmup = 3, 1
    print(f'search iteration (arch step + weight step), device {a.device}, {os.cpu_count()} CPUs; images/s of the '
          'global batch, median of', a.iters)
    for net in a.nets.split(','):
        batch = a.batch or NETS[net]['batch']
        one1 = measure(net, 1, 1, False, a)
        oneT = measure(net, 1, a.threads, False, a) if a.threads != 1 else one1
        two = measure(net, 2, 1, False, a)
        two_sync = measure(net, 2, 1, True, a)
        print(f'{net:5s} batch {batch}: 1 proc x 1 thread {one1["ips"]:7.1f} | 1 proc x {a.threads} threads '
              f'{oneT["ips"]:7.1f} | 2 procs x 1 thread (batch {batch // 2} each) {two["ips"]:7.1f}, sync_bn '
              f'{two_sync["ips"]:7.1f} images/s; scaling efficiency {two["ips"] / (2 * one1["ips"]):.2f} '
              f'(sync_bn {two_sync["ips"] / (2 * one1["ips"]):.2f}), vs 1 proc x {a.threads} threads '
              f'{two["ips"] / oneT["ips"]:.2f}x')


if __name__ == '__main__':
    main()
