"""The CIFAR-recipe trainer on real Fashion-MNIST images, resume after a kill, eval, bad input (issue 4)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bnas_nni.cli import main
from bnas_nni.data import DEBIAN_FASHION_MNIST
from bnas_nni.paths import REPO_ROOT, experiments_dir

pytestmark = pytest.mark.skipif(not Path(DEBIAN_FASHION_MNIST, 'train-images-idx3-ubyte.gz').is_file()
                                and not os.environ.get('BNAS_FASHION_MNIST'),
                                reason='Debian dataset-fashion-mnist is not installed')

QUICK = str(experiments_dir() / 'train_quick_fashion.yaml')
# 64 real training images, 2 iterations per epoch, toy network: seconds per epoch on 1 CPU thread
TINY = ['--train-subset', '64', '--val-subset', '48', '--batch-size', '32', '--init-channels', '4',
        '--layers', '3', '--threads', '1', '--set', 'progress=never']


def _train(run_dir, *extra):
    return main(['train', '--config', QUICK, '--run-dir', str(run_dir), *TINY, *extra])


def _rows(run_dir):
    with open(Path(run_dir) / 'metrics.csv', newline='') as f:
        return list(csv.DictReader(f))


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith('error: ')
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def _no_checkpoint_files(run_dir):
    run_dir = Path(run_dir)
    return not run_dir.exists() or not [p for p in run_dir.iterdir() if p.name.endswith(('.pt', '.tmp'))]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """One 2-epoch run shared by the tests that need a checkpoint."""
    run = tmp_path_factory.mktemp('trained') / 'run'
    assert _train(run, '--epochs', '2') == 0
    return run


def test_run_directory_logs_and_checkpoint(trained, capsys):
    from bnas_nni.checkpoints import read_checkpoint

    cfg = yaml.safe_load((trained / 'config.yaml').read_text())
    assert cfg['init_channels'] == 4 and cfg['layers'] == 3 and cfg['epochs'] == 2 and cfg['train_subset'] == 64
    assert cfg['dataset'] == 'fashion-mnist' and cfg['schedule'] == 'onecycle' and cfg['run_dir'] == str(trained)
    rows = _rows(trained)
    assert [int(r['epoch']) for r in rows] == [0, 1]
    assert float(rows[0]['lr']) == pytest.approx(0.05 * cfg['lr'])       # the one-cycle start, 0.05 * lr
    assert float(rows[1]['drop_path_prob']) == pytest.approx(0.2 * 1 / 2)
    for r in rows:
        assert 0 <= float(r['valid_top1']) <= float(r['valid_top5']) <= 100 and float(r['train_loss']) > 0
    log = (trained / 'log.txt').read_text()
    for line in (f"epoch 0 lr {0.05 * cfg['lr']:e}", 'train 000 ', 'train_acc ', 'valid_acc ', 'valid_acc_top5 '):
        assert line in log
    assert list((trained / 'tb').glob('events.out.tfevents.*'))
    ck = read_checkpoint(trained / 'checkpoint.pt')                     # weights_only=True inside
    assert ck['epoch'] == 2 and ck['kind'] == 'train' and ck['config']['init_channels'] == 4
    assert ck['metrics']['valid_top1'] == pytest.approx(float(rows[-1]['valid_top1']))
    assert set(ck['rng']) >= {'torch', 'numpy', 'python'}
    # eval of our checkpoint reproduces the last validation numbers exactly
    assert main(['eval', '--checkpoint', str(trained / 'checkpoint.pt'), '--threads', '1']) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert out[0] == 'top1' and float(out[1]) == pytest.approx(float(rows[-1]['valid_top1']), abs=1e-3)
    assert float(out[3]) == pytest.approx(float(rows[-1]['valid_top5']), abs=1e-3) and '48 images' in ' '.join(out)


DRIVER = r'''
import json, os, signal, sys
from bnas_nni.train.runner import run_training
args = json.loads(sys.argv[1])
kill = tuple(args['kill']) if args['kill'] else None
def on_step(epoch, step):
    if kill == (epoch, step):
        os.kill(os.getpid(), signal.SIGKILL)   # no cleanup, no atexit: a real crash
run_training(args['config'], args['overrides'], resume=args['resume'], on_step=on_step)
'''


def _driver(overrides, kill=None, resume=None):
    payload = json.dumps({'config': QUICK, 'overrides': overrides, 'kill': kill, 'resume': resume})
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    return subprocess.run([sys.executable, '-c', DRIVER, payload], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_resume_after_kill_continues_at_the_right_epoch_with_the_same_state(tmp_path):
    from bnas_nni.checkpoints import read_checkpoint

    base = {'train_subset': 64, 'val_subset': 32, 'batch_size': 32, 'init_channels': 4, 'layers': 3, 'threads': 1,
            'epochs': 3, 'progress': 'never', 'tensorboard': False}
    straight = _driver({**base, 'run_dir': str(tmp_path / 'a')})
    assert straight.returncode == 0, straight.stderr[-2000:]
    # killed after the first optimizer step of epoch 1: epoch 0 is checkpointed, epoch 1 is half done
    killed = _driver({**base, 'run_dir': str(tmp_path / 'b')}, kill=[1, 0])
    assert killed.returncode == -9
    mid = read_checkpoint(tmp_path / 'b' / 'checkpoint.pt')
    assert mid['epoch'] == 1 and [r['epoch'] for r in _rows(tmp_path / 'b')] == ['0']
    assert not list((tmp_path / 'b').glob('.*.tmp'))
    resumed = _driver({**base, 'run_dir': str(tmp_path / 'b')}, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert 'at epoch 1 ' in resumed.stdout and 'epoch 0 lr' not in resumed.stdout and 'epoch 1 lr' in resumed.stdout

    a, b = read_checkpoint(tmp_path / 'a' / 'checkpoint.pt'), read_checkpoint(tmp_path / 'b' / 'checkpoint.pt')
    assert a['epoch'] == b['epoch'] == 3
    for k, v in a['state_dict'].items():                       # bit-identical to the uninterrupted run
        assert torch.equal(v, b['state_dict'][k]), k
    oa, ob = a['optimizer'], b['optimizer']
    assert oa['param_groups'] == ob['param_groups']
    for i, st in oa['state'].items():
        assert torch.equal(st['momentum_buffer'], ob['state'][i]['momentum_buffer'])
    assert a['scheduler'] == b['scheduler'] and a['scheduler']['last_epoch'] == 3 * 2
    strip = lambda rows: [{k: v for k, v in r.items() if k != 'epoch_seconds'} for r in rows]
    assert strip(_rows(tmp_path / 'a')) == strip(_rows(tmp_path / 'b'))


def test_unknown_model_config(tmp_path, capsys):
    assert _train(tmp_path / 'r', '--model', 'bnas-z') == 2
    _one_line_error(capsys, "unknown model config 'bnas-z'", 'bnas-a')
    assert not (tmp_path / 'r').exists()


def test_missing_dataset_path(tmp_path, capsys):
    assert _train(tmp_path / 'r', '--data', str(tmp_path / 'no-such-dir')) == 2
    _one_line_error(capsys, 'no-such-dir', 'does not exist')
    assert main(['train', '--config', str(experiments_dir() / 'train_imagenet_bnas.yaml'), '--data',
                 str(tmp_path / 'no-imagenet'), '--run-dir', str(tmp_path / 'r2')]) == 2
    _one_line_error(capsys, 'no-imagenet', 'does not exist')
    assert not (tmp_path / 'r').exists() and not (tmp_path / 'r2').exists()


def test_wrong_imagenet_layout(tmp_path, capsys):
    from PIL import Image

    for split in ('train', 'val'):
        d = tmp_path / 'imnet' / split / 'n01440764'
        d.mkdir(parents=True)
        Image.new('RGB', (8, 8)).save(d / 'a.JPEG')
    assert main(['train', '--config', str(experiments_dir() / 'train_imagenet_bnas.yaml'), '--data',
                 str(tmp_path / 'imnet'), '--run-dir', str(tmp_path / 'r')]) == 2
    _one_line_error(capsys, 'n01440764', 'prepare-imagenet')
    assert not (tmp_path / 'r').exists()


def test_unknown_config_key_and_bad_value(tmp_path, capsys):
    assert _train(tmp_path / 'r', '--set', 'learning_rat=0.1') == 2
    _one_line_error(capsys, "unknown config key 'learning_rat'")
    assert _train(tmp_path / 'r', '--set', 'amp=fp8') == 2
    _one_line_error(capsys, "amp='fp8'", 'bf16')


def test_checkpoint_from_another_architecture_is_refused(trained, tmp_path, capsys):
    before = (trained / 'checkpoint.pt').read_bytes()
    # resume into a wider network
    assert _train(tmp_path / 'r', '--init-channels', '6', '--epochs', '3', '--resume', str(trained)) == 2
    _one_line_error(capsys, 'different architecture', 'init_channels 4 vs 6')
    assert _no_checkpoint_files(tmp_path / 'r')
    # evaluate as another genotype
    assert main(['eval', '--checkpoint', str(trained), '--config', QUICK, '--init-channels', '4', '--layers', '3',
                 '--arch', 'latest_cell']) == 2
    _one_line_error(capsys, 'different architecture', 'genotype')
    # an existing run is not overwritten without --resume
    assert _train(trained, '--epochs', '3') == 2
    _one_line_error(capsys, 'already holds a checkpoint', '--resume')
    assert (trained / 'checkpoint.pt').read_bytes() == before


def test_binary_grad_clip_matches_the_official_order():
    """The gradient w.r.t. the binary weights, recovered from the latent gradient, equals the one
    autograd computes for the binarized tensor; clipping then bounds that (official) norm."""
    from bnas_nni.networks import build_model
    from bnas_nni.quant import binary_convs
    from bnas_nni.train.loop import binary_weight_grad, clip_binary_grad_norm_

    torch.manual_seed(0)
    model = build_model('bnas-a', init_channels=4, layers=3, genotype='latest_cell')   # no Zeroise: every conv learns
    captured = {}
    for m in binary_convs(model):
        orig = m.effective_weight

        def hooked(m=m, orig=orig):
            w = orig()
            w.register_hook(lambda g, m=m: captured.__setitem__(m, g.clone()))
            return w
        m.effective_weight = hooked
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert len(captured) == len(binary_convs(model)) >= 10
    for m, g in captured.items():
        assert torch.allclose(binary_weight_grad(m), g, rtol=1e-4, atol=1e-7)
    binary_ids = {id(m.weight) for m in captured}
    fp = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in binary_ids]
    manual = torch.sqrt(sum(g.double().pow(2).sum() for g in list(captured.values()) + fp))
    latent = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None))
    assert latent > 10 * manual                 # the latent gradient is much larger (x n(1 - 1/C_in))
    norm = clip_binary_grad_norm_(model, 1e-3)
    assert norm == pytest.approx(float(manual), rel=1e-5)
    after = torch.sqrt(sum(binary_weight_grad(m).double().pow(2).sum() for m in captured)
                       + sum(g.double().pow(2).sum() for g in fp))
    assert float(after) == pytest.approx(1e-3, rel=1e-3)


def test_bf16_autocast_and_channels_last_on_cpu(tmp_path):
    assert _train(tmp_path / 'r', '--epochs', '1', '--amp', 'bf16', '--channels-last', '--set',
                  'tensorboard=false') == 0
    row = _rows(tmp_path / 'r')[0]
    assert float(row['train_loss']) > 0 and 0 <= float(row['valid_top1']) <= 100


def test_eval_of_an_official_layout_checkpoint(trained, tmp_path, capsys):
    """Our weights re-saved the way the official train.py did (DataParallel ``module.`` prefix,
    ``_ops`` names, a bare state dict) evaluate to the same numbers through ``--official``."""
    from bnas_nni.checkpoints import ours_to_official, read_checkpoint

    ck = read_checkpoint(trained)
    official = ours_to_official(ck['state_dict'], 'cifar', prefix='module.')
    assert any('._ops.' in k for k in official) and all(k.startswith('module.') for k in official)
    path = tmp_path / 'weights.pt'
    torch.save(official, path)
    flags = ['--config', QUICK, '--init-channels', '4', '--layers', '3', '--val-subset', '48', '--threads', '1']
    capsys.readouterr()
    assert main(['eval', '--checkpoint', str(path), '--official', '--precision-rule', 'standard', *flags]) == 0
    ours = capsys.readouterr().out.strip().splitlines()[-1]
    assert float(ours.split()[1]) == pytest.approx(float(_rows(trained)[-1]['valid_top1']), abs=1e-3)
    # by default --official binarizes as the first release did (which convs stay full precision differs)
    assert main(['eval', '--checkpoint', str(path), '--official', *flags]) == 0
    assert 'precision rule official-2020-08' in capsys.readouterr().out
    # the official file into the wrong network: one line listing the mis-shaped keys
    assert main(['eval', '--checkpoint', str(path), '--official', '--config', QUICK, '--init-channels', '8',
                 '--layers', '3']) == 2
    _one_line_error(capsys, 'does not fit the model', 'mis-shaped')
