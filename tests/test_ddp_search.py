"""Data-parallel BinaryDARTS under ``torchrun`` with 2 gloo processes on real Fashion-MNIST images.

The tiny preset, a few steps, one thread per rank. torchrun runs in a private network namespace where one
exists (its rendezvous store listens on every interface, see the README's "Data-parallel search"); every
process a test starts is killed at its end, also when it fails. This file is also the worker script of
some runs: ``python tests/test_ddp_search.py equiv|cli ...``, alone or under torchrun.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

REPO = Path(__file__).resolve().parent.parent
PRESET = REPO / 'experiments' / 'search_quick_fashion.yaml'


# --------------------------------------------------------------------------- worker modes (one rank each)


class _Float64:
    """A dataset whose images are float64."""

    def __init__(self, data) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return x.double(), y


def _worker_equiv(out: str, batch_size: int, sync_bn: bool, epochs: int, images: int) -> None:
    """A search on un-augmented images (so that 1 and 2 processes see the same pixels) that records the
    alphas after every architecture step; rank 0 writes them to ``out``, every rank its fingerprints.
    ``BNAS_TEST_FULL_PRECISION=1``: the same supernet without binarization; ``BNAS_TEST_FLOAT64=1``: all
    in float64 (the library code unchanged); ``BNAS_TEST_PERTURB_RANK=R``: rank R nudges one alpha after
    its first step (a diverging rank)."""
    import torch

    from bnas_nni.data import DatasetView, FashionMNIST32
    from bnas_nni.distributed import cleanup
    from bnas_nni.search.data_parallel import model_fingerprint, quiet_off_main
    from bnas_nni.search.driver import SearchDriver
    from bnas_nni.search.run import build_space, resolve_search_config, search_context
    from bnas_nni.search.strategies import build_strategy
    from bnas_nni.seeding import seed_everything

    torch.set_num_threads(1)
    overrides = {'batch_size': batch_size, 'epochs': epochs, 'device': 'cpu', 'dist_timeout': 60}
    if os.environ.get('BNAS_TEST_FULL_PRECISION'):
        overrides.update(binarizer='none', activation='identity')
    cfg = resolve_search_config(str(PRESET), overrides)
    ctx = search_context(cfg)
    plain = FashionMNIST32(None, train=True, subset=2 * images, augment=False)
    if os.environ.get('BNAS_TEST_FLOAT64'):
        torch.set_default_dtype(torch.float64)
        plain = _Float64(plain)
    train, val = DatasetView(plain, 0, images, 16), DatasetView(plain, images, 2 * images, 16)
    seed_everything(int(cfg['seed']))
    driver = SearchDriver(build_space(cfg), build_strategy(cfg), train_data=train, val_data=val,
                          run_dir=Path(out).parent / 'run', epochs=epochs, batch_size=batch_size, lr=cfg['lr'],
                          lr_min=cfg['lr_min'], seed=cfg['seed'], tensorboard=False, log=print, dist=ctx,
                          sync_bn=sync_bn)
    trajectory: List[List[float]] = []
    arch_step = driver.arch_step
    perturb = os.environ.get('BNAS_TEST_PERTURB_RANK')

    def recording_arch_step(x, y, epoch):
        stats = arch_step(x, y, epoch)
        if perturb is not None and int(perturb) == ctx.rank and not trajectory:
            with torch.no_grad():
                driver.alphas[0][0] += 1e-6
        trajectory.append(torch.cat([a.detach().reshape(-1) for a in driver.alphas]).double().tolist())
        return stats

    driver.arch_step = recording_arch_step

    def search() -> None:
        with quiet_off_main(ctx):        # a user-facing error: one line from rank 0, status 2 everywhere
            driver.run()

    try:
        from bnas_nni.cli import run_guarded

        rc = run_guarded(search)
        if rc:
            raise SystemExit(rc)
        with open(f'{out}.rank{ctx.rank}', 'w') as f:
            json.dump(model_fingerprint(driver.module), f)
        if ctx.is_main:
            with open(out, 'w') as f:
                json.dump({'alphas': trajectory, 'genotypes': [h['genotype'] for h in driver.history]}, f)
    finally:
        cleanup(ctx)


def _worker_cli(argv: List[str]) -> int:
    """``bnas-nni`` with ``$BNAS_TEST_RANK1_ARGS`` appended on rank 1 only (a node given other input)."""
    from bnas_nni.cli import main

    if os.environ.get('RANK') == '1':
        argv = argv + os.environ.get('BNAS_TEST_RANK1_ARGS', '').split()
    return main(argv)


if __name__ == '__main__':
    if sys.argv[1] == 'equiv':
        _worker_equiv(sys.argv[2], int(sys.argv[3]), sys.argv[4] == 'sync', int(sys.argv[5]), int(sys.argv[6]))
        sys.exit(0)
    sys.exit(_worker_cli(sys.argv[2:]))


# --------------------------------------------------------------------------- the tests

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from harness import Job, child_env, descendants, torchrun, torchrun_command  # noqa: E402

from bnas_nni.data import DEBIAN_FASHION_MNIST  # noqa: E402
from bnas_nni.integrations.nni.loopback import loopback_namespace_prefix  # noqa: E402

FASHION = Path(os.environ.get('BNAS_FASHION_MNIST') or DEBIAN_FASHION_MNIST)
needs_fashion = pytest.mark.skipif(not (FASHION / 'train-images-idx3-ubyte.gz').is_file(),
                                   reason='Debian dataset-fashion-mnist is not installed')
SETS = ['--set', 'threads=1', '--set', 'progress=never', '--set', 'tensorboard=true']
QUICK = ['--config', str(PRESET), *SETS]


@pytest.fixture
def jobs():
    started: List[Job] = []

    def start(cmd: Sequence[str], log: Path, **env: str) -> Job:
        job = Job(cmd, child_env(**env), log)
        started.append(job)
        return job

    yield start
    for job in started:
        job.close()
    time.sleep(0.2)
    assert not [p for job in started for p in job.leftovers()], 'processes left behind'


def _run(jobs, tmp_path: Path, name: str, cmd: List[str], timeout: float = 240, **env: str):
    job = jobs(cmd, tmp_path / f'{name}.log', **env)
    rc = job.wait(timeout)
    return rc, job.output(), job


def _our_lines(output: str) -> List[str]:
    """Lines our program printed, without torch/torchrun's own (warnings, the failure summary)."""
    noise = re.compile(r'^\s*$|^\[[WIE]\d{4}|socket\.cpp|torch\.distributed|^\s*(rank|exitcode|error_file|traceback|'
                       r'host|time)\s*:|^=+$|^-+$|Failures:|Root Cause|<NO_OTHER_FAILURES>|^\S+\.py FAILED|'
                       r'^Traceback|^\s+File |^\s+\S|^\w+Error|warnings\.warn|Warning')
    return [line for line in output.splitlines() if not noise.search(line)]


