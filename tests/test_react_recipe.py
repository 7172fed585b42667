"""The react recipe: two steps with one command (step 2 starts from step 1's weights), resumable in either
step, Adam with conv-only weight decay that is really 0 in step 2, distillation from a checkpoint or a
torchvision teacher, and one-line errors for bad teachers and recipes."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bnas_nni.data import DEBIAN_FASHION_MNIST
from bnas_nni.paths import experiments_dir

pytestmark = pytest.mark.skipif(not Path(DEBIAN_FASHION_MNIST, 'train-images-idx3-ubyte.gz').is_file()
                                and not os.environ.get('BNAS_FASHION_MNIST'),
                                reason='Debian dataset-fashion-mnist is not installed')

QUICK = experiments_dir() / 'train_quick_fashion.yaml'
REACT = experiments_dir() / 'train_quick_fashion_react.yaml'
TINY = {'train_subset': 64, 'val_subset': 32, 'batch_size': 32, 'init_channels': 4, 'layers': 3, 'threads': 1,
        'epochs': 2, 'progress': 'never', 'tensorboard': False}


class _Stop(Exception):
    pass


@pytest.fixture(scope='module')
def teacher(tmp_path_factory) -> Path:
    """A full-precision version of the same genotype (binarizer none, activation identity), one epoch."""
    from bnas_nni.train.runner import run_training

    run = tmp_path_factory.mktemp('teacher') / 'fp'
    run_training(QUICK, {**TINY, 'epochs': 1, 'binarizer': 'none', 'activation': 'identity', 'run_dir': str(run)})
    return run


def test_react_defaults_and_stages():
    from bnas_nni.train.recipes import get_recipe
    from bnas_nni.train.runner import resolve_train_config

    cifar = resolve_train_config(None, {'recipe': 'react'})
    assert (cifar['optimizer'], cifar['lr'], cifar['betas'], cifar['schedule'], cifar['epochs'], cifar['batch_size'],
            cifar['weight_decay'], cifar['weight_decay_other'], cifar['step2_weight_decay'], cifar['op_set'],
            cifar['drop_path_prob']) == ('adam', 5e-4, [0.9, 0.999], 'linear', 300, 256, 5e-6, 0.0, 0.0, 'react', 0.0)
    imagenet = resolve_train_config(None, {'recipe': 'react', 'model': 'bnas-d'})
    assert (imagenet['dataset'], imagenet['lr'], imagenet['epochs'], imagenet['batch_size'],
            imagenet['image_size']) == ('imagenet', 1.25e-3, 256, 256, 224)
    stages = get_recipe('react').stages(cifar.replace(step1_epochs=7, step2_weight_decay=1e-7))
    assert [(s.name, dict(s.overrides), s.init_from_previous) for s in stages] == [
        ('step1', {'binarizer': 'none', 'epochs': 7, 'bn_freeze_epochs': 0, 'bn_renorm_epochs': 0}, False),
        ('step2', {'weight_decay': 1e-7}, True)]
    assert cifar['bn_recalibration'] == imagenet['bn_recalibration'] == 100
    assert cifar['bn_recalibration_mode'] == imagenet['bn_recalibration_mode'] == 'eval'
    paper = resolve_train_config(None, {})
    assert paper['op_set'] is None and paper['weight_decay_other'] is None     # the paper recipe is untouched
    assert cifar['bn_freeze_epochs'] == imagenet['bn_freeze_epochs'] == 0
    assert paper['bn_recalibration'] == paper['bn_freeze_epochs'] == paper['bn_renorm_epochs'] == 0


def test_recalibration_sees_the_training_images_with_the_evaluation_transform():
    from bnas_nni.data import FashionMNIST32, build_dataset

    cfg = {'dataset': 'fashion-mnist', 'data': None, 'train_subset': 16, 'val_subset': 8}
    plain = build_dataset(cfg, 'train-eval')
    train = build_dataset(cfg, 'train')
    ref = FashionMNIST32(None, train=True, subset=16, augment=False)
    assert len(plain) == len(train) == 16
    assert all(torch.equal(plain[i][0], ref[i][0]) and plain[i][1] == train[i][1] for i in range(16))
    torch.manual_seed(0)
    assert any(not torch.equal(train[i][0], ref[i][0]) for i in range(16))      # train: crops and flips


def test_bn_recalibration_is_the_plain_average_of_the_batch_statistics():
    """Precise BN in training mode (``bn_recalibration_mode: train``): each running mean / variance becomes
    the mean over the batches of the batch mean / unbiased variance of the final weights' activations;
    weights, momentum and drop path are untouched."""
    import torch.nn as nn

    from bnas_nni.distributed import init_distributed
    from bnas_nni.networks import build_model
    from bnas_nni.train.loop import recalibrate_bn

    torch.manual_seed(0)
    model = build_model('bnas-a', init_channels=4, layers=3, op_set='react').eval()
    model.drop_path_prob = 0.3
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    probe = bns[len(bns) // 2]
    seen = []
    hook = probe.register_forward_pre_hook(lambda mod, inp: seen.append(
        (inp[0].mean((0, 2, 3)), inp[0].transpose(0, 1).flatten(1).var(1, unbiased=True))))
    batches = [(torch.randn(6, 3, 16, 16) * (1 + i), torch.zeros(6, dtype=torch.long)) for i in range(4)]
    before = {k: v.clone() for k, v in model.state_dict().items() if 'running' not in k and 'num_batches' not in k}
    ctx = init_distributed('cpu')
    assert recalibrate_bn(model, batches, 3, ctx=ctx, mode='train') == 18
    hook.remove()
    assert len(seen) == 3
    mean = torch.stack([m for m, _ in seen]).mean(0)
    var = torch.stack([v for _, v in seen]).mean(0)
    torch.testing.assert_close(probe.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probe.running_var, var, rtol=1e-5, atol=1e-6)
    assert all(m.momentum == 0.1 for m in bns) and model.drop_path_prob == 0.3 and not model.training
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


@pytest.mark.parametrize('cached', [True, False])
def test_eval_mode_recalibration_gives_each_bn_the_statistics_of_the_evaluated_network(monkeypatch, cached):
    """``bn_recalibration_mode: eval`` (the default): after re-estimation, every BN's running mean / variance
    are the average over the batches of the batch mean / unbiased variance of its input *in the eval-mode
    network with the new statistics*; this differs from training-mode re-estimation; weights, momentum,
    drop path and the train/eval flag are untouched. ``cached=False``: the batches are read again per BN."""
    import torch.nn as nn

    from bnas_nni.distributed import init_distributed
    from bnas_nni.networks import build_model
    from bnas_nni.train import loop

    if not cached:
        monkeypatch.setattr(loop, 'RECALIBRATION_CACHE_BYTES', 0)
    torch.manual_seed(0)
    model = build_model('bnas-a', init_channels=4, layers=3, op_set='react').train()
    model.drop_path_prob = 0.3
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    batches = [(torch.randn(6, 3, 16, 16) * (1 + i), torch.zeros(6, dtype=torch.long)) for i in range(4)]
    before = {k: v.clone() for k, v in model.state_dict().items() if 'running' not in k and 'num_batches' not in k}
    ctx = init_distributed('cpu')
    assert loop.recalibrate_bn(model, batches, 3, ctx=ctx, mode='train') == 18
    by_train = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    assert loop.recalibrate_bn(model, batches, 3, ctx=ctx) == 18                 # mode='eval'
    assert model.training and model.drop_path_prob == 0.3 and all(m.momentum == 0.1 for m in bns)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    # what the evaluated network feeds each BN, with the statistics just estimated
    seen = {id(m): [] for m in bns}
    hooks = [m.register_forward_pre_hook(lambda mod, inp: seen[id(mod)].append(inp[0].detach())) for m in bns]
    model.eval()
    with torch.no_grad():
        for x, _ in batches[:3]:
            model(x)
    for h in hooks:
        h.remove()
    differs = False
    for m, (train_mean, train_var) in zip(bns, by_train):
        xs = seen[id(m)]
        assert len(xs) == 3
        mean = torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0)
        var = torch.stack([x.transpose(0, 1).flatten(1).var(1, unbiased=True) for x in xs]).mean(0)
        torch.testing.assert_close(m.running_mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m.running_var, var, rtol=1e-4, atol=1e-5)
        assert int(m.num_batches_tracked) == 3
        differs |= not torch.allclose(m.running_mean, train_mean, rtol=1e-3, atol=1e-3) or \
            not torch.allclose(m.running_var, train_var, rtol=1e-3, atol=1e-3)
    assert differs                       # downstream of the first BN the two estimates are not the same
    with pytest.raises(ValueError, match='mode must be one of'):
        loop.recalibrate_bn(model, batches, 3, ctx=ctx, mode='batch')


def test_frozen_bn_epochs_train_the_function_that_is_evaluated():
    """``freeze_bn``: the logits the loss sees are the eval-mode network's, BN running statistics stay put,
    and the weights (BN affine parameters, RSign thresholds included) still learn."""
    import torch.nn as nn

    from bnas_nni.distributed import init_distributed
    from bnas_nni.networks import build_model
    from bnas_nni.train.loop import train_one_epoch

    torch.manual_seed(0)
    model = build_model('bnas-a', init_channels=4, layers=3, op_set='react', num_classes=10)
    model.drop_path_prob = 0.0
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:                                           # statistics that differ from any batch's
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
    stats = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    batches = [(torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))) for _ in range(3)]
    expected, seen = [], []

    class Recording(nn.Module):
        def forward(self, logits, target, images):
            seen.append(logits.detach().clone())
            model.eval()
            with torch.no_grad():
                expected.append(model(images))
            model.train()
            for m in bns:
                m.eval()
            return nn.functional.cross_entropy(logits, target)

    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_one_epoch(model, batches, opt, Recording(), epoch=0, ctx=init_distributed('cpu'), freeze_bn=True,
                    report_freq=0)
    assert len(seen) == 3 and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(seen, expected))
    for m, (mean, var, n) in zip(bns, stats):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        assert torch.equal(m.num_batches_tracked, n)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), params[n])}
    assert any(n.endswith('quantizer.beta') for n in moved) and any(n.endswith('bn.weight') for n in moved)


def test_bn_freeze_epochs_keep_the_re_estimated_statistics(tmp_path):
    """The last ``bn_freeze_epochs`` of a stage start from re-estimated statistics and keep them: the BN
    buffers after the first and the last frozen epoch are equal while the weights moved; the run logs it."""
    import shutil

    from bnas_nni.checkpoints import read_checkpoint
    from bnas_nni.train.runner import run_training

    run = tmp_path / 'frozen'
    kept = tmp_path / 'after_epoch1.pt'

    def copy_checkpoint(epoch, step):
        if epoch == 2 and step == 0:                         # the checkpoint still holds epoch 1's end
            shutil.copy(run / 'checkpoint.pt', kept)

    run_training(QUICK, {**TINY, 'epochs': 3, 'op_set': 'react', 'activation': 'rsign', 'bn_recalibration': 2,
                         'bn_freeze_epochs': 2, 'drop_path_prob': 0.0, 'run_dir': str(run)},
                 on_step=copy_checkpoint)
    a, b = read_checkpoint(kept)['state_dict'], read_checkpoint(run)['state_dict']
    buffers = [k for k in a if k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))]
    assert buffers and all(torch.equal(a[k], b[k]) for k in buffers)
    assert any(not torch.equal(a[k], b[k]) for k in a if k not in buffers)
    log = (run / 'log.txt').read_text()
    assert 'epochs 1-2 train with BN statistics fixed' in log
    # before epoch 1, not at the end
    assert log.count('BN statistics re-estimated layer by layer in eval mode on 64 training images') == 1


def test_bn_renorm_epochs_train_with_the_running_statistics(tmp_path):
    """``bn_renorm_epochs``: re-estimated once before the renorm epochs (not again at the end), the running
    statistics keep moving, the log says so, and the epochs' training forward is the eval-mode one."""
    import contextlib

    from bnas_nni.checkpoints import read_checkpoint
    from bnas_nni.train import loop
    from bnas_nni.train.runner import run_training

    run = tmp_path / 'renorm'
    kept, checked = {}, []
    real = loop.batch_renormalization

    @contextlib.contextmanager
    def spy(model, *a, **k):                                  # compare train and eval forwards inside the block
        with real(model, r_max=float("inf"), d_max=float("inf")) as bns:   # no clip: exactly eval
            x = torch.randn(4, 3, 16, 16)
            with torch.no_grad():
                saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
                train_out = model(x)
                for m, (mean, var, n) in zip(bns, saved):
                    m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(n)
                model.eval()
                eval_out = model(x)
                model.train()
            checked.append(torch.allclose(train_out, eval_out, atol=1e-4))
            yield bns

    def keep(epoch, step):
        if epoch == 2 and step == 0:
            kept['state'] = read_checkpoint(run)['state_dict']

    loop.batch_renormalization = spy
    try:
        run_training(QUICK, {**TINY, 'epochs': 3, 'op_set': 'react', 'activation': 'rsign', 'bn_recalibration': 2,
                             'bn_renorm_epochs': 2, 'drop_path_prob': 0.0, 'run_dir': str(run)}, on_step=keep)
    finally:
        loop.batch_renormalization = real
    assert checked == [True, True]                            # epochs 1 and 2, not epoch 0
    a, b = kept['state'], read_checkpoint(run)['state_dict']
    means = [k for k in a if k.endswith('running_mean')]
    assert means and all(not torch.equal(a[k], b[k]) for k in means)     # the statistics kept updating
    log = (run / 'log.txt').read_text()
    assert 'epochs 1-2 train with Batch Renormalization' in log
    assert log.count('BN statistics re-estimated layer by layer in eval mode on 64 training images') == 1


