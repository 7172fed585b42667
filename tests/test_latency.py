"""The latency model measured on the packed engine: the measurement and its cache, predict on a hand table, the
NNI profiler (frozen samples, RangeProfilerFilter, ExpectationProfilerPenalty) and the CLI on a tiny network."""
from __future__ import annotations

import json
import random
import warnings

warnings.filterwarnings('ignore', message='.*is found to be not a nn.Module.*')

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from nni.nas.oneshot.pytorch.profiler import ExpectationProfilerPenalty, RangeProfilerFilter  # noqa: E402

from bnas_nni.cli import main  # noqa: E402
from bnas_nni.errors import ConfigError  # noqa: E402
from bnas_nni.genotypes import CELL_TYPES, Genotype, save_genotype  # noqa: E402
from bnas_nni.latency import LatencyModel, PackedLatencyProfiler, machine_key, measure_latency_model  # noqa: E402
from bnas_nni.latency import profile as lp  # noqa: E402
from bnas_nni.latency.model import num_edges  # noqa: E402
from bnas_nni.ops import PRIMITIVES  # noqa: E402
from bnas_nni.space import BNASSpace  # noqa: E402

#: the tiny network every measuring test shares (the bnas-tiny space at 16x16): seconds to profile
TINY = dict(ops=PRIMITIVES, num_nodes=2, init_channels=4, layers=3, image_size=16, num_classes=10, family='cifar',
            batch=1, threads=1, repeats=1, calibration=0)


@pytest.fixture
def cache(monkeypatch, tmp_path_factory):
    folder = tmp_path_factory.getbasetemp() / 'latency-cache'
    monkeypatch.setenv(lp.CACHE_ENV, str(folder))
    return folder


@pytest.fixture
def tiny_model(cache) -> LatencyModel:
    """Measured once per session (later calls hit the cache in the shared folder)."""
    return measure_latency_model(**TINY)


def _hand_model(num_nodes: int = 2, seed: int = 0) -> LatencyModel:
    g = torch.Generator().manual_seed(seed)
    tables = {t: torch.rand(num_edges(num_nodes), len(PRIMITIVES), generator=g, dtype=torch.float64)
              for t in CELL_TYPES}
    return LatencyModel.from_tables(PRIMITIVES, num_nodes, tables, 3.25, {'note': 'hand table'})


def test_machine_key_names_cpu_isa_threads_batch():
    key = machine_key(3, 32)
    assert key['threads'] == 3 and key['batch'] == 32
    assert key['isa'] in ('portable', 'avx2', 'avx512') and key['cpu']


def test_measured_model_covers_every_op_where_networks_put_it(tiny_model, cache):
    m = tiny_model
    assert m.ops == tuple(PRIMITIVES) and m.num_nodes == 2
    z = m.ops.index('zeroise')
    for t in CELL_TYPES:
        assert m.edge_ms[t].shape == (num_edges(2), len(PRIMITIVES))
        assert torch.all(m.edge_ms[t][:, z] == 0)          # zeroise adds nothing to the base network
        assert torch.all(m.edge_ms[t] >= 0)
    # a 5x5 binary conv on every slot costs the network something in each input class
    per_slot = m.meta['per_slot_ms']
    for cls in ('normal', 'reduce_s2', 'reduce_s1'):
        assert f'{cls}/bin_conv_5x5' in per_slot
    # reduction cells: the stride-2 rows (inputs 0, 1) and the stride-1 row (node 1's input 2) come from
    # different probes
    k = m.ops.index('bin_conv_5x5')
    assert float(m.edge_ms['reduce'][4, k]) == pytest.approx(per_slot['reduce_s1/bin_conv_5x5'])
    assert float(m.edge_ms['reduce'][0, k]) == pytest.approx(per_slot['reduce_s2/bin_conv_5x5'])
    assert m.fixed_ms > 0 and m.meta['base_ms'] == pytest.approx(m.fixed_ms)
    assert set(m.meta['fixed_parts_ms']) >= {'stem', 'preprocess', 'residual', 'head'}
    assert m.meta['machine'] == machine_key(1, 1) and m.meta['engine_version'] == lp.engine_version()


