"""The recipe seam: the paper preset reproduces the plain CIFAR one-cycle loop bit for bit; optimizer groups,
losses with a teacher, stages and warm starts are chosen by the recipe, all through the one train loop."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bnas_nni.data import DEBIAN_FASHION_MNIST
from bnas_nni.errors import BNASError, ConfigError
from bnas_nni.paths import experiments_dir

pytestmark = pytest.mark.skipif(not Path(DEBIAN_FASHION_MNIST, 'train-images-idx3-ubyte.gz').is_file()
                                and not os.environ.get('BNAS_FASHION_MNIST'),
                                reason='Debian dataset-fashion-mnist is not installed')

QUICK = experiments_dir() / 'train_quick_fashion.yaml'
TINY = {'train_subset': 96, 'val_subset': 64, 'batch_size': 32, 'init_channels': 4, 'layers': 3, 'threads': 1,
        'epochs': 3, 'progress': 'never', 'tensorboard': False, 'drop_path_prob': 0.2, 'lr': 0.02}


def _reference_paper_cifar(epochs: int, lr: float):
    """The paper's CIFAR recipe written out as a plain loop, independent of bnas_nni.train."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from bnas_nni.data import FashionMNIST32
    from bnas_nni.networks import build_model
    from bnas_nni.quant import attach_latent_constraint
    from bnas_nni.seeding import seed_everything
    from bnas_nni.train.schedules import OneCycleLR

    seed_everything(0)
    model = build_model('bnas-a', init_channels=4, layers=3, num_classes=10)
    train = FashionMNIST32(train=True, subset=96, augment=True)
    val = FashionMNIST32(train=False, subset=64, augment=False)
    seed_everything(0)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=3e-6)
    attach_latent_constraint(opt, model)
    sampler = DistributedSampler(train, num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = DataLoader(train, batch_size=32, sampler=sampler)
    sched = OneCycleLR(opt, epochs * len(loader), lr_range=(0.05 * lr, lr), momentum_range=(0.85, 0.95),
                       annihilation_frac=0.1, reduce_factor=0.01)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        model.drop_path_prob = 0.2 * epoch / epochs
        model.train()
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            for x, _ in DataLoader(val, batch_size=32):
                model(x)
    return model.state_dict()


def test_paper_recipe_reproduces_the_plain_one_cycle_loop_bit_for_bit(tmp_path):
    from bnas_nni.checkpoints import read_checkpoint
    from bnas_nni.train.runner import run_training

    out = run_training(QUICK, {**TINY, 'run_dir': str(tmp_path / 'run')})
    assert out['epochs_run'] == 3 and len(out['stages']) == 1
    ours = read_checkpoint(tmp_path / 'run')['state_dict']
    ref = _reference_paper_cifar(3, 0.02)
    assert ours.keys() == ref.keys()
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k


def test_recipe_defaults_per_family_and_unknown_recipe():
    from bnas_nni.train.runner import resolve_train_config

    cifar = resolve_train_config(None, {})
    imagenet = resolve_train_config(None, {'model': 'bnas-d'})
    assert (cifar['recipe'], cifar['epochs'], cifar['schedule'], cifar['weight_decay']) == \
        ('paper', 600, 'onecycle', 3e-6)
    assert (imagenet['dataset'], imagenet['epochs'], imagenet['schedule'], imagenet['label_smoothing'],
            imagenet['grad_clip'], imagenet['image_size']) == ('imagenet', 250, 'cosine_restarts', 0.1, 5.0, 224)
    assert resolve_train_config(None, {'model': 'bnas-d', 'epochs': 3})['epochs'] == 3   # the user still wins
    with pytest.raises(ConfigError, match="unknown recipe 'reactnet'; choose one of .*paper"):
        resolve_train_config(None, {'recipe': 'reactnet'})


def test_parameter_groups_give_binary_latent_weights_their_own_decay():
    from bnas_nni.networks import build_model
    from bnas_nni.quant import binary_convs, has_latent_constraint
    from bnas_nni.train.optim import build_optimizer

    model = build_model('bnas-a', init_channels=4, layers=3)
    one = build_optimizer(model, lr=0.1, weight_decay=1e-4)
    assert len(one.param_groups) == 1 and has_latent_constraint(one)
    two = build_optimizer(model, optimizer='adam', lr=0.1, weight_decay=1e-4, weight_decay_binary=0.0)
    groups = {g['group']: g for g in two.param_groups}
    latent = {id(m.weight) for m in binary_convs(model)}
    assert {id(p) for p in groups['binary']['params']} == latent and groups['binary']['weight_decay'] == 0.0
    assert groups['real']['weight_decay'] == 1e-4 and not latent & {id(p) for p in groups['real']['params']}
    # weight decay 0 really leaves binary latent weights undecayed (zero gradients, a few Adam steps), while
    # the same steps with decay move them; the real-valued parameters decay in both
    def latent_drift(weight_decay_binary):
        model = build_model('bnas-a', init_channels=4, layers=3)
        opt = build_optimizer(model, optimizer='adam', lr=0.1, weight_decay=1e-2,
                              weight_decay_binary=weight_decay_binary)
        conv = binary_convs(model)[0]
        with torch.no_grad():
            conv.weight.copy_(torch.sign(torch.randn_like(conv.weight)) * 0.5)
            conv.weight.sub_(conv.weight.mean(dim=1, keepdim=True))     # already satisfies the latent constraint
        before = conv.weight.detach().clone()
        real = model.classifier.weight
        real_before = real.detach().clone()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        for _ in range(3):
            opt.step()
        return float((conv.weight.detach() - before).abs().max()), float((real.detach() - real_before).abs().max())

    undecayed, real_moved = latent_drift(0.0)
    decayed, _ = latent_drift(0.5)
    assert undecayed < 1e-6 and decayed > 1e-2 and real_moved > 1e-2


class _TwoStage:
    """A test recipe: real-valued weights first, then binary weights warm-started from stage one."""

    def __new__(cls):
        from bnas_nni.train.recipes import PaperRecipe, Stage

        class TwoStage(PaperRecipe):
            name = 'test-two-stage'

            def stages(self, cfg):
                return [Stage('real', {'binarizer': 'none', 'epochs': 1}),
                        Stage('binary', {'epochs': 1}, init_from_previous=True)]

        return TwoStage()


def test_stages_hand_their_weights_on_and_resume(tmp_path, capsys):
    from bnas_nni.checkpoints import read_checkpoint
    from bnas_nni.train.recipes import RECIPES, register_recipe
    from bnas_nni.train.runner import run_training

    if 'test-two-stage' not in RECIPES:
        register_recipe(_TwoStage())
    run = tmp_path / 'run'
    out = run_training(QUICK, {**TINY, 'recipe': 'test-two-stage', 'run_dir': str(run)})
    assert [Path(s['run_dir']).name for s in out['stages']] == ['real', 'binary']
    real, binary = read_checkpoint(run / 'real'), read_checkpoint(run / 'binary')
    assert real['model']['binarizers'] == {} and binary['model']['binarizers']      # stage overrides applied
    assert 'initialised the weights from' in (run / 'log.txt').read_text()
    # the binary stage started from the real stage's final weights: re-run it alone from there, compare
    from bnas_nni.train.runner import resolve_train_config

    assert resolve_train_config(base=binary['config'])['init_from'] is None
    run_training(QUICK, {**TINY, 'epochs': 1, 'run_dir': str(tmp_path / 'again'), 'init_from': str(run / 'real')})
    b2 = read_checkpoint(tmp_path / 'again')
    for k, v in binary['state_dict'].items():
        assert torch.equal(v, b2['state_dict'][k]), k
    # a finished multi-stage run resumes as a no-op
    done = run_training(QUICK, {**TINY, 'recipe': 'test-two-stage', 'run_dir': str(run)}, resume=True)
    assert done['epochs_run'] == 0
    with pytest.raises(ConfigError, match='already holds a checkpoint'):
        run_training(QUICK, {**TINY, 'recipe': 'test-two-stage', 'run_dir': str(run)})


def test_distillation_loss_from_a_checkpoint_teacher(tmp_path):
    from bnas_nni.train.losses import Distillation, distribution_loss
    from bnas_nni.train.runner import run_training

    z = torch.randn(5, 10)
    assert float(distribution_loss(z, z)) == 0.0     # the KL form: ReActNet's cross entropy minus the teacher entropy
    teacher = tmp_path / 'teacher'
    run_training(QUICK, {**TINY, 'epochs': 1, 'binarizer': 'none', 'activation': 'identity',
                         'run_dir': str(teacher)})
    out = run_training(QUICK, {**TINY, 'epochs': 1, 'teacher': str(teacher), 'run_dir': str(tmp_path / 'student')})
    assert out['final']['train_loss'] > 0
    with pytest.raises(BNASError, match='predicts 10 classes but the student has 12'):
        run_training(QUICK, {**TINY, 'epochs': 1, 'teacher': str(teacher), 'num_classes': 12,
                             'run_dir': str(tmp_path / 'bad')})
    assert not (tmp_path / 'bad').exists()
    assert isinstance(Distillation(torch.nn.Linear(2, 2)).teacher, torch.nn.Linear)
