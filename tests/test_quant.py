"""Quantizers as modules: given by name, mapping, class or instance, owned by their layer, knowing their
precision; the fast search cell shares sign(BN(x)) only between stateless quantizers."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

warnings.filterwarnings('ignore', message='.*is found to be not a nn.Module.*')

from bnas_nni.errors import ConfigError  # noqa: E402
from bnas_nni.networks import BNASNetwork  # noqa: E402
from bnas_nni.ops import BNConvReLU  # noqa: E402
from bnas_nni.quant import (  # noqa: E402
    ACTIVATIONS,
    WEIGHT_BINARIZERS,
    ActivationQuantizer,
    BinaryConv2d,
    SteSign,
    WeightBinarizer,
    XnorBinarizer,
    make_activation,
    make_binarizer,
    quantizer_spec,
    register_activation,
)
from bnas_nni.space import BNASSpace  # noqa: E402
from bnas_nni.summary import summarize  # noqa: E402


class _ShiftedSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, beta):
        ctx.save_for_backward(x, beta)
        return torch.sign(x - beta.view(1, -1, 1, 1))

    @staticmethod
    def backward(ctx, g):
        x, beta = ctx.saved_tensors
        inside = ((x - beta.view(1, -1, 1, 1)).abs() < 1).to(g.dtype)
        gx = g * inside
        return gx, -gx.sum(dim=(0, 2, 3))


@register_activation('test_learnable_sign')
class LearnableSign(ActivationQuantizer):
    """A stateful quantizer for the tests: sign(x - beta_c) with a learnable per-channel threshold."""

    precision = 1
    stateless = False
    option_names = ('init',)

    def __init__(self, channels=None, init: float = 0.0) -> None:
        super().__init__(channels)
        self.init = init
        self.beta = nn.Parameter(torch.full((channels,), float(init)))

    def forward(self, x):
        return _ShiftedSign.apply(x, self.beta)


def test_quantizers_by_name_mapping_class_and_instance():
    assert type(make_activation('ste_sign')) is SteSign and type(make_activation('STE-Sign')) is SteSign
    assert type(make_binarizer('xnor')) is XnorBinarizer and make_binarizer(None) is None
    assert make_binarizer('none') is None
    q = make_activation({'name': 'test_learnable_sign', 'init': 0.5}, channels=3)
    assert isinstance(q, LearnableSign) and torch.equal(q.beta.detach(), torch.full((3,), 0.5))
    assert type(make_activation(SteSign)) is SteSign
    inst = make_activation({'name': 'test_learnable_sign', 'init': 0.25}, channels=2)
    copy = make_activation(inst)
    assert copy is not inst and torch.equal(copy.beta, inst.beta)      # each layer owns its own module
    copy.beta.data += 1
    assert not torch.equal(copy.beta, inst.beta)
    assert quantizer_spec(q) == {'name': 'test_learnable_sign', 'init': 0.5}
    assert quantizer_spec(make_activation('ste_sign')) == 'ste_sign'
    assert (SteSign.precision, SteSign.stateless, LearnableSign.stateless) == (1, True, False)
    assert make_activation('identity').precision == 32 and make_binarizer('xnor').precision == 1
    with pytest.raises(ConfigError, match='unknown activation quantizer .*tanh.*ste_sign'):
        make_activation('tanh')
    with pytest.raises(ConfigError, match='does not take'):
        make_activation({'name': 'ste_sign', 'slope': 2})
    with pytest.raises(ConfigError, match='needs a name'):
        make_activation({'init': 0.0})
    assert 'test_learnable_sign' in ACTIVATIONS


def test_layers_own_their_quantizers_and_state_dicts_stay_official():
    op = BNConvReLU(4, 4, 3, 1, 1, activation='ste_sign')
    assert isinstance(op.quantizer, nn.Module) and op.activation == 'ste_sign'
    assert set(op.state_dict()) == {'bn.weight', 'bn.bias', 'bn.running_mean', 'bn.running_var',
                                    'bn.num_batches_tracked', 'op.0.weight'}
    learn = BNConvReLU(4, 4, 3, 1, 1, activation={'name': 'test_learnable_sign', 'init': 0.1})
    assert 'quantizer.beta' in learn.state_dict()                       # learnable state is in the state dict
    conv = BinaryConv2d(4, 8, 3, binarizer='xnor')
    assert isinstance(conv.weight_quantizer, XnorBinarizer) and conv.binarizer == 'xnor'
    conv.binarizer = None
    assert conv.weight_quantizer is None and torch.equal(conv.effective_weight(), conv.weight)
    # a network of learnable quantizers: the summary counts their parameters as full precision
    net = BNASNetwork('latest_cell', init_channels=4, layers=3, activation={'name': 'test_learnable_sign'})
    s = summarize(net)
    betas = sum(p.numel() for n, p in net.named_parameters() if n.endswith('quantizer.beta'))
    assert betas > 0 and s.params == sum(p.numel() for p in net.parameters())
    rebuilt = BNASNetwork.from_config(net.config)
    assert rebuilt.config['activation'] == {'name': 'test_learnable_sign'}
    rebuilt.load_state_dict(net.state_dict())


def test_built_in_binarizers_keep_their_exact_ternary_promise():
    """``exact_ternary_signs`` lets the fast cell's int8 path take a binarizer's weights unchecked, so each
    built-in binarizer that declares it must give exactly one scale per filter times signs in {-1, 0, 1}:
    what the int8 path's own check (``ternary_weight``) accepts, and the same sign and scale unchecked."""
    from bnas_nni.search.fast_cell import kernels

    assert WeightBinarizer.exact_ternary_signs is False          # a user binarizer promises nothing by default
    built_in = {name: WEIGHT_BINARIZERS.get(name) for name in WEIGHT_BINARIZERS
                if WEIGHT_BINARIZERS.get(name).__module__.startswith('bnas_nni.')}
    assert {name for name, cls in built_in.items() if cls.exact_ternary_signs} == {'xnor', 'sign', 'scaled_sign'}
    g = torch.Generator().manual_seed(0)
    sparse = torch.randn(5, 4, 3, 3, generator=g) * (torch.rand(5, 4, 3, 3, generator=g) < 0.5)
    sparse[1] = 0                                                 # a filter of zeros: scale 0
    for name, cls in built_in.items():
        if not cls.exact_ternary_signs:
            continue
        q = make_binarizer(name)
        for w in (torch.randn(6, 8, 3, 3, generator=g) * 3, torch.rand(4, 2, 5, 5, generator=g) - 0.7, sparse):
            wb = q(w)
            checked, trusted = kernels.ternary_weight(wb), kernels.ternary_weight(wb, trusted=True)
            assert checked is not None, f'{name}: not one scale per filter times signs'
            assert all(torch.equal(a, b) for a, b in zip(checked, trusted))
            assert set(checked[0].unique().tolist()) <= {-1, 0, 1}