def test_cache_round_trip_without_measuring(tiny_model, cache, monkeypatch):
    files = sorted(cache.glob('*.json'))
    assert len(files) == 1 and not list(cache.glob('.*.tmp'))
    assert json.loads(files[0].read_text())['meta']['network']['layers'] == 3

    def no_timing(*a, **k):
        raise AssertionError('the cached model must be reused, not measured again')
    monkeypatch.setattr(lp, '_time_all', no_timing)
    again = measure_latency_model(**TINY)
    assert again.fixed_ms == tiny_model.fixed_ms
    assert all(torch.equal(again.edge_ms[t], tiny_model.edge_ms[t]) for t in CELL_TYPES)
    # summary's lookup: a genotype's ops are enough, any other network is a miss
    net = {k: TINY[k] for k in ('num_nodes', 'init_channels', 'layers', 'image_size', 'num_classes', 'family',
                                'batch', 'threads')}
    assert lp.cached_model(ops=['bin_conv_3x3', 'max_pool_3x3'], cover=True, **net) is not None
    assert lp.cached_model(ops=['bin_conv_3x3', 'max_pool_3x3'], **net) is None
    assert lp.cached_model(ops=PRIMITIVES, **{**net, 'layers': 4}) is None
    assert lp.cached_model(ops=PRIMITIVES, **{**net, 'batch': 2}) is None
    # a damaged cache file is measured again, not an error
    files[0].write_text('{"format": "bnas-nni-latency-model", "version": 1')
    monkeypatch.undo()
    monkeypatch.setenv(lp.CACHE_ENV, str(cache))
    remeasured = measure_latency_model(**TINY)
    assert LatencyModel.load(files[0]).fixed_ms == remeasured.fixed_ms


def test_holdout_genotypes_are_timed_with_the_probes_and_kept_out_of_the_fit(cache, monkeypatch):
    rng = random.Random(7)
    holdout = [lp.random_genotype(PRIMITIVES, 2, rng, name=f'h{i}') for i in range(3)]
    seen = []
    real = lp._time_all

    def spy(nets, x, repeats):
        seen.append(len(nets))
        return real(nets, x, repeats)
    monkeypatch.setattr(lp, '_time_all', spy)
    with_fit = {**TINY, 'calibration': 4}
    plain = measure_latency_model(**with_fit, cache=False)
    model = measure_latency_model(**with_fit, cache=False, holdout=holdout)
    assert seen[1] == seen[0] + 3                       # one round-robin: probes, calibration and hold-out alike
    h = model.meta['holdout']
    assert h['genotypes'] == [str(g) for g in holdout] and len(h['measured_ms']) == 3
    assert h['predicted_ms'] == [model.predict(g) for g in holdout]
    rel = [abs(p - m) / m for p, m in zip(h['predicted_ms'], h['measured_ms'])]
    assert h['rel_error']['worst'] == pytest.approx(max(rel))
    # the fit saw the same calibration networks only: the same kind of correction is considered for both
    assert model.meta['fit']['calibration_genotypes'] == plain.meta['fit']['calibration_genotypes'] == 4
    # the command line reports it
    assert main(['latency', 'profile', '--space', 'bnas-tiny', '--init-channels', '4', '--layers', '3',
                 '--image-size', '16', '--threads', '1', '--calibration', '2', '--holdout', '2', '--no-cache']) == 0


def test_probe_networks_have_no_zero_signs_after_xnor_centring():
    w = torch.tensor([[[[0.5]], [[0.5]]], [[[0.0]], [[0.3]]], [[[0.2]], [[-0.2]]]])   # [O=3, C=2, 1, 1]
    assert bool(((w - w.mean(dim=1, keepdim=True)) == 0).any())
    lp._no_zero_signs(w)
    centred = w - w.mean(dim=1, keepdim=True)
    assert not bool((w == 0).any()) and not bool((centred == 0).any())


def test_bad_measurement_arguments_are_one_line():
    with pytest.raises(ConfigError, match='batch'):
        measure_latency_model(**{**TINY, 'batch': 0})
    with pytest.raises(ConfigError, match='calibration'):
        measure_latency_model(**{**TINY, 'calibration': -1})
    with pytest.raises(ConfigError, match='unknown op'):
        measure_latency_model(**{**TINY, 'ops': ['zeroise', 'conv_9x9']})


