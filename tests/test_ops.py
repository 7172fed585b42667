"""The seven candidate ops: shapes, strides, search vs final variants, binary op maths, Zeroise."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bnas_nni.errors import ConfigError
from bnas_nni.ops import OPS, PRIMITIVES, BNConvReLU, Zeroise, make_op
from bnas_nni.quant import BinaryConv2d, make_binarizer

BINARY = [n for n in PRIMITIVES if n.startswith('bin_')]
POOLS = ['max_pool_3x3', 'avg_pool_3x3']
# kernel, padding, dilation of each binary op (official operations.py)
GEOMETRY = {'bin_dil_conv_3x3': (3, 2, 2), 'bin_dil_conv_5x5': (5, 4, 2), 'bin_conv_3x3': (3, 1, 1),
            'bin_conv_5x5': (5, 2, 1)}


def test_primitive_order_is_the_alpha_column_order():
    assert PRIMITIVES == ('zeroise', 'max_pool_3x3', 'avg_pool_3x3', 'bin_dil_conv_3x3', 'bin_dil_conv_5x5',
                          'bin_conv_3x3', 'bin_conv_5x5')
    assert set(OPS) == set(PRIMITIVES)


@pytest.mark.parametrize('search', [False, True])
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('name', PRIMITIVES)
def test_output_shape_and_stride(name, stride, search):
    C = 6
    op = make_op(name, C, stride, search=search)
    for hw in (8, 7):
        x = torch.randn(2, C, hw, hw)
        y = op(x)
        side = (hw + stride - 1) // stride
        assert tuple(y.shape) == (2, C, side, side), (name, stride, hw)


@pytest.mark.parametrize('name', BINARY)
def test_binary_op_structure(name):
    k, pad, dil = GEOMETRY[name]
    for search in (False, True):
        op = make_op(name, 5, 2, search=search)
        assert isinstance(op, BNConvReLU)
        assert op.bn.affine is (not search)
        conv = op.op[0]
        assert isinstance(conv, BinaryConv2d) and conv.binarizer == 'xnor' and conv.bias is None
        assert conv.kernel_size == (k, k) and conv.padding == (pad, pad) and conv.dilation == (dil, dil)
        assert conv.stride == (2, 2)
        assert isinstance(op.op[1], nn.ReLU)


@pytest.mark.parametrize('name', POOLS)
def test_pool_variants(name):
    final = make_op(name, 4, 1)
    assert isinstance(final, (nn.MaxPool2d, nn.AvgPool2d)) and not any(True for _ in final.parameters())
    search = make_op(name, 4, 1, search=True)
    assert isinstance(search, nn.Sequential) and isinstance(search[1], nn.BatchNorm2d)
    assert search[1].num_features == 4 and not search[1].affine
    # search BN normalizes the pooled output (train mode: per-channel mean ~0)
    y = search(torch.randn(8, 4, 6, 6) + 3.0)
    assert y.mean(dim=(0, 2, 3)).abs().max() < 1e-5


def test_avg_pool_excludes_padding():
    op = make_op('avg_pool_3x3', 1, 1)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    y = op(x)
    assert y[0, 0, 0, 0].item() == pytest.approx((0 + 1 + 4 + 5) / 4)  # count_include_pad=False


@pytest.mark.parametrize('name', BINARY)
def test_binary_op_is_bn_sign_conv_relu_and_nonnegative(name):
    k, pad, dil = GEOMETRY[name]
    op = make_op(name, 4, 1)
    with torch.no_grad():
        op.bn.weight.uniform_(0.5, 1.5)
        op.bn.bias.uniform_(-0.5, 0.5)
    op.eval()
    op.bn.running_mean.uniform_(-1, 1)
    op.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(3, 4, 9, 9) * 2
    y = op(x)
    assert (y >= 0).all() and (y > 0).any()
    xb = F.batch_norm(x, op.bn.running_mean, op.bn.running_var, op.bn.weight, op.bn.bias, False, 0.0, op.bn.eps)
    w = op.op[0].weight
    wc = (w - w.mean(1, keepdim=True)).clamp(-1, 1)
    wb = wc.sign() * wc.abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = F.relu(F.conv2d(xb.sign(), wb, padding=pad, dilation=dil))
    assert torch.allclose(y, expected, atol=1e-5)


def test_binary_op_gradient_reaches_bn_and_latent_weights():
    op = make_op('bin_conv_3x3', 4, 1)
    x = (torch.randn(2, 4, 6, 6) * 0.5).requires_grad_()
    op(x).sum().backward()
    assert op.op[0].weight.grad.abs().sum() > 0
    assert op.bn.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_full_precision_variant_has_no_sign():
    op = BNConvReLU(3, 5, 3, 1, 1, binarizer=None, activation='identity')
    op.eval()
    x = torch.randn(2, 3, 6, 6)
    expected = F.relu(F.conv2d(op.bn(x), op.op[0].weight, padding=1))
    assert torch.allclose(op(x), expected, atol=1e-6)


@pytest.mark.parametrize('stride', [1, 2])
def test_zeroise_outputs_zeros(stride):
    op = make_op('zeroise', 3, stride)
    assert isinstance(op, Zeroise) and not any(True for _ in op.parameters())
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y = op(x)
    assert tuple(y.shape) == (2, 3, 8 // stride, 8 // stride)
    assert torch.count_nonzero(y) == 0
    assert make_op('none', 3, stride).stride == stride  # official name is an alias


def test_unknown_op_names_it_and_the_allowed_list():
    with pytest.raises(ConfigError) as e:
        make_op('sep_conv_3x3', 4, 1)
    msg = str(e.value)
    assert 'sep_conv_3x3' in msg and all(n in msg for n in PRIMITIVES)
    assert '\n' not in msg


def test_ops_accept_another_binarizer():
    op = make_op('bin_conv_3x3', 4, 1, binarizer='sign')
    assert op.op[0].binarizer == 'sign'
    assert torch.equal(op.op[0].effective_weight(), make_binarizer('sign')(op.op[0].weight))
