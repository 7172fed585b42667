"""``bnas-nni nni create``, and experiment presets that run where the user is (issue 12, finding 4).

The shipped ``experiments/nnictl_*.yml`` run on a CPU-only machine; the GPU presets are separate
``*_gpu.yml`` files, and on a machine without a GPU ``nni create`` says why their manager stopped
(NNI's own ``nnictl create`` reports success and the experiment vanishes). Every experiment here
runs from a copy of a shipped preset whose working directory is moved into tmp, with HOME
redirected, and is stopped by id (then by PID) before the test ends.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bnas_nni.integrations.nni.environment import nni_environment
from bnas_nni.integrations.nni.lifecycle import stop_experiment
from bnas_nni.integrations.nni.nnictl import manifest_entry
from bnas_nni.integrations.nni.processes import pid_alive
from bnas_nni.paths import REPO_ROOT, experiments_dir

PRESETS = sorted(experiments_dir().glob('nnictl_*.yml'))
CPU_PRESETS = [p for p in PRESETS if not p.stem.endswith('_gpu')]


def _bnas_nni(*args: str, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env)
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get('PYTHONPATH')]))
    return subprocess.run([sys.executable, '-m', 'bnas_nni.cli', *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _copy_preset(name: str, tmp_path: Path, **changes) -> Path:
    exp = yaml.safe_load((experiments_dir() / name).read_text())
    exp.update(trialCodeDirectory=str(REPO_ROOT), experimentWorkingDirectory=str(tmp_path / 'experiments'), **changes)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(exp))
    return path


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available() or shutil.which('nvidia-smi') is not None


def _experiment_id(stdout: str) -> str:
    line = next(ln for ln in stdout.splitlines() if ln.startswith('NNI experiment '))
    return line.split()[2]


@pytest.mark.parametrize('path', CPU_PRESETS, ids=[p.name for p in CPU_PRESETS])
def test_shipped_presets_run_on_cpu(path):
    from nni.experiment.config import ExperimentConfig

    exp = yaml.safe_load(path.read_text())
    assert exp.get('trialGpuNumber', 0) == 0, f'{path.name} asks for GPUs; GPU presets are *_gpu.yml'
    assert exp['trainingService'] == {'platform': 'local', 'useActiveGpu': False}
    assert exp['trialConcurrency'] == 1                    # NNI 3.0 mixes up concurrent trials (nni#5726)
    assert 'nnictl create' not in path.read_text()           # the comments point at bnas-nni nni create
    assert ExperimentConfig(**exp).trial_gpu_number == 0


def test_gpu_presets_are_separate_files():
    names = {p.name for p in PRESETS}
    assert {'nnictl_train_fashion.yml', 'nnictl_train_cifar10.yml', 'nnictl_train_cifar10_gpu.yml',
            'nnictl_train_imagenet_ddp.yml', 'nnictl_train_imagenet_ddp_gpu.yml'} <= names
    for name in ('nnictl_train_cifar10', 'nnictl_train_imagenet_ddp'):
        cpu = yaml.safe_load((experiments_dir() / f'{name}.yml').read_text())
        gpu = yaml.safe_load((experiments_dir() / f'{name}_gpu.yml').read_text())
        assert gpu['trialGpuNumber'] >= 1 and cpu['searchSpace'] == gpu['searchSpace']


def test_fashion_preset_is_a_few_short_trials():
    exp = yaml.safe_load((experiments_dir() / 'nnictl_train_fashion.yml').read_text())
    cmd = exp['trialCommand']
    assert cmd.startswith('python trainers/train_cifar10.py --config experiments/train_quick_fashion.yaml')
    train = yaml.safe_load((experiments_dir() / 'train_quick_fashion.yaml').read_text())
    assert train['dataset'] == 'fashion-mnist'
    assert exp['maxTrialNumber'] == len(exp['searchSpace']['lr']['_value']) == 3
    assert exp['tuner']['name'] == 'GridSearch'


def test_nnictl_refusal_is_one_line(tmp_path):
    bad = _copy_preset('nnictl_train_fashion.yml', tmp_path, trialGpuNumbr=0)       # a misspelt key
    out = _bnas_nni('nni', 'create', str(bad), '--port', '0', '--scratch', str(tmp_path / 'scratch'))
    assert out.returncode == 2, out
    assert out.stderr.startswith('error: nnictl create') and 'trialgpunumbr' in out.stderr.lower()
    assert 'Traceback' not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_busy_port_is_named(tmp_path):
    config = _copy_preset('nnictl_train_fashion.yml', tmp_path)
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        sock.listen()
        port = sock.getsockname()[1]
        out = _bnas_nni('nni', 'create', str(config), '--port', str(port), '--scratch', str(tmp_path / 'scratch'))
    assert out.returncode == 2
    assert f'port {port} is in use' in out.stderr and '--port' in out.stderr, out.stderr


def test_missing_config_and_unknown_stop(tmp_path):
    out = _bnas_nni('nni', 'create', str(tmp_path / 'nope.yml'), '--scratch', str(tmp_path / 's'))
    assert out.returncode == 2 and 'experiment config not found' in out.stderr
    out = _bnas_nni('nni', 'stop', 'abcdefgh', '--scratch', str(tmp_path / 's'))
    assert out.returncode == 2 and "no experiment 'abcdefgh'" in out.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gpu_preset_without_gpu_reports_why_the_manager_stopped(tmp_path):
    if _has_gpu():
        pytest.skip('this machine has a GPU, so the GPU preset starts normally')
    config = _copy_preset('nnictl_train_cifar10_gpu.yml', tmp_path)
    scratch = tmp_path / 'scratch'
    out = _bnas_nni('nni', 'create', str(config), '--port', '0', '--scratch', str(scratch))
    env = nni_environment(scratch)
    ids = list(yaml.safe_load((Path(env['HOME']) / 'nni-experiments' / '.experiment').read_text()))
    try:
        assert out.returncode == 2, out
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith('error: the NNI manager of experiment'), out.stderr
        assert 'Failed to collect GPU info' in lines[0] and 'trialGpuNumber: 0' in lines[0]
        assert 'nnimanager.log' in lines[0]
        assert len(ids) == 1 and not pid_alive(manifest_entry(env, ids[0]).get('pid'))
    finally:
        for exp_id in ids:
            stop_experiment(exp_id, env)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_cpu_cifar_preset_starts_and_names_the_failed_trial(tmp_path):
    """The README's CIFAR-10 experiment on a machine without CIFAR-10: the manager stays up, the
    trial's one-line error is printed, and the failed download leaves no empty data folder."""
    shipped = yaml.safe_load((experiments_dir() / 'nnictl_train_cifar10.yml').read_text())
    data = tmp_path / 'cifar10'
    config = _copy_preset('nnictl_train_cifar10.yml', tmp_path, maxTrialNumber=1,
                          trialCommand=f'{shipped["trialCommand"]} --data {data} --epochs 1 --threads 1')
    scratch = tmp_path / 'scratch'
    # the download goes to a closed local port instead of the internet; NNI's own loopback traffic must
    # not be sent there (no_proxy), or its tuner cannot connect
    env = dict(os.environ, https_proxy='http://127.0.0.1:9', http_proxy='http://127.0.0.1:9')
    out = _bnas_nni('nni', 'create', str(config), '--port', '0', '--scratch', str(scratch), env=env)
    exp_id = None
    try:
        assert out.returncode == 0, out
        exp_id = _experiment_id(out.stdout)
        assert 'is running: http://127.0.0.1:' in out.stdout and '1 trial(s) started' in out.stdout
        assert f'bnas-nni nni stop {exp_id} --scratch {scratch}' in out.stdout
        warning = out.stderr.strip().splitlines()[-1]
        assert warning.startswith('warning: trial ') and 'failed: error: CIFAR-10 is not under' in warning, out.stderr
        assert 'trial.stderr' in warning
        assert not data.exists()                      # the failed download removed the folder it created
        stop = _bnas_nni('nni', 'stop', exp_id, '--scratch', str(scratch))
        assert stop.returncode == 0 and f'experiment {exp_id} stopped' in stop.stdout
        nni_env = nni_environment(scratch)
        assert not pid_alive(manifest_entry(nni_env, exp_id).get('pid'))
        listed = _bnas_nni('nni', 'list', '--scratch', str(scratch))
        assert exp_id in listed.stdout and 'STOPPED' in listed.stdout
    finally:
        if exp_id is not None:
            stop_experiment(exp_id, nni_environment(scratch))
