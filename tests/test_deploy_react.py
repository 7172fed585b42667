"""The react block (``op_set: react``) through the packed engine and ONNX.

RSign -> scaled-sign conv [+ real-valued shortcut] -> RPReLU: RSign's ``beta`` must be folded into the sign
thresholds exactly (every sign decision the float model's, also one float away from a threshold), the
scaled-sign weights become bits plus one scale per filter, and the shortcut and (R)PReLU must give the float
block's bits. "Exact-sum" weights (every binary filter ``±v``, ``v`` a multiple of 1/8) make the float convs
themselves exact, so the engine must then reproduce every cell output of the float model bit for bit, on
every instruction-set path; ordinary random weights agree to float reassociation.
"""
from __future__ import annotations

import json
import struct

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from packed_fuzz import ALL_OPS_GENOTYPE

from bnas_nni import deploy
from bnas_nni.checkpoints import save_checkpoint
from bnas_nni.cli import main
from bnas_nni.deploy import format as packed_format
from bnas_nni.deploy import kernels, runtime
from bnas_nni.deploy.export import _fold_all, _pack_unit, _unit, describe_network, packed_description
from bnas_nni.deploy.fold import bn_sign_thresholds, kernel_thresholds, threshold_signs
from bnas_nni.deploy.validate import validate_packed
from bnas_nni.errors import CheckpointError, ConfigError
from bnas_nni.genotypes import Genotype
from bnas_nni.networks import build_model
from bnas_nni.ops import make_op
from bnas_nni.quant import ActivationQuantizer, BinaryConv2d, RSign, register_activation
from bnas_nni.quant.nonlinear import Nonlinearity, register_nonlinearity

GENOTYPE = Genotype.from_dict(ALL_OPS_GENOTYPE, name='all_packed_ops')  # binary convs on reduction-cell inputs too
ISAS = kernels.supported_isas()


@register_activation('test_deploy_half_sign')
class HalfSign(ActivationQuantizer):
    """A user quantizer the engine cannot fold (its values are not {-1, 0, +1})."""

    precision = 1

    def forward(self, x):
        return 0.5 * torch.sign(x)


@register_nonlinearity('test_deploy_hardtanh')
class HardTanh(Nonlinearity):
    def forward(self, x):
        return x.clamp(-1.0, 1.0)


