"""The fast cell's kernel paths against the straightforward cell, and the int8 ternary convolution itself.

Every path of :class:`FastBinaryMixedCell` (int8 ternary convs, or fp32 convs in the fused per-state
function, or the plain per-kernel-type path of ``BNAS_FAST_KERNELS=0``; ReLU recomputed, or kept as masks
in weight steps and as values in architecture steps)
must give what :class:`BinaryMixedCell` gives: outputs, alpha and weight gradients, input gradients and BN
running statistics, over whole search iterations (architecture step with the weights frozen, then weight
step) and in eval mode.
"""
from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

warnings.filterwarnings('ignore', message='.*is found to be not a nn.Module.*')

from test_fast_cell import TOL, _assert_close_dicts, _grads, _pair  # noqa: E402

from bnas_nni.quant import BinaryConv2d, WeightBinarizer, attach_latent_constraint, make_binarizer, register_binarizer  # noqa: E402
from bnas_nni.search.fast_cell import FastBinaryMixedCell, functions, kernels  # noqa: E402
from bnas_nni.search.mixed_cell import BinaryMixedCell  # noqa: E402

needs_int8 = pytest.mark.skipif(not kernels.ternary_conv_supported(),
                                reason='no oneDNN int8 convolution in this build/CPU (the fp32 path is tested)')


# ------------------------------------------------------------------ the int8 ternary convolution


@needs_int8
@pytest.mark.parametrize('k,stride,padding,dilation', [(3, 1, 1, 1), (5, 1, 2, 1), (3, 1, 2, 2), (5, 1, 4, 2),
                                                       (3, 2, 1, 1), (5, 2, 4, 2), (1, 1, 0, 1)])
def test_ternary_conv_is_the_exact_integer_convolution(k, stride, padding, dilation):
    g = torch.Generator().manual_seed(k * 10 + stride + dilation)
    for batch, c_in, c_out, size in ((3, 16, 24, 9), (1, 7, 5, 6)):
        s = torch.randint(-1, 2, (batch, c_in, size, size), generator=g).float()
        q = torch.randint(-1, 2, (c_out, c_in, k, k), generator=g).float()
        conv = kernels.TernaryConv(q.to(torch.int8), (stride, stride), (padding, padding), (dilation, dilation), 1)
        want = F.conv2d(s, q, None, stride, padding, dilation)  # small integers: exact in fp32
        got = conv(kernels.sign_to_uint8(s), relu=False)
        assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got, want)
        assert torch.equal(conv(kernels.sign_to_uint8(s), relu=True), want.clamp_min(0))


def test_ternary_weight_accepts_only_per_filter_scaled_signs():
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(6, 4, 3, 3, generator=g)
    for name in ('xnor', 'sign'):
        w = make_binarizer(name)(latent)
        q, scale = kernels.ternary_weight(w)
        assert q.dtype == torch.int8 and torch.equal(q.float() * scale.view(-1, 1, 1, 1), w)
    assert kernels.ternary_weight(latent) is None                     # real-valued
    w = make_binarizer('xnor')(latent)
    w[0, 0, 0, 0] *= 2                                                 # two magnitudes in one filter
    assert kernels.ternary_weight(w) is None
    w = make_binarizer('xnor')(latent)
    w[1] = 0                                                           # an all-zero filter is ternary (scale 0)
    q, scale = kernels.ternary_weight(w)
    assert scale[1] == 0 and not q[1].any()


def test_env_switch_turns_the_fast_kernels_off(monkeypatch):
    monkeypatch.setenv('BNAS_FAST_KERNELS', '0')
    assert not kernels.fast_kernels_enabled() and not kernels.ternary_conv_supported()
    monkeypatch.setenv('BNAS_FAST_KERNELS', '1')
    assert kernels.fast_kernels_enabled()


# ------------------------------------------------------------------ the cell, per kernel path


class _Count:
    """Counts calls of the fused state function and how many of them ran int8 convolutions."""

    def __init__(self, monkeypatch):
        self.fused = self.int8 = 0
        apply = functions._StateBinaryOps.apply

        def counted(*args):
            self.fused += 1
            self.int8 += bool(args[4])
            return apply(*args)
        monkeypatch.setattr(functions._StateBinaryOps, 'apply', counted)


PATHS = ['int8', 'int8-recompute', 'int8-torch-ops', 'fused-fp32', 'plain']


