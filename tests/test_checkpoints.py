"""Checkpoints (official layout and ours) and the ``bnas-nni summary`` figures."""
from __future__ import annotations

import argparse
import json
import re

import pytest
import torch
import torch.nn as nn

from bnas_nni.checkpoints import (
    FORMAT,
    describe_model,
    load_checkpoint_into,
    official_to_ours,
    ours_to_official,
    save_checkpoint,
)
from bnas_nni.cli import main
from bnas_nni.errors import CheckpointError
from bnas_nni.networks import build_model
from bnas_nni.quant import BinaryConv2d
from bnas_nni.summary import summarize

CIFAR = {'genotype': 'latest_cell_zeroise', 'dataset': 'cifar10', 'init_channels': 4, 'layers': 5, 'num_classes': 10}
IMAGENET = {'genotype': 'latest_cell', 'dataset': 'imagenet', 'init_channels': 8, 'layers': 4, 'num_classes': 10,
            'num_skip': 3}
CASES = {'cifar': (CIFAR, 32, 'official-2020-11'), 'imagenet': (IMAGENET, 224, 'official-2020-11')}


def _randomize(model: nn.Module) -> nn.Module:
    """Unconstrained latent weights (off-centre, beyond [-1, 1]) and non-trivial BN statistics."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BinaryConv2d) and m.binarizer is not None:
                m.weight.normal_(0.2, 0.8)
            elif isinstance(m, nn.Conv2d):
                m.weight.mul_(0.5)
                if m.bias is not None:
                    m.bias.normal_(0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.3)
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0, 0.05)
    return model


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def _official_binarization_copy(model: nn.Module) -> nn.Module:
    """The official eval path on a copy: each binary conv's weight replaced once by sign(C(W)) * alpha
    (mean-centre, clamp, binarize, as ``BinOp.binarization()`` does), then evaluated in full precision."""
    import copy

    clone = copy.deepcopy(model)
    with torch.no_grad():
        for m in clone.modules():
            if isinstance(m, BinaryConv2d) and m.binarizer is not None:
                w = m.weight.data
                w = w.add(w.mean(1, keepdim=True).mul(-1)).clamp(-1.0, 1.0)
                n = w[0].nelement()
                alpha = w.norm(1, 3, keepdim=True).sum(2, keepdim=True).sum(1, keepdim=True).div(n)
                m.weight.data = w.sign().mul(alpha.expand_as(w))
                m.binarizer = None
    return clone


@pytest.mark.parametrize('family', ['cifar', 'imagenet'])
@pytest.mark.parametrize('wrapped', [False, True])
def test_official_layout_import_gives_identical_logits(family, wrapped, tmp_path):
    cfg, size, rule = CASES[family]
    a = _randomize(build_model(cfg, precision_rule=rule))
    official = ours_to_official(a.state_dict(), family, prefix='module.')
    keys = list(official)
    assert all(k.startswith('module.') for k in keys)
    assert any('._ops.' in k for k in keys) and not any('.ops.' in k for k in keys)
    reds = [k for k in keys if '_red.' in k]
    if family == 'imagenet':  # reductions at cells 1 and 2 for L=4
        assert {k.split('.')[2] for k in reds} == {'1', '2'}
        assert {k.split('.')[3] for k in reds} == {'preprocess0_red', 'preprocess1_red'}
        assert not any(k.startswith('module.cells.1.preprocess0.') for k in keys)
    else:
        assert not reds
    payload = {'state_dict': official, 'epoch': 249, 'amp': {'loss_scaler0': {'loss_scale': 1.0, 'unskipped': 0}}} \
        if wrapped else official
    path = tmp_path / 'official.pt'
    torch.save(payload, path)

    b = build_model(cfg, precision_rule=rule)
    info = load_checkpoint_into(b, path)
    assert info['layout'] == 'official'
    if wrapped:
        assert info['epoch'] == 249 and 'amp' in info
    x = torch.randn(2, 3, size, size)
    la, lb = _logits(a, x), _logits(b, x)
    assert (la - lb).abs().max() < 1e-4
    assert la.abs().max() > 1e-2  # not a degenerate all-zero output
    # and that equals the official eval path: binarize the latent weights once, then a full-precision forward
    assert (_logits(_official_binarization_copy(b), x) - lb).abs().max() < 1e-4 * max(1.0, lb.abs().max().item())
    # the precision rule matters: the same weights under another rule give other logits
    c = build_model(cfg, precision_rule='standard')
    load_checkpoint_into(c, path, layout='official')
    assert (_logits(c, x) - lb).abs().max() > 1e-3


def test_key_mapping_round_trip_and_idempotence():
    model = build_model(IMAGENET)
    sd = model.state_dict()
    off = ours_to_official(sd, 'imagenet')
    assert list(official_to_ours(off)) == list(sd)
    assert list(official_to_ours(sd)) == list(sd)  # our layout passes through unchanged
    nested = {'module.module.' + k: v for k, v in off.items()}
    assert list(official_to_ours(nested)) == list(sd)
    with pytest.raises(CheckpointError, match='collide'):
        official_to_ours({'cells.0._ops.1.bn.weight': torch.zeros(1), 'cells.0.ops.1.bn.weight': torch.zeros(1)})
    with pytest.raises(CheckpointError, match='family'):
        ours_to_official(sd, 'mnist')


def test_own_checkpoint_round_trip(tmp_path):
    a = _randomize(build_model(CIFAR))
    opt = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    a.train()
    a(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    path = save_checkpoint(a, tmp_path / 'ck' / 'last.pt', epoch=3, optimizer=opt.state_dict(),
                           metrics={'top1': 12.5})
    raw = torch.load(path, map_location='cpu', weights_only=True)  # plain types only
    assert raw['format'] == FORMAT and raw['model']['genotype']['name'] == 'latest_cell_zeroise'
    assert raw['model']['init_channels'] == 4 and raw['model']['layers'] == 5 and raw['model']['family'] == 'cifar'
    b = build_model(CIFAR)
    info = load_checkpoint_into(b, path)
    assert info['layout'] == 'bnas-nni' and info['epoch'] == 3 and info['metrics'] == {'top1': 12.5}
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    opt_b.load_state_dict(info['optimizer'])
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(_logits(a, x), _logits(b, x))
    # a loaded dict and an explicit layout work too, and DataParallel wrappers on either side
    load_checkpoint_into(b, raw, layout='bnas-nni')
    wrapped = save_checkpoint(nn.DataParallel(a), tmp_path / 'ck' / 'dp.pt')
    assert next(iter(torch.load(wrapped, weights_only=True)['state_dict'])).startswith('stem.')
    load_checkpoint_into(nn.DataParallel(b), wrapped)
    assert not list((tmp_path / 'ck').glob('.*.tmp'))


def test_own_checkpoint_architecture_mismatch_is_one_clear_line(tmp_path):
    path = save_checkpoint(build_model(CIFAR), tmp_path / 'a.pt')
    with pytest.raises(CheckpointError) as e:
        load_checkpoint_into(build_model({**CIFAR, 'init_channels': 8}), path)
    msg = str(e.value)
    assert 'init_channels 4 vs 8' in msg and '\n' not in msg
    with pytest.raises(CheckpointError) as e:
        load_checkpoint_into(build_model({**CIFAR, 'genotype': 'latest_cell'}), path)
    assert 'latest_cell_zeroise vs latest_cell' in str(e.value)
    with pytest.warns(UserWarning, match='binarization'):
        load_checkpoint_into(build_model(CIFAR, precision_rule='official-2020-08'), path)


def test_bad_keys_are_listed(tmp_path):
    model = build_model(CIFAR)
    sd = ours_to_official(model.state_dict(), 'cifar')
    del sd['cells.2._ops.1.bn.weight']
    del sd['classifier.bias']
    sd['cells.2.extra.weight'] = torch.zeros(3)
    sd['classifier.weight'] = torch.zeros(10, 7)
    del sd['stem.bn.num_batches_tracked']  # tolerated: does not affect evaluation
    with pytest.raises(CheckpointError) as e:
        load_checkpoint_into(build_model(CIFAR), sd)
    msg = str(e.value)
    assert '\n' not in msg
    assert '2 missing: cells.2.ops.1.bn.weight, classifier.bias' in msg
    assert '1 unexpected: cells.2.extra.weight' in msg
    assert 'classifier.weight (10, 7) vs (10, 64)' in msg
    # long lists are truncated with a count
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith('cells.')}
    with pytest.raises(CheckpointError) as e:
        load_checkpoint_into(build_model(CIFAR), sd)
    msg = str(e.value)
    n_missing = sum(1 for k in model.state_dict() if k.startswith('cells.') and not k.endswith('num_batches_tracked'))
    assert f'{n_missing} missing' in msg and f'(+{n_missing - 6} more)' in msg and len(msg) < 600


def test_unreadable_and_wrong_inputs(tmp_path):
    model = build_model(CIFAR)
    with pytest.raises(CheckpointError, match='not found'):
        load_checkpoint_into(model, tmp_path / 'missing.pt')
    path = tmp_path / 'pickled.pt'
    torch.save({'state_dict': model.state_dict(), 'args': argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError, match='weights_only'):
        load_checkpoint_into(model, path)
    garbage = tmp_path / 'garbage.pt'
    garbage.write_bytes(b'not a checkpoint at all')
    with pytest.raises(CheckpointError, match='truncated or not a torch checkpoint'):
        load_checkpoint_into(model, garbage)
    with pytest.raises(CheckpointError, match='layout'):
        load_checkpoint_into(model, model.state_dict(), layout='keras')
    with pytest.raises(CheckpointError, match='neither'):
        load_checkpoint_into(model, {'epoch': 3})
    with pytest.raises(CheckpointError, match='plain types'):
        save_checkpoint(model, tmp_path / 'x.pt', args=argparse.Namespace(lr=0.1))
    with pytest.raises(CheckpointError, match='reserved'):
        save_checkpoint(model, tmp_path / 'x.pt', state_dict={})
    assert not (tmp_path / 'x.pt').exists()


def test_describe_model_records_plain_config():
    desc = describe_model(build_model(IMAGENET, precision_rule='official-2020-11'))
    assert desc['family'] == 'imagenet' and desc['init_channels'] == 8 and desc['layers'] == 4
    assert desc['num_classes'] == 10 and desc['reduction_cells'] == [1, 2]
    assert desc['full_precision_convs'][:3] == ['stem0.0', 'stem0.3', 'stem1.1']
    json.dumps(desc)  # plain types only


# --------------------------------------------------------------------------- summary


def _figure(text: str, label: str) -> float:
    m = re.search(re.escape(label) + r'\s+([0-9.e+,]+)', text)
    assert m, (label, text)
    return float(m.group(1).replace(',', ''))


def test_summary_cli_bnas_a_matches_reference_figures(capsys):
    assert main(['summary', 'bnas-a', '--precision-rule', 'official-2020-11']) == 0
    out = capsys.readouterr().out
    # bnas-original.md §5.4, counted from the official code (HEAD precision rule)
    assert _figure(out, 'parameters') == 5_578_252
    assert f"{_figure(out, 'binary MACs (BOPs)'):.2e}" == '6.73e+08'
    assert f"{_figure(out, 'full-precision MACs'):.2e}" == '1.12e+08'
    assert f"{_figure(out, 'OPs = BOPs/64 + FLOPs'):.2e}" == '1.22e+08'
    assert '74 binary convs' in out and 'xnor (1-bit)' in out


def test_summary_json_default_rule_differs_by_the_last_two_convs(capsys):
    assert main(['summary', 'bnas-a', '--json']) == 0
    std = json.loads(capsys.readouterr().out)
    head = summarize(build_model('bnas-a', precision_rule='official-2020-11'))
    # standard rule binarizes cells.19.ops.1/2: two 3x3 convs, 144 -> 144 channels at 8x8
    moved = 2 * 144 * 144 * 9 * 8 * 8
    assert std['binary_macs'] - head.binary_macs == moved
    assert head.fp_macs - std['fp_macs'] == moved
    assert std['ops'] == pytest.approx(std['bops'] / 64 + std['fp_macs'])
    assert std['params'] == 5_578_252 and std['binary_convs'] == 76 and std['fp_convs'] == 3


def test_summary_macs_agree_with_torch_flop_counter_and_size_arithmetic():
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(IMAGENET, precision_rule='official-2020-11')
    s = summarize(model)
    assert s.input_shape == [1, 3, 224, 224]
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 224, 224))
    flops = counter.get_flop_counts()['Global']
    conv_linear = sum(v for k, v in flops.items() if 'convolution' in str(k) or 'mm' in str(k))
    assert s.binary_macs + s.fp_macs == conv_linear // 2
    # packed size: fp32 minus 31 bits per binary weight, plus one fp32 scale per output filter (xnor)
    convs = [m for m in model.modules() if isinstance(m, BinaryConv2d) and m.binarizer is not None]
    saved_bits = sum(m.weight.numel() * 31 - m.out_channels * 32 for m in convs)
    assert s.fp32_bytes - s.size_bytes == saved_bits / 8
    # the unscaled 'sign' binarizer stores no per-filter scales; same MACs
    t = summarize(build_model(IMAGENET, precision_rule='official-2020-11', binarizer='sign'))
    assert t.size_bytes == s.size_bytes - sum(m.out_channels for m in convs) * 4
    assert (t.binary_macs, t.fp_macs) == (s.binary_macs, s.fp_macs)
    # no binarizer at all: everything is full precision and fp32-sized
    fp = summarize(build_model({**IMAGENET, 'binarizer': None}))
    assert fp.binary_macs == 0 and fp.fp_macs == s.binary_macs + s.fp_macs and fp.size_bytes == fp.fp32_bytes


def test_summary_genotype_path_and_verbose(tmp_path, capsys):
    from bnas_nni.genotypes import load_genotype, save_genotype

    path = save_genotype(load_genotype('latest_cell'), tmp_path / 'mine.yaml')
    assert main(['summary', str(path), '--dataset', 'imagenet', '--layers', '4', '--init-channels', '8',
                 '--verbose']) == 0
    out = capsys.readouterr().out
    assert 'imagenet' in out and '1x3x224x224' in out and '1000 classes' in out
    assert re.search(r'^cells\.3\.ops\.7\.op\.0\s+BinaryConv2d', out, re.M)
    assert re.search(r'^classifier\s+Linear', out, re.M)


def test_summary_bad_model_is_one_line_exit_2(capsys):
    assert main(['summary', 'bnas-q']) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith('error: ') and '\n' not in err and 'bnas-q' in err and 'bnas-a' in err
    assert captured.out == ''
    assert main(['summary', 'bnas-a', '--binarizer', 'ternary']) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and 'ternary' in err and '\n' not in err