def _failed_ranks(output: str) -> Dict[int, int]:
    """torchrun's failure summary: ``{rank: exit code}``."""
    found = re.findall(r'rank\s*:\s*(\d+)\s*\(local_rank.*?\n\s*exitcode\s*:\s*(-?\d+)', output)
    return {int(r): int(c) for r, c in found}


# ------------------------------------------------------------------ in-process units (no torchrun)


def test_shard_sampler_keeps_the_single_process_batches():
    from bnas_nni.search.data_parallel import EpochShardSampler

    n, b = 50, 8
    single = list(torch.utils.data.RandomSampler(range(n), generator=torch.Generator().manual_seed(11)))
    one = list(EpochShardSampler(n, 0, 1, torch.Generator().manual_seed(11)))
    assert one == single                                   # one rank: exactly torch's order
    shards = [list(EpochShardSampler(n, r, 2, torch.Generator().manual_seed(11))) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 25
    for k in range(3):                                     # rank batches of b/2 make up the batch of b
        union = shards[0][k * b // 2:(k + 1) * b // 2] + shards[1][k * b // 2:(k + 1) * b // 2]
        assert sorted(union) == sorted(single[k * b:(k + 1) * b])
    three = [list(EpochShardSampler(n, r, 3, torch.Generator().manual_seed(11))) for r in range(3)]
    flat = sum(three, [])
    assert len(flat) == 51 and set(flat) == set(range(n))  # padded by one repeated index


def test_synced_batch_norm_on_one_process_is_batch_norm():
    """The synced normalisation (module and fast-cell groups) computes nn.BatchNorm2d's function:
    outputs, input gradients and running statistics, also with one process (no collective)."""
    from bnas_nni.distributed import DistContext
    from bnas_nni.search.data_parallel import BatchNormSync, SyncedBatchNorm2d
    from bnas_nni.search.fast_cell import _BNGroup

    torch.manual_seed(0)
    x = torch.randn(6, 5, 7, 7) * 3 + 1
    ref = torch.nn.BatchNorm2d(5)
    ref.weight.data.uniform_(0.5, 1.5)
    mine = torch.nn.BatchNorm2d(5)
    mine.load_state_dict(ref.state_dict())
    mine.__class__ = SyncedBatchNorm2d
    mine.sync = BatchNormSync(DistContext())
    g = torch.randn(6, 5, 7, 7)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ref(xa) * g).sum().backward()
    (mine(xb) * g).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    for name in ('running_mean', 'running_var', 'num_batches_tracked'):
        torch.testing.assert_close(getattr(mine, name), getattr(ref, name))
    # a fast-cell BN group: weighted normalisation through the sync object equals the fused path
    bns = [torch.nn.BatchNorm2d(5, affine=False) for _ in range(2)]
    fused, synced = _BNGroup(bns), _BNGroup([torch.nn.BatchNorm2d(5, affine=False) for _ in range(2)])
    synced.sync = BatchNormSync(DistContext())
    p = torch.tensor([0.3, 0.7])
    pa, pb = p.clone().requires_grad_(), p.clone().requires_grad_()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    sum((t * g).sum() for t in fused.normalize_weighted(xa, True, pa)).backward()
    sum((t * g).sum() for t in synced.normalize_weighted(xb, True, pb)).backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(synced.bns[1].running_var, fused.bns[1].running_var)


def _spawned_bn(rank: int, world: int, store: str, x: torch.Tensor, g: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    from bnas_nni.distributed import DistContext
    from bnas_nni.search.data_parallel import BatchNormSync, SyncedBatchNorm2d

    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=world)
    try:
        bn = torch.nn.BatchNorm2d(x.size(1))
        bn.__class__ = SyncedBatchNorm2d
        bn.sync = BatchNormSync(DistContext(rank=rank, world_size=world, backend='gloo'))
        half = x.size(0) // world
        xs = x[rank * half:(rank + 1) * half].clone().requires_grad_()
        (bn(xs) * g[rank * half:(rank + 1) * half]).sum().backward()
        torch.save({'y': bn(xs).detach(), 'gx': xs.grad, 'rv': bn.running_var.clone()}, f'{out}.{rank}')
    finally:
        dist.destroy_process_group()


def test_synced_batch_norm_over_two_processes_is_the_whole_batch(tmp_path, monkeypatch):
    """Two gloo processes (no torchrun: a file store, loopback only), each normalising half a batch, get
    the outputs and input gradients of one nn.BatchNorm2d over the whole batch."""
    import torch.multiprocessing as mp

    monkeypatch.setenv('GLOO_SOCKET_IFNAME', 'lo')
    torch.manual_seed(1)
    x, g = torch.randn(8, 3, 5, 5) * 2 - 1, torch.randn(8, 3, 5, 5)
    mp.spawn(_spawned_bn, args=(2, str(tmp_path / 'store'), x, g, str(tmp_path / 'out')), nprocs=2, join=True)
    ref = torch.nn.BatchNorm2d(3)
    xr = x.clone().requires_grad_()
    (ref(xr) * g).sum().backward()
    parts = [torch.load(tmp_path / f'out.{r}', weights_only=True) for r in range(2)]
    # the second forward of each rank ran in training mode again: compare to a reference stepped twice
    ref(x)
    torch.testing.assert_close(torch.cat([p['gx'] for p in parts]), xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts[0]['rv'], ref.running_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts[0]['rv'], parts[1]['rv'], rtol=0, atol=0)


@needs_fashion
def test_each_step_hands_the_seam_only_its_own_gradients(tmp_path):
    """The architecture step all-reduces alpha gradients only and the weight step weight gradients only
    (what DDP's reducer could not do with the two alternating optimizers); the seam's loss is used."""
    from bnas_nni.data import search_splits
    from bnas_nni.search.driver import SearchDriver
    from bnas_nni.search.run import build_space, resolve_search_config
    from bnas_nni.search.strategies import build_strategy

    cfg = resolve_search_config(str(PRESET), {'train_subset': 64, 'batch_size': 16, 'epochs': 1, 'device': 'cpu'})
    train, val, val_eval = search_splits(cfg)
    driver = SearchDriver(build_space(cfg), build_strategy(cfg), train_data=train, val_data=val, eval_data=val_eval,
                          run_dir=tmp_path / 'run', epochs=1, batch_size=16, tensorboard=False, log=lambda *_: None)
    calls = []

    def recording(params, loss):
        calls.append(({id(p) for p in params}, all(p.grad is not None for p in params)))
        return loss

    driver.module.grad_sync = recording
    driver.run()
    alphas, weights = {id(a) for a in driver.alphas}, {id(w) for w in driver.weights}
    assert len(calls) == 4 and all(ok for _, ok in calls)       # 2 iterations, every gradient present
    assert [c[0] for c in calls] == [alphas, weights, alphas, weights]
    assert not alphas & weights


def test_more_ranks_than_batches_is_one_line():
    from bnas_nni.distributed import DistContext
    from bnas_nni.errors import ConfigError
    from bnas_nni.search.data_parallel import check_world_fits

    check_world_fits(64, 64, 32, DistContext(rank=0, world_size=2))
    with pytest.raises(ConfigError, match=r'^3 processes but the weight half has only 2 batch\(es\)'):
        check_world_fits(64, 200, 32, DistContext(rank=0, world_size=3))


def test_new_keys_are_typed_and_dist_timeout_may_change_on_resume():
    from bnas_nni.config import SEARCH, resolve
    from bnas_nni.errors import ConfigError

    cfg = resolve(SEARCH, overrides={'sync_bn': 'true', 'dist_timeout': '30'})
    assert cfg['sync_bn'] is True and cfg['dist_timeout'] == 30.0
    assert 'dist_timeout' in SEARCH.resume_free and 'sync_bn' not in SEARCH.resume_free
    with pytest.raises(ConfigError, match='sync_bn'):
        resolve(SEARCH, overrides={'sync_bn': 'maybe'})


# ------------------------------------------------------------------ torchrun, 2 gloo processes


@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ranks_follow_one_process_with_synced_bn(tmp_path, jobs):
    """2 ranks with per-rank batch 16 and synced BN follow 1 process with batch 32 on the same images;
    without synced BN the alphas move apart at once (per-rank BN statistics). Both ranks hold bitwise
    identical models.

    The tiny supernet without binarization and in float64: the binary supernet's gradient jumps when
    an input moves by one ulp (ties in its pooled and signed activations), so in float32, or with
    signs, any change of summation order -- a batch split as much as another BN kernel in one process
    -- grows into visible differences after a few steps; without them only round-off is left."""
    script = str(Path(__file__).resolve())
    runs = {'one': ([sys.executable, script, 'equiv'], 32, 'nosync'),
            'sync': (torchrun(2, script, 'equiv'), 16, 'sync'),
            'nosync': (torchrun(2, script, 'equiv'), 16, 'nosync')}
    alphas = {}
    for name, (cmd, batch, bn) in runs.items():
        (tmp_path / name).mkdir()
        out = tmp_path / name / 'out.json'
        rc, output, _ = _run(jobs, tmp_path, name, [*cmd, str(out), str(batch), bn, '2', '64'],
                             BNAS_TEST_FULL_PRECISION='1', BNAS_TEST_FLOAT64='1')
        assert rc == 0, output[-3000:]
        alphas[name] = np.array(json.loads(out.read_text())['alphas'])
        if name != 'one':
            prints = [json.loads((tmp_path / name / f'out.json.rank{r}').read_text()) for r in range(2)]
            assert prints[0] == prints[1]                   # alphas, genotype and weights bitwise equal
    assert alphas['one'].shape == (4, 70)                   # 2 epochs x 2 steps, 70 alphas
    assert np.abs(np.diff(alphas['one'], axis=0)).max() > 1e-3   # the alphas do move
    sync = np.abs(alphas['sync'] - alphas['one']).max(axis=1)
    nosync = np.abs(alphas['nosync'] - alphas['one']).max(axis=1)
    assert sync.max() <= 1e-10, sync                        # round-off only (measured ~1e-14)
    assert nosync[0] > 1e-3, nosync                         # per-rank BN statistics change the first step


@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_diverging_rank_stops_the_search_with_one_line(tmp_path, jobs):
    script = str(Path(__file__).resolve())
    out = tmp_path / 'out.json'
    t0 = time.monotonic()
    rc, output, _ = _run(jobs, tmp_path, 'diverge', [*torchrun(2, script, 'equiv'), str(out), '16', 'nosync', '1',
                                                      '32'], BNAS_TEST_PERTURB_RANK='1')
    assert rc != 0 and time.monotonic() - t0 < 120
    errors = [line for line in _our_lines(output) if line.startswith('error:')]
    assert len(errors) == 1, output[-3000:]
    assert re.match(r'error: epoch 1/1: rank 1 holds different alpha', errors[0]), errors
    assert set(_failed_ranks(output)) == {0, 1} and all(c != 0 for c in _failed_ranks(output).values())
    assert not out.exists() and not (tmp_path / 'run' / 'checkpoint.pt').exists()


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """One uninterrupted 2-rank CLI search with synced BN (2 epochs, 4 steps each per rank)."""
    if not (FASHION / 'train-images-idx3-ubyte.gz').is_file():
        pytest.skip('Debian dataset-fashion-mnist is not installed')
    tmp = tmp_path_factory.mktemp('ddp-reference')
    run_dir = tmp / 'run'
    job = Job(torchrun(2, '-m', 'bnas_nni', 'search', *SEARCH_ARGS, '--run-dir', str(run_dir)), child_env(),
              tmp / 'log')
    try:
        rc = job.wait(300)
        output = job.output()
    finally:
        job.close()
    assert rc == 0, output[-3000:]
    assert not job.leftovers()
    return run_dir, output


SEARCH_ARGS = [*QUICK, '--epochs', '2', '--set', 'train_subset=256', '--set', 'batch_size=16', '--set', 'sync_bn=true',
               '--set', 'dist_timeout=60']


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cli_two_ranks_one_writer(reference):
    run_dir, output = reference
    log = (run_dir / 'log.txt').read_text()
    assert '2 epochs x 4 iterations, 2 processes (gloo, batch 16 per process, synced BN over' in output
    assert log.count('epoch 1/2 ') == 1 and log.count('epoch 2/2 ') == 1     # rank 1 writes nothing
    assert output.count('genotype (CIFAR):') == 1
    names = {p.name for p in run_dir.iterdir()}
    assert {'config.yaml', 'checkpoint.pt', 'genotype.yaml', 'genotype_imagenet.yaml', 'alpha_history.json',
            'metrics.csv', 'log.txt', 'tb'} <= names
    assert len(list((run_dir / 'tb').iterdir())) == 1                        # one TensorBoard writer
    ckpt = torch.load(run_dir / 'checkpoint.pt', weights_only=True)
    assert ckpt['world_size'] == 2 and ckpt['epoch'] == 2 and ckpt['global_step'] == 8
    history = json.loads((run_dir / 'alpha_history.json').read_text())
    assert [h['epoch'] for h in history] == [0, 1]
    assert 0 <= history[-1]['val_acc'] <= 100
    # supernet accuracy over both ranks' shards of the 128 architecture images: a multiple of 1/128
    assert (history[-1]['val_acc'] * 128 / 100) == pytest.approx(round(history[-1]['val_acc'] * 128 / 100))
    saved = yaml.safe_load((run_dir / 'config.yaml').read_text())
    assert saved['sync_bn'] is True and saved['batch_size'] == 16


def _kill_mid_epoch(jobs, tmp_path: Path, run_dir: Path) -> None:
    job = jobs(torchrun(2, '-m', 'bnas_nni', 'search', *SEARCH_ARGS, '--run-dir', str(run_dir)),
               tmp_path / 'killed.log')
    ckpt = run_dir / 'checkpoint.pt'
    deadline = time.monotonic() + 240
    while not ckpt.exists() and job.proc.poll() is None and time.monotonic() < deadline:
        job.poll_tree()
        time.sleep(0.02)
    assert ckpt.exists(), job.output()[-3000:]
    job.kill()                                              # kill -9 of the agent and both workers
    assert job.proc.returncode == -signal.SIGKILL and not job.leftovers()
    assert torch.load(ckpt, weights_only=True)['epoch'] == 1, 'the kill came after the last epoch'


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_mid_epoch_then_resume_with_two_ranks_and_with_one(tmp_path, jobs, reference):
    ref_dir, _ = reference
    killed = tmp_path / 'killed'
    _kill_mid_epoch(jobs, tmp_path, killed)
    shutil.copytree(killed, tmp_path / 'one')
    # 2 ranks: continues from epoch 1 and ends exactly where the uninterrupted run ended
    rc, output, _ = _run(jobs, tmp_path, 'resume2', torchrun(2, '-m', 'bnas_nni', 'search', *SEARCH_ARGS,
                                                              '--run-dir', str(killed), '--resume'))
    assert rc == 0, output[-3000:]
    assert f'resumed from {killed / "checkpoint.pt"} at epoch 1/2' in output
    ref = json.loads((ref_dir / 'alpha_history.json').read_text())
    got = json.loads((killed / 'alpha_history.json').read_text())
    assert [h['alphas'] for h in got] == [h['alphas'] for h in ref]
    assert (killed / 'genotype.yaml').read_text() == (ref_dir / 'genotype.yaml').read_text().replace(
        str(ref_dir), str(killed))
    assert [r.split(',')[0] for r in (killed / 'metrics.csv').read_text().splitlines()[1:]] == ['0', '1']
    # 1 rank: continues from the same checkpoint, with a note on the batch over all processes
    rc, output, _ = _run(jobs, tmp_path, 'resume1', [sys.executable, '-m', 'bnas_nni', 'search', *SEARCH_ARGS,
                                                     '--run-dir', str(tmp_path / 'one'), '--resume'])
    assert rc == 0, output[-3000:]
    assert 'written by 2 process(es), this run has 1' in output and 'at epoch 1/2' in output
    got1 = json.loads((tmp_path / 'one' / 'alpha_history.json').read_text())
    assert [h['epoch'] for h in got1] == [0, 1] and got1[0]['alphas'] == ref[0]['alphas']
    assert torch.load(tmp_path / 'one' / 'checkpoint.pt', weights_only=True)['world_size'] == 1


@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize('case', ['more_ranks_than_batches', 'other_seed_file', 'dataset_missing_on_rank_1'])
def test_bad_input_is_one_line_on_rank_0_and_every_rank_fails(case, tmp_path, jobs):
    script = str(Path(__file__).resolve())
    config = str(PRESET)
    rank1 = ''
    if case == 'other_seed_file':                            # the "same" preset, with another seed on rank 1
        preset = yaml.safe_load(PRESET.read_text())
        for seed in (2, 3):
            (tmp_path / f'seed{seed}.yaml').write_text(yaml.safe_dump({**preset, 'seed': seed}))
        config, rank1 = str(tmp_path / 'seed2.yaml'), f'--config {tmp_path / "seed3.yaml"}'
    elif case == 'dataset_missing_on_rank_1':
        rank1 = f'--data {tmp_path / "nowhere"}'
    batch = '64' if case == 'more_ranks_than_batches' else '16'   # 64 images per half: 1 batch for 2 ranks
    args = ['--config', config, *SETS, '--epochs', '1', '--set', 'train_subset=128', '--set', f'batch_size={batch}',
            '--set', 'dist_timeout=30', '--run-dir', str(tmp_path / 'run')]
    t0 = time.monotonic()
    rc, output, _ = _run(jobs, tmp_path, case, torchrun(2, script, 'cli', 'search', *args), timeout=180,
                         BNAS_TEST_RANK1_ARGS=rank1)
    assert rc != 0 and time.monotonic() - t0 < 150
    ours = _our_lines(output)
    errors = [line for line in ours if line.startswith('error:')]
    assert len(errors) == 1, output[-3000:]
    expected = {'more_ranks_than_batches': r'error: 2 processes but the weight half has only 1 batch',
                'other_seed_file': r'error: the ranks were given different settings: seed differ between rank 0 '
                                   r'and rank 1',
                'dataset_missing_on_rank_1': r'error: rank 1: .*nowhere'}[case]
    assert re.match(expected, errors[0]), errors[0]
    failed = _failed_ranks(output)
    assert set(failed) == {0, 1} and all(c != 0 for c in failed.values()), output[-2000:]
    assert not (tmp_path / 'run' / 'checkpoint.pt').exists()


def _rank_pid(job: Job, rank: int) -> int:
    for pid in descendants(job.proc.pid):
        try:
            env = Path(f'/proc/{pid}/environ').read_bytes().split(b'\0')
        except OSError:
            continue
        if f'RANK={rank}'.encode() in env and b'TORCHELASTIC_RUN_ID' in b' '.join(env):
            return pid
    raise AssertionError(f'no worker of rank {rank}')


@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_stalled_rank_ends_the_job_within_the_timeout(tmp_path, jobs):
    """Rank 1 frozen (SIGSTOP) in epoch 2: rank 0's next collective gives up after dist_timeout with one
    line, torchrun takes the job down, the checkpoint of epoch 1 stays."""
    run_dir = tmp_path / 'run'
    job = jobs(torchrun(2, '-m', 'bnas_nni', 'search', *QUICK, '--epochs', '3', '--set', 'train_subset=512',
                        '--set', 'batch_size=16', '--set', 'dist_timeout=10', '--run-dir', str(run_dir)),
               tmp_path / 'stall.log')
    deadline = time.monotonic() + 240
    while not (run_dir / 'checkpoint.pt').exists() and job.proc.poll() is None and time.monotonic() < deadline:
        job.poll_tree()
        time.sleep(0.05)
    assert (run_dir / 'checkpoint.pt').exists(), job.output()[-3000:]
    os.kill(_rank_pid(job, 1), signal.SIGSTOP)
    t0 = time.monotonic()
    rc = job.wait(150)
    output = job.output()
    assert rc != 0 and time.monotonic() - t0 < 120             # 10 s timeout + torchrun's grace period
    errors = [line for line in _our_lines(output) if line.startswith('error:')]
    assert len(errors) == 1 and errors[0].startswith('error: rank 0: no answer from the other processes within '
                                                     'dist_timeout (10s)'), output[-3000:]
    assert torch.load(run_dir / 'checkpoint.pt', weights_only=True)['epoch'] == 1


@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize('name', ['darts', 'gumbel_darts', 'random_one_shot'])
def test_nni_one_shot_strategy_under_lightning_ddp_exports_one_architecture(name, tmp_path, jobs):
    from bnas_nni.genotypes import load_genotype

    run_dir = tmp_path / 'run'
    rc, output, _ = _run(jobs, tmp_path, name, torchrun(
        2, '-m', 'bnas_nni', 'search', '--config', str(REPO / 'experiments' / f'strategy_{name}.yaml'),
        '--epochs', '1', '--set', 'train_subset=128', '--set', 'batch_size=16', '--set', 'max_train_batches=2',
        '--set', 'derived_epochs=0', '--set', 'threads=1', '--set', 'tensorboard=false', '--set', 'progress=never',
        '--set', 'dist_timeout=60', '--run-dir', str(run_dir)), timeout=300)
    assert rc == 0, output[-3000:]
    line = next(line for line in output.splitlines() if 'exported the same architecture' in line)
    assert '2 processes' in line
    genotype = load_genotype(run_dir / 'genotype.yaml')
    assert genotype.num_nodes == 2
    assert yaml.safe_load((run_dir / 'genotype.yaml').read_text())['meta']['world_size'] == 2
    assert output.count('genotype (CIFAR):') == 1


# ------------------------------------------------------------------ an nnictl trial that is a torchrun job

NNICTL_DRIVER = r'''
import json, os, sys, time
from pathlib import Path
from bnas_nni.integrations.nni.environment import nni_environment
from bnas_nni.integrations.nni.nnictl import nnictl_create, nnictl_stop
from bnas_nni.integrations.nni.rest import free_port, rest_get, wait_for_experiment
exp_yml, scratch, result = sys.argv[1:4]
env = nni_environment(scratch, threads=1)
port = free_port()
out = {'port': port}
exp_id = None
try:
    exp_id = nnictl_create(exp_yml, port, env)
    out['id'] = exp_id
    out['status'] = wait_for_experiment(port, timeout=400)
    out['trials'] = rest_get(port, 'trial-jobs')
    out['metrics'] = rest_get(port, 'metric-data')
finally:
    if exp_id is not None:
        out['stopped'] = nnictl_stop(exp_id, env)
    time.sleep(2)
    # everything that ran in this private network namespace, besides this process and its launcher
    me = os.readlink('/proc/self/ns/net')
    mine = {os.getpid(), os.getppid()}
    left = []
    for p in Path('/proc').iterdir():
        if p.name.isdigit() and int(p.name) not in mine:
            try:
                if os.readlink(p / 'ns' / 'net') == me:
                    left.append(int(p.name))
            except OSError:
                pass
    out['left_processes'] = left
    listening = [l for l in Path('/proc/net/tcp').read_text().splitlines()[1:] if l.split()[3] == '0A']
    listening += [l for l in Path('/proc/net/tcp6').read_text().splitlines()[1:] if l.split()[3] == '0A']
    out['listening'] = listening
    Path(result).write_text(json.dumps(out))
'''


def _decode(data):
    value = json.loads(data)
    return json.loads(value) if isinstance(value, str) else value


@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_nnictl_trial_is_a_torchrun_job_and_rank_0_reports(tmp_path, jobs):
    """The shipped experiments/nnictl_search_ddp.yml, shrunk to one tiny trial, run (manager included) in a
    private network namespace: the trial's 2 ranks search, rank 0 alone reports 2 intermediate and 1
    final results over the manager's REST API, and nothing is left running or listening."""
    if not loopback_namespace_prefix():
        pytest.skip('no private network namespace here (unshare -n)')
    config = yaml.safe_load((REPO / 'experiments' / 'nnictl_search_ddp.yml').read_text())
    assert 'torchrun --nnodes 1 --nproc_per_node 2' in config['trialCommand']
    assert '-m bnas_nni search' in config['trialCommand']
    config['searchSpace'] = {'lamda': {'_type': 'choice', '_value': [1.0]}}
    config['maxTrialNumber'] = 1
    config['trialCommand'] = config['trialCommand'].replace('torchrun', str(torchrun_command()[0]), 1) + (
        ' --epochs 2 --set train_subset=256 --set batch_size=32 --set dist_timeout=60 '
        '--set final_train_subset=128 --set final_test_subset=128')
    config['trialCodeDirectory'] = str(REPO)
    config['experimentWorkingDirectory'] = str(tmp_path / 'nni-experiments')
    config['maxExperimentDuration'] = '8m'
    exp_yml = tmp_path / 'exp.yml'
    exp_yml.write_text(yaml.safe_dump(config))
    driver = tmp_path / 'driver.py'
    driver.write_text(NNICTL_DRIVER)
    result = tmp_path / 'result.json'
    job = jobs([sys.executable, str(driver), str(exp_yml), str(tmp_path / 'scratch'), str(result)],
               tmp_path / 'nnictl.log')
    rc = job.wait(560)
    assert rc == 0 and result.is_file(), job.output()[-3000:]
    out = json.loads(result.read_text())
    assert out['status'] == 'DONE' and out['stopped'], out
    (trial,) = out['trials']
    assert trial['status'] == 'SUCCEEDED', trial
    rows = [m for m in out['metrics'] if m['trialJobId'] == trial['trialJobId']]
    periodical = sorted((m for m in rows if m['type'] == 'PERIODICAL'), key=lambda m: m['sequence'])
    final = [m for m in rows if m['type'] == 'FINAL']
    assert len(periodical) == 2 and len(final) == 1, rows          # rank 0 alone reported
    first = _decode(periodical[0]['data'])
    assert set(first) >= {'default', 'arch_entropy', 'epoch'} and 0.0 <= first['default'] <= 100.0
    data = _decode(final[0]['data'])
    assert data['default'] == pytest.approx(max(_decode(m['data'])['default'] for m in periodical))
    trial_dir = tmp_path / 'nni-experiments' / out['id'] / 'environments' / 'local-env' / 'trials' / trial['trialJobId']
    printed = (trial_dir / 'trial.log').read_text()             # the trial's stdout, as NNI captured it
    assert '2 processes (gloo' in printed and printed.count('final result:') == 1
    log = (trial_dir / 'search' / 'log.txt').read_text()
    assert log.count('epoch 1/2 ') == 1 and log.count('epoch 2/2 ') == 1
    assert (trial_dir / 'genotype.yaml').is_file()
    assert out['left_processes'] == [] and out['listening'] == [], out
