"""Binary primitives: activation STE, the xnor binarizer against the official BinOp, the sign binarizer."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bnas_nni.errors import BNASError, ConfigError
from bnas_nni.quant import (
    ACTIVATIONS,
    WEIGHT_BINARIZERS,
    BinaryConv2d,
    attach_latent_constraint,
    binary_convs,
    constrain_latent_weights_,
    make_activation,
    make_binarizer,
)

# --------------------------------------------------------------------------- activation


def test_ste_sign_forward_and_clipped_gradient():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.3, 0.999, 1.0, 3.0], requires_grad=True)
    act = make_activation('ste_sign')
    y = act(x)
    assert y.tolist() == [-1.0, -1.0, -1.0, 0.0, 1.0, 1.0, 1.0, 1.0]  # sign(0) = 0 as in the official code
    g = torch.arange(1.0, 9.0)
    y.backward(g)
    # gradient passes where |x| < 1 only (x = +-1 is blocked, as grad_input[input.ge(1)] = 0 does)
    assert x.grad.tolist() == [0.0, 0.0, 3.0, 4.0, 5.0, 6.0, 0.0, 0.0]
    assert act.precision == 1


def test_identity_activation_is_full_precision():
    x = torch.randn(5, requires_grad=True)
    act = make_activation('identity')
    act(x).sum().backward()
    assert torch.equal(act(x), x) and torch.equal(x.grad, torch.ones(5))
    assert act.precision == 32


# --------------------------------------------------------------------------- xnor


def _constrain(w: torch.Tensor) -> torch.Tensor:
    """Mean-centre over input channels, then clamp to [-1, 1] (BinOp steps 1.1-1.2)."""
    return (w - w.mean(dim=1, keepdim=True)).clamp(-1, 1)


def test_xnor_forward_is_sign_times_filter_mean_abs():
    w = torch.randn(6, 5, 3, 3, dtype=torch.float64) * 0.9
    wc = _constrain(w)
    alpha = torch.stack([wc[o].abs().mean() for o in range(6)]).view(6, 1, 1, 1)
    wb = make_binarizer('xnor')(w)
    assert torch.allclose(wb, wc.sign() * alpha, atol=1e-12)
    # one magnitude per output filter
    for o in range(6):
        mags = wb[o].abs().unique()
        assert mags.numel() == 1 and abs(mags.item() - alpha[o].item()) < 1e-12
    assert not torch.allclose(make_binarizer('xnor').constrain(w), w)  # the constraint really changes w


@pytest.mark.parametrize('c_in', [1, 3, 8])
def test_xnor_gradient_closed_form(c_in):
    O, k = 4, 3
    w = (torch.randn(O, c_in, k, k, dtype=torch.float64) * 1.5).requires_grad_()
    g = torch.randn(O, c_in, k, k, dtype=torch.float64)
    (make_binarizer('xnor')(w) * g).sum().backward()

    wc = _constrain(w.detach())
    n = c_in * k * k
    alpha = wc.abs().sum(dim=(1, 2, 3), keepdim=True) / n
    inside = (wc.abs() <= 1).double()
    mean_sg = (wc.sign() * g).sum(dim=(1, 2, 3), keepdim=True) / n
    expected = (alpha * inside * g + wc.sign() * mean_sg) * n * (1 - 1 / c_in)
    assert torch.allclose(w.grad, expected, atol=1e-10)
    if c_in == 1:
        assert torch.count_nonzero(w.grad) == 0  # (1 - 1/C_in) = 0
    else:
        # the n(1-1/C_in) scale is large: the latent gradient is much bigger than the plain STE one
        assert w.grad.abs().mean() > 5 * (alpha * g).abs().mean()


class _OfficialSign(torch.autograd.Function):
    """Independent copy of the official BinActive maths (sign; zero grad where |x| >= 1)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sign()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        g = g.clone()
        g[x.ge(1)] = 0
        g[x.le(-1)] = 0
        return g


class _OfficialBinOp:
    """Re-implementation of the official ``BinOp`` data-swap sequence on plain ``nn.Conv2d`` weights."""

    def __init__(self, weights):
        self.targets = list(weights)
        self.saved = [w.data.clone() for w in self.targets]

    def binarization(self):
        for i, w in enumerate(self.targets):
            w.data = w.data.add(w.data.mean(1, keepdim=True).mul(-1).expand_as(w.data))
            w.data = w.data.clamp(-1.0, 1.0)
            self.saved[i].copy_(w.data)
            n = w.data[0].nelement()
            m = w.data.norm(1, 3, keepdim=True).sum(2, keepdim=True).sum(1, keepdim=True).div(n)
            w.data = w.data.sign().mul(m.expand(w.data.size()))

    def restore(self):
        for i, w in enumerate(self.targets):
            w.data.copy_(self.saved[i])

    def update_binary_grad_weight(self):
        for w in self.targets:
            weight = w.data
            n = weight[0].nelement()
            s = weight.size()
            m = weight.norm(1, 3, keepdim=True).sum(2, keepdim=True).sum(1, keepdim=True).div(n).expand(s).clone()
            m[weight.lt(-1.0)] = 0
            m[weight.gt(1.0)] = 0
            m = m.mul(w.grad.data)
            m_add = weight.sign().mul(w.grad.data)
            m_add = m_add.sum(3, keepdim=True).sum(2, keepdim=True).sum(1, keepdim=True).div(n).expand(s)
            m_add = m_add.mul(weight.sign())
            w.grad.data = m.add(m_add).mul(1.0 - 1.0 / s[1]).mul(n)