def _learnable_pair():
    """The straightforward and the fast supernet with a stateful quantizer, identical parameters: every op
    its own threshold, and binary weights whose conv outputs are exact (see ``test_fast_cell._pair``; ReLU
    ties at 0 would otherwise fall by summation order, which differs between the two cells' layouts)."""
    from test_fast_cell import _pair

    torch.manual_seed(0)                      # the same parameters whatever ran before in this worker

    return _pair(init_channels=4, layers=3, num_nodes=2, activation={'name': 'test_learnable_sign', 'init': 0.0})


def test_fast_cell_does_not_share_a_learnable_quantizer():
    from test_fast_cell import TOL, _assert_close_dicts

    from bnas_nni.search.fast_cell import FastBinaryMixedCell

    ref, fast = _learnable_pair()
    cells = [m for m in fast.modules() if isinstance(m, FastBinaryMixedCell)]
    assert cells
    for cell in cells:
        for plan in cell._plans:
            assert not plan.binary, 'stateful quantizers must not be grouped for sharing'
            assert all(type(op) is BNConvReLU for _, name, op in plan.generic if name.startswith('bin_'))
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ref.train(), fast.train()
    out_ref, out_fast = ref(x), fast(x)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-5)
    out_ref.square().sum().backward()
    out_fast.square().sum().backward()
    grads_ref = {n: p.grad for n, p in ref.named_parameters()}
    # the fast suite's float32 tolerance, relative to each gradient's scale: the two cells sum the same terms
    # in other orders (channels-last vs NCHW), and some weight gradients here reach ~300
    _assert_close_dicts(grads_ref, {n: p.grad for n, p in fast.named_parameters()}, 'grad', *TOL[torch.float32])
    assert any(n.endswith('quantizer.beta') and grads_ref[n].abs().sum() > 0 for n in grads_ref)


def test_fast_cell_shares_stateless_quantizers():
    from test_fast_cell import _strategy

    from bnas_nni.search.fast_cell import FastBinaryMixedCell

    fast = _strategy(FastBinaryMixedCell).mutate_model(BNASSpace(init_channels=4, layers=3, num_nodes=2))
    plans = [plan for m in fast.modules() if isinstance(m, FastBinaryMixedCell) for plan in m._plans]
    assert any(len(items) > 1 for plan in plans for items in plan.binary.values())