def test_resumed_inside_the_renorm_epochs_matches_an_uninterrupted_run(tmp_path):
    """Killed in the second Batch Renormalization epoch, ``--resume`` neither re-estimates the statistics again
    nor trains that epoch without renormalisation: the weights, BN buffers and metrics equal an uninterrupted run's."""
    from bnas_nni.checkpoints import read_checkpoint
    from bnas_nni.train.runner import run_training

    cfg = {**TINY, 'epochs': 3, 'op_set': 'react', 'activation': 'rsign', 'bn_recalibration': 2,
           'bn_renorm_epochs': 2, 'drop_path_prob': 0.0}
    full = run_training(QUICK, {**cfg, 'run_dir': str(tmp_path / 'full')})

    def stop(epoch, step):
        if epoch == 2 and step == 0:
            raise _Stop()

    run = tmp_path / 'cut'
    with pytest.raises(_Stop):
        run_training(QUICK, {**cfg, 'run_dir': str(run)}, on_step=stop)
    done = run_training(QUICK, {**cfg, 'run_dir': str(run)}, resume=True)
    assert done['epochs_run'] == 1 and done['final'] == {**full['final'],
                                                         'epoch_seconds': done['final']['epoch_seconds']}
    a, b = read_checkpoint(tmp_path / 'full')['state_dict'], read_checkpoint(run)['state_dict']
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = (run / 'log.txt').read_text()
    assert log.count('BN statistics re-estimated') == 1 and log.count('train with Batch Renormalization') == 1