def _select_path(path, monkeypatch):
    """Force one kernel path of the fast cell; returns the fast cell class to use."""
    if path in ('int8', 'int8-torch-ops') and not kernels.ternary_conv_supported():
        pytest.skip('no int8 convolution here')
    if path == 'int8':
        assert kernels.fused_ops() is not None, 'the fused search ops did not build here'
    if path == 'int8-torch-ops':   # the torch ops that the fused elementwise passes replace
        monkeypatch.setenv('BNAS_FUSED_OPS', '0')
    if path == 'int8-recompute':   # ReLU(conv) recomputed in backward (the default keeps the ReLU outputs)
        if not kernels.ternary_conv_supported():
            pytest.skip('no int8 convolution here')
        return type('FastRecompute', (FastBinaryMixedCell,), {'recompute_relu_masks': True})
    if path == 'fused-fp32':
        monkeypatch.setattr(kernels, 'ternary_conv_supported', lambda: False)
    if path == 'plain':
        monkeypatch.setenv('BNAS_FAST_KERNELS', '0')
    return FastBinaryMixedCell


def _iterations(ref, fast, batches, tol, channels_last=False, contexts=(contextlib.nullcontext,) * 2):
    """Two full search iterations (arch step with weights frozen, weight step with alphas frozen) on both
    supernets; after each step the gradients that step computes must match, and after both the states.
    ``contexts``: one context factory per model, entered around each of its steps."""
    rtol, atol = tol
    setups = []
    for model in (ref, fast):
        if channels_last:
            model.to(memory_format=torch.channels_last)
        model.train()
        alphas = list({id(p): p for m in model.modules() if isinstance(m, BinaryMixedCell)
                       for p in m.arch_parameters()}.values())
        ids = {id(p) for p in alphas}
        weights = [p for p in model.parameters() if id(p) not in ids]
        w_opt = torch.optim.SGD(weights, lr=0.025, momentum=0.9, weight_decay=3e-4)
        attach_latent_constraint(w_opt, model)
        a_opt = torch.optim.Adam(alphas, lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
        setups.append((model, alphas, weights, w_opt, a_opt))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for it, ((xv, yv), (xt, yt)) in enumerate(batches):
        # architecture step: input gradients flow through every cell, weights get none
        outs, grads, in_grads = [], [], []
        for (model, alphas, weights, _, a_opt), ctx in zip(setups, contexts):
            ctx_ = ctx()
            ctx_.__enter__()
            for p in weights:
                p.requires_grad_(False)
            model.zero_grad(set_to_none=True)
            x = xv.clone().contiguous(memory_format=fmt).requires_grad_()
            out = model(x)
            rows = torch.cat([m.alpha_matrix() for m in model.modules() if isinstance(m, BinaryMixedCell)])
            p = rows.softmax(-1)
            loss = F.cross_entropy(out, yv) - math.exp(-it / 7.7) * (-(p * p.log()).sum(-1).mean())
            loss.backward()
            outs.append(out.detach())
            grads.append(_grads(model))
            in_grads.append({'x': x.grad})
            a_opt.step()
            for p in weights:
                p.requires_grad_(True)
            ctx_.__exit__(None, None, None)
        torch.testing.assert_close(outs[1], outs[0], rtol=rtol, atol=atol)
        assert all(v is None for k, v in grads[1].items() if '_arch_alpha' not in k)
        assert all(v is not None and v.abs().sum() > 0 for k, v in grads[0].items() if '_arch_alpha' in k)
        _assert_close_dicts(grads[0], grads[1], f'iteration {it} arch-step grad', rtol, atol)
        _assert_close_dicts(in_grads[0], in_grads[1], f'iteration {it} input grad', rtol, atol)
        # weight step
        grads = []
        for (model, alphas, weights, w_opt, _), ctx in zip(setups, contexts):
            for p in alphas:
                p.requires_grad_(False)
            w_opt.zero_grad(set_to_none=True)
            with ctx():
                F.cross_entropy(model(xt.contiguous(memory_format=fmt)), yt).backward()
            grads.append(_grads(model))
            w_opt.step()
            for p in alphas:
                p.requires_grad_(True)
        assert any(k.endswith('op.0.weight') and v is not None and v.abs().sum() > 0 for k, v in grads[0].items())
        _assert_close_dicts(grads[0], grads[1], f'iteration {it} weight-step grad', rtol, atol)
        _assert_close_dicts(ref.state_dict(), fast.state_dict(), f'iteration {it} state', rtol, atol)
        _snap_binary_weights(ref, fast)
    for model, *_ in setups:
        model.eval()
    with torch.no_grad():
        x = batches[0][0][0].contiguous(memory_format=fmt)
        with contexts[0]():
            want = ref(x)
        with contexts[1]():
            got = fast(x)
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@torch.no_grad()
def _snap_binary_weights(ref, other):
    """Put the binary convs' latent weights back on the +-0.25 lattice of ``_pair`` (signs from the
    reference's current weights, zero mean over input channels; the same values into both models): the XNOR
    scale is then exactly 0.25 and every conv output an exact multiple of it, so the straightforward cell's
    fp32 sums have no round-off that could move a ReLU tie at 0 (the int8 path computes those sums exactly
    whatever the weights)."""
    theirs = dict(other.named_parameters())
    for name, w in ref.named_parameters():
        if '_arch_alpha' in name or w.dim() != 4 or w.shape[1] % 2 or not name.endswith('op.0.weight') \
                or 'preprocess' in name:
            continue
        rank = w.argsort(dim=1, stable=True).argsort(dim=1)  # rank of each input channel per (out, kh, kw)
        w.copy_(torch.where(rank >= w.shape[1] // 2, 0.25, -0.25).to(w.dtype))
        theirs[name].copy_(w)


def _batches(n, size, seed, iterations=2):
    g = torch.Generator().manual_seed(seed)
    return [tuple((torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g))
                  for _ in range(2)) for _ in range(iterations)]


@pytest.mark.parametrize('path', PATHS)
def test_search_iterations_match_on_every_kernel_path(path, monkeypatch):
    """fp32, the working precision (int8 only runs in fp32): whole iterations, every gradient and state."""
    cls = _select_path(path, monkeypatch)
    count = _Count(monkeypatch)
    ref, fast = _pair(torch.float32, cls, init_channels=4, layers=3, num_nodes=3)
    _iterations(ref, fast, _batches(4, 16, seed=7), TOL[torch.float32])
    if path == 'plain':
        assert count.fused == 0
    else:
        assert count.fused > 0 and (count.int8 == count.fused if path.startswith('int8') else count.int8 == 0)


@pytest.mark.parametrize('path', ['fused-fp32', 'plain'])
def test_search_iterations_match_in_float64(path, monkeypatch):
    """float64 checks the fused function's math to round-off (int8 is fp32-only, so fp32 convs here)."""
    cls = _select_path(path, monkeypatch)
    ref, fast = _pair(torch.float64, cls, init_channels=4, layers=3, num_nodes=3)
    _iterations(ref, fast, [tuple((x.double(), y) for x, y in it) for it in _batches(3, 16, seed=8)],
                TOL[torch.float64])


def test_paper_cells_channels_last_model_match(monkeypatch):
    """The paper's cells (C=16, 4 nodes, all seven ops, a normal and two reduction cells), the model and its
    inputs channels-last end to end as ``channels_last: true`` runs them; float64 (fp32 convs) so that the
    comparison with the straightforward cell is to round-off, as in test_fast_cell."""
    monkeypatch.setattr(kernels, 'ternary_conv_supported', lambda: False)
    ref, fast = _pair(torch.float64, init_channels=16, layers=3, num_nodes=4)
    _iterations(ref, fast, [tuple((x.double(), y) for x, y in it) for it in _batches(2, 16, seed=9, iterations=1)],
                TOL[torch.float64], channels_last=True)


@needs_int8
def test_paper_cells_int8_equals_fp32_convs():
    """At paper size in fp32 a state whose normalised value is within round-off of 0 can take either sign in
    two implementations that sum in different orders, so the fp32 comparison with the straightforward cell
    is made on small cells (above). Here the int8 path is compared with the fp32-conv path of the same cell,
    which sums in the same order: with the lattice weights both compute exactly the same products."""
    int8_on = contextlib.nullcontext

    @contextlib.contextmanager
    def int8_off():
        real = kernels.ternary_conv_supported
        kernels.ternary_conv_supported = lambda: False
        try:
            yield
        finally:
            kernels.ternary_conv_supported = real

    fp32, int8 = _pair(torch.float32, init_channels=16, layers=3, num_nodes=4)[1], \
        _pair(torch.float32, init_channels=16, layers=3, num_nodes=4)[1]
    _iterations(fp32, int8, _batches(2, 16, seed=9), (1e-5, 1e-6), channels_last=True,
                contexts=(int8_off, int8_on))


def test_cell_keeps_the_callers_memory_format():
    _, fast = _pair(torch.float32, init_channels=4, layers=2, num_nodes=2)
    fast.train()
    cell = next(m for m in fast.modules() if type(m) is FastBinaryMixedCell)
    s = torch.randn(2, 12, 8, 8)   # the stem's output: 3 * 4 channels
    assert cell(s, s).is_contiguous()
    s_cl = s.contiguous(memory_format=torch.channels_last)
    assert cell(s_cl, s_cl).is_contiguous(memory_format=torch.channels_last)


@needs_int8
def test_packed_weights_follow_weight_changes(monkeypatch):
    """The packed int8 weights are reused, without even reading the weights, while every latent weight keeps
    its storage and version; an in-place change, a new tensor behind a parameter or a new parameter makes the
    cell repack."""
    ref, fast = _pair(torch.float32, init_channels=4, layers=2, num_nodes=2)
    x = torch.randn(2, 3, 16, 16)
    for model in (ref, fast):
        model.eval()
    reads = []
    real = kernels.ternary_weight
    monkeypatch.setattr(kernels, 'ternary_weight', lambda w, trusted=False: reads.append(1) or real(w, trusted))

    def flip_signs(change):
        for model in (ref, fast):
            for name, p in list(model.named_parameters()):
                if name.endswith('op.0.weight') and p.dim() == 4 and p.shape[-1] > 1:
                    change(model, name, p)

    def renew(model, name, p):
        owner = model.get_submodule(name.rsplit('.', 1)[0])
        owner.weight = torch.nn.Parameter(-p.detach().clone())

    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), **dict(zip(('rtol', 'atol'), TOL[torch.float32])))
        specs = [c.spec for m in fast.modules() if type(m) is FastBinaryMixedCell
                 for plan in m._plans for bundles in plan.bundles.values() for b in bundles for c in b.convs]
        packed = [s._packed for s in specs]
        reads.clear()
        fast(x)
        assert [s._packed for s in specs] == packed and not reads   # same weights: nothing read or repacked
        for change in (lambda m, n, p: p.neg_(),                      # in place: every sign flips
                       lambda m, n, p: setattr(p, 'data', -p.data),   # a new tensor behind the parameter
                       renew):                                        # a new parameter
            flip_signs(change)
            assert torch.allclose(fast(x), ref(x), *TOL[torch.float32])
            assert all(s._packed is not old for s, old in zip(specs, packed))
            packed = [s._packed for s in specs]


