"""An ``nnictl`` experiment of two CIFAR-trainer trials; metrics checked over the REST API (issue 4).

The experiment comes from ``experiments/nnictl_train_cifar10.yml`` with a toy trial command on
real Fashion-MNIST images. ``HOME`` is redirected into tmp, the manager is forced onto 127.0.0.1
by the ``localhost-only.js`` preload, and the experiment is stopped by id in ``finally``.
"""
import csv
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from bnas_nni.data import DEBIAN_FASHION_MNIST
from bnas_nni.integrations.nni.environment import nni_environment
from bnas_nni.integrations.nni.nnictl import nnictl_create, nnictl_stop
from bnas_nni.integrations.nni.rest import free_port, rest_get, wait_for_experiment
from bnas_nni.paths import REPO_ROOT, experiments_dir

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(DEBIAN_FASHION_MNIST, 'train-images-idx3-ubyte.gz').is_file()
                                 and not os.environ.get('BNAS_FASHION_MNIST'),
                                 reason='Debian dataset-fashion-mnist is not installed')]

EPOCHS = 2
LRS = [0.05, 0.1]


def _listen_addresses(port: int):
    """Local addresses listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = []
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
        if not os.path.exists(table):
            continue
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(':')
            if state == '0A' and int(p, 16) == port:
                found.append(addr)
    return found


def _decode(data):
    value = json.loads(data)
    return json.loads(value) if isinstance(value, str) else value


def test_two_trials_report_intermediate_and_final_metrics(tmp_path):
    exp = yaml.safe_load((experiments_dir() / 'nnictl_train_cifar10.yml').read_text())
    assert exp['trainingService']['platform'] == 'local' and exp['tuner']['name'] == 'GridSearch'
    assert 'trainers/train_cifar10.py' in exp['trialCommand']
    exp.update(
        trialCommand=f'{sys.executable} trainers/train_cifar10.py --config experiments/train_quick_fashion.yaml '
                     f'--epochs {EPOCHS} --train-subset 64 --val-subset 32 --batch-size 32 --init-channels 4 '
                     '--layers 3 --threads 1 --set tensorboard=false --set progress=never',
        trialCodeDirectory=str(REPO_ROOT), experimentWorkingDirectory=str(tmp_path / 'experiments'),
        trialConcurrency=1, maxTrialNumber=2, maxExperimentDuration='10m',
        searchSpace={'lr': {'_type': 'choice', '_value': LRS}})
    exp.pop('trialGpuNumber', None)
    config = tmp_path / 'exp.yml'
    config.write_text(yaml.safe_dump(exp))
    env = nni_environment(tmp_path, threads=1)
    assert env['HOME'] == str((tmp_path / 'home').resolve()) and 'localhost-only.js' in env['NODE_OPTIONS']
    port = free_port()
    exp_id = None
    try:
        exp_id = nnictl_create(config, port, env)
        addrs = _listen_addresses(port)
        assert addrs and set(addrs) == {'0100007F'}, addrs               # 127.0.0.1 only
        status = wait_for_experiment(port, timeout=420)
        assert status == 'DONE', status
        trials = rest_get(port, 'trial-jobs')
        metrics = rest_get(port, 'metric-data')
    finally:
        if exp_id:
            assert nnictl_stop(exp_id, env)
    assert (tmp_path / 'home' / 'nni-experiments').is_dir()               # NNI's manifest went to the tmp HOME
    assert len(trials) == 2 and {t['status'] for t in trials} == {'SUCCEEDED'}, trials
    lr_of = {t['trialJobId']: json.loads(t['hyperParameters'][0])['parameters']['lr'] for t in trials}
    assert sorted(lr_of.values()) == LRS
    for trial_id, lr in lr_of.items():
        rows = [m for m in metrics if m['trialJobId'] == trial_id]
        periodical = sorted((m for m in rows if m['type'] == 'PERIODICAL'), key=lambda m: m['sequence'])
        final = [m for m in rows if m['type'] == 'FINAL']
        assert len(periodical) == EPOCHS and len(final) == 1, rows
        values = [_decode(m['data']) for m in periodical]
        for v in values:
            assert set(v) == {'default', 'top5', 'loss'} and 0 <= v['default'] <= v['top5'] <= 100 and v['loss'] > 0
        fin = _decode(final[0]['data'])
        assert fin['default'] == pytest.approx(values[-1]['default']) and 'best_top1' in fin
        # the reported numbers are the trial's own validation results, and NNI's lr reached the optimizer
        run_dirs = list((tmp_path / 'experiments' / exp_id).glob(f'environments/*/trials/{trial_id}/run'))
        assert len(run_dirs) == 1
        with open(run_dirs[0] / 'metrics.csv', newline='') as f:
            csv_rows = list(csv.DictReader(f))
        assert [float(r['valid_top1']) for r in csv_rows] == pytest.approx([v['default'] for v in values])
        saved = yaml.safe_load((run_dirs[0] / 'config.yaml').read_text())
        assert saved['lr'] == lr and float(csv_rows[0]['lr']) == pytest.approx(0.05 * lr)


def test_imagenet_ddp_experiment_yaml():
    """The shipped DDP experiments: a grid over bnas-d..h, torchrun trials with a loopback rendezvous,
    2 CPU processes by default and 8 GPUs in the _gpu variant, configs NNI itself accepts."""
    from nni.experiment.config import ExperimentConfig

    for name, procs, gpus in (('nnictl_train_imagenet_ddp.yml', 2, 0), ('nnictl_train_imagenet_ddp_gpu.yml', 8, 8)):
        path = experiments_dir() / name
        exp = yaml.safe_load(path.read_text())
        assert exp['searchSpace']['model']['_value'] == ['bnas-d', 'bnas-e', 'bnas-f', 'bnas-g', 'bnas-h']
        assert exp['tuner']['name'] == 'GridSearch' and exp['maxTrialNumber'] == 5
        cmd = exp['trialCommand']
        assert ('torchrun' in cmd or 'torch.distributed.run' in cmd) and f'--nproc_per_node={procs}' in cmd
        assert '--rdzv-endpoint=127.0.0.1:0' in cmd
        assert 'trainers/train_imagenet.py' in cmd and 'experiments/train_imagenet_bnas.yaml' in cmd
        cfg = ExperimentConfig(**{k: v for k, v in exp.items()})
        assert cfg.trial_gpu_number == gpus
    text = (experiments_dir() / 'nnictl_train_imagenet_ddp_gpu.yml').read_text()
    assert 'platform: remote' in text and 'platform: kubeflow' in text          # commented variants
    cifar = yaml.safe_load((experiments_dir() / 'nnictl_train_cifar10.yml').read_text())
    assert ExperimentConfig(**cifar).search_space['lr']['_value'] == [0.05, 0.1]