class _TinyNet(nn.Module):
    """stem (full precision) -> 2 binary convs (BN -> sign -> conv -> ReLU) -> linear.

    A binary conv's output is alpha times a sum of +-1 terms; the fan-ins (7*3*3, 9*1*1) are odd and
    there is no zero padding, so no output is exactly 0 and the ReLU masks cannot flip on rounding
    differences between the two implementations.
    """

    def __init__(self, conv, act):
        super().__init__()
        self.act = act
        self.stem = nn.Conv2d(3, 7, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(7)
        self.conv1 = conv(7, 9, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(9)
        self.conv2 = conv(9, 6, 1, bias=False)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.conv1(self.act(self.bn1(x))))
        x = F.relu(self.conv2(self.act(self.bn2(x))))
        return self.fc(x.mean(dim=(2, 3)))


def _train_pair(steps: int, hook: bool = True):
    ours = _TinyNet(lambda *a, **k: BinaryConv2d(*a, binarizer='xnor', **k), make_activation('ste_sign')).double()
    with torch.no_grad():  # latent weights outside [-1, 1] and off-centre, so the constraint matters
        ours.conv1.weight.mul_(8).add_(0.3)
        ours.conv2.weight.mul_(4)
    official = _TinyNet(nn.Conv2d, _OfficialSign.apply).double()
    official.load_state_dict(ours.state_dict())
    kw = dict(lr=0.02, momentum=0.9, weight_decay=3e-4)
    opt_ours = torch.optim.SGD(ours.parameters(), **kw)
    opt_off = torch.optim.SGD(official.parameters(), **kw)
    if hook:
        attach_latent_constraint(opt_ours, ours)
    binop = _OfficialBinOp([official.conv1.weight, official.conv2.weight])
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 3, 8, 8, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 4, (8,), generator=gen)
        # official: binarization -> forward/backward -> restore -> grad transform -> step
        binop.binarization()
        F.cross_entropy(official(x), y).backward()
        binop.restore()
        binop.update_binary_grad_weight()
        opt_off.step()
        opt_off.zero_grad()
        # ours: plain autograd step; the pre-step hook applies the persistent constraint
        F.cross_entropy(ours(x), y).backward()
        opt_ours.step()
        opt_ours.zero_grad()
    return ours, official


def test_xnor_training_matches_official_binop_sequence():
    ours, official = _train_pair(steps=6)
    for name in ('conv1.weight', 'conv2.weight', 'stem.weight', 'fc.weight', 'bn1.weight', 'bn2.running_mean'):
        a, b = ours.state_dict()[name], official.state_dict()[name]
        assert torch.allclose(a, b, atol=1e-9, rtol=0), f'{name} differs by {(a - b).abs().max():.3e}'
    # latent weights really moved and were constrained along the way
    assert ours.conv1.weight.abs().max() < 1.5


def test_latent_constraint_hook_is_needed():
    """Without the pre-step hook the trajectories diverge: the comparison above can fail."""
    ours, official = _train_pair(steps=3, hook=False)
    assert (ours.conv1.weight - official.conv1.weight).abs().max() > 1e-3


def test_constraint_helpers_touch_only_binary_convs_of_the_optimizer():
    a = BinaryConv2d(4, 4, 3, binarizer='xnor')
    b = BinaryConv2d(4, 4, 3, binarizer='xnor')
    fp = BinaryConv2d(4, 4, 3, binarizer=None)
    model = nn.Sequential(a, b, fp)
    with torch.no_grad():
        for m in model:
            m.weight.mul_(10)
    before = {i: m.weight.detach().clone() for i, m in enumerate(model)}
    opt = torch.optim.SGD(a.parameters(), lr=0.0)
    attach_latent_constraint(opt, model)
    opt.step()
    assert torch.allclose(a.weight, _constrain(before[0]))
    assert torch.equal(b.weight, before[1]) and torch.equal(fp.weight, before[2])
    assert binary_convs(model) == [a, b]
    assert constrain_latent_weights_(model) == 2
    assert torch.allclose(b.weight, _constrain(before[1])) and torch.equal(fp.weight, before[2])


# --------------------------------------------------------------------------- sign binarizer and registry


def test_sign_binarizer_no_scale_identity_gradient():
    w = (torch.randn(3, 2, 3, 3) * 2).requires_grad_()
    binz = make_binarizer('sign')
    wb = binz.binarize(w)
    assert torch.equal(wb, w.detach().sign())
    g = torch.randn_like(w)
    (wb * g).sum().backward()
    assert torch.equal(w.grad, g)
    assert torch.equal(binz.constrain(w.detach()), w.detach().clamp(-1, 1))
    assert binz.precision == 1


def test_binary_conv_uses_named_binarizer_and_none_is_full_precision():
    x = torch.randn(2, 3, 6, 6)
    for name in ('xnor', 'sign'):
        conv = BinaryConv2d(3, 4, 3, padding=1, bias=False, binarizer=name)
        expected = F.conv2d(x, make_binarizer(name)(conv.weight), padding=1)
        assert torch.allclose(conv(x), expected)
    conv.binarizer = None
    assert torch.allclose(conv(x), F.conv2d(x, conv.weight, padding=1))
    assert 'binarizer=None' in repr(conv)


def test_registries_report_unknown_names_with_choices():
    assert {'xnor', 'sign'} <= set(WEIGHT_BINARIZERS) and {'ste_sign', 'identity'} <= set(ACTIVATIONS)
    with pytest.raises(ConfigError) as e:
        make_binarizer('dorefa')
    assert 'dorefa' in str(e.value) and 'xnor' in str(e.value) and 'sign' in str(e.value)
    with pytest.raises(ConfigError) as e:
        make_activation('tanh')
    assert 'tanh' in str(e.value) and 'ste_sign' in str(e.value)
    with pytest.raises(BNASError):
        BinaryConv2d(3, 3, 3, binarizer='nope')