def test_two_steps_hand_weights_on_with_distillation(tmp_path, teacher):
    from bnas_nni.checkpoints import read_checkpoint
    from bnas_nni.train.runner import run_training

    run = tmp_path / 'react'
    out = run_training(REACT, {**TINY, 'teacher': str(teacher), 'run_dir': str(run), 'step1_epochs': 1})
    assert [Path(s['run_dir']).name for s in out['stages']] == ['step1', 'step2']
    assert [s['epochs_run'] for s in out['stages']] == [1, 2]
    s1, s2 = read_checkpoint(run / 'step1'), read_checkpoint(run / 'step2')
    final = read_checkpoint(run)['state_dict']                              # the run directory names step 2's model
    assert final.keys() == s2['state_dict'].keys()
    assert all(torch.equal(final[k], v) for k, v in s2['state_dict'].items())
    assert s1['model']['binarizers'] == {}                                  # step 1: real weights
    assert set(s2['model']['binarizers'].values()) == {'scaled_sign'}      # step 2: binary weights too
    assert s1['model']['config']['activation'] == s2['model']['config']['activation'] == 'rsign'
    assert (s1['config']['weight_decay'], s2['config']['weight_decay']) == (5e-6, 0.0)
    assert s1.keys() >= {'optimizer'} and s1['state_dict'].keys() == s2['state_dict'].keys()
    log = (run / 'log.txt').read_text()
    assert f'initialised the weights from {run / "step1" / "checkpoint.pt"}' in log
    # the distilled loss is the KL to the teacher (>= 0), not the cross entropy
    assert 0 <= out['final']['train_loss'] < out['final']['valid_loss']
    # step 2 started from step 1's final weights: the same training as one stage initialised from step 1
    again = run_training(QUICK, {**TINY, 'recipe': 'paper', 'op_set': 'react', 'optimizer': 'adam', 'lr': 2e-3,
                                 'betas': [0.9, 0.999], 'schedule': 'linear', 'weight_decay': 0.0,
                                 'weight_decay_other': 0.0, 'drop_path_prob': 0.0, 'teacher': str(teacher),
                                 'bn_recalibration': 100,
                                 'init_from': str(run / 'step1'), 'run_dir': str(tmp_path / 'again')})
    assert again['epochs_run'] == 2
    ref = read_checkpoint(tmp_path / 'again')['state_dict']
    for k, v in s2['state_dict'].items():
        assert torch.equal(v, ref[k]), k
    moved = [k for k in s1['state_dict'] if k.endswith('quantizer.beta')
             and not torch.equal(s1['state_dict'][k], s2['state_dict'][k])]
    assert moved                                                            # the thresholds trained on in step 2


