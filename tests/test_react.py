"""ReActNet parts: RSign, ApproxSign, RPReLU and the scaled-sign binarizer against their formulas; the
distributional loss; the react op set in networks, the summary and the search space."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

warnings.filterwarnings('ignore', message='.*is found to be not a nn.Module.*')

from bnas_nni.errors import ConfigError  # noqa: E402
from bnas_nni.networks import BNASNetwork, build_model  # noqa: E402
from bnas_nni.ops import OP_SETS, BNConvReLU, ReActConv, binary_block, expand_op_set, make_op  # noqa: E402
from bnas_nni.quant import (  # noqa: E402
    ApproxSign,
    RPReLU,
    RSign,
    ScaledSignBinarizer,
    XnorBinarizer,
    make_activation,
    make_binarizer,
    make_nonlinearity,
    quantizer_spec,
)
from bnas_nni.space import BNASSpace, load_space_config  # noqa: E402
from bnas_nni.summary import summarize  # noqa: E402


def _approx_grad_formula(u: torch.Tensor) -> torch.Tensor:
    """Bi-Real's piecewise derivative, written out piece by piece."""
    return torch.where(u < -1, torch.zeros_like(u),
                       torch.where(u < 0, 2 + 2 * u, torch.where(u < 1, 2 - 2 * u, torch.zeros_like(u))))


def test_approx_sign_values_and_gradient():
    x = torch.tensor([-1.5, -1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5], requires_grad=True)
    y = make_activation('approx_sign')(x)
    assert torch.equal(y, torch.tensor([-1., -1, -1, -1, -1, 0, 1, 1, 1, 1, 1]))
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, torch.tensor([0, 0, 0.5, 1.0, 1.5, 2.0, 1.5, 1.0, 0.5, 0, 0]))
    # against an upstream gradient, on random values
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    g = torch.randn_like(x)
    ApproxSign()(x).backward(g)
    torch.testing.assert_close(x.grad, g * _approx_grad_formula(x.detach()), rtol=0, atol=0)
    assert ApproxSign.precision == 1 and ApproxSign.stateless


def test_rsign_forward_and_gradients_against_the_formula():
    q = make_activation({'name': 'rsign', 'init': 0.1}, channels=3)
    assert isinstance(q, RSign) and torch.equal(q.beta.detach(), torch.full((3,), 0.1))
    assert not q.stateless and q.precision == 1 and quantizer_spec(q) == {'name': 'rsign', 'init': 0.1}
    with torch.no_grad():
        q.beta.copy_(torch.tensor([-0.3, 0.0, 0.45]))
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    g = torch.randn(4, 3, 6, 6)
    y = q(x)
    u = x.detach() - q.beta.detach().view(1, 3, 1, 1)
    assert torch.equal(y, torch.sign(u))
    y.backward(g)
    d = g * _approx_grad_formula(u)
    torch.testing.assert_close(x.grad, d, rtol=0, atol=0)
    torch.testing.assert_close(q.beta.grad, -d.sum(dim=(0, 2, 3)), rtol=1e-6, atol=1e-6)
    assert q.beta.grad.abs().sum() > 0
    # 2-D inputs (N, C) broadcast per channel too
    assert torch.equal(q(torch.zeros(2, 3)), torch.sign(-q.beta.detach()).expand(2, 3))
    with pytest.raises(ConfigError, match='rsign needs the number of channels'):
        make_activation('rsign')


