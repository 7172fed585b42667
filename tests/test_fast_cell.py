"""FastBinaryMixedCell computes what BinaryMixedCell computes: outputs, weight and alpha gradients, BN running
statistics and the parameters after a step, in training and eval mode; and it works as an NNI mutation hook."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

warnings.filterwarnings('ignore', message='.*is found to be not a nn.Module.*')

from nni.nas.oneshot.pytorch.supermodule.differentiable import DifferentiableMixedCell  # noqa: E402
from nni.nas.strategy import DARTS  # noqa: E402

from bnas_nni.quant import BinaryConv2d, attach_latent_constraint  # noqa: E402
from bnas_nni.search.fast_cell import FastBinaryMixedCell  # noqa: E402
from bnas_nni.search.mixed_cell import BinaryMixedCell  # noqa: E402
from bnas_nni.space import BNASSpace  # noqa: E402


def _strategy(cell_cls):
    class _S(DARTS):
        def default_mutation_hooks(self):
            return [cell_cls.mutate if getattr(h, '__self__', None) is DifferentiableMixedCell else h
                    for h in super().default_mutation_hooks()]
    return _S()


def _pair(dtype=torch.float32, fast_cls=FastBinaryMixedCell, **space_kwargs):
    """The same supernet twice (straightforward, fast) with identical parameters and buffers."""
    ref = _strategy(BinaryMixedCell).mutate_model(BNASSpace(**space_kwargs))
    fast = _strategy(fast_cls).mutate_model(BNASSpace(**space_kwargs))
    assert any(type(m) is fast_cls for m in fast.modules())
    assert not any(isinstance(m, FastBinaryMixedCell) for m in ref.modules())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if '_arch_alpha' in name:  # spread the softmax so every op's weight matters
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() == 4 and p.shape[1] % 2 == 0:
                # binary convs: latent weights +-0.25 with zero mean over input channels, so the XNOR scale is
                # exactly 0.25 and conv outputs are exact multiples of it whatever the summation order: ReLU
                # ties at 0 then fall the same way in both implementations (gradients are discontinuous there)
                o, i, kh, kw = p.shape
                half = torch.randint(0, 2, (o, i // 2, kh, kw), generator=g).float() * 2 - 1
                w = torch.cat([half, -half], 1)
                p.copy_(w[:, torch.randperm(i, generator=g)] * 0.25)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    fast.load_state_dict(ref.state_dict())
    return ref.to(dtype), fast.to(dtype)


def _grads(model):
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def _assert_close_dicts(a, b, what, rtol, atol_scale):
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if x is None or y is None:
            assert x is None and y is None, f'{what} {k}: one is None'
            continue
        x, y = x.double(), y.double()
        atol = atol_scale * max(1.0, float(x.abs().max()))
        assert torch.allclose(x, y, rtol=rtol, atol=atol), \
            f'{what} {k}: max diff {float((x - y).abs().max()):.3g} (scale {float(x.abs().max()):.3g})'


def _compare_training_step(ref, fast, x, y, x2, tol):
    """One search step (forward, backward, latent constraint + SGD) on both; everything must match."""
    rtol, atol = tol
    outs, grads = [], []
    for model in (ref, fast):
        model.train()
        alpha_ids = {id(p) for m in model.modules() if isinstance(m, BinaryMixedCell) for p in m.arch_parameters()}
        weights = [p for p in model.parameters() if id(p) not in alpha_ids]
        opt = torch.optim.SGD(weights, lr=0.025, momentum=0.9, weight_decay=3e-4)
        attach_latent_constraint(opt, model)
        model.zero_grad()
        out = model(x)
        F.cross_entropy(out, y).backward()
        outs.append(out.detach())
        grads.append(_grads(model))
        opt.step()
    torch.testing.assert_close(outs[1], outs[0], rtol=rtol, atol=atol)
    alpha_grads = [{k: v for k, v in g.items() if '_arch_alpha' in k} for g in grads]
    assert alpha_grads[0] and all(v is not None and v.abs().sum() > 0 for v in alpha_grads[0].values())
    conv_grads = [k for k, v in grads[0].items() if k.endswith('op.0.weight') and v is not None]
    assert conv_grads and all(grads[0][k].abs().sum() > 0 for k in conv_grads)
    _assert_close_dicts(grads[0], grads[1], 'grad', rtol, atol)
    # parameters and BN running statistics after the step (both forwards updated every BN once)
    sa, sb = ref.state_dict(), fast.state_dict()
    assert any(k.endswith('running_mean') and float(v.abs().max()) > 0 for k, v in sa.items())
    _assert_close_dicts(sa, sb, 'state', rtol, atol)
    # eval mode after the step: running statistics are used
    for model in (ref, fast):
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x2), ref(x2), rtol=rtol, atol=atol)


# float64 checks the math to round-off; float32 (the working precision) differs by round-off that the
# non-affine BNs and the XNOR gradient factor n(1 - 1/C_in) amplify, hence the looser tolerance
TOL = {torch.float64: (1e-9, 1e-10), torch.float32: (2e-3, 1e-4)}


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_tiny_space_training_and_eval_match(dtype):
    ref, fast = _pair(dtype, init_channels=4, layers=3, num_nodes=2)
    g = torch.Generator().manual_seed(0)
    x, x2 = torch.randn(4, 3, 16, 16, generator=g), torch.randn(3, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (4,), generator=g)
    _compare_training_step(ref, fast, x.to(dtype), y, x2.to(dtype), TOL[dtype])


def test_channels_last_variant_matches():
    cl = type('FastBinaryMixedCellCL', (FastBinaryMixedCell,), {'channels_last': True})
    ref, fast = _pair(torch.float64, cl, init_channels=4, layers=3, num_nodes=2)
    g = torch.Generator().manual_seed(4)
    x, x2 = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (2,), generator=g)
    _compare_training_step(ref, fast, x.double(), y, x2.double(), TOL[torch.float64])


def test_paper_size_cells_match():
    # the paper's cells: C=16, 4 nodes, all seven ops; cell 0 normal (C=16), cells 1-2 reduction (C=32, 64);
    # float64 so that the comparison is to round-off; 16x16 inputs keep it fast
    ref, fast = _pair(torch.float64, init_channels=16, layers=3, num_nodes=4)
    assert [c.label for c in fast.cells] == ['normal', 'reduce', 'reduce']
    g = torch.Generator().manual_seed(1)
    x, x2 = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (2,), generator=g)
    _compare_training_step(ref, fast, x.double(), y, x2.double(), TOL[torch.float64])


def test_eval_mode_gradients_and_unequal_running_stats():
    """In eval mode each BN uses its own running statistics; BNs of one state whose statistics differ (e.g.
    after loading a checkpoint trained otherwise) must not be shared."""
    ref, fast = _pair(torch.float64, init_channels=4, layers=2, num_nodes=2)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for (n, buf_a), (_, buf_b) in zip(ref.named_buffers(), fast.named_buffers()):
            if n.endswith('running_var'):
                v = torch.rand(buf_a.shape, generator=g) + 0.5
                buf_a.copy_(v)
                buf_b.copy_(v)
            elif n.endswith('running_mean'):
                v = torch.randn(buf_a.shape, generator=g) * 0.5
                buf_a.copy_(v)
                buf_b.copy_(v)
    x = torch.randn(3, 3, 16, 16, generator=g).double()
    outs, grads = [], []
    for model in (ref, fast):
        model.eval()
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(_grads(model))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-9, atol=1e-10)
    _assert_close_dicts(grads[0], grads[1], 'eval grad', *TOL[torch.float64])
    # the BN stats were left alone in eval mode
    _assert_close_dicts(ref.state_dict(), fast.state_dict(), 'state', rtol=0, atol_scale=0)


def test_fast_cell_as_darts_hook_exports_same_genotype():
    space_kwargs = dict(init_channels=4, layers=3, num_nodes=4)
    ref, fast = _pair(**space_kwargs)
    ref_cells = [m for m in ref.modules() if isinstance(m, BinaryMixedCell)]
    fast_cells = [m for m in fast.modules() if isinstance(m, BinaryMixedCell)]
    assert len(fast_cells) == 3 and all(type(c) is FastBinaryMixedCell for c in fast_cells)
    # alphas: one 7-vector per edge, shared by label (14 edges x 2 labels), no hidden zero
    alphas = {id(p): p for c in fast_cells for p in c.arch_parameters()}
    assert len(alphas) == 28 and all(p.numel() == 7 for p in alphas.values())
    assert fast_cells[1]._arch_alpha['reduce/2_0'] is fast_cells[2]._arch_alpha['reduce/2_0']
    torch.testing.assert_close(fast_cells[0].alpha_matrix(), ref_cells[0].alpha_matrix())

    def export(cells):
        memo = {}
        for c in cells:
            memo.update(c.export(memo))
        return memo

    arch = export(fast_cells)
    assert arch == export(ref_cells)
    assert len(arch) == 2 * 4 * 2 * 2  # op and input for 2 inputs of 4 nodes, normal and reduce
    assert fast_cells[0].export_probs({}) == ref_cells[0].export_probs({})
    # the exported architecture builds and runs as a fixed network
    net = fast.freeze(arch)
    assert not any(isinstance(m, BinaryMixedCell) for m in net.modules())
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    # alphas get gradients through the fast cell and the stock DARTS export path sees the same modules
    fast.train()
    F.cross_entropy(fast(torch.randn(2, 3, 16, 16)), torch.tensor([1, 2])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in alphas.values())


def test_merged_weight_equals_per_op_binarization():
    """Binarizing the concatenated latent weights equals concatenating the per-op binarized weights (XNOR
    scales are per filter), forward and backward."""
    g = torch.Generator().manual_seed(5)
    convs = [BinaryConv2d(8, 8, 3, padding=1, bias=False) for _ in range(3)]
    for c in convs:
        with torch.no_grad():
            c.weight.copy_(torch.randn(c.weight.shape, generator=g))
    from bnas_nni.quant import make_binarizer
    merged = make_binarizer('xnor')(torch.cat([c.weight for c in convs], 0))
    separate = torch.cat([c.effective_weight() for c in convs], 0)
    torch.testing.assert_close(merged, separate, rtol=0, atol=0)
    up = torch.randn(merged.shape, generator=g)
    ga = torch.autograd.grad((merged * up).sum(), [c.weight for c in convs])
    gb = torch.autograd.grad((separate * up).sum(), [c.weight for c in convs])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