@pytest.mark.parametrize('stop_stage', [0, 1])
def test_resumable_in_either_step(tmp_path, teacher, stop_stage):
    """Killed in step 1 or step 2, ``--resume`` finishes with the same weights as an uninterrupted run."""
    from bnas_nni.checkpoints import read_checkpoint
    from bnas_nni.train.runner import run_training

    cfg = {**TINY, 'teacher': str(teacher), 'step1_epochs': 2}
    full = run_training(REACT, {**cfg, 'run_dir': str(tmp_path / 'full')})
    calls = {'n': 0}
    per_epoch = 2                                                     # 64 images, batch 32

    def stop(epoch, step):
        calls['n'] += 1
        if calls['n'] == stop_stage * 2 * per_epoch + per_epoch + 1:   # the second epoch of the chosen step
            raise _Stop()

    run = tmp_path / 'cut'
    with pytest.raises(_Stop):
        run_training(REACT, {**cfg, 'run_dir': str(run)}, on_step=stop)
    assert (run / 'step1' / 'checkpoint.pt').is_file()
    assert (run / 'step2' / 'checkpoint.pt').is_file() == (stop_stage == 1)
    assert not (run / 'checkpoint.pt').is_file()                      # the final model only once step 2 is done
    done = run_training(REACT, {**cfg, 'run_dir': str(run)}, resume=True)
    assert done['epochs_run'] == (3 if stop_stage == 0 else 1)
    a, b = read_checkpoint(tmp_path / 'full' / 'step2')['state_dict'], read_checkpoint(run / 'step2')['state_dict']
    for k in a:
        assert torch.equal(a[k], b[k]), k
    top = read_checkpoint(run)['state_dict']
    assert all(torch.equal(a[k], top[k]) for k in a)
    assert full['final']['valid_top1'] == done['final']['valid_top1']