def test_predict_on_a_hand_table():
    m = _hand_model()
    g = Genotype(normal=(('bin_conv_3x3', 0), ('max_pool_3x3', 1), ('zeroise', 2), ('bin_conv_5x5', 0)),
                 reduce=(('avg_pool_3x3', 1), ('bin_dil_conv_3x3', 0), ('bin_dil_conv_5x5', 2), ('bin_conv_3x3', 1)))
    col = {op: k for k, op in enumerate(PRIMITIVES)}
    n, r = m.edge_ms['normal'], m.edge_ms['reduce']
    # rows: node 0 inputs 0, 1 -> rows 0, 1; node 1 inputs 0, 1, 2 -> rows 2, 3, 4
    want = (3.25 + n[0, col['bin_conv_3x3']] + n[1, col['max_pool_3x3']] + n[4, col['zeroise']]
            + n[2, col['bin_conv_5x5']] + r[1, col['avg_pool_3x3']] + r[0, col['bin_dil_conv_3x3']]
            + r[4, col['bin_dil_conv_5x5']] + r[3, col['bin_conv_3x3']])
    assert m.predict(g) == pytest.approx(float(want), rel=1e-12)


# --------------------------------------------------------------------------- the NNI profiler

@pytest.fixture(scope='module')
def tiny_space() -> BNASSpace:
    return BNASSpace(init_channels=4, layers=3, num_nodes=2)


def test_profiler_on_frozen_samples_equals_predict(tiny_space):
    m = _hand_model()
    profiler = PackedLatencyProfiler(tiny_space, m)
    assert set(profiler.expression.simplify()) == set(tiny_space.simplify())
    for seed in range(5):
        sample = {}
        tiny_space.random(memo=sample, random_state=np.random.RandomState(seed))
        assert profiler.profile(sample) == pytest.approx(m.predict(Genotype.from_arch_dict(sample)), rel=1e-12)
    g = lp.random_genotype(PRIMITIVES, 2, random.Random(7))
    assert profiler.profile(g.to_arch_dict()) == pytest.approx(m.predict(g), rel=1e-12)


def test_range_filter_rejects_a_sample_over_budget(tiny_space):
    m = _hand_model()
    profiler = PackedLatencyProfiler(tiny_space, m)
    rng = random.Random(3)
    samples = [lp.random_genotype(PRIMITIVES, 2, rng).to_arch_dict() for _ in range(6)]
    lat = sorted((profiler.profile(s), i) for i, s in enumerate(samples))
    budget = (lat[2][0] + lat[3][0]) / 2
    keep = RangeProfilerFilter(profiler, max=budget)
    assert [keep(samples[i]) for _, i in lat] == [True] * 3 + [False] * 3


def test_expectation_under_uniform_probabilities_is_expected_ms(tiny_space, tmp_path):
    m = _hand_model()
    m.save(tmp_path / 'lat.json')
    profiler = PackedLatencyProfiler(tiny_space, str(tmp_path / 'lat.json'))
    uniform = {label: {v: 1.0 / len(c.values) for v in c.values} for label, c in tiny_space.simplify().items()}
    penalty = ExpectationProfilerPenalty(profiler, baseline=10.0)
    K = len(PRIMITIVES)
    want = m.expected_ms({t: torch.full((num_edges(2), K), 1.0 / K, dtype=torch.float64) for t in CELL_TYPES})
    assert penalty.profile(uniform) == pytest.approx(float(want), rel=1e-12)
    loss, details = penalty(torch.tensor(1.0), uniform)
    assert float(details['penalty']) == pytest.approx(float(want), rel=1e-12)
    # a non-uniform op distribution on one slot moves the expectation by exactly that slot's share
    skewed = dict(uniform)
    skewed['normal/op_2_0'] = {op: float(op == 'bin_conv_5x5') for op in PRIMITIVES}
    k5 = PRIMITIVES.index('bin_conv_5x5')
    slot = sum(0.5 * (float(m.edge_ms['normal'][j, k5]) - float(m.edge_ms['normal'][j].mean())) for j in (0, 1))
    assert penalty.profile(skewed) == pytest.approx(float(want) + slot, rel=1e-12)


