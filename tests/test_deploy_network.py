"""Whole networks through the packed engine and ONNX: logits, the file round trip, the CLI and bad input.

"Exact-sum" weights make the float model itself exact: every binary filter is ``±v`` with ``v`` a multiple
of 1/8 and balanced signs, so the float convs add multiples of 1/8 without rounding and the float model
computes the same integers the engine counts. Those networks must agree to the last bit (up to the
float head), whatever the BN thresholds -- including thresholds exactly at 0 on ReLU outputs and on the
Zeroise channels, where ``sign(0) = 0`` decides. Networks with ordinary random weights agree to float
reassociation (<= 1e-4) when their BN thresholds are generic, as in a trained network.
"""
from __future__ import annotations

import json
import os
import struct

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from bnas_nni import deploy
from bnas_nni.checkpoints import ours_to_official, save_checkpoint
from bnas_nni.cli import main
from bnas_nni.deploy import kernels
from bnas_nni.deploy.export import describe_network, packed_description
from bnas_nni.deploy.format import BASE_VERSION, CHECKSUM_KEY, checksum
from bnas_nni.errors import CheckpointError, ConfigError
from bnas_nni.networks import build_model
from bnas_nni.quant import BinaryConv2d, SteSign


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


RULES = ('standard', 'official-2020-11', 'official-2020-08')
SMALL = {  # name -> (model config, overrides, image size)
    'cifar-latest-cell': ('bnas-a', dict(genotype='latest_cell', init_channels=8, layers=5), 16),
    'imagenet-small': ('bnas-d', dict(init_channels=8, layers=4, num_classes=20), 48),
}