def test_step2_leaves_binary_latent_weights_undecayed():
    """The optimizers the recipe builds: step 1 decays conv weights only; in step 2 (weight decay 0)
    Adam steps with zero gradients leave every latent binary weight exactly where it was."""
    from bnas_nni.quant import binary_convs
    from bnas_nni.train.recipes import get_recipe
    from bnas_nni.train.runner import build_network, resolve_model_config, resolve_train_config

    recipe = get_recipe('react')
    cfg = resolve_train_config(None, {'recipe': 'react', 'init_channels': 4, 'layers': 3, 'lr': 0.1})
    step1, step2 = [resolve_train_config(base=cfg, overrides=dict(s.overrides)) for s in recipe.stages(cfg)]

    def run_steps(stage_cfg):
        model = build_network(resolve_model_config(stage_cfg))
        opt = recipe.optimizer(model, stage_cfg)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        for _ in range(3):
            opt.step()
        moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
        return model, opt, moved

    model1, opt1, moved1 = run_steps(step1)
    assert not binary_convs(model1)                                    # real weights in step 1
    conv_weights = {f'{n}.weight' for n, m in model1.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert moved1 == conv_weights                                      # decay reaches the (latent) conv weights only
    assert {g['weight_decay'] for g in opt1.param_groups} == {5e-6, 0.0}
    model2, opt2, moved2 = run_steps(step2)
    assert binary_convs(model2) and moved2 == set()
    assert all(g['weight_decay'] == 0.0 for g in opt2.param_groups)
    assert isinstance(opt2, torch.optim.Adam) and opt2.param_groups[0]['betas'] == (0.9, 0.999)


def test_torchvision_teacher_from_a_local_file(tmp_path):
    import torchvision

    from bnas_nni.errors import BNASError
    from bnas_nni.train.losses import Distillation
    from bnas_nni.train.teacher import load_teacher

    weights = tmp_path / 'resnet18.pth'
    torch.save(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), weights)
    model = load_teacher(f'torchvision:resnet18={weights}', num_classes=10)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.randn(2, 3, 32, 32)
    loss = Distillation(model)(model(x), None, x)
    assert float(loss) == 0.0
    with pytest.raises(BNASError, match='predicts 10 classes but the student has 12'):
        load_teacher(f'torchvision:resnet18={weights}', num_classes=12)
    with pytest.raises(BNASError, match='do not fit torchvision resnet34'):
        load_teacher(f'torchvision:resnet34={weights}', num_classes=10)
    with pytest.raises(BNASError, match='torchvision:NAME=WEIGHTS_FILE'):
        load_teacher('torchvision:resnet18', num_classes=10)


