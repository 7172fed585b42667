"""The engine's faster paths against the exact answers they must give, on every instruction-set path.

* Column packing (a KxK binary conv over few channels reads its taps concatenated bit by bit): the exact
  integer XNOR/popcount counts, so ``alpha * count`` bit for bit against an integer reference built from
  the signs, in every geometry where it is used and where it is not.
* The ``int8`` option for the residual convs: within the bound that the two quantization steps
  allow (derived per output below), the same bits on every path, and top-1 agreement of a whole network
  with its float model; switching back to ``float`` gives the float model's bits again.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bnas_nni.deploy import fold, kernels
from bnas_nni.deploy.export import describe_network, packed_description
from bnas_nni.deploy.int8 import Int8Conv
from bnas_nni.deploy.runtime import PackedNetwork
from bnas_nni.networks import build_model

ISAS = kernels.supported_isas()


@pytest.fixture(scope='module')
def ext():
    return kernels.extension()


def random_thresholds(C: int, g: torch.Generator):
    """Kernel thresholds of a trained-looking BN, some channels flipped and some thresholds exactly at 0."""
    w = torch.randn(C, generator=g)
    b = torch.randn(C, generator=g) * 0.5
    b[torch.rand(C, generator=g) < 0.3] = 0.0
    th, negate = fold.bn_sign_thresholds(w, b, torch.zeros(C), torch.ones(C), 0.0)
    return th, negate


GEOMETRIES = [  # C_in, C_out, KH, KW, stride, padding, dilation, H, W (columns pay where KW * C packs tighter)
    (36, 36, 3, 3, 1, 1, 1, 9, 8),      # BNAS-A width: 3 taps of 36 bits in 2 words instead of 3
    (36, 36, 3, 3, 1, 2, 2, 8, 9),      # dilated
    (72, 40, 3, 3, 2, 1, 1, 9, 7),      # stride 2, odd sizes
    (20, 9, 5, 5, 1, 4, 2, 7, 6),       # 5 taps of 20 bits in 2 words; padding covers most of the window
    (144, 36, 3, 3, 1, 1, 1, 4, 5),     # three words per pixel: 7 instead of 9
    (36, 12, 1, 3, 1, 1, 1, 5, 6),      # 1 x 3
    (64, 16, 3, 3, 1, 1, 1, 5, 5),      # whole words: no columns
    (144, 36, 1, 1, 1, 0, 1, 6, 5),     # 1x1: no columns
    (36, 8, 3, 3, 1, 1, 1, 1, 1),       # a single pixel
]


@pytest.mark.parametrize('geometry', GEOMETRIES, ids=lambda g: 'x'.join(map(str, g)))
def test_binary_conv_gives_the_exact_popcount_on_every_path(ext, geometry):
    C, O, KH, KW, s, p, d, H, W = geometry
    g = torch.Generator().manual_seed(11)
    th, negate = random_thresholds(C, g)
    x = torch.randn(2, C, H, W, generator=g)
    x[torch.rand(x.shape, generator=g) < 0.2] = 0.0
    signs = fold.threshold_signs(x, th, negate)                      # {-1, 0, +1}
    wsign = torch.where(torch.rand(O, C, KH, KW, generator=g) < 0.5, -1.0, 1.0)
    alpha = torch.rand(O, generator=g) + 0.1
    count = F.conv2d(signs.double(), wsign.double(), None, s, p, d)  # exact integers
    t_zero, t_pos, flip = fold.kernel_thresholds(th, negate)
    words = fold.kernel_weight_words(wsign < 0)
    alpha_pad = torch.zeros(words.shape[1])
    alpha_pad[:O] = alpha
    expected = alpha.view(1, -1, 1, 1) * count.float()
    for relu, accumulate in ((False, False), (True, False), (True, True)):
        want = F.relu(expected) if relu else expected
        base = torch.randn(want.shape, generator=g).contiguous(memory_format=torch.channels_last)
        if accumulate:
            want = base + want
        for isa in ISAS:
            out = base.clone()
            ext.binary_conv(x.contiguous(memory_format=torch.channels_last), t_zero, t_pos, flip, words, alpha_pad,
                            out, KH, KW, s, p, d, relu, accumulate, kernels.isa_id(isa))
            assert torch.equal(out, want), (isa, relu, accumulate)


def int8_bound(conv: Int8Conv, h: torch.Tensor, weight: torch.Tensor, s: int, p: int, d: int) -> torch.Tensor:
    """Largest |int8 - float| per output: each input off by at most half its image's step, each weight by half its
    filter's step, plus the product of the two (padding is exact zero); a little float rounding on top."""
    sx = (h.abs().amax((1, 2, 3)) / 127).view(-1, 1, 1, 1)
    sw = conv.wscale[:weight.shape[0]].view(1, -1, 1, 1).double()
    ones = torch.ones_like(h)
    sum_abs_w = F.conv2d(ones, weight.abs().double(), None, s, p, d)
    sum_abs_h = F.conv2d(h.abs(), torch.ones_like(weight).double(), None, s, p, d)
    taps = F.conv2d(ones, torch.ones_like(weight).double(), None, s, p, d)
    exact = sx / 2 * sum_abs_w + sw / 2 * sum_abs_h + sx * sw / 4 * taps
    return exact + 1e-5 * F.conv2d(h.abs(), weight.abs().double(), None, s, p, d) + 1e-6