# ------------------------------------------------------------------ which binarizers the int8 path trusts


class _MaxScaledSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        return torch.sign(w) * w.abs().amax(dim=(1, 2, 3), keepdim=True)

    @staticmethod
    def backward(ctx, g):
        return g


@register_binarizer('test_stated_exact')
class StatedExact(WeightBinarizer):
    """A user binarizer: ``sign(W)`` times the largest ``|W|`` of each filter, exact ternary signs by
    construction, and it says so."""

    scaled = True
    exact_ternary_signs = True

    def forward(self, w):
        return _MaxScaledSign.apply(w)


@register_binarizer('test_unstated_exact')
class UnstatedExact(StatedExact):
    """The same weights, without the promise."""

    exact_ternary_signs = False


class _InputScaledSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        c_in = w.shape[1]
        return torch.sign(w) * (1 + torch.arange(c_in, dtype=w.dtype) / c_in).view(1, -1, 1, 1) / 4

    @staticmethod
    def backward(ctx, g):
        return g


@register_binarizer('test_input_scaled')
class InputScaled(WeightBinarizer):
    """Signs times a scale per input channel (dyadic, so every conv sum is exact in fp32): not one scale per
    filter, so not for the int8 convolution."""

    def forward(self, w):
        return _InputScaledSign.apply(w)