def randomize_(model: nn.Module, g: torch.Generator, *, exact: bool, at_zero: float = 0.3) -> None:
    """Trained-looking BN statistics and react parameters; with ``exact``, exact-sum binary weights. A fraction
    ``at_zero`` of the sign channels gets BN output 0 at input 0 and ``beta = 0``: there ``sign(0) = 0`` decides."""
    steps = torch.arange(1, 9, dtype=torch.float32) / 8
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                C = m.num_features
                zero = torch.rand(C, generator=g) < at_zero
                m.running_mean.copy_(torch.randn(C, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(C, generator=g) + 0.5)
                m.running_mean[zero] = 0.0
                if m.affine:
                    m.weight.copy_(torch.randn(C, generator=g))
                    m.bias.copy_(torch.randn(C, generator=g) * 0.5)
                    m.bias[zero] = 0.0
            elif isinstance(m, RSign):
                zero = torch.rand(m.beta.numel(), generator=g) < at_zero
                m.beta.copy_(torch.randn(m.beta.numel(), generator=g) * 0.3)
                m.beta[zero] = 0.0
            elif exact and isinstance(m, BinaryConv2d) and m.weight_quantizer is not None:
                O = m.weight.shape[0]
                v = steps[torch.randint(len(steps), (O,), generator=g)].view(O, 1, 1, 1)
                m.weight.copy_(torch.where(torch.rand(m.weight.shape, generator=g) < 0.5, -v, v))
            for name, p in m.named_parameters(recurse=False):
                if name in ('gamma', 'zeta'):
                    p.copy_(torch.randn(p.numel(), generator=g) * 0.3)
                elif name == 'slope':
                    p.copy_(torch.rand(p.numel(), generator=g) - 0.4)


def react_net(shortcut: bool, *, exact: bool = True, seed: int = 0, layers: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    cfg = dict(genotype=GENOTYPE, init_channels=8, layers=layers, op_set='react', shortcut=shortcut)
    model = build_model('bnas-a', **cfg).eval()
    randomize_(model, torch.Generator().manual_seed(seed), exact=exact)
    return model


def float_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# -- the ops ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('affine', ['positive', 'negative', 'zero', 'none'])
def test_rsign_thresholds_give_every_sign_decision_of_the_float_model(affine):
    """sign(BN(x) - beta) from the folded thresholds, in Python and in the packing kernels of every ISA, at random
    inputs and at each threshold and one float either side of it."""
    g = torch.Generator().manual_seed(1)
    C = 70                                                        # two 64-channel words, one partial
    bn = nn.BatchNorm2d(C, affine=affine != 'none').eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(C, generator=g))
        bn.running_var.copy_(torch.rand(C, generator=g) + 0.1)
        if bn.affine:
            w = {'positive': torch.rand(C, generator=g) + 0.1, 'negative': -torch.rand(C, generator=g) - 0.1,
                 'zero': torch.randn(C, generator=g) * (torch.rand(C, generator=g) < 0.5)}[affine]
            bn.weight.copy_(w)
            bn.bias.copy_(torch.randn(C, generator=g))
    q = RSign(C)
    with torch.no_grad():
        q.beta.copy_(torch.randn(C, generator=g))
        q.beta[:5] = 0.0
    th, negate = bn_sign_thresholds(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, shift=q.beta)
    finite = torch.where(torch.isfinite(th), th, torch.zeros(()))
    near = [finite, torch.nextafter(finite, torch.tensor(np.inf)), torch.nextafter(finite, torch.tensor(-np.inf))]
    probes = torch.cat([torch.randn(40, C, generator=g) * 3, *near])
    probes = torch.where(negate, -probes, probes)               # thresholds are on -x where the BN weight is < 0
    x = probes.T.reshape(1, C, -1, 1).contiguous()              # each channel sees its own thresholds
    with torch.no_grad():
        want = q(bn(x))
    assert int((want == 0).sum()) > 0 and int((want > 0).sum()) > 0 and int((want < 0).sum()) > 0
    assert torch.equal(threshold_signs(x, th, negate), want)
    t_zero, t_pos, flip = kernel_thresholds(th, negate)
    for isa in ISAS:
        planes = kernels.extension().pack_signs(x, t_zero, t_pos, flip, 0, kernels.isa_id(isa))
        words = planes.view(-1, 2).numpy().view(np.uint64)           # [pixel * Kw, {s, m}]
        bits = np.unpackbits(words.view(np.uint8), bitorder='little').reshape(words.shape[0], 2, 64)
        s, m = bits[:, 0].reshape(x.shape[2], -1)[:, :C], bits[:, 1].reshape(x.shape[2], -1)[:, :C]
        got = torch.from_numpy(m.astype(np.float32) * (1 - 2 * s.astype(np.float32))).T.reshape_as(want)
        assert torch.equal(got, want), isa


def _engine_unit(op: nn.Module) -> runtime._Unit:
    u = _unit(op, 'op')
    return runtime._Unit(_pack_unit(u, _fold_all([u] if u['input'] == 'sign' else [])))


@pytest.mark.parametrize('nonlinearity', ['rprelu', 'prelu', 'relu', 'identity'])
@pytest.mark.parametrize('shortcut', [False, True])
def test_every_react_op_gives_the_float_bits(nonlinearity, shortcut):
    """Each binary op as a react block (stride 1 and 2, with and without the shortcut): the engine's output equals
    the float op's bit for bit with exact-sum weights, on every ISA, also accumulated into a node."""
    g = torch.Generator().manual_seed(2)
    C = 24
    for name in ('bin_conv_3x3', 'bin_conv_5x5', 'bin_dil_conv_3x3', 'bin_dil_conv_5x5'):
        for stride in (1, 2):
            torch.manual_seed(3)
            op = make_op(name, C, stride, binarizer='scaled_sign', activation='rsign', nonlinearity=nonlinearity,
                         shortcut=shortcut).eval()
            randomize_(op, g, exact=True)
            x = torch.randn(2, C, 10, 10, generator=g)
            with torch.no_grad():
                want = op(x)
            unit = _engine_unit(op)
            assert unit.packed and unit.epilogue == (shortcut or nonlinearity in ('rprelu', 'prelu'))
            assert (unit.shortcut is not None) == shortcut
            for isa in ISAS:
                got = unit(x.contiguous(memory_format=torch.channels_last), kernels.isa_id(isa))
                assert torch.equal(got, want), (name, stride, isa)
                node = want.clone().contiguous(memory_format=torch.channels_last)
                unit(x.contiguous(memory_format=torch.channels_last), kernels.isa_id(isa), out=node, accumulate=True)
                assert torch.equal(node, want + want), (name, stride, isa)


def test_random_scaled_sign_weights_agree_to_float_reassociation():
    g = torch.Generator().manual_seed(4)
    op = make_op('bin_conv_3x3', 32, 1, binarizer='scaled_sign', activation='rsign', nonlinearity='rprelu',
                 shortcut=True).eval()
    randomize_(op, g, exact=False)
    x = torch.randn(2, 32, 9, 9, generator=g)
    with torch.no_grad():
        want = op(x)
    got = _engine_unit(op)(x.contiguous(memory_format=torch.channels_last), kernels.isa_id(ISAS[-1]))
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


# -- whole networks --------------------------------------------------------------------------------------------

def cell_outputs_float(model: nn.Module, x: torch.Tensor) -> list:
    outs = []
    hooks = [c.register_forward_hook(lambda m, i, o: outs.append(o.clone())) for c in model.cells]
    float_logits(model, x)
    for h in hooks:
        h.remove()
    return outs


def cell_outputs_engine(net: deploy.PackedNetwork, x: torch.Tensor, monkeypatch) -> list:
    outs = []
    call = runtime._Cell.__call__

    def spy(self, *args, **kwargs):
        out = call(self, *args, **kwargs)
        outs.append(out.contiguous())
        return out

    with monkeypatch.context() as m:
        m.setattr(runtime._Cell, '__call__', spy)
        m.setattr(runtime, 'CELL_CHAINS', False)     # each cell on its own, so that its output can be seen
        logits = net(x)
    return outs, logits


def react_net_with(shortcut: bool, nonlinearity: str, *, exact: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model('bnas-a', genotype=GENOTYPE, init_channels=8, layers=5, op_set='react', shortcut=shortcut,
                        nonlinearity=nonlinearity).eval()
    randomize_(model, torch.Generator().manual_seed(seed), exact=exact)
    return model


def bits(t: torch.Tensor) -> torch.Tensor:
    """The float32 values as their bit patterns (``torch.equal`` takes -0.0 for 0.0)."""
    return t.contiguous().view(torch.int32)


class PathSpy:
    """Counts the cells run as cell programs (``_Cell._run_program``, or in a chain, ``PackedNetwork._chain``) and
    op by op (``_Cell._run``)."""

    def __init__(self, monkeypatch) -> None:
        self.program = self.op_by_op = 0
        run_program, run, chain = runtime._Cell._run_program, runtime._Cell._run, runtime.PackedNetwork._chain

        def spy_program(cell, *args):
            self.program += 1
            return run_program(cell, *args)

        def spy_chain(net, cells, *args):
            self.program += len(cells)
            return chain(net, cells, *args)

        def spy_run(cell, *args):
            self.op_by_op += 1
            return run(cell, *args)

        monkeypatch.setattr(runtime._Cell, '_run_program', spy_program)
        monkeypatch.setattr(runtime._Cell, '_run', spy_run)
        monkeypatch.setattr(runtime.PackedNetwork, '_chain', spy_chain)

    def reset(self) -> None:
        self.program = self.op_by_op = 0


@pytest.mark.parametrize('nonlinearity', ['rprelu', 'prelu', 'relu', 'identity'])
@pytest.mark.parametrize('shortcut', [False, True])
def test_react_network_bit_for_bit_on_every_isa(shortcut, nonlinearity, monkeypatch):
    """Exact-sum weights: every cell output of the engine is the float model's bit for bit, as a cell program
    (the default) and op by op, on every ISA, at batch 3 and 1; every cell really takes the path asked for."""
    model = react_net_with(shortcut, nonlinearity, exact=True, seed=0)
    kinds = {type(m.shortcut).__name__ for m in model.modules() if hasattr(m, 'shortcut')}
    assert kinds == {'NoneType', 'Identity', 'AvgPool2d'} if shortcut else kinds <= {'NoneType'}
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    net = deploy.PackedNetwork(packed_description(describe_network(model)))
    assert all(c.chunkable for c in net.cells)                          # all packed: cell programs
    epilogues = [u for c in net.cells for u in c._program_units if u.epilogue]
    if shortcut or nonlinearity in ('rprelu', 'prelu'):
        assert epilogues
        shortcuts = {u.shortcut for u in epilogues}
        assert shortcuts >= {'identity', 'avg_pool'} if shortcut else shortcuts == {None}
    monkeypatch.setattr(runtime, 'CACHE_BUDGET', 1)                      # op by op: image by image
    paths = PathSpy(monkeypatch)
    for batch in (x, x[:1]):          # the float model at the same batch size: its fp32 convs' bits depend on it
        want_cells, ref = cell_outputs_float(model, batch), float_logits(model, batch)
        for isa in ISAS:
            net.set_isa(isa)
            for program in (True, False):
                monkeypatch.setattr(runtime, 'CELL_PROGRAM', program)
                paths.reset()
                cells, logits = cell_outputs_engine(net, batch, monkeypatch)
                if program:                                              # every cell, none op by op
                    assert paths.program >= len(net.cells) and paths.op_by_op == 0
                else:
                    assert paths.program == 0 and paths.op_by_op >= len(net.cells)
                for k, (got, want) in enumerate(zip(cells, want_cells)):
                    # equal values: the engine (both paths alike) can give -0.0 where the float model gives +0.0
                    # (seen with PReLU without shifts); no sign decision or later sum tells them apart
                    assert torch.equal(got, want), (isa, program, len(batch), k)
                    if program:
                        prog_cells = cells
                    else:                                                # the two paths: bits, zeros' signs too
                        assert torch.equal(bits(got), bits(prog_cells[k])), (isa, len(batch), k)
                assert (logits - ref).abs().max().item() <= 1e-5, (isa, program)
                if program:                                              # chains of cells: the same bits
                    paths.reset()
                    assert torch.equal(bits(net(batch)), bits(logits)), (isa, len(batch))
                    assert paths.program >= len(net.cells) and paths.op_by_op == 0


@pytest.mark.parametrize('nonlinearity', ['rprelu', 'prelu', 'relu', 'identity'])
def test_react_cell_programs_give_the_op_by_op_bits(nonlinearity, monkeypatch):
    """Ordinary random weights, shortcuts of both kinds: the cell programs give the op-by-op path's logits bit for
    bit on every ISA, at batch 1, 3 and 7 (above two images per thread, where runs of cells go a few images at a
    time), and the profile names the react layers. (Against the float model such weights agree only to float
    reassociation, which can move a value across a sign threshold: the exact-sum test above checks that.)"""
    model = react_net_with(True, nonlinearity, exact=False, seed=12)
    net = deploy.PackedNetwork(packed_description(describe_network(model)))
    monkeypatch.setattr(torch, 'get_num_threads', lambda: 2)            # the run group is 4 images
    paths = PathSpy(monkeypatch)
    x = torch.randn(7, 3, 16, 16, generator=torch.Generator().manual_seed(12))
    for batch in (x[:1], x[:3], x):
        for isa in ISAS:
            net.set_isa(isa)
            got = {}
            for program in (True, False):
                monkeypatch.setattr(runtime, 'CELL_PROGRAM', program)
                paths.reset()
                got[program] = net(batch)
                assert (paths.program > 0, paths.op_by_op > 0) == (program, not program)
            assert torch.equal(bits(got[True]), bits(got[False])), (isa, len(batch))
    monkeypatch.setattr(runtime, 'CELL_PROGRAM', True)
    logits, layers = net.profile(x)
    assert torch.equal(logits, got[True])
    kinds = {kind for _, kind, _ in layers}
    react = {'shortcut + ' + ('rprelu' if nonlinearity == 'rprelu' else 'prelu'), 'shortcut'}
    assert any(k.endswith(r) for k in kinds for r in react), kinds


@pytest.mark.parametrize('op_set', ['paper', 'react'])
def test_threads_sharing_an_image_give_the_same_bits(op_set):
    """With fewer images than threads, a cell program's threads split each image by rows, with a barrier between
    stages (when the image holds enough work: tiny cells stay on one thread). Every all-packed cell of a network
    (normal and reduction, pools, dilated and 1x1 convs, react shortcuts), on 20x20 and 9x9 maps: at 2 and 3
    threads (3: rows that do not split evenly, and more threads than this machine's cores) and batch 1 and 2, on
    every ISA, the cell's output is the one of a single thread taking whole images, bit for bit, and the cell
    reports how many threads shared an image. (Whole networks are not compared across thread counts: PyTorch's
    own float convs need not give the same bits at 3 threads.)"""
    if op_set == 'react':
        model = react_net_with(True, 'rprelu', exact=False, seed=14)
    else:
        torch.manual_seed(14)
        model = build_model('bnas-a', genotype=GENOTYPE, init_channels=8, layers=5).eval()
        randomize_(model, torch.Generator().manual_seed(14), exact=False)
    net = deploy.PackedNetwork(packed_description(describe_network(model)))
    cells = [c for c in net.cells if c.chunkable]
    assert any(c.reduction for c in cells) and any(not c.reduction for c in cells)
    g = torch.Generator().manual_seed(14)
    ext = kernels.extension()
    threshold = ext.team_min_macs()
    # cells this small stay on one thread by default (waking a second costs more than it saves) ...
    torch.set_num_threads(2)
    s0 = torch.randn(1, cells[0].pre0.in_ch, 9, 9, generator=g).contiguous(memory_format=torch.channels_last)
    s1 = torch.randn(1, cells[0].pre1.in_ch, 9, 9, generator=g).contiguous(memory_format=torch.channels_last)
    cells[0](s0, s1, kernels.isa_id(ISAS[-1]), runtime._Timer())
    assert cells[0].team == 1
    ext.team_min_macs(0)          # ... so the test makes every cell share its images
    try:
        for cell in cells:
            for H in (20, 9):
                OH = (H - 1) // (2 if cell.reduction else 1) + 1
                s0 = torch.randn(2, cell.pre0.in_ch, H * cell.pre0.stride, H * cell.pre0.stride, generator=g)
                s1 = torch.randn(2, cell.pre1.in_ch, H, H, generator=g)
                s0, s1 = (s.contiguous(memory_format=torch.channels_last) for s in (s0, s1))
                res = None
                if isinstance(cell.residual, runtime._Unit):
                    res = torch.randn(2, len(cell.concat) * cell.C, OH, OH, generator=g)
                for isa in ISAS:
                    isa_id = kernels.isa_id(isa)
                    for n in (1, 2):
                        args = (s0[:n], s1[:n], isa_id, runtime._Timer())
                        r = None if res is None else res[:n]
                        torch.set_num_threads(1)
                        want = cell(*args, res=r)
                        assert cell.team == 1
                        for threads in (2, 3):
                            torch.set_num_threads(threads)
                            got = cell(*args, res=r)
                            assert torch.equal(bits(got), bits(want)), (cell.name, H, isa, threads, n)
                            assert cell.team == (threads if n < threads else 1), (cell.name, threads, n)
    finally:
        torch.set_num_threads(2)
        ext.team_min_macs(threshold)


def test_react_cell_program_pools_odd_maps_as_pytorch():
    """A reduction cell on 9x9 maps: its pooled shortcuts then average partial 2x2 windows (ceil mode, padding not
    counted); the cell program gives the bits of the op-by-op path, which runs PyTorch's avg_pool2d."""
    model = react_net_with(True, 'rprelu', exact=False, seed=13)
    net = deploy.PackedNetwork(packed_description(describe_network(model)))
    cell = next(c for c in net.cells if c.reduction and c.chunkable)
    assert any(u.shortcut == 'avg_pool' for u in cell._program_units)
    g = torch.Generator().manual_seed(13)
    H = 9
    s0 = torch.randn(2, cell.pre0.in_ch, H * cell.pre0.stride, H * cell.pre0.stride, generator=g)
    s1 = torch.randn(2, cell.pre1.in_ch, H, H, generator=g)
    s0, s1 = (s.contiguous(memory_format=torch.channels_last) for s in (s0, s1))
    timer = runtime._Timer()
    for isa in ISAS:
        outs = [torch.full((2, len(cell.concat) * cell.C, 5, 5), float('nan')).contiguous(
            memory_format=torch.channels_last) for _ in range(2)]
        cell._run_program(s0, s1, outs[0], None, kernels.isa_id(isa), timer)
        cell._run(s0, s1, outs[1], None, kernels.isa_id(isa), timer)
        assert torch.equal(outs[0], outs[1]), isa


def test_random_react_network_agrees_to_float_reassociation():
    model = react_net(True, exact=False, seed=6)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    ref = float_logits(model, x)
    got = deploy.PackedNetwork(packed_description(describe_network(model)))(x)
    assert (got - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())
    assert got.argmax(1).tolist() == ref.argmax(1).tolist()


def test_react_file_is_version_3_and_round_trips(tmp_path):
    model = react_net(True, exact=False, seed=7)
    path = tmp_path / 'react.bnp'
    report = deploy.export_packed(model, path)
    assert report['binary_convs'] > 0 and report['packed_bytes'] * 10 < report['fp32_bytes']
    raw = path.read_bytes()
    (n,) = struct.unpack('<Q', raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = json.loads(header['__metadata__']['bnas_nni'])
    assert meta['version'] == packed_format.VERSION == 3
    assert 'cells.0.ops.0.prelu.gamma' in header and 'beta' not in json.dumps(meta)   # RSign's beta is folded
    x = torch.randn(2, 3, 16, 16)
    loaded = deploy.load(path)
    assert torch.equal(loaded(x), deploy.PackedNetwork(packed_description(describe_network(model)))(x))


def _first_unit(packed):
    return packed['network']['cells'][0]['ops'][0]


@pytest.mark.parametrize('edit, field', [
    (lambda u: u['prelu'].__setitem__('slope', torch.zeros(3)), 'ops[0].prelu.slope'),
    (lambda u: u['prelu'].pop('zeta'), 'ops[0].prelu'),
    (lambda u: u['prelu'].__setitem__('zeta', torch.full_like(u['prelu']['zeta'], float('inf'))), 'prelu.zeta'),
    (lambda u: u['prelu'].__setitem__('scale', u['prelu']['slope']), 'prelu.scale'),
    (lambda u: u.__setitem__('relu', True), 'ops[0].relu'),
    (lambda u: u.__setitem__('shortcut', 'conv'), 'ops[0].shortcut'),
    (lambda u: u.__setitem__('shortcut', 'avg_pool'), 'ops[0].shortcut'),   # a stride-1 op
    (lambda u: u.__setitem__('prelu', [1, 2]), 'ops[0].prelu'),
])
def test_bad_react_fields_are_refused_in_one_line(edit, field):
    model = react_net(True, exact=False, seed=8, layers=3)
    packed = packed_description(describe_network(model))
    unit = _first_unit(packed)
    assert unit['shortcut'] == 'identity' and set(unit['prelu']) == {'gamma', 'slope', 'zeta'}
    edit(unit)
    with pytest.raises(CheckpointError) as err:
        validate_packed(packed, 'crafted.bnp')
    assert '\n' not in str(err.value) and field in str(err.value) and 're-export' in str(err.value)


def test_react_fields_in_a_version_2_file_are_refused(tmp_path, monkeypatch):
    model = react_net(False, exact=False, seed=9, layers=3)
    monkeypatch.setattr(packed_format, 'needed_version', lambda network: 2)
    deploy.export_packed(model, tmp_path / 'v2.bnp')
    with pytest.raises(CheckpointError, match=r'prelu is a format version 3 field in a version 2 file'):
        deploy.load(tmp_path / 'v2.bnp')


# -- ONNX ------------------------------------------------------------------------------------------------------

def test_onnx_of_a_react_network_matches_pytorch(tmp_path):
    model = react_net(True, exact=False, seed=10)
    path = tmp_path / 'react.onnx'
    deploy.export_onnx(model, path)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    nodes = {n.name: n for n in proto.graph.node}
    producer = {o: n for n in proto.graph.node for o in n.output}
    binary = json.loads({p.key: p.value for p in proto.metadata_props}['bnas_nni.binary_convs'])
    n_binary = sum(1 for m in model.modules() if isinstance(m, BinaryConv2d) and m.weight_quantizer is not None)
    assert len(binary) == n_binary > 0
    for b in binary:                                    # BN -> Sub(beta) -> Sign -> Conv
        sign, conv = nodes[b['sign']], nodes[b['conv']]
        assert conv.input[0] == sign.output[0] and producer[sign.input[0]].name == b['shift']
        assert nodes[b['shift']].op_type == 'Sub' and producer[nodes[b['shift']].input[0]].op_type == \
            'BatchNormalization'
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count('PRelu') == n_binary and 'AveragePool' in ops
    rprelu = [n for n in proto.graph.node if n.op_type == 'PRelu']
    assert all(producer[n.input[0]].op_type == 'Sub' for n in rprelu)   # Sub(gamma) -> PRelu -> Add(zeta)
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(10))
    got = sess.run(None, {'images': x.numpy()})[0]
    want = float_logits(model, x).numpy()
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))
    assert (got.argmax(1) == want.argmax(1)).all()