@pytest.mark.parametrize('geometry', [(144, 288, 2, 2, 0, 1, 8, 8, False),   # the residual conv of a reduction
                                      (3, 24, 3, 1, 1, 1, 7, 9, False),      # the CIFAR stem
                                      (21, 19, 3, 2, 1, 2, 9, 8, True)],     # odd sizes, partial lanes, ReLU
                         ids=lambda g: 'x'.join(map(str, g)))
def test_int8_conv_is_within_its_quantization_bound_on_every_path(geometry):
    C, O, k, s, p, d, H, W, relu = geometry
    g = torch.Generator().manual_seed(5)
    bn = {'weight': torch.randn(C, generator=g), 'bias': torch.randn(C, generator=g) * 0.5,
          'mean': torch.randn(C, generator=g) * 0.5, 'var': torch.rand(C, generator=g) + 0.5}
    weight = torch.randn(O, C, k, k, generator=g)
    bias = torch.randn(O, generator=g)
    conv = Int8Conv(weight, bias, bn, 1e-5, s, p, d, relu)
    x = torch.randn(3, C, H, W, generator=g)
    x[1] *= 20.0                                                      # images of very different ranges
    h = F.batch_norm(x.double(), bn['mean'].double(), bn['var'].double(), bn['weight'].double(),
                     bn['bias'].double(), False, 0.0, 1e-5)
    ref = F.conv2d(h, weight.double(), bias.double(), s, p, d)
    outs = [conv(x, kernels.isa_id(isa)) for isa in ISAS]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])                               # every path: the same bits
    bound = int8_bound(conv, h, weight, s, p, d)
    err = (outs[0].double() - (F.relu(ref) if relu else ref)).abs()
    assert (err <= bound).all(), float((err - bound).max())
    assert err.max() > 0                                               # it is quantized: not the float result
    # an image's result does not depend on its batch
    assert torch.equal(conv(x[1:2], kernels.isa_id(ISAS[-1])), outs[0][1:2])