def test_rprelu_forward_and_gradients_against_the_formula():
    act = make_nonlinearity('rprelu', channels=3)
    assert isinstance(act, RPReLU) and torch.equal(act.slope.detach(), torch.full((3,), 0.25))
    assert torch.equal(act.gamma.detach(), torch.zeros(3)) and torch.equal(act.zeta.detach(), torch.zeros(3))
    with torch.no_grad():
        act.gamma.copy_(torch.tensor([0.2, -0.1, 0.0]))
        act.slope.copy_(torch.tensor([0.25, 0.5, -0.1]))
        act.zeta.copy_(torch.tensor([0.3, 0.0, -0.7]))
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    g = torch.randn(4, 3, 5, 5)
    view = lambda v: v.detach().view(1, 3, 1, 1)
    u = x.detach() - view(act.gamma)
    pos = (u > 0).to(u.dtype)
    y = act(x)
    torch.testing.assert_close(y, pos * u + (1 - pos) * view(act.slope) * u + view(act.zeta), rtol=0, atol=1e-7)
    y.backward(g)
    dydx = pos + (1 - pos) * view(act.slope)
    torch.testing.assert_close(x.grad, g * dydx, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(act.gamma.grad, -(g * dydx).sum(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(act.zeta.grad, g.sum(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(act.slope.grad, (g * u * (1 - pos)).sum(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert make_nonlinearity({'name': 'rprelu', 'init': 0.1}, channels=2).slope.detach().tolist() == \
        pytest.approx([0.1, 0.1])
    with pytest.raises(ConfigError, match='unknown nonlinearity .*tanh'):
        make_nonlinearity('tanh', channels=2)


def test_scaled_sign_binarizer_has_no_centring_and_a_clipped_gradient():
    w = (torch.randn(4, 3, 3, 3) * 0.8 + torch.linspace(-0.5, 0.5, 3).view(1, 3, 1, 1)).requires_grad_()
    with torch.no_grad():
        w[0, 0, 0, 0] = 1.7          # outside [-1, 1]: no gradient
        w[1, 2, 1, 1] = -1.2
    b = make_binarizer('scaled_sign', channels=4)
    assert isinstance(b, ScaledSignBinarizer) and b.scaled and b.per_filter and b.precision == 1
    out = b(w)
    alpha = w.detach().abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.equal(out, torch.sign(w.detach()) * alpha)
    assert not torch.allclose(out, XnorBinarizer()(w).detach())      # xnor mean-centres, scaled_sign does not
    assert torch.equal(b.constrain(w.detach()), w.detach())         # no persistent latent step
    g = torch.randn_like(w)
    out.backward(g)
    assert torch.equal(w.grad, g * (w.detach().abs() <= 1).to(g.dtype))
    assert w.grad[0, 0, 0, 0] == 0 and w.grad[1, 2, 1, 1] == 0


def test_distribution_loss_is_the_formula_zero_for_identical_logits_with_the_reactnet_gradient():
    from bnas_nni.train.losses import Distillation, distribution_loss

    zs = torch.randn(6, 10, requires_grad=True)
    zt = torch.randn(6, 10) * 2
    pt, log_pt, log_ps = F.softmax(zt, 1), F.log_softmax(zt, 1), F.log_softmax(zs.detach(), 1)
    loss = distribution_loss(zs, zt)
    torch.testing.assert_close(loss, (pt * (log_pt - log_ps)).sum(1).mean())
    cross_entropy = -(pt * log_ps).sum(1).mean()
    entropy = -(pt * log_pt).sum(1).mean()
    torch.testing.assert_close(loss, cross_entropy - entropy)
    assert float(loss.detach()) > 0
    loss.backward()
    # the gradient is ReActNet's: that of -sum p_t log p_s, i.e. (p_s - p_t) / B
    zs2 = zs.detach().clone().requires_grad_()
    (-(pt * F.log_softmax(zs2, 1)).sum(1).mean()).backward()
    torch.testing.assert_close(zs.grad, zs2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(zs.grad, (F.softmax(zs.detach(), 1) - pt) / 6, rtol=1e-5, atol=1e-7)
    for z in (torch.randn(5, 10), torch.randn(3, 1000) * 30):
        assert float(distribution_loss(z, z.clone())) == 0.0
    # the teacher side gets no gradient, and a Distillation loss runs its frozen teacher in eval mode
    zt_req = zt.clone().requires_grad_()
    distribution_loss(zs.detach().requires_grad_(), zt_req).backward()
    assert zt_req.grad is None
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.Dropout(0.5))
    kd = Distillation(teacher).train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    images = torch.randn(6, 3, 2, 2)
    assert float(kd(teacher(images), None, images)) == 0.0


def test_react_block_composition_state_dict_and_shortcut():
    torch.manual_seed(3)
    react = binary_block(4, 4, 3, 1, 1, binarizer='scaled_sign', activation='rsign', nonlinearity='rprelu')
    assert isinstance(react, ReActConv) and react.shortcut is None
    assert set(react.state_dict()) == {'bn.weight', 'bn.bias', 'bn.running_mean', 'bn.running_var',
                                       'bn.num_batches_tracked', 'quantizer.beta', 'op.0.weight', 'op.1.gamma',
                                       'op.1.slope', 'op.1.zeta'}
    x = torch.randn(2, 4, 8, 8)
    react.eval()
    conv = react.op[0]
    manual = react.op[1](F.conv2d(react.quantizer(react.bn(x)), conv.effective_weight(), None, 1, 1))
    assert torch.equal(react(x), manual)
    # the real-valued shortcut: identity at stride 1, a 2x2 average pool at stride 2, none across channel counts
    sc = binary_block(4, 4, 3, 1, 1, binarizer='scaled_sign', activation='rsign', nonlinearity='rprelu',
                      shortcut=True).eval()
    sc.load_state_dict(react.state_dict())
    y_conv = F.conv2d(sc.quantizer(sc.bn(x)), sc.op[0].effective_weight(), None, 1, 1)
    assert torch.equal(sc(x), sc.op[1](y_conv + x))
    down = binary_block(4, 4, 5, 2, 2, nonlinearity='rprelu', activation='rsign', shortcut=True).eval()
    x7 = torch.randn(2, 4, 7, 7)
    y = F.conv2d(down.quantizer(down.bn(x7)), down.op[0].effective_weight(), None, 2, 2)
    assert y.shape[-1] == 4
    torch.testing.assert_close(down(x7), down.op[1](y + F.avg_pool2d(x7, 2, 2, ceil_mode=True)))
    assert binary_block(4, 8, 1, 1, 0, nonlinearity='rprelu', shortcut=True).shortcut is None
    # the paper's ops are untouched: the same class and state dict as before
    paper = make_op('bin_conv_3x3', 4, 1)
    assert type(paper) is BNConvReLU and type(paper.op[1]) is nn.ReLU
    assert set(paper.state_dict()) == {'bn.weight', 'bn.bias', 'bn.running_mean', 'bn.running_var',
                                       'bn.num_batches_tracked', 'op.0.weight'}


def test_op_sets_expand_unless_keys_are_given():
    assert OP_SETS.names() == ['paper', 'react']
    assert expand_op_set({'op_set': 'react'}) == {'binarizer': 'scaled_sign', 'activation': 'rsign',
                                                  'nonlinearity': 'rprelu', 'shortcut': False}
    assert expand_op_set({'op_set': 'react', 'activation': 'approx_sign', 'binarizer': 'none'})['activation'] == \
        'approx_sign'
    assert expand_op_set({'layers': 3}) == {'layers': 3}
    with pytest.raises(ConfigError, match="unknown op set 'bireal'; choose one of paper, react"):
        build_model('bnas-a', op_set='bireal')
    net = build_model('bnas-a', init_channels=4, layers=3, op_set='react', activation='approx_sign')
    blocks = [m for m in net.modules() if isinstance(m, ReActConv)]
    assert blocks and all(type(b.quantizer) is ApproxSign and b.nonlinearity == 'rprelu' for b in blocks)
    assert not any(isinstance(m, BNConvReLU) for n, m in net.named_modules() if n.startswith('cells'))
    assert isinstance(net.stem, BNConvReLU) and net.stem.activation == 'identity'     # the stem stays real
    # the stored config rebuilds the network (checkpoints, teachers) with the same state dict
    rebuilt = BNASNetwork.from_config(net.config)
    assert rebuilt.config == net.config and net.config['nonlinearity'] == 'rprelu'
    rebuilt.load_state_dict(net.state_dict())
    # the trainer's config keys: --set op_set=react / activation=... / shortcut=true
    from bnas_nni.train.runner import build_network, resolve_model_config, resolve_train_config

    cfg = resolve_train_config(None, {'op_set': 'react', 'shortcut': 'true', 'init_channels': 4, 'layers': 3})
    net = build_network(resolve_model_config(cfg))
    assert net.config['binarizer'] == 'scaled_sign' and net.config['shortcut'] is True
    assert any(isinstance(m, ReActConv) and m.shortcut is not None for m in net.modules())


def test_summary_counts_the_react_network():
    kw = dict(init_channels=8, layers=5)
    paper, react = build_model('bnas-a', **kw), build_model('bnas-a', op_set='react', **kw)
    step1 = build_model('bnas-a', op_set='react', binarizer='none', **kw)
    sp, sr, s1 = summarize(paper), summarize(react), summarize(step1)
    # the same convs are binary, with the same MACs; one fp32 scale per filter for both binarizers
    assert (sr.binary_macs, sr.fp_macs, sr.binary_convs, sr.fp_convs) == \
        (sp.binary_macs, sp.fp_macs, sp.binary_convs, sp.fp_convs)
    assert sr.binarizers == ['scaled_sign'] and sp.binarizers == ['xnor']
    # RSign thresholds and RPReLU's three vectors are full-precision parameters, stored in fp32
    extra = sum(p.numel() for n, p in react.named_parameters()
                if n.endswith(('quantizer.beta', 'op.1.gamma', 'op.1.slope', 'op.1.zeta')))
    n_blocks = sum(1 for m in react.modules() if isinstance(m, ReActConv))
    assert extra > 0 and extra == sum(m.op[0].in_channels + 3 * m.op[0].out_channels
                                      for m in react.modules() if isinstance(m, ReActConv))
    assert n_blocks == sum(1 for m in paper.modules() if isinstance(m, BNConvReLU)) - 1      # all but the stem
    assert sr.params - sp.params == extra
    assert sr.size_bytes - sp.size_bytes == 4 * extra and sr.fp32_bytes - sp.fp32_bytes == 4 * extra
    # step 1 (real weights, binary activations): no binary MACs
    assert s1.binary_macs == 0 and s1.fp_macs == sp.binary_macs + sp.fp_macs


def test_summary_command_with_the_react_op_set(capsys):
    import json

    from bnas_nni.cli import main

    assert main(['summary', 'bnas-a', '--op-set', 'react', '--layers', '5', '--init-channels', '8', '--json']) == 0
    out = json.loads(capsys.readouterr().out)
    s = summarize(build_model('bnas-a', init_channels=8, layers=5, op_set='react'))
    assert out['binarizers'] == ['scaled_sign'] and out['params'] == s.params and out['binary_macs'] == s.binary_macs


def test_react_space_searches_and_derives(tmp_path, capsys):
    """A tiny BinaryDARTS run on search_spaces/bnas-react.yaml: the learnable RSign/RPReLU parameters train,
    the genotype derives, and the frozen network is the react network of that genotype."""
    from pathlib import Path

    from bnas_nni.cli import main
    from bnas_nni.data import DEBIAN_FASHION_MNIST
    from bnas_nni.genotypes import load_genotype

    space_cfg = load_space_config('bnas-react', init_channels=4, layers=3, num_nodes=2)
    assert (space_cfg['activation'], space_cfg['binarizer'], space_cfg['nonlinearity']) == \
        ('rsign', 'scaled_sign', 'rprelu')
    space = BNASSpace(**space_cfg)
    blocks = [m for m in space.modules() if isinstance(m, ReActConv)]
    assert blocks and all(not m.bn.affine for m in blocks)           # search variants: non-affine BN
    if not Path(DEBIAN_FASHION_MNIST, 'train-images-idx3-ubyte.gz').is_file():
        pytest.skip('Debian dataset-fashion-mnist is not installed')
    run = tmp_path / 'search'
    rc = main(['search', '--config', 'experiments/search_quick_fashion.yaml', '--run-dir', str(run),
               '--set', 'space=bnas-react', '--set', 'init_channels=4', '--set', 'layers=3', '--set', 'num_nodes=2',
               '--set', 'epochs=1', '--set', 'train_subset=64', '--set', 'batch_size=16', '--set', 'image_size=16',
               '--set', 'progress=never', '--set', 'tensorboard=false', '--save', 'react_tiny',
               '--out', str(tmp_path / 'out')])
    assert rc == 0, capsys.readouterr().err
    genotype = load_genotype(str(tmp_path / 'out' / 'react_tiny.yaml'))
    assert genotype.num_nodes == 2
    state = torch.load(run / 'checkpoint.pt', weights_only=True)['state_dict']
    betas = [v for k, v in state.items() if k.endswith('quantizer.beta')]
    slopes = [v for k, v in state.items() if k.endswith('op.1.slope')]
    assert betas and slopes
    assert any(b.abs().sum() > 0 for b in betas)                      # thresholds moved from 0
    assert any(not torch.equal(s, torch.full_like(s, 0.25)) for s in slopes)
    # the derived network: frozen from the space, or built from the genotype with the same blocks
    frozen = space.freeze(genotype.to_arch_dict())
    net = build_model({'genotype': str(tmp_path / 'out' / 'react_tiny.yaml'), 'init_channels': 4, 'layers': 3,
                       'op_set': 'react'})
    assert any(isinstance(m, ReActConv) for m in net.modules())
    assert set(frozen.state_dict()) == set(net.state_dict())
    frozen.load_state_dict(net.state_dict())
    frozen.eval(), net.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(frozen(x), net(x))


@pytest.mark.parametrize('shortcut', [False, True])
def test_fast_cell_runs_react_ops_exactly(shortcut):
    """The fast search cell does not recognise RSign/RPReLU blocks and runs them as they are: the same
    outputs and gradients as the straightforward cell."""
    from test_fast_cell import _strategy

    from bnas_nni.search.fast_cell import FastBinaryMixedCell
    from bnas_nni.search.mixed_cell import BinaryMixedCell

    kw = dict(load_space_config('bnas-react', init_channels=4, layers=3, num_nodes=2, shortcut=shortcut))
    assert any(isinstance(m, ReActConv) and (m.shortcut is not None) == shortcut for m in BNASSpace(**kw).modules())
    ref = _strategy(BinaryMixedCell).mutate_model(BNASSpace(**kw))
    fast = _strategy(FastBinaryMixedCell).mutate_model(BNASSpace(**kw))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(('quantizer.beta', 'op.1.gamma', 'op.1.zeta')):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif '_arch_alpha' in name:
                p.copy_(torch.randn(p.shape, generator=g))
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out_ref, out_fast = ref(x), fast(x)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-5)
    out_ref.square().sum().backward()
    out_fast.square().sum().backward()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    for n, p in fast.named_parameters():
        if grads[n] is None:
            assert p.grad is None, n
        else:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-4, msg=n)
    assert any(n.endswith('quantizer.beta') and grads[n] is not None and grads[n].abs().sum() > 0 for n in grads)