@needs_int8
@pytest.mark.parametrize('binarizer, trusted, int8', [('test_stated_exact', True, True),
                                                       ('test_unstated_exact', False, True),
                                                       ('test_input_scaled', False, False),
                                                       ('scaled_sign', True, True)])
def test_a_user_binarizer_states_whether_the_int8_path_trusts_it(binarizer, trusted, int8, monkeypatch):
    """The fast cell reads ``exact_ternary_signs`` from the binarizer: declared, the int8 path takes the
    binarized weights unchecked; undeclared, each one is checked and runs int8 only if it is one scale per
    filter times signs, else as an fp32 conv. Every way, whole search iterations match the straightforward
    cell."""
    seen = []  # per ternary_weight call: (trusted, accepted)

    def ternary_weight(w, trusted=False, real=kernels.ternary_weight):
        out = real(w, trusted)
        seen.append((trusted, out is not None))
        return out
    monkeypatch.setattr(kernels, 'ternary_weight', ternary_weight)
    int8_convs = []
    real_call = kernels.TernaryConv.__call__
    monkeypatch.setattr(kernels.TernaryConv, '__call__', lambda self, s, relu: int8_convs.append(1) or
                        real_call(self, s, relu))
    ref, fast = _pair(torch.float32, init_channels=4, layers=3, num_nodes=3, binarizer=binarizer)
    assert {type(m.weight_quantizer).name for m in fast.modules()
            if isinstance(m, BinaryConv2d) and m.weight_quantizer is not None} == {binarizer}
    _iterations(ref, fast, _batches(4, 16, seed=7), TOL[torch.float32])
    assert seen and {t for t, _ in seen} == {trusted}
    assert {ok for _, ok in seen} == {int8} and bool(int8_convs) == int8