def _one_line_error(argv, capsys) -> str:
    from bnas_nni.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: '), err
    return err[0]


def test_bad_teachers_and_recipes_are_one_line_errors(tmp_path, teacher, capsys):
    from bnas_nni.checkpoints import read_checkpoint

    base = ['train', '--config', str(REACT), '--set', 'train_subset=32', '--set', 'val_subset=16',
            '--set', 'init_channels=4', '--set', 'layers=3', '--set', 'epochs=1', '--set', 'progress=never']
    # a teacher checkpoint whose weights do not fit the network it describes
    obj = read_checkpoint(teacher)
    key = next(k for k in obj['state_dict'] if k.endswith('op.0.weight'))
    del obj['state_dict'][key]
    broken = tmp_path / 'broken.pt'
    torch.save(obj, broken)
    err = _one_line_error(base + ['--set', f'teacher={broken}', '--run-dir', str(tmp_path / 'a')], capsys)
    assert f'teacher {broken}' in err and '1 missing' in err and key in err
    # a teacher with another number of classes
    err = _one_line_error(base + ['--set', f'teacher={teacher}', '--num-classes', '12',
                                  '--run-dir', str(tmp_path / 'b')], capsys)
    assert 'predicts 10 classes but the student has 12' in err
    # a file that is not a bnas-nni checkpoint, and one that does not exist
    bare = tmp_path / 'bare.pt'
    torch.save(obj['state_dict'], bare)
    assert 'not a bnas-nni checkpoint' in _one_line_error(base + ['--set', f'teacher={bare}', '--run-dir',
                                                                  str(tmp_path / 'c')], capsys)
    assert 'checkpoint not found' in _one_line_error(base + ['--set', f'teacher={tmp_path / "nope.pt"}',
                                                             '--run-dir', str(tmp_path / 'd')], capsys)
    # a recipe that does not exist; an op set that does not exist
    err = _one_line_error(base + ['--recipe', 'reactnet', '--run-dir', str(tmp_path / 'e')], capsys)
    assert "unknown recipe 'reactnet'; choose one of paper, react" in err
    err = _one_line_error(base + ['--set', 'op_set=bireal', '--run-dir', str(tmp_path / 'f')], capsys)
    assert "unknown op set 'bireal'" in err
    for name in 'abcdef':
        assert not (tmp_path / name).exists(), name                  # refused before any file is written
