"""Fixed BNAS networks: parameter counts, macro structure, precision rules, real-image forward, drop path."""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bnas_nni.errors import ConfigError
from bnas_nni.genotypes import load_genotype
from bnas_nni.networks import BNASNetwork, build_model, count_parameters, drop_path, reduction_indices
from bnas_nni.ops import Zeroise
from bnas_nni.quant import BinaryConv2d

# counted on the official code's instantiated models (bnas-original.md §4)
OFFICIAL_PARAMS = {'bnas-a': 5_578_252, 'bnas-d': 28_407_560, 'bnas-e': 31_997_890, 'bnas-f': 39_781_442,
                   'bnas-g': 37_343_287, 'bnas-h': 160_016_936}


@pytest.mark.parametrize('name', list(OFFICIAL_PARAMS))
def test_parameter_counts_equal_official(name):
    model = build_model(name)
    assert count_parameters(model) == OFFICIAL_PARAMS[name]
    del model
    gc.collect()


def _conv_names(model, binary=None):
    out = []
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            is_bin = isinstance(m, BinaryConv2d) and m.binarizer is not None
            if binary is None or binary == is_bin:
                out.append(n)
    return out


def test_precision_rules_bnas_a():
    # bnas-original.md §1.5 / §6.1
    std = build_model('bnas-a')
    assert len(_conv_names(std)) == 79
    assert _conv_names(std, binary=False) == ['stem.op.0', 'cells.6.preprocess_res.1', 'cells.13.preprocess_res.1']
    head = build_model('bnas-a', precision_rule='official-2020-11')
    assert len(_conv_names(head, binary=True)) == 74
    assert _conv_names(head, binary=False) == ['stem.op.0', 'cells.6.preprocess_res.1', 'cells.13.preprocess_res.1',
                                               'cells.19.ops.1.op.0', 'cells.19.ops.2.op.0']
    first = build_model('bnas-a', precision_rule='official-2020-08')
    assert len(_conv_names(first, binary=True)) == 76
    assert _conv_names(first, binary=False) == ['stem.op.0', 'cells.19.ops.1.op.0', 'cells.19.ops.2.op.0']
    # the classifier is a plain Linear in every rule
    assert type(std.classifier) is nn.Linear


def test_precision_rules_bnas_d():
    head = build_model('bnas-d', precision_rule='official-2020-11')
    assert len(_conv_names(head)) == 115 and len(_conv_names(head, binary=True)) == 108
    assert _conv_names(head, binary=False) == ['stem0.0', 'stem0.3', 'stem1.1', 'cells.4.preprocess_res.1',
                                               'cells.8.preprocess_res.1', 'cells.11.ops.6.op.0', 'cells.11.ops.7.op.0']
    std = build_model('bnas-d')
    assert _conv_names(std, binary=False) == ['stem0.0', 'stem0.3', 'stem1.1', 'cells.4.preprocess_res.1',
                                              'cells.8.preprocess_res.1']
    with pytest.raises(ConfigError) as e:
        build_model('bnas-d', precision_rule='newest')
    assert 'newest' in str(e.value) and 'official-2020-11' in str(e.value)


@pytest.mark.parametrize('layers,expected', [(8, (2, 5)), (20, (6, 13)), (11, (3, 7)), (12, (4, 8)),
                                             (15, (5, 10)), (16, (5, 10))])
def test_reduction_positions(layers, expected):
    assert reduction_indices(layers) == expected


@pytest.mark.parametrize('dataset,layers,size', [('cifar10', 5, 32), ('imagenet', 4, 224)])
def test_macro_structure_channels_and_resolution(dataset, layers, size):
    C = 4
    model = build_model({'genotype': 'latest_cell', 'dataset': dataset, 'init_channels': C, 'layers': layers,
                         'num_classes': 7})
    reds = reduction_indices(layers)
    shapes = []
    hooks = [cell.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape))) for cell in model.cells]
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    for h in hooks:
        h.remove()
    assert out.shape == (2, 7)
    side = 32 if dataset == 'cifar10' else 28
    ch = C
    for i, (cell, shape) in enumerate(zip(model.cells, shapes)):
        assert cell.reduction == (i in reds)
        assert hasattr(cell, 'preprocess_res') == (i in reds)
        if i in reds:
            ch *= 2
            side //= 2
        assert shape == (2, 4 * ch, side, side), i
    assert side == (8 if dataset == 'cifar10' else 7)
    # CIFAR: the stride-2 preprocess0 after a reduction has a non-affine BN; ImageNet: affine (official)
    after = model.cells[reds[0] + 1].preprocess0
    assert after.op[0].stride == (2, 2) and after.bn.affine == (dataset != 'cifar10')