def _small_bnas_a(seed: int, layers: int = 5):
    """A small BNAS-A (C=8, `layers` cells) with seeded random BN statistics, its packed network and the generator
    (left where the statistics ended, for the test's images)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = build_model('bnas-a', genotype='latest_cell', init_channels=8, layers=layers).eval()
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.5)
                bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    return model, PackedNetwork(packed_description(describe_network(model))), g


def test_int8_fp_parts_keep_the_float_model_top1_and_switch_back_exactly():
    model, net, g = _small_bnas_a(0)
    x = torch.randn(64, 3, 16, 16, generator=g)
    with torch.no_grad():
        ref = model(x)
    exact = net(x)
    residuals = [c.residual for c in net.cells if c.reduction]
    net.set_fp_parts('int8')
    assert residuals and all(u.int8 is not None for u in residuals) and net.stem.int8 is None
    outs = []
    for isa in ISAS:
        net.set_isa(isa)
        outs.append(net(x))
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    agree = (outs[0].argmax(1) == ref.argmax(1)).float().mean().item()
    rel = ((outs[0] - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
    assert agree >= 0.9 and rel < 0.2, (agree, rel)
    assert not torch.equal(outs[0], exact)
    net.set_fp_parts('float')
    assert torch.equal(net(x), exact)


def test_peak_micro_benchmarks_refuse_what_they_cannot_measure(ext):
    with pytest.raises(RuntimeError, match='portable'):
        ext.peak_macs('binary', kernels.isa_id('portable'), 10)
    with pytest.raises(RuntimeError, match='kind'):
        ext.peak_macs('int4', kernels.isa_id(ISAS[-1]), 10)


def test_chains_of_binary_cells_give_the_cell_by_cell_bits(monkeypatch, ext):
    """Consecutive all-binary cells run as one C++ call (each image through the whole chain; at batch sizes below
    the thread count the threads share each image): on every ISA, at batch 1, 2 and 7 and 2 or 3 threads, the
    logits are those of the cell programs called one by one, bit for bit, and the chains really ran (14 cells:
    chains of 4, 5 and 5, so inner cells' outputs go round the three scratch slots)."""
    from bnas_nni.deploy import runtime

    model, net, g = _small_bnas_a(1, layers=14)
    assert any(c.reduction and isinstance(c.residual, runtime._Unit) for c in net.cells)  # chains split there
    x = torch.randn(7, 3, 16, 16, generator=g)
    chains = []
    chain = runtime.PackedNetwork._chain
    threshold = ext.team_min_macs(0)                        # a network this small shares images only when told
    monkeypatch.setattr(runtime.PackedNetwork, '_chain', lambda self, cells, *a: (chains.append(len(cells)),
                                                                                   chain(self, cells, *a))[1])
    try:
        for threads in (2, 3):
            torch.set_num_threads(threads)
            for isa in ISAS:
                net.set_isa(isa)
                for batch in (x[:1], x[:2], x):
                    monkeypatch.setattr(runtime, 'CELL_CHAINS', False)
                    want = net(batch)
                    monkeypatch.setattr(runtime, 'CELL_CHAINS', True)
                    chains.clear()
                    got = net(batch)
                    assert chains == [4, 5, 5], chains
                    assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (threads, isa, len(batch))
                    team = threads if len(batch) < threads else 1
                    assert all(c.team == team for c in net.cells if c.chunkable), (threads, len(batch))
    finally:
        torch.set_num_threads(2)
        ext.team_min_macs(threshold)
    with torch.no_grad():
        assert (net(x) - model(x)).abs().max() < 1e-3


@pytest.mark.parametrize('shape', [(1, 108, 32, 32), (2, 13, 5, 7), (3, 9, 3, 1), (1, 1, 1, 1), (2, 40, 8, 8)])
def test_relayout_is_pytorchs_layout_change_on_every_path(ext, shape):
    """The engine's NCHW <-> channels-last copy (8 x 8 register blocks on AVX2/AVX-512, tiles on the portable
    path): the same tensor as PyTorch's ``contiguous``, bits included, for shapes whose rows and columns do not
    fill whole blocks; anything but those two layouts is refused with one line."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    x.view(-1)[::7] = -0.0
    xc = x.contiguous(memory_format=torch.channels_last)
    for isa in ISAS:
        to_cl = torch.empty(shape, memory_format=torch.channels_last)
        ext.relayout(x, to_cl, kernels.isa_id(isa))
        to_nchw = torch.empty(shape)
        ext.relayout(xc, to_nchw, kernels.isa_id(isa))
        assert to_cl.is_contiguous(memory_format=torch.channels_last) and to_nchw.is_contiguous()
        for got in (to_cl, to_nchw):
            assert torch.equal(got.contiguous().view(torch.int32), x.view(torch.int32)), isa
    if shape[1] > 1 and shape[2] * shape[3] > 1:
        with pytest.raises(RuntimeError, match='one tensor must be NCHW-contiguous'):
            ext.relayout(x, torch.empty(shape), kernels.isa_id(ISAS[0]))


@pytest.mark.parametrize('chains', [True, False])
def test_forward_passes_reuse_their_buffers_and_keep_the_bits(monkeypatch, chains):
    """The engine lends its intermediate maps from a workspace kept between passes (one per calling thread):
    passes at alternating batch sizes give a fresh network's bits, every lent buffer is given back, a repeated
    pass takes all of its buffers from the pool (no new ones), and threads calling at once get their own; with
    chains of cells and cell by cell."""
    import threading

    from bnas_nni.deploy import runtime

    monkeypatch.setattr(runtime, 'CELL_CHAINS', chains)
    model, net, g = _small_bnas_a(2)
    xa, xb = torch.randn(5, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)

    def fresh(x):
        return PackedNetwork(packed_description(describe_network(model)))(x).view(torch.int32)

    want = {5: fresh(xa), 2: fresh(xb)}
    for x in (xa, xb, xa, xb):
        assert torch.equal(net(x).view(torch.int32), want[len(x)])
    ws = net._workspace
    assert not ws.lent and ws.free
    pool = sorted(t.data_ptr() for t in ws.free)
    net(xa)
    net(xb)
    assert sorted(t.data_ptr() for t in ws.free) == pool

    got, errors = {}, []

    def caller(i: int, x: torch.Tensor) -> None:
        try:
            for _ in range(4):
                got[i] = net(x).view(torch.int32)
                assert torch.equal(got[i], want[len(x)])
        except AssertionError as exc:   # pragma: no cover - reported below
            errors.append((i, exc))

    threads = [threading.Thread(target=caller, args=(i, x)) for i, x in enumerate((xa, xb, xa))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == 3
    net.release_buffers()
    assert not ws.free and not ws._views
    assert torch.equal(net(xb).view(torch.int32), want[2])


def test_workspace_keeps_what_recent_passes_need_not_every_size_it_saw():
    """Passes at ever new batch sizes do not pile up buffers: after batches 1, 2, ..., 12 the workspace holds what
    the last two passes used, under 3 times what repeated batch-12 passes keep (keeping every size it saw would
    hold about 6.5 times as much)."""
    model, net, g = _small_bnas_a(3)
    x = torch.randn(12, 3, 16, 16, generator=g)
    net(x)
    net(x)
    one_pass = net._workspace.retained()
    _, growing, _ = _small_bnas_a(3)
    for batch in range(1, 13):
        growing(x[:batch])
        ws = growing._workspace    # the views it keeps for reuse are views of buffers it keeps, nothing else
        assert {ptr for ptr, _, _ in ws._views} <= {t.data_ptr() for t in ws.free}
    assert 0 < one_pass and growing._workspace.retained() <= 3 * one_pass
    assert torch.equal(growing(x).view(torch.int32), net(x).view(torch.int32))