# -- the command line ------------------------------------------------------------------------------------------

def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: '), err
    return err[0]


def test_cli_exports_a_react_checkpoint_and_run_directory(tmp_path, capsys):
    model = react_net(True, exact=False, seed=11)
    run = tmp_path / 'run'
    save_checkpoint(model, run / 'checkpoint.pt')
    x = torch.randn(2, 3, 32, 32)
    for source in (run / 'checkpoint.pt', run):
        out = tmp_path / f'{source.name}.bnp'
        assert main(['export', '--checkpoint', str(source), '--out', str(out)]) == 0
        printed = capsys.readouterr().out
        assert 'verified' in printed and 'warning' not in printed
        assert (deploy.load(out)(x) - float_logits(model, x)).abs().max().item() <= 1e-4
    assert main(['export', '--checkpoint', str(run), '--format', 'onnx', '--out', str(tmp_path / 'm.onnx')]) == 0
    assert 'onnxruntime' in capsys.readouterr().out
    assert main(['export', '--check', str(tmp_path / 'run.bnp')]) == 0
    assert capsys.readouterr().out.count('identical') == len(ISAS)


@pytest.mark.parametrize('key, name', [('activation', 'test_deploy_half_sign'),
                                       ('nonlinearity', 'test_deploy_hardtanh')])
def test_unfoldable_user_quantizer_is_one_line_exit_2_and_no_file(tmp_path, capsys, key, name):
    model = build_model('bnas-a', genotype='latest_cell', init_channels=8, layers=2, op_set='react',
                        **{key: name}).eval()
    save_checkpoint(model, tmp_path / 'ck.pt')
    with pytest.raises(ConfigError, match=name):
        deploy.export_packed(model, tmp_path / 'x.bnp')
    for fmt in ('packed', 'onnx'):
        assert main(['export', '--checkpoint', str(tmp_path / 'ck.pt'), '--format', fmt,
                     '--out', str(tmp_path / f'x.{fmt}')]) == 2
        line = _one_error_line(capsys)
        assert name in line and 'not supported by the packed engine' in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ck.pt']