def test_cell_zero_nodes_and_residual_rules():
    model = build_model('bnas-a', init_channels=4, layers=5)  # reductions at cells 1 and 3
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        s = model.stem(x)
        c0 = model.cells[0](s, s)
        # BNAS-A normal cell: nodes 4 and 5 take only Zeroise inputs; cell 0 has no residual, so they are 0
        assert torch.count_nonzero(c0[:, 8:]) == 0 and torch.count_nonzero(c0[:, :8]) > 0
        c1 = model.cells[1](s, c0)
        c2 = model.cells[2](c0, c1)
        # in a normal cell those zero channels carry exactly the identity residual c_{k-1}
        assert c2.shape == c1.shape and torch.equal(c2[:, 16:], c1[:, 16:])
        assert not torch.equal(c2[:, :16], c1[:, :16])
        # a reduction cell adds BN + 2x2 stride-2 conv (with bias) of c_{k-1}
        res = model.cells[3].preprocess_res
        assert res[1].kernel_size == (2, 2) and res[1].stride == (2, 2) and res[1].bias is not None
        c3 = model.cells[3](c1, c2)
        # BNAS-A reduction cell: nodes 4 and 5 are Zeroise-only, so channels 32.. are the residual alone
        assert c3.shape == (2, 64, 8, 8) and torch.equal(c3[:, 32:], res(c2)[:, 32:])
        assert torch.count_nonzero(res(c2)[:, 32:]) > 0
    assert isinstance(model.cells[2].ops[3], Zeroise)


def test_forward_on_real_cifar_images(foolbox_cifar):
    images, labels = foolbox_cifar
    model = build_model('bnas-a', init_channels=8, layers=5)  # BNAS-A's cells at a CPU-friendly size
    model.eval()
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (20, 10) and torch.isfinite(logits).all()
    # different images give different outputs (no collapse to a constant)
    assert (logits - logits[0]).abs().max() > 1e-4
    # a small model trains on them: loss goes down with plain SGD in a few steps
    small = build_model('bnas-a', init_channels=4, layers=3)
    opt = torch.optim.SGD(small.parameters(), lr=0.05, momentum=0.9)
    small.train()
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(small(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)) and losses[-1] < losses[0]


def test_drop_path_out_of_place_with_backward():
    x = torch.randn(64, 3, 4, 4, requires_grad=True)
    h = F.relu(x)  # the official in-place version fails exactly here on modern torch
    before = h.detach().clone()
    y = drop_path(h, 0.25)
    assert torch.equal(h, before)  # input untouched
    kept = (y.flatten(1).abs().sum(1) > 0) | (h.flatten(1).abs().sum(1) == 0)
    for i in range(64):
        if kept[i]:
            assert torch.allclose(y[i], h[i] / 0.75)
        else:
            assert torch.count_nonzero(y[i]) == 0
    assert 0 < int(kept.sum()) < 64
    y.sum().backward()
    assert x.grad is not None
    assert drop_path(h, 0.0) is h


def test_network_drop_path_train_and_eval():
    model = build_model('bnas-a', init_channels=4, layers=4)
    x = torch.randn(4, 3, 32, 32)
    model.drop_path_prob = 0.3
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.classifier.parameters())
    model.eval()
    with torch.no_grad():
        a = model(x)
        model.drop_path_prob = 0.0
        b = model(x)
    assert torch.equal(a, b)  # no drop path at eval


def test_build_model_errors():
    with pytest.raises(ConfigError) as e:
        build_model('bnas-z')
    assert 'bnas-z' in str(e.value) and 'bnas-a' in str(e.value)
    with pytest.raises(ConfigError):
        build_model('bnas-a', binarizer='nope')


def test_network_from_genotype_object():
    g = load_genotype('latest_cell')
    net = BNASNetwork(g, init_channels=4, layers=3, num_classes=5)
    assert net.genotype == g and net.family == 'cifar' and net.classifier.out_features == 5
