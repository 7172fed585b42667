"""Learning-rate/momentum schedules and the loss of the two BNAS recipes ."""
import math

import pytest
import torch

from bnas_nni.paths import experiments_dir
from bnas_nni.train.losses import CrossEntropy
from bnas_nni.train.runner import resolve_train_config as resolve_config
from bnas_nni.train.schedules import IterationSchedule, OneCycleLR, build_schedule, cosine_restarts

ITERS = 196          # ceil(50000 / 256)
EPOCHS = 600


def _optimizer(lr=0.05, momentum=0.9):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=lr, momentum=momentum, weight_decay=3e-6)


def test_cifar_recipe_values_from_the_shipped_yaml():
    cfg = resolve_config(experiments_dir() / 'train_cifar10_bnas_a.yaml')
    assert (cfg['epochs'], cfg['batch_size'], cfg['lr'], cfg['momentum'], cfg['weight_decay']) == \
        (600, 256, 0.05, 0.9, 3e-6)
    assert cfg['schedule'] == 'onecycle' and cfg['drop_path_prob'] == 0.2 and cfg['model'] == 'bnas-a'
    assert cfg['label_smoothing'] == 0.0 and cfg['grad_clip'] is None


def test_imagenet_recipe_values_from_the_shipped_yaml():
    cfg = resolve_config(experiments_dir() / 'train_imagenet_bnas.yaml')
    assert (cfg['dataset'] == 'imagenet' and cfg['recipe'] == 'paper' and cfg['epochs'] == 250 and cfg['lr'] == 0.05
            and cfg['weight_decay'] == 3e-5)
    assert cfg['label_smoothing'] == 0.1 and cfg['grad_clip'] == 5.0 and cfg['restart_epochs'] == 50
    assert cfg['schedule'] == 'cosine_restarts' and cfg['drop_path_prob'] == 0.0


def test_one_cycle_at_the_iterations_that_matter():
    """Walk all 117,600 iterations of the paper schedule, as the trainer does, and check the values
    at start, epoch boundaries (the README log), peak, end of ramp-down and end."""
    cfg = resolve_config(experiments_dir() / 'train_cifar10_bnas_a.yaml')
    opt = _optimizer()
    sched = build_schedule(cfg, opt, ITERS)
    assert isinstance(sched.scheduler, OneCycleLR)
    total = EPOCHS * ITERS
    half = int(total * 0.9) // 2
    assert (total, half, int(total * 0.9)) == (117600, 52920, 105840)
    want = {0: (2.5e-3, 0.95), ITERS: (2.675926e-3, None), 2 * ITERS: (2.851852e-3, None),
            half: (0.05, 0.85), 105840: (2.5e-3, 0.95), total: (2.5e-5, 0.95), total + 5: (2.5e-5, 0.95)}
    seen = {}
    for step in range(total + 6):
        if step in want:
            seen[step] = (opt.param_groups[0]['lr'], opt.param_groups[0]['momentum'])
        opt.step()
        sched.after_step()
    for step, (lr, mom) in want.items():
        assert seen[step][0] == pytest.approx(lr, rel=1e-6), step
        if mom is not None:
            assert seen[step][1] == pytest.approx(mom, abs=1e-12), step
    # halfway up the ramp: lr and momentum halfway between their ends
    s = sched.scheduler
    assert s.lr_at(half // 2) == pytest.approx((0.0025 + 0.05) / 2)
    assert s.momentum_at(half // 2) == pytest.approx(0.90)
    # annihilation: linear from 2.5e-3 to 2.5e-5, momentum parked at 0.95
    mid = (105840 + total) // 2
    assert s.lr_at(mid) == pytest.approx((2.5e-3 + 2.5e-5) / 2) and s.momentum_at(mid) == 0.95


def test_one_cycle_state_dict_resumes_exactly():
    opt_a, opt_b = _optimizer(), _optimizer()
    a = OneCycleLR(opt_a, 1000, lr_range=(0.0025, 0.05))
    for _ in range(337):
        opt_a.step()
        a.step()
    b = OneCycleLR(opt_b, 1000, lr_range=(0.0025, 0.05))
    opt_b.load_state_dict(opt_a.state_dict())
    b.load_state_dict(a.state_dict())
    for _ in range(500):
        for o, s in ((opt_a, a), (opt_b, b)):
            o.step()
            s.step()
        assert opt_a.param_groups[0]['lr'] == opt_b.param_groups[0]['lr']
        assert opt_a.param_groups[0]['momentum'] == opt_b.param_groups[0]['momentum']
    assert a.get_last_lr() == b.get_last_lr()


def test_cosine_restarts_per_iteration_with_fractional_epoch():
    opt = _optimizer()
    sched = IterationSchedule('cosine_restarts', cosine_restarts(opt, 50))
    iters = 10
    lrs = {}
    for epoch in (0, 25, 49, 50, 120):
        for i in range(iters):
            sched.before_step(epoch, i, iters)
            lrs[(epoch, i)] = opt.param_groups[0]['lr']
            opt.step()
    expect = lambda e: 0.05 * (1 + math.cos(math.pi * (e % 50) / 50)) / 2
    for (epoch, i), lr in lrs.items():
        assert lr == pytest.approx(expect(epoch + i / iters), abs=1e-12)
    assert lrs[(0, 0)] == pytest.approx(0.05) and lrs[(25, 0)] == pytest.approx(0.025)
    assert lrs[(49, 9)] < 1e-4 and lrs[(50, 0)] == pytest.approx(0.05)     # restart at epoch 50


def test_label_smoothing_matches_the_official_formula():
    torch.manual_seed(0)
    logits, target = torch.randn(8, 1000), torch.randint(0, 1000, (8,))
    eps = 0.1
    onehot = torch.zeros_like(logits).scatter_(1, target[:, None], 1.0)
    smoothed = (1 - eps) * onehot + eps / 1000
    official = (-smoothed * torch.log_softmax(logits, 1)).mean(0).sum()
    assert CrossEntropy(eps)(logits, target).item() == pytest.approx(official.item(), rel=1e-6)
    assert CrossEntropy(0.0)(logits, target).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, target).item(), rel=1e-6)
    cfg = resolve_config(experiments_dir() / 'train_imagenet_bnas.yaml')
    assert CrossEntropy(cfg['label_smoothing']).ce.label_smoothing == 0.1
