"""The packed engine's ops against their float counterparts: thresholds, bit planes, binary convs, pools.

Inputs hold exact zeros, thresholds sit exactly at zero for some channels (so sign(0) = 0 happens), some BN
weights are zero (constant channels) or negative (flipped comparisons), and borders are checked through
convs whose padding reaches well into the image. Every instruction-set path must give the same bits.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnas_nni.deploy import fold, kernels
from bnas_nni.errors import ConfigError
from bnas_nni.ops import BNConvReLU

ISAS = kernels.supported_isas()


@pytest.fixture(scope='module')
def ext():
    return kernels.extension()


def random_bn_(bn: torch.nn.BatchNorm2d, g: torch.Generator) -> None:
    """Trained-looking BN statistics, plus channels whose threshold is exactly 0, zero and negative weights."""
    C = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(C, generator=g) * 0.5)
        bn.running_var.copy_(torch.rand(C, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(C, generator=g))
        bn.bias.copy_(torch.randn(C, generator=g) * 0.5)
        at_zero = torch.rand(C, generator=g) < 0.3
        bn.running_mean[at_zero] = 0.0
        bn.bias[at_zero] = 0.0
        bn.weight[torch.rand(C, generator=g) < 0.1] = 0.0


def inputs_with_zeros(shape, g: torch.Generator, zero_frac: float = 0.3) -> torch.Tensor:
    x = torch.randn(*shape, generator=g)
    x[torch.rand(*shape, generator=g) < zero_frac] = 0.0
    return x


def engine_args(m: BNConvReLU):
    th, negate = fold.bn_sign_thresholds(m.bn.weight, m.bn.bias, m.bn.running_mean, m.bn.running_var, m.bn.eps)
    t_zero, t_pos, flip = fold.kernel_thresholds(th, negate)
    negative, alpha = fold.binary_filters(m.op[0].effective_weight())
    words = fold.kernel_weight_words(negative)
    alpha_pad = torch.zeros(words.shape[1])
    alpha_pad[:alpha.numel()] = alpha
    return t_zero, t_pos, flip, words, alpha_pad


def test_thresholds_reproduce_torch_sign_of_batch_norm_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    bn = torch.nn.BatchNorm2d(50).eval()
    random_bn_(bn, g)
    with torch.no_grad():
        bn.weight[:3] = torch.tensor([1e-30, -1e-30, 3e4])   # extreme slopes: underflow widens the zero band
    th, negate = fold.bn_sign_thresholds(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    assert th.shape == (2, 50) and negate.dtype == torch.bool
    # probe every threshold and its float neighbours, zeros, subnormals and ordinary values
    t = th.numpy()
    finite = np.where(np.isfinite(t), t, 0).astype(np.float32)
    probes = [finite[0], finite[1], np.nextafter(finite[0], -np.inf), np.nextafter(finite[1], -np.inf),
              np.nextafter(finite[0], np.inf), np.nextafter(finite[1], np.inf), -finite[0], -finite[1]]
    probes = [torch.from_numpy(np.asarray(p, np.float32)) for p in probes]
    probes += [torch.zeros(50), torch.full((50,), 1e-45), torch.full((50,), -1e-45), torch.randn(50, generator=g)]
    x = torch.stack(probes).view(len(probes), 50, 1, 1).repeat(1, 1, 3, 5)
    with torch.no_grad():
        expected = torch.sign(bn(x))
    assert torch.equal(fold.threshold_signs(x, th, negate), expected)
    assert (expected == 0).any() and (expected == 1).any() and (expected == -1).any()


@pytest.mark.parametrize('C', [70, 8, 144, 330])   # a partial word; a lone group; 9 groups; 3 spans of 8 groups
@pytest.mark.parametrize('isa', ISAS)
def test_bit_planes_hold_signs_zeros_and_a_zero_border(ext, isa, C):
    g = torch.Generator().manual_seed(2)
    pad = 2
    bn = torch.nn.BatchNorm2d(C).eval()
    random_bn_(bn, g)
    x = inputs_with_zeros((2, C, 5, 7), g)
    th, negate = fold.bn_sign_thresholds(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    t_zero, t_pos, flip = fold.kernel_thresholds(th, negate)
    for layout in (torch.contiguous_format, torch.channels_last):
        packed = ext.pack_signs(x.contiguous(memory_format=layout), t_zero, t_pos, flip, pad, kernels.isa_id(isa))
        assert packed.shape == (2, 5 + 2 * pad, 7 + 2 * pad, (C + 63) // 64, 2)
        words = packed.numpy().view(np.uint64)
        bits = lambda plane: np.unpackbits(words[..., plane].copy().view(np.uint8), axis=-1, bitorder='little')  # noqa: E731
        neg, nonzero = bits(0).astype(np.int64), bits(1).astype(np.int64)
        values = nonzero * (1 - 2 * neg)                               # N, Hp, Wp, 64 * words
        with torch.no_grad():
            expected = torch.sign(bn(x)).permute(0, 2, 3, 1).numpy()    # N, H, W, C
        assert np.array_equal(values[:, pad:-pad, pad:-pad, :C], expected)
        assert not values[:, :, :, C:].any()                            # channels beyond C are empty
        interior = np.zeros(values.shape[:3], bool)
        interior[:, pad:-pad, pad:-pad] = True
        assert not nonzero[~interior].any() and not neg[~interior].any()  # the border contributes nothing


GEOMETRIES = [  # C_in, C_out, kernel, stride, padding, dilation, H, W
    (36, 36, 3, 1, 1, 1, 9, 9),      # bin_conv_3x3 at BNAS-A width
    (144, 36, 1, 1, 0, 1, 6, 5),     # preprocess 1x1, three words per pixel
    (70, 19, 3, 2, 1, 1, 9, 8),      # stride 2 (reduction preprocess), odd sizes, a partial word and lane
    (36, 36, 5, 1, 4, 2, 7, 7),      # bin_dil_conv_5x5: the padding covers most of the window
    (100, 13, 3, 1, 2, 2, 5, 6),     # bin_dil_conv_3x3
    (130, 70, 5, 2, 2, 1, 7, 9),     # bin_conv_5x5 stride 2, 3 words
    (8, 4, 3, 1, 1, 1, 1, 1),        # a single pixel: only the centre tap sees data
    (36, 36, 3, 1, 1, 1, 11, 13),    # border columns, then interior blocks of 4 and a remainder
    (36, 36, 3, 1, 2, 2, 9, 10),     # bin_dil_conv_3x3 at BNAS-A width: two-word columns 2 pixels apart
    (16, 8, 3, 1, 1, 1, 6, 9),       # one-word columns
    (72, 40, 3, 2, 1, 1, 10, 11),    # stride 2 over column-packed input
    (150, 24, 1, 1, 0, 1, 3, 9),     # 1x1: every window inside
]


@pytest.mark.parametrize('dense', [False, True], ids=['zeros', 'dense'])
@pytest.mark.parametrize('geometry', GEOMETRIES, ids=lambda g: 'x'.join(map(str, g)))
def test_binary_conv_equals_float_bn_sign_conv_relu(ext, geometry, dense):
    """zeros: BN channels where inputs map to exactly 0 (masked steps everywhere); dense: none, so the
    AVX-512 path skips the masks inside the image (kernels.h, dense windows) and the others do not."""
    C_in, C_out, k, s, p, d, H, W = geometry
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    m = BNConvReLU(C_in, C_out, k, s, p, d).eval()
    if dense:
        with torch.no_grad():
            m.bn.running_mean.copy_(torch.randn(C_in, generator=g) * 0.5)
            m.bn.weight.copy_(torch.randn(C_in, generator=g))
    else:
        random_bn_(m.bn, g)
    x = inputs_with_zeros((3, C_in, H, W), g)
    with torch.no_grad():
        ref = m(x)
    args = engine_args(m)
    assert torch.equal(args[0], args[1]) == dense               # the thresholds coincide exactly when dense
    outs = []
    for isa in ISAS:
        for layout in (torch.channels_last, torch.contiguous_format):   # strided input layouts
            out = torch.empty(ref.shape, memory_format=torch.channels_last)
            ext.binary_conv(x.contiguous(memory_format=layout), *args, out, k, k, s, p, d, True, False,
                            kernels.isa_id(isa))
            outs.append(out)
    for out in outs:
        assert torch.equal(out, outs[0])                      # every path, every layout: the same bits
    assert (ref == 0).any() and (ref > 0).any()
    assert (outs[0] - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize('isa', ISAS)
def test_weight_bits_beyond_the_channels_change_nothing(ext, isa):
    """Packed weights from a caller may carry bits past C in their last word: the masked steps ignore them,
    and they keep a unit off the unmasked (dense) steps, which would count them."""
    g = torch.Generator().manual_seed(5)
    m = BNConvReLU(36, 16, 1, 1, 0).eval()      # a 1x1 conv reads the words as given (no column packing)
    with torch.no_grad():
        m.bn.running_mean.copy_(torch.randn(36, generator=g))
    x = torch.randn(2, 36, 7, 9, generator=g)
    t_zero, t_pos, flip, words, alpha = engine_args(m)
    assert torch.equal(t_zero, t_pos)
    stray = words | torch.tensor(-(1 << 36), dtype=torch.int64)    # bits 36..63 of every word set
    outs = []
    for w in (words, stray):
        out = torch.empty(2, 16, 7, 9, memory_format=torch.channels_last)
        ext.binary_conv(x, t_zero, t_pos, flip, w, alpha, out, 1, 1, 1, 0, 1, True, False, kernels.isa_id(isa))
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and outs[0].abs().sum() > 0


@pytest.mark.parametrize('isa', ISAS)
def test_binary_conv_accumulates_into_a_channel_slice(ext, isa):
    """A cell's op writes into its slice of the concat; the node's second op adds to it; nothing else moves."""
    g = torch.Generator().manual_seed(4)
    m = BNConvReLU(36, 36, 3, 1, 1).eval()
    random_bn_(m.bn, g)
    x = inputs_with_zeros((2, 36, 6, 6), g)
    with torch.no_grad():
        ref = m(x)
    big = torch.randn(2, 144, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
    before = big.clone()
    first = torch.randn(2, 36, 6, 6, generator=g)
    big[:, 36:72] = first
    ext.binary_conv(x, *engine_args(m), big[:, 36:72], 3, 3, 1, 1, 1, True, True, kernels.isa_id(isa))
    assert torch.equal(big[:, :36], before[:, :36]) and torch.equal(big[:, 72:], before[:, 72:])
    assert (big[:, 36:72] - (first + ref)).abs().max().item() <= 1e-4 * ref.abs().max().item()


@pytest.mark.parametrize('is_max', [True, False], ids=['max', 'avg'])
@pytest.mark.parametrize('stride', [1, 2])
def test_pools_equal_torch(ext, is_max, stride):
    g = torch.Generator().manual_seed(5)
    x = inputs_with_zeros((2, 70, 7, 8), g).contiguous(memory_format=torch.channels_last)
    if is_max:
        ref = F.max_pool2d(x.contiguous(), 3, stride, 1)
    else:
        ref = F.avg_pool2d(x.contiguous(), 3, stride, 1, count_include_pad=False)
    base = torch.randn(ref.shape, generator=g)
    for isa in ISAS:
        out = torch.empty(ref.shape, memory_format=torch.channels_last)
        ext.pool2d(x, out, 3, stride, 1, is_max, False, kernels.isa_id(isa))
        assert torch.equal(out, ref), isa
        acc = base.clone().contiguous(memory_format=torch.channels_last)
        ext.pool2d(x, acc, 3, stride, 1, is_max, True, kernels.isa_id(isa))
        assert torch.equal(acc, base + ref), isa


def test_binary_filters_need_one_magnitude_per_filter():
    w = torch.tensor([0.5, -0.5, 0.5, -0.5]).view(2, 2, 1, 1)
    negative, alpha = fold.binary_filters(w)
    assert alpha.tolist() == [0.5, 0.5] and negative.view(-1).tolist() == [False, True, False, True]
    assert fold.binary_filters(torch.zeros(2, 2, 1, 1))[1].tolist() == [0.0, 0.0]
    with pytest.raises(ConfigError, match='more than one magnitude'):
        fold.binary_filters(torch.tensor([0.5, -0.25, 0.5, -0.5]).view(2, 2, 1, 1))
    bits = fold.pack_filter_bits(negative)
    assert torch.equal(fold.unpack_filter_bits(bits, (2, 2, 1, 1)), negative)


def test_isa_switch(monkeypatch):
    monkeypatch.delenv(kernels.ISA_ENV, raising=False)
    assert kernels.resolve_isa() == ISAS[-1]
    for isa in ISAS:
        monkeypatch.setenv(kernels.ISA_ENV, isa)
        assert kernels.resolve_isa() == isa
    monkeypatch.setenv(kernels.ISA_ENV, 'sse9')
    with pytest.raises(ConfigError, match='unknown instruction set'):
        kernels.resolve_isa()
    assert kernels.resolve_isa('portable') == 'portable'
    assert 'portable' in ISAS


# the CPU features each path is compiled for (GCC's names, as /proc/cpuinfo spells them)
ISA_FLAGS = {'portable': set(), 'avx2': {'avx2', 'popcnt'},
             'avx512': {'avx512f', 'avx512bw', 'avx512dq', 'avx512vl', 'avx512_vpopcntdq', 'popcnt'}}


def test_cpu_paths_present_on_avx512_machines(ext, monkeypatch):
    """The engine offers exactly the paths the CPU's flags allow (all three on an AVX-512 VPOPCNTDQ machine),
    ``auto`` picks the fastest, a path the CPU lacks is a one-line error, and every offered path runs and
    packs the same bits as the portable one."""
    cpuinfo = Path('/proc/cpuinfo')
    if not cpuinfo.is_file():
        pytest.skip('no /proc/cpuinfo to read the CPU flags from')
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith('flags'):
            flags |= set(line.split(':', 1)[1].split())
    expected = tuple(isa for isa in ISAS if ISA_FLAGS[isa] <= flags)
    assert kernels.supported_isas() == expected
    if ISA_FLAGS['avx512'] <= flags:
        assert expected == ('portable', 'avx2', 'avx512')
    monkeypatch.delenv(kernels.ISA_ENV, raising=False)
    assert kernels.resolve_isa() == expected[-1]
    for isa in set(ISAS) - set(expected):
        with pytest.raises(ConfigError, match=f'cannot run the {isa} path'):
            kernels.resolve_isa(isa)
    g = torch.Generator().manual_seed(9)
    bn = torch.nn.BatchNorm2d(70).eval()
    random_bn_(bn, g)
    x = inputs_with_zeros((2, 70, 5, 7), g)
    t_zero, t_pos, flip = fold.kernel_thresholds(*fold.bn_sign_thresholds(bn.weight, bn.bias, bn.running_mean,
                                                                          bn.running_var, bn.eps))
    packed = {isa: ext.pack_signs(x, t_zero, t_pos, flip, 1, kernels.isa_id(isa)) for isa in expected}
    assert packed['portable'].any()
    for isa in expected:
        assert torch.equal(packed[isa], packed['portable']), isa