def test_profiler_refuses_a_model_of_another_space(tiny_space):
    with pytest.raises(ConfigError, match='nodes'):
        PackedLatencyProfiler(tiny_space, _hand_model(num_nodes=3))
    other = LatencyModel.from_tables(PRIMITIVES[:3], 2, {t: torch.zeros(num_edges(2), 3) for t in CELL_TYPES}, 1.0)
    with pytest.raises(ConfigError, match='ops'):
        PackedLatencyProfiler(tiny_space, other)


# --------------------------------------------------------------------------- the CLI

def test_cli_profile_predict_summary(tiny_model, cache, tmp_path, capsys, monkeypatch):
    out = tmp_path / 'lat.json'
    flags = ['--threads', '1', '--batch', '1', '--image-size', '16', '--repeats', '1']
    # the model of these flags is cached (tiny_model): profile reads it back and writes --out
    rc = main(['latency', 'profile', '--space', 'bnas-tiny', *flags, '--calibration', '0', '--out', str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and out.is_file() and 'bin_conv_5x5' in text and 'fixed part' in text
    assert LatencyModel.load(out).fixed_ms == tiny_model.fixed_ms
    g = lp.random_genotype(PRIMITIVES, 2, random.Random(1), name='g')
    save_genotype(g, tmp_path / 'g.yaml')
    rc = main(['latency', 'predict', str(tmp_path / 'g.yaml'), '--table', str(out), '--measure', '--repeats', '1'])
    text = capsys.readouterr().out
    assert rc == 0
    assert f'predicted latency of g: {tiny_model.predict(g):.3f} ms' in text and 'measured latency' in text
    rc = main(['summary', str(tmp_path / 'g.yaml'), '--init-channels', '4', '--layers', '3', '--latency', str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and f'predicted {tiny_model.predict(g):.3f} ms' in text


@pytest.mark.parametrize('argv, words', [
    (['latency', 'profile', '--space', 'no-such-space'], 'no-such-space'),
    (['latency', 'predict', 'latest_cell', '--table', 'missing.json'], 'missing.json'),
    (['latency', 'profile', '--space', 'bnas-tiny', '--out', '.'], 'directory'),
])
def test_cli_bad_input_is_one_line(argv, words, capsys, tmp_path, monkeypatch, cache):
    monkeypatch.chdir(tmp_path)
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith('error: ') and '\n' not in err and words in err
    assert list(tmp_path.iterdir()) == []


def test_cli_predict_genotype_of_other_node_count(tiny_model, capsys, tmp_path):
    tiny_model.save(tmp_path / 'lat.json')
    rc = main(['latency', 'predict', 'latest_cell', '--table', str(tmp_path / 'lat.json')])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and '4 nodes' in err and '\n' not in err


def test_fit_finds_a_systematic_scale_and_leaves_an_additive_network_alone():
    rng = random.Random(0)
    sums = [{'normal': rng.uniform(1, 5), 'reduce': rng.uniform(0.2, 1)} for _ in range(10)]
    noise = [1 + rng.uniform(-0.01, 0.01) for _ in sums]
    # the engine runs mixed cells 25 % slower than the probes say: one common scale explains it
    slower = [(2.0 + 1.25 * (s['normal'] + s['reduce'])) * e for s, e in zip(sums, noise)]
    fit = lp._fit(2.0, sums, slower, {'normal': True, 'reduce': True})
    assert fit['applied'] and fit['scale']['normal'] == pytest.approx(1.25, abs=0.05)
    assert fit['rel_error_after']['median'] < 0.02 < fit['rel_error_before']['median']
    # exactly additive up to noise: no correction beats none by leave-one-out
    additive = [2.0 + s['normal'] + s['reduce'] for s in sums]
    fit = lp._fit(2.0, sums, additive, {'normal': True, 'reduce': True})
    assert fit['rel_error_after']['median'] < 1e-9
    # an absurd scale (noise, not an effect) is never applied
    wild = [2.0 + 5.0 * (s['normal'] + s['reduce']) for s in sums]
    assert not lp._fit(2.0, sums, wild, {'normal': True, 'reduce': True})['applied']