def exact_sum_weights_(model: nn.Module, g: torch.Generator) -> None:
    """Binary filters ``±v`` (v in 1/8 .. 1), signs balanced over input channels so the xnor mean-centring is
    exact too; full-precision convs keep their random weights."""
    steps = torch.tensor([2, 3, 4, 5, 6, 7, 8], dtype=torch.float32) / 8
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BinaryConv2d) and m.weight_quantizer is not None:
                O, C, KH, KW = m.weight.shape
                assert C % 2 == 0
                half = torch.cat([torch.ones(C // 2), -torch.ones(C // 2)])
                signs = torch.stack([half[torch.randperm(C, generator=g)] for _ in range(O * KH * KW)])
                signs = signs.view(O, KH, KW, C).permute(0, 3, 1, 2)
                v = steps[torch.randint(len(steps), (O,), generator=g)].view(O, 1, 1, 1)
                m.weight.copy_(signs * v)


def random_bn_(model: nn.Module, g: torch.Generator, at_zero: float = 0.0) -> None:
    """Trained-looking BN statistics; a fraction ``at_zero`` of channels gets its sign threshold exactly at 0."""
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                C = bn.num_features
                bn.running_mean.copy_(torch.randn(C, generator=g) * 0.5)
                bn.running_var.copy_(torch.rand(C, generator=g) + 0.5)
                zero = torch.rand(C, generator=g) < at_zero
                bn.running_mean[zero] = 0.0
                if bn.affine:
                    bn.weight.copy_(torch.randn(C, generator=g))
                    bn.bias.copy_(torch.randn(C, generator=g) * 0.5)
                    bn.bias[zero] = 0.0


def build(name: str, rule: str = 'standard', *, exact: bool = True, seed: int = 0) -> tuple:
    config, overrides, size = SMALL[name]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = build_model(config, precision_rule=rule, **overrides).eval()
    if exact:
        exact_sum_weights_(model, g)
        random_bn_(model, g, at_zero=0.3)
    else:
        random_bn_(model, g)
    return model, torch.randn(3, 3, size, size, generator=g)


def float_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def count_zero_signs(model: nn.Module, x: torch.Tensor) -> int:
    """How many sign outputs of the float model are exactly 0 (so sign(0) = 0 really matters)."""
    zeros = []
    hooks = [m.register_forward_hook(lambda mod, i, o: zeros.append(int((o == 0).sum())))
             for m in model.modules() if type(m) is SteSign]
    float_logits(model, x)
    for h in hooks:
        h.remove()
    return sum(zeros)


def engine_of(model: nn.Module, isa=None) -> deploy.PackedNetwork:
    return deploy.PackedNetwork(packed_description(describe_network(model)), isa=isa)


def test_bnas_a_logits_equal_the_float_model():
    """BNAS-A at full size (C=36, L=20): its Zeroise cells give exact-zero channels, BN thresholds at 0 make
    sign(0) = 0 decide, and the logits still equal the float model's."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = build_model('bnas-a').eval()
    exact_sum_weights_(model, g)
    random_bn_(model, g, at_zero=0.3)
    x = torch.randn(2, 3, 32, 32, generator=g)
    ref = float_logits(model, x)
    assert count_zero_signs(model, x) > 10_000
    got = engine_of(model)(x)
    assert (got - ref).abs().max().item() <= 1e-5
    assert got.argmax(1).tolist() == ref.argmax(1).tolist()


@pytest.mark.parametrize('rule', RULES)
@pytest.mark.parametrize('name', list(SMALL))
def test_small_networks_exact_under_every_precision_rule(name, rule):
    model, x = build(name, rule)
    if rule != 'standard':   # the official rules leave some convs full precision behind a sign, or binary on FP input
        kinds = {(m.op[0].weight_quantizer is None) for m in model.modules() if hasattr(m, 'quantizer')
                 and type(m.quantizer) is SteSign}
        assert kinds == {True, False}
    ref = float_logits(model, x)
    assert count_zero_signs(model, x) > 0
    net = engine_of(model)
    assert (net(x) - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize('name', list(SMALL))
def test_random_weights_agree_to_float_reassociation(name):
    model, x = build(name, 'official-2020-08', exact=False)
    ref = float_logits(model, x)
    assert (engine_of(model)(x) - ref).abs().max().item() <= 1e-4


def test_cells_run_group_by_group_give_the_same_bits(monkeypatch):
    """Large batches run each all-binary cell a few images at a time (cache reuse); the result must not change."""
    from bnas_nni.deploy import runtime as engine_module

    model, x = build('cifar-latest-cell', exact=False)
    x = torch.cat([x, x.flip(0)])
    whole = engine_of(model)(x)
    monkeypatch.setattr(engine_module, 'CACHE_BUDGET', 1)       # one image per group
    monkeypatch.setattr(engine_module, 'CELL_PROGRAM', False)   # the op-by-op path groups; programs go image by image
    net = engine_of(model)
    assert sum(c.chunkable for c in net.cells) == len(net.cells)
    assert torch.equal(net(x), whole)
    assert (whole - float_logits(model, x)).abs().max().item() <= 1e-4


@pytest.mark.parametrize('name', list(SMALL))
def test_cell_programs_give_the_bits_of_the_op_by_op_path(name, monkeypatch):
    """At batch > 1 an all-binary cell runs as one C++ call, image by image per thread (csrc/cell.cpp); it
    must compute exactly what the op-by-op path computes, on every instruction-set path, with and without
    profiling, and the profile must attribute the cell's time to its layers."""
    from bnas_nni.deploy import runtime as engine_module

    model, x = build(name, 'standard', exact=False, seed=2)
    x = torch.cat([x, x.flip(0), x[:1]])   # 7 images: uneven per thread
    net = engine_of(model)
    assert any(c.chunkable for c in net.cells)
    for isa in kernels.supported_isas():
        net.set_isa(isa)
        monkeypatch.setattr(engine_module, 'CELL_PROGRAM', False)
        op_by_op = net(x)
        monkeypatch.setattr(engine_module, 'CELL_PROGRAM', True)
        assert torch.equal(net(x), op_by_op), isa
        logits, records = net.profile(x, cpu=True)
        assert torch.equal(logits, op_by_op)
        kinds = {kind for _, kind, _, _ in records}
        assert 'concat + residual add' in kinds and any(k.startswith('binary conv') for k in kinds)
        assert all(t >= 0 and c >= 0 for _, _, t, c in records)
    assert (op_by_op - float_logits(model, x)).abs().max().item() <= 1e-4


@pytest.mark.parametrize('rule', RULES)
@pytest.mark.parametrize('name', list(SMALL))
def test_small_float_parts_on_one_thread_keep_the_bits(name, rule, monkeypatch):
    """With sleeping threads the small float parts (stem, residual convs, head, their BN and layout copies) run
    on one thread (runtime.ONE_THREAD_MACS): the logits are the bits of the caller's threads, at batch 1 and 3,
    and equal the float model's; the switch really happens, and only then."""
    from bnas_nni.deploy import runtime as engine_module

    model, x = build(name, rule, exact=False, seed=3)
    net = engine_of(model)
    switched = []
    one_thread = engine_module._one_thread

    def spy():
        switched.append(torch.get_num_threads())
        return one_thread()
    monkeypatch.setattr(engine_module, '_one_thread', spy)
    with torch.no_grad():
        torch.set_num_threads(2)
        for batch in (x[:1], x):
            outs = {}
            for small_ops in (True, False):
                monkeypatch.setattr(engine_module, 'ONE_THREAD_SMALL_OPS', small_ops)
                switched.clear()
                outs[small_ops] = net(batch)
                assert bool(switched) == small_ops and set(switched) <= {2}
            assert torch.equal(outs[True], outs[False]), (name, rule, len(batch))
            assert (outs[True] - float_logits(model, batch)).abs().max().item() <= 1e-4


def test_one_thread_rule_follows_the_wait_policy_and_spares_pointwise_convs(monkeypatch):
    """Small ops go to one thread only where threads sleep (OMP_WAIT_POLICY=PASSIVE) and only below the size
    limits; an unstrided 1x1 conv keeps the caller's threads, because PyTorch picks its backend (and so its
    rounding) by the thread count."""
    from bnas_nni.deploy import runtime as engine_module

    monkeypatch.setattr(engine_module, 'ONE_THREAD_SMALL_OPS', None)
    torch.set_num_threads(2)
    x = torch.randn(1, 108, 16, 16, generator=torch.Generator().manual_seed(0))
    w = torch.randn(8, 108, 1, 1, generator=torch.Generator().manual_seed(1))
    w3 = torch.randn(8, 108, 3, 3, generator=torch.Generator().manual_seed(2))

    def threads_in(ctx) -> int:
        with ctx:
            return torch.get_num_threads()

    for policy, sleeping in (('PASSIVE', True), ('passive', True), ('ACTIVE', False), (None, False)):
        if policy is None:
            monkeypatch.delenv('OMP_WAIT_POLICY', raising=False)
        else:
            monkeypatch.setenv('OMP_WAIT_POLICY', policy)
        assert threads_in(engine_module._conv_threads(x, w3.shape, 1, 1, 1)) == (1 if sleeping else 2), policy
        assert threads_in(engine_module._threads_for(1000, engine_module.ONE_THREAD_ELEMENTS)) == \
            (1 if sleeping else 2)
        assert threads_in(engine_module._threads_for(1 << 20, engine_module.ONE_THREAD_ELEMENTS)) == 2
        assert threads_in(engine_module._conv_threads(x, w.shape, 1, 0, 1)) == 2           # pointwise: kept
        assert threads_in(engine_module._conv_threads(x, w.shape, 2, 0, 1)) == (1 if sleeping else 2)
    assert torch.get_num_threads() == 2                                                   # restored
    monkeypatch.setenv('OMP_WAIT_POLICY', 'PASSIVE')
    ref = torch.nn.functional.conv2d(x, w)
    with engine_module._conv_threads(x, w.shape, 1, 0, 1):
        assert torch.equal(torch.nn.functional.conv2d(x, w), ref)


def test_isa_paths_forced_by_the_environment_agree_bit_for_bit(tmp_path, monkeypatch):
    model, x = build('cifar-latest-cell', 'official-2020-11', exact=False, seed=1)
    path = tmp_path / 'net.bnp'
    deploy.export_packed(model, path)
    outs = {}
    for isa in kernels.supported_isas():
        monkeypatch.setenv(kernels.ISA_ENV, isa)
        net = deploy.load(path)
        assert net.isa == isa
        outs[isa] = net(x)
    first = next(iter(outs.values()))
    assert all(torch.equal(v, first) for v in outs.values()), \
        {k: (v - first).abs().max().item() for k, v in outs.items()}
    assert (first - float_logits(model, x)).abs().max().item() <= 1e-4


def test_packed_file_round_trip_is_pickle_free_and_versioned(tmp_path):
    model, x = build('imagenet-small', 'official-2020-08')
    path = tmp_path / 'net.bnp'
    report = deploy.export_packed(model, path)
    assert report['file_bytes'] == path.stat().st_size < report['fp32_state_dict_bytes']
    assert report['binary_convs'] > 0 and report['packed_bytes'] * 10 < report['fp32_bytes']
    raw = path.read_bytes()
    (header_len,) = struct.unpack('<Q', raw[:8])                       # safetensors: length + JSON header + data
    header = json.loads(raw[8:8 + header_len])
    meta = json.loads(header['__metadata__']['bnas_nni'])
    assert meta['format'] == 'bnas-nni-packed' and meta['version'] == BASE_VERSION == 2   # no react fields
    assert header['__metadata__'][CHECKSUM_KEY] == checksum(header['__metadata__']['bnas_nni'], load_file(str(path)))
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()   # like every other output (0644)
    assert meta['architecture']['genotype']['name'] == 'latest_cell' and meta['architecture']['family'] == 'imagenet'
    conv = header['cells.1.preprocess1.conv.bits']                     # 1 bit per weight, one filter per row
    assert conv['dtype'] == 'U8' and conv['shape'] == [16, (32 * 1 * 1 + 7) // 8]
    assert b'\x80\x04' not in raw[:8 + header_len]
    loaded = deploy.load(path)
    assert torch.equal(loaded(x), engine_of(model)(x))
    assert (loaded(x) - float_logits(model, x)).abs().max().item() <= 1e-5
    logits, layers = loaded.profile(x)
    assert torch.equal(logits, loaded(x)) and any(kind.startswith('binary conv') for _, kind, _ in layers)


def test_onnx_export_keeps_the_binary_pattern_and_matches_onnxruntime(tmp_path):
    model, x = build('cifar-latest-cell', 'official-2020-08')
    path = tmp_path / 'net.onnx'
    deploy.export_onnx(model, path)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version >= 17
    meta = {p.key: p.value for p in proto.metadata_props}
    binary = json.loads(meta['bnas_nni.binary_convs'])
    nodes = {n.name: n for n in proto.graph.node}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    n_binary = sum(1 for m in model.modules() if hasattr(m, 'quantizer') and type(m.quantizer) is SteSign
                   and m.op[0].weight_quantizer is not None)
    assert len(binary) == n_binary > 0
    for b in binary:
        conv, sign = nodes[b['conv']], nodes[b['sign']]
        assert conv.op_type == 'Conv' and sign.op_type == 'Sign' and conv.input[0] == sign.output[0]
        w = torch.from_numpy(inits[b['weight']].copy()).abs().flatten(1)
        assert torch.equal(w, w.amax(1, keepdim=True).expand_as(w))  # ±alpha, one magnitude per filter
    # official rule: FP-weight convs behind a sign
    assert sum(n.op_type == 'Sign' for n in proto.graph.node) > n_binary
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    got = sess.run(None, {'images': x.numpy()})[0]
    want = float_logits(model, x).numpy()
    # float round-off only: a few ulps of the logit scale (these untrained logits reach a few hundred)
    assert abs(got - want).max() <= 2e-6 * max(1.0, float(abs(want).max()))


def test_model_from_checkpoint_rebuilds_precision_rules(tmp_path):
    model, x = build('cifar-latest-cell', 'official-2020-11', exact=False)
    save_checkpoint(model, tmp_path / 'ck.pt')
    rebuilt = deploy.network_from_checkpoint(tmp_path / 'ck.pt')
    assert {n: getattr(m, 'binarizer', None) for n, m in rebuilt.named_modules() if isinstance(m, BinaryConv2d)} == \
        {n: getattr(m, 'binarizer', None) for n, m in model.named_modules() if isinstance(m, BinaryConv2d)}
    assert torch.equal(float_logits(rebuilt, x), float_logits(model, x))


def test_cli_exports_packed_and_onnx_and_checks(tmp_path, capsys):
    model, x = build('cifar-latest-cell', exact=False)
    run = tmp_path / 'run'
    save_checkpoint(model, run / 'checkpoint.pt')
    assert main(['export', '--checkpoint', str(run), '--out', str(tmp_path / 'm.bnp')]) == 0
    out = capsys.readouterr().out
    assert 'smaller' in out and 'verified' in out and 'warning' not in out
    assert (tmp_path / 'm.bnp').stat().st_mode & 0o777 == 0o666 & ~current_umask()
    assert (deploy.load(tmp_path / 'm.bnp')(x) - float_logits(model, x)).abs().max().item() <= 1e-4
    assert main(['export', '--checkpoint', str(run), '--format', 'onnx', '--out', str(tmp_path / 'm.onnx')]) == 0
    assert 'onnxruntime' in capsys.readouterr().out
    assert main(['export', '--check', str(tmp_path / 'm.bnp')]) == 0
    assert capsys.readouterr().out.count('identical') == len(kernels.supported_isas())


def test_cli_official_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model('bnas-a', init_channels=8, layers=5, precision_rule='official-2020-08').eval()
    random_bn_(model, torch.Generator().manual_seed(0))
    torch.save({'state_dict': ours_to_official(model.state_dict(), 'cifar', prefix='module.')}, tmp_path / 'off.pt')
    argv = ['export', '--checkpoint', str(tmp_path / 'off.pt'), '--official', '--model', 'bnas-a',
            '--init-channels', '8', '--layers', '5', '--out', str(tmp_path / 'off.bnp')]
    assert main(argv) == 0
    capsys.readouterr()
    x = torch.randn(2, 3, 32, 32)
    assert (deploy.load(tmp_path / 'off.bnp')(x) - float_logits(model, x)).abs().max().item() <= 1e-4


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: '), err
    return err[0]


def test_cli_bad_inputs_give_one_line_and_no_file(tmp_path, capsys):
    model, _ = build('cifar-latest-cell', exact=False)
    save_checkpoint(model, tmp_path / 'ck.pt')
    torch.save(model.state_dict(), tmp_path / 'bare.pt')
    out = tmp_path / 'out.bnp'
    # a checkpoint that does not match the architecture asked for
    assert main(['export', '--checkpoint', str(tmp_path / 'ck.pt'), '--model', 'bnas-a', '--out', str(out)]) == 2
    assert 'different architecture' in _one_error_line(capsys)
    assert main(['export', '--checkpoint', str(tmp_path / 'bare.pt'), '--model', 'bnas-a', '--out', str(out)]) == 2
    assert 'does not fit the model' in _one_error_line(capsys)
    assert main(['export', '--checkpoint', str(tmp_path / 'bare.pt'), '--out', str(out)]) == 2
    assert '--model' in _one_error_line(capsys)
    # a truncated packed file
    deploy.export_packed(model, tmp_path / 'good.bnp')
    data = (tmp_path / 'good.bnp').read_bytes()
    (tmp_path / 'cut.bnp').write_bytes(data[:len(data) // 2])
    assert main(['export', '--check', str(tmp_path / 'cut.bnp')]) == 2
    assert 'not a complete safetensors file' in _one_error_line(capsys)
    with pytest.raises(CheckpointError):
        deploy.load(tmp_path / 'cut.bnp')
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == \
        ['bare.pt', 'ck.pt', 'cut.bnp', 'good.bnp']


def test_foreign_and_future_packed_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({'w': torch.zeros(2)}, str(tmp_path / 'foreign.bnp'))
    with pytest.raises(CheckpointError, match='not a bnas-nni packed model'):
        deploy.load(tmp_path / 'foreign.bnp')
    header = {'format': 'bnas-nni-packed', 'version': 99, 'architecture': {}, 'network': {}}
    save_file({'w': torch.zeros(2)}, str(tmp_path / 'future.bnp'), metadata={'bnas_nni': json.dumps(header)})
    with pytest.raises(CheckpointError, match='version 99'):
        deploy.load(tmp_path / 'future.bnp')
    header['version'] = 1     # written before the checksum
    save_file({'w': torch.zeros(2)}, str(tmp_path / 'old.bnp'), metadata={'bnas_nni': json.dumps(header)})
    with pytest.raises(CheckpointError, match=r'version 1, written by an older bnas-nni .* re-export it with '
                                              r'bnas-nni export'):
        deploy.load(tmp_path / 'old.bnp')
    header['version'] = 2
    header['network'] = {'family': 'cifar', 'in_channels': 3, 'num_classes': 10, 'stem': [], 'cells': [],
                         'classifier': {'weight': {'$tensor': 'missing'}, 'bias': None}}
    text = json.dumps(header)
    tensors = {'w': torch.zeros(2)}
    save_file(tensors, str(tmp_path / 'unsigned.bnp'), metadata={'bnas_nni': text})
    with pytest.raises(CheckpointError, match='without a checksum'):
        deploy.load(tmp_path / 'unsigned.bnp')
    save_file(tensors, str(tmp_path / 'broken.bnp'), metadata={'bnas_nni': text, CHECKSUM_KEY: checksum(text, tensors)})
    with pytest.raises(CheckpointError, match="tensor 'missing'"):
        deploy.load(tmp_path / 'broken.bnp')


class MyOp(nn.Module):
    """A user-registered candidate op the packed engine does not know."""

    def __init__(self, C: int, stride: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(3, stride, 1, count_include_pad=True)

    def forward(self, x):
        return self.pool(x)


@pytest.fixture
def user_op(monkeypatch):
    """Register ``my_op`` the way a user extends the op table (OPS, PRIMITIVES and the name check)."""
    from bnas_nni import ops

    monkeypatch.setitem(ops.OPS, 'my_op', lambda C, stride, affine, **q: MyOp(C, stride))
    prims = ops.PRIMITIVES + ('my_op',)
    monkeypatch.setattr(ops, 'PRIMITIVES', prims)
    monkeypatch.setattr(ops.canonical_op, '__defaults__', (prims, ''))
    return 'my_op'


def test_unsupported_user_op_is_one_line_and_writes_nothing(tmp_path, capsys, user_op):
    from bnas_nni.genotypes import Genotype

    normal = (('bin_conv_3x3', 1), (user_op, 0), ('bin_conv_3x3', 2), ('max_pool_3x3', 0))
    reduce = (('max_pool_3x3', 0), ('bin_conv_3x3', 1), ('zeroise', 2), ('bin_conv_3x3', 2))
    genotype = Genotype(normal=normal, reduce=reduce, name='with_my_op')
    model = build_model({'genotype': genotype, 'init_channels': 8, 'layers': 3}).eval()
    with pytest.raises(ConfigError, match="cells.0.ops.1: op 'my_op'"):
        deploy.export_packed(model, tmp_path / 'x.bnp')
    save_checkpoint(model, tmp_path / 'ck.pt')
    for fmt in ('packed', 'onnx'):
        assert main(['export', '--checkpoint', str(tmp_path / 'ck.pt'), '--format', fmt,
                     '--out', str(tmp_path / f'x.{fmt}')]) == 2
        assert 'my_op' in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ck.pt']