def test_strided_dilated_convs_run_on_the_subsampled_input():
    """A conv with stride s = dilation s and padding a multiple of s is the stride-1 undilated conv of
    x[:, :, ::s, ::s] (exactly: the same products), for even and odd sizes; the reduction cells' dilated
    convs run that way (their gradients are checked against the straightforward cell above)."""
    g = torch.Generator().manual_seed(3)
    for size in (8, 9, 16):
        x = torch.randn(2, 5, size, size, generator=g, dtype=torch.float64)
        for k in (3, 5):
            w = torch.randn(7, 5, k, k, generator=g, dtype=torch.float64)
            want = F.conv2d(x, w, None, 2, 2 * (k // 2), 2)
            got = F.conv2d(functions._subsample(x, 2), w, None, 1, k // 2, 1)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    _, fast = _pair(torch.float32, init_channels=4, layers=3, num_nodes=3)
    specs = [c.spec for m in fast.modules() if type(m) is FastBinaryMixedCell
             for plan in m._plans for bundles in plan.bundles.values() for b in bundles for c in b.convs]
    cpu = {id(s): s.geometry(torch.device('cpu')) for s in specs}
    subsampled = [s for s in specs if cpu[id(s)][0] == 2]
    assert subsampled and all(s.stride == s.dilation == (2, 2) and cpu[id(s)][1:] == ((1, 1), (s.padding[0] // 2,
                                                                                          s.padding[1] // 2), (1, 1))
                              for s in subsampled)
    assert any(cpu[id(s)][0] == 1 and s.dilation == (2, 2) for s in specs)   # normal cells' stay dilated
    assert all(s.geometry(torch.device('meta')) == (1, s.stride, s.padding, s.dilation) for s in specs)  # CPU only


def test_dilated_weight_gradient_over_the_phases():
    """A stride-1 conv with dilation d and padding d * (k // 2): its weight gradient is the undilated conv's
    over the d * d polyphase components stacked along the batch. The fast cell takes that route where the
    dilated kernel spans the image (the 5x5 at 8x8 here; not the 3x3), tested against the straightforward
    cell by the search iterations above (their 8x8 cells)."""
    g = torch.Generator().manual_seed(4)
    for k, size in ((5, 8), (3, 4), (5, 6)):
        x = torch.randn(3, 4, size, size, generator=g, dtype=torch.float64)
        gout = torch.randn(3, 6, size, size, generator=g, dtype=torch.float64)
        w = torch.randn(6, 4, k, k, generator=g, dtype=torch.float64)
        want = torch.ops.aten.convolution_backward(gout, x, w, None, [1, 1], [2 * (k // 2)] * 2, [2, 2], False,
                                                   [0, 0], 1, [False, True, False])[1]
        got = torch.ops.aten.convolution_backward(functions._phases(gout, 2), functions._phases(x, 2), w, None,
                                                  [1, 1], [k // 2] * 2, [1, 1], False, [0, 0], 1,
                                                  [False, True, False])[1]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    _, fast = _pair(torch.float32, init_channels=4, layers=3, num_nodes=3)
    specs = [c.spec for m in fast.modules() if type(m) is FastBinaryMixedCell
             for plan in m._plans for bundles in plan.bundles.values() for b in bundles for c in b.convs]
    out8 = torch.empty(1, 1, 8, 8)
    assert {s.kernel_size: s.phase_split(out8) for s in specs if s.stride == (1, 1) and s.dilation == (2, 2)} \
        == {(3, 3): 1, (5, 5): 2}
    assert all(s.phase_split(torch.empty(1, 1, 16, 16)) == 1 for s in specs)
    assert all(s.phase_split(torch.empty(1, 1, 8, 8, device='meta')) == 1 for s in specs)   # CPU only


def test_cuda_check_compares_the_cells_and_catches_a_difference(monkeypatch):
    """``bench/cuda_check.py``'s fast-cell check (run on CUDA where a GPU is lent) runs here on the CPU: it
    passes on the cell as it is and fails when the fast cell computes something else."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / 'bench' / 'cuda_check.py'
    spec = importlib.util.spec_from_file_location('cuda_check_under_test', path)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    check.fast_cell(torch.device('cpu'))
    assert check.FAILED == []
    if not kernels.ternary_conv_supported():
        monkeypatch.setenv('BNAS_FAST_KERNELS', '0')   # the plain path: break its conv instead
        monkeypatch.setattr(functions._ConvReLUScale, 'apply', lambda s, w, p, *a: F.relu(F.conv2d(
            s, w, None, *a[:4])) * p.view(1, -1, 1, 1) * 1.01)
    else:
        real = kernels.TernaryConv.__call__
        monkeypatch.setattr(kernels.TernaryConv, '__call__', lambda self, s, relu: real(self, s, relu) * 1.01)
    check.fast_cell(torch.device('cpu'))
    assert any('output' in name for name in check.FAILED)


# ------------------------------------------------------------------ the fused elementwise passes


def _cl(*shape, gen, low=None):
    t = torch.randn(*shape, generator=gen)
    if low is not None:
        t = t.clamp_min(low)
    return t.contiguous(memory_format=torch.channels_last)


@pytest.fixture
def fused():
    """The extension's module; the tests compare each pass with its torch-ops fallback (BNAS_FUSED_OPS=0)."""
    ext = kernels.fused_ops()
    assert ext is not None, 'the fused search ops did not build here'
    return ext


def _torch_ops(monkeypatch, fn, *args, **kwargs):
    with monkeypatch.context() as m:
        m.setenv('BNAS_FUSED_OPS', '0')
        return fn(*args, **kwargs)


def test_fused_relu_backward_and_dots_match_the_torch_ops(fused, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    g = _cl(4, 24, 6, 6, gen=gen)
    g[0, 0, 0, :3] = torch.tensor([-0.0, 0.0, -1.5])  # signed zeros and values where z == 0 go to +0
    z = _cl(4, 24, 6, 6, gen=gen, low=0.0)          # a ReLU output: about half exact zeros
    for want in (True, False):
        gm, dots = kernels.relu_backward(g, z, want)
        gm_ref, dots_ref = _torch_ops(monkeypatch, kernels.relu_backward, g, z, want)
        assert torch.equal(gm, gm_ref) and gm.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(gm.view(torch.int32), gm_ref.view(torch.int32))  # +0, never -0, where z == 0
        if want:
            exact = (g.double() * z.double()).sum(dim=(0, 2, 3))
            assert dots.dtype == torch.float64 and torch.allclose(dots, exact, rtol=1e-12, atol=1e-12)
            assert torch.allclose(dots_ref.double(), exact, rtol=1e-5, atol=1e-5)
        else:
            assert dots is None and dots_ref is None


def test_fused_forward_passes_match_the_torch_ops(fused, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    zs = [_cl(3, 16, 5, 5, gen=gen, low=0.0) for _ in range(4)]
    ps = [torch.rand(16, generator=gen) for _ in range(4)]
    y = kernels.weighted_sum(zs, ps)
    y_ref = _torch_ops(monkeypatch, kernels.weighted_sum, zs, ps)
    exact = sum(z.double() * p.double().view(1, -1, 1, 1) for z, p in zip(zs, ps))
    assert torch.allclose(y.double(), exact, rtol=1e-6, atol=1e-6) and torch.allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    assert y.is_contiguous(memory_format=torch.channels_last)
    # pools: one block per destination edge, added in place
    xh = _cl(3, 4, 5, 5, gen=gen)
    p = torch.rand(4, generator=gen)
    blocks, blocks_ref = y.clone(), y.clone()
    kernels.add_blocks_(blocks, xh, p)
    _torch_ops(monkeypatch, kernels.add_blocks_, blocks_ref, xh, p)
    assert torch.allclose(blocks, blocks_ref, rtol=1e-6, atol=1e-6)
    assert torch.allclose(blocks[:, 8:12], y[:, 8:12] + xh * p[2], rtol=1e-6, atol=1e-6)
    # the sign and straight-through mask of a normalised state, including the edges 0 and +-1
    x = _cl(2, 8, 4, 4, gen=gen)
    x.permute(0, 2, 3, 1).view(-1)[:6] = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.999, -1.001])
    sign, s_u8, mask = kernels.sign_and_mask(x.clone(), want_mask=True)
    sign_ref, s_ref, mask_ref = _torch_ops(monkeypatch, kernels.sign_and_mask, x.clone(), want_mask=True)
    assert sign is None and torch.equal(sign_ref, torch.sign(x))
    assert torch.equal(s_u8, s_ref) and torch.equal(mask, mask_ref)
    assert s_u8.dtype == mask.dtype == torch.uint8 and s_u8.is_contiguous(memory_format=torch.channels_last)


def test_fused_backward_passes_match_the_torch_ops(fused, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    g = _cl(3, 12, 5, 5, gen=gen)
    mask = (torch.rand(3, 12, 5, 5, generator=gen) < 0.5).contiguous(memory_format=torch.channels_last)
    for m in (mask, mask.view(torch.uint8)):
        out = kernels.through_mask(g, m)
        assert torch.equal(out.view(torch.int32), _torch_ops(monkeypatch, kernels.through_mask, g, m).view(torch.int32))
    # pools: the gradient w.r.t. the normalised pool output and the dot products of the softmax-weight gradient
    pooled = _cl(3, 4, 5, 5, gen=gen)
    mean, invstd, p = torch.randn(4, generator=gen), torch.rand(4, generator=gen) + 0.5, torch.rand(3, generator=gen)
    gxh, dots = kernels.pool_backward(g, pooled, mean, invstd, p, True, True)
    gxh_ref, dots_ref = _torch_ops(monkeypatch, kernels.pool_backward, g, pooled, mean, invstd, p, True, True)
    assert torch.allclose(gxh, gxh_ref, rtol=1e-6, atol=1e-6)
    assert torch.allclose(dots.float(), dots_ref, rtol=1e-5, atol=1e-5)
    gxh, dots = kernels.pool_backward(g, pooled, mean, invstd, p, False, True)
    assert gxh is None and dots is not None


def test_fused_ops_leave_other_dtypes_and_layouts_to_torch(fused, monkeypatch):
    """float64 and non-channels-last tensors take the torch ops (nothing to build, nothing to check)."""
    calls = []
    monkeypatch.setattr(kernels, '_fused_module', lambda: calls.append(1) or fused)
    g64 = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    kernels.relu_backward(g64, g64.clamp_min(0), True)
    g = torch.randn(2, 4, 3, 3)
    kernels.relu_backward(g, g.clamp_min(0), True)   # NCHW
    assert calls == []


def test_cell_runs_the_torch_ops_when_the_fused_ops_cannot_be_built(monkeypatch, caplog):
    from bnas_nni import extensions

    def broken(*args, **kwargs):
        raise extensions.ExtensionBuildError('g++: command not found')
    kernels._fused_module.cache_clear()
    monkeypatch.setattr(kernels, 'load_extension', broken)      # the name the fused-ops loader calls
    try:
        with caplog.at_level('WARNING'):
            assert kernels.fused_ops() is None
        assert 'fused search ops unavailable (g++: command not found)' in caplog.text
        ref, fast = _pair(torch.float32, FastBinaryMixedCell, init_channels=4, layers=3, num_nodes=3)
        _iterations(ref, fast, _batches(2, 16, seed=9, iterations=1), TOL[torch.float32])
    finally:
        kernels._fused_module.cache_clear()
