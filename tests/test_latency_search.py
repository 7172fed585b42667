"""Latency-aware search: the additive latency model (predict, expected_ms, files) and its use in BinaryDARTS."""
from __future__ import annotations

import csv
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.utils.data as tud

warnings.filterwarnings('ignore', message='.*is found to be not a nn.Module.*')

from bnas_nni.config import SEARCH, resolve  # noqa: E402
from bnas_nni.errors import ConfigError  # noqa: E402
from bnas_nni.genotypes import Genotype  # noqa: E402
from bnas_nni.io import load_yaml  # noqa: E402
from bnas_nni.latency import LatencyModel  # noqa: E402
from bnas_nni.latency.model import edge_nodes, num_edges  # noqa: E402
from bnas_nni.search.binary_darts import BinaryDARTS, alpha_matrices, derive_from_model  # noqa: E402
from bnas_nni.search.driver import SearchDriver  # noqa: E402
from bnas_nni.search.latency import latency_term  # noqa: E402
from bnas_nni.search.objective import (  # noqa: E402
    LatencyTerm,
    diversity_weight,
    expected_latency,
    latency_penalty,
    mean_edge_entropy,
)
from bnas_nni.search.strategies import check_strategy_options  # noqa: E402
from bnas_nni.space import BNASSpace  # noqa: E402

OPS = ('zeroise', 'max_pool_3x3', 'bin_conv_3x3')
SPACE_OPS = ('zeroise', 'max_pool_3x3', 'avg_pool_3x3', 'bin_dil_conv_3x3', 'bin_dil_conv_5x5', 'bin_conv_3x3',
             'bin_conv_5x5')


def small_model() -> LatencyModel:
    """Two nodes (5 edges) x 3 ops; entries chosen so every (cell, edge, op) sum is distinguishable."""
    normal = [[0.0, 1.0, 10.0], [0.0, 2.0, 20.0], [0.0, 3.0, 30.0], [0.0, 4.0, 40.0], [0.0, 5.0, 50.0]]
    reduce = [[0.0, 0.5, 100.0], [0.0, 0.25, 200.0], [0.0, 0.125, 300.0], [0.0, 0.0625, 400.0],
              [0.0, 0.03125, 500.0]]
    return LatencyModel.from_tables(OPS, 2, {'normal': normal, 'reduce': reduce}, 7.0, {'batch': 1})


def test_edge_layout_matches_alpha_rows():
    assert num_edges(4) == 14
    assert edge_nodes(2) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]


def test_predict_sums_fixed_and_kept_edges():
    g = Genotype(normal=(('bin_conv_3x3', 0), ('max_pool_3x3', 1), ('bin_conv_3x3', 2), ('zeroise', 0)),
                 reduce=(('max_pool_3x3', 1), ('bin_conv_3x3', 0), ('max_pool_3x3', 0), ('bin_conv_3x3', 1)))
    # normal: row0 conv 10, row1 pool 2, row4 conv 50, row2 zero 0; reduce: row1 pool .25, row0 conv 100,
    # row2 pool .125, row3 conv 400
    assert small_model().predict(g) == pytest.approx(7 + 10 + 2 + 50 + 0 + 0.25 + 100 + 0.125 + 400)


def test_predict_refuses_other_node_counts_and_ops():
    m = small_model()
    three = Genotype(normal=(('zeroise', 0),) * 6, reduce=(('zeroise', 0),) * 6)
    with pytest.raises(ConfigError, match='3 nodes'):
        m.predict(three)
    other = Genotype(normal=(('avg_pool_3x3', 0),) * 4, reduce=(('zeroise', 0),) * 4)
    with pytest.raises(ConfigError, match='avg_pool_3x3'):
        m.predict(other)


def test_expected_ms_by_hand():
    m = small_model()
    pn = torch.tensor([[0.2, 0.3, 0.5], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0]], dtype=torch.float64)
    pr = torch.full((5, 3), 1 / 3, dtype=torch.float64)
    # node 0 edges weigh 2/2, node 1 edges 2/3
    normal = 1.0 * (0.3 * 1 + 0.5 * 10) + 1.0 * 0 + (2 / 3) * (3 + 40 + 0.5 * 5)
    reduce = (1 / 3) * (1.0 * (0.5 + 100 + 0.25 + 200) + (2 / 3) * (0.125 + 300 + 0.0625 + 400 + 0.03125 + 500))
    got = m.expected_ms({'normal': pn, 'reduce': pr})
    assert got.dtype == torch.float64 and got.dim() == 0
    assert float(got) == pytest.approx(7 + normal + reduce, rel=1e-12)
    assert m.uniform_ms() == pytest.approx(7 + (1 / 3) * (1.0 * (11 + 22) + (2 / 3) * (33 + 44 + 55))
                                           + reduce, rel=1e-12)


def test_expected_ms_of_one_hot_equals_predict_when_every_edge_is_kept():
    """With one node each node has exactly two inputs, both kept: the expectation of a one-hot choice is the
    prediction of that genotype."""
    m = LatencyModel.from_tables(OPS, 1, {'normal': [[0, 1, 2], [0, 3, 4]], 'reduce': [[0, 5, 6], [0, 7, 8]]}, 1.5)
    g = Genotype(normal=(('bin_conv_3x3', 0), ('max_pool_3x3', 1)), reduce=(('max_pool_3x3', 0), ('zeroise', 1)))
    onehot = {'normal': torch.tensor([[0., 0, 1], [0, 1, 0]]), 'reduce': torch.tensor([[0., 1, 0], [1, 0, 0]])}
    assert float(m.expected_ms(onehot)) == pytest.approx(m.predict(g)) == pytest.approx(1.5 + 2 + 3 + 5)


def test_save_load_round_trip(tmp_path):
    m = small_model()
    path = tmp_path / 'lat.json'
    m.save(path)
    back = LatencyModel.load(path)
    assert back.ops == m.ops and back.num_nodes == 2 and back.fixed_ms == 7.0 and back.meta == {'batch': 1}
    for t in ('normal', 'reduce'):
        assert torch.equal(back.edge_ms[t], m.edge_ms[t])
    assert [p.name for p in tmp_path.iterdir()] == ['lat.json']


@pytest.mark.parametrize('edit, words', [
    (lambda d: d.pop('fixed_ms'), "lacks key 'fixed_ms'"),
    (lambda d: d['edge_ms']['normal'].pop(), 'shape'),
    (lambda d: d.update(version=99), 'format version 99'),
    (lambda d: d.update(ops=['zeroise', 'warp_drive', 'bin_conv_3x3']), 'warp_drive'),
    (lambda d: d['edge_ms'].update(reduce='fast'), 'reduce'),
])
def test_load_refuses_malformed_files_in_one_line(tmp_path, edit, words):
    path = tmp_path / 'lat.json'
    data = small_model().to_dict()
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=words) as info:
        LatencyModel.load(path)
    msg = str(info.value)
    assert str(path) in msg and 'latency profile' in msg and '\n' not in msg


def test_load_names_missing_and_garbled_files(tmp_path):
    with pytest.raises(ConfigError, match='does not exist'):
        LatencyModel.load(tmp_path / 'none.json')
    (tmp_path / 'bad.json').write_text('{"format": ')
    with pytest.raises(ConfigError, match='cannot be read'):
        LatencyModel.load(tmp_path / 'bad.json')


# --------------------------------------------------------------------------- the architecture-loss term


def tiny_space_model(fixed: float = 2.0) -> LatencyModel:
    """A hand-made table for bnas-tiny (2 nodes, the seven ops): binary convs cost, pools little, Zeroise
    nothing; the normal cells (two of the three) cost more than the reduction cell, later edges a bit more."""
    per_op = np.array([0.0, 0.05, 0.05, 0.8, 1.5, 1.0, 2.0])
    rows = np.arange(num_edges(2))[:, None] * 0.1 + 1.0
    return LatencyModel.from_tables(SPACE_OPS, 2, {'normal': 2 * rows * per_op, 'reduce': 0.5 * rows * per_op},
                                    fixed, {'source': 'hand-made test table'})


def test_expected_latency_of_logits_by_hand():
    m = small_model()
    gen = torch.Generator().manual_seed(0)
    alphas = {t: torch.randn(5, 3, generator=gen, dtype=torch.float64) for t in ('normal', 'reduce')}
    want = m.fixed_ms
    for t in ('normal', 'reduce'):
        for e, (node, _) in enumerate(edge_nodes(2)):
            row = [math.exp(float(v)) for v in alphas[t][e]]
            for k in range(3):
                want += 2 / (2 + node) * row[k] / sum(row) * float(m.edge_ms[t][e, k])
    assert float(expected_latency(alphas, m)) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize('nonlinear, below, above', [('positive', 0.0, 0.5), ('absolute', 0.25, 0.5),
                                                     ('linear', -0.25, 0.5)])
def test_penalty_is_nni_profiler_penalty_shape(nonlinear, below, above):
    """phi(E / target - 1): NNI's ProfilerPenalty with baseline = target, aggregate add."""
    assert float(latency_penalty(torch.tensor(7.5), 10.0, nonlinear)) == pytest.approx(below)
    assert float(latency_penalty(torch.tensor(15.0), 10.0, nonlinear)) == pytest.approx(above)
    term = LatencyTerm(small_model(), target_ms=10.0, weight=3.0, penalty=nonlinear)
    assert float(term(torch.tensor(15.0))) == pytest.approx(3 * above)


def test_penalty_matches_nni_expectation_profiler_penalty_formula():
    """The same number as NNI's ProfilerPenalty aggregation for the same profiler value."""
    from nni.nas.oneshot.pytorch.profiler import ProfilerPenalty

    for nonlinear in ('positive', 'absolute', 'linear'):
        nni_penalty = ProfilerPenalty(profiler=None, baseline=4.0, scale=0.7, nonlinear=nonlinear)
        for value in (2.5, 4.0, 6.0):
            ours = LatencyTerm(small_model(), target_ms=4.0, weight=0.7, penalty=nonlinear)
            value_t = torch.tensor(value, dtype=torch.float64)
            want = nni_penalty.aggregate_fn(torch.tensor(1.25, dtype=torch.float64),
                                            nni_penalty.nonlinear_fn(value_t / 4.0 - 1))
            assert float(1.25 + ours(torch.tensor(value, dtype=torch.float64))) == pytest.approx(float(want))


@pytest.mark.parametrize('nonlinear', ['positive', 'absolute', 'linear'])
def test_term_gradient_matches_finite_differences(nonlinear):
    m = tiny_space_model()
    term = LatencyTerm(m, target_ms=0.6 * m.uniform_ms(), weight=1.3, penalty=nonlinear)
    gen = torch.Generator().manual_seed(4)
    a_n = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    a_r = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    assert float(term.expected_ms({'normal': a_n.detach(), 'reduce': a_r.detach()})) > term.target_ms  # off the kink
    assert torch.autograd.gradcheck(lambda n, r: term(term.expected_ms({'normal': n, 'reduce': r})), (a_n, a_r),
                                    eps=1e-6, atol=1e-8, rtol=1e-6)


def test_term_validates_its_settings():
    with pytest.raises(ConfigError, match='latency_target_ms'):
        LatencyTerm(small_model(), target_ms=0.0)
    with pytest.raises(ConfigError, match='latency_weight'):
        LatencyTerm(small_model(), target_ms=1.0, weight=float('nan'))
    with pytest.raises(ConfigError, match='latency_penalty'):
        LatencyTerm(small_model(), target_ms=1.0, penalty='square')


# --------------------------------------------------------------------------- BinaryDARTS with the term


def _driver(tmp_path, halves, latency=None, epochs=2, seed=0, **kw):
    torch.manual_seed(seed)
    space = BNASSpace.from_config('bnas-tiny')
    strategy = BinaryDARTS(arc_learning_rate=3e-2, mixed_cell='fast', latency=latency)
    train, val = halves
    return SearchDriver(space, strategy, train_data=train, val_data=val, run_dir=tmp_path, epochs=epochs,
                        batch_size=32, seed=seed, tensorboard=False, log=lambda s: None, **kw)


def test_without_target_the_arch_loss_is_the_papers_bit_for_bit(tmp_path, fashion_halves):
    """No term, and a term that only measures (no target): the same loss as the paper's formula computed
    here by hand, to the bit, and the same alphas after real architecture steps."""
    runs = {}
    for key, term in (('paper', None), ('logged', LatencyTerm(tiny_space_model(), target_ms=None))):
        d = _driver(tmp_path / key, fashion_halves, latency=term)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for a in d.alphas:
                a.copy_(torch.randn(a.shape, generator=gen))
        ce = torch.tensor(1.2345678, requires_grad=True)
        loss, _, _ = d.module.arch_objective(ce, epoch=3)
        by_hand = ce - diversity_weight(3, d.module.lamda, d.module.tau) * mean_edge_entropy(
            alpha_matrices(d.model).values())
        assert torch.equal(loss, by_hand)
        x, y = next(iter(tud.DataLoader(fashion_halves[1], batch_size=32)))
        stats = [d.arch_step(x, y, epoch=e) for e in range(3)]
        assert all('expected_latency_ms' not in s for s in stats)
        runs[key] = ([s['arch_loss'] for s in stats], [a.detach().clone() for a in d.alphas])
    assert runs['paper'][0] == runs['logged'][0]
    assert all(torch.equal(a, b) for a, b in zip(runs['paper'][1], runs['logged'][1]))


def test_tight_target_ends_with_lower_expected_latency(tmp_path, fashion_halves):
    """The same search (same seed, data, steps) with and without a tight target: the target's run ends with
    a lower expected latency and a faster derived genotype; both record latency per epoch."""
    model = tiny_space_model()
    results = {}
    for key, target in (('free', None), ('tight', 0.5 * model.uniform_ms())):
        term = LatencyTerm(model, target_ms=target, weight=5.0)
        d = _driver(tmp_path / key, fashion_halves, latency=term, epochs=2, max_train_batches=2)
        cifar, _ = d.run()
        results[key] = d
        rows = list(csv.DictReader(open(tmp_path / key / 'metrics.csv')))
        assert len(rows) == 2 and all(float(r['expected_latency_ms']) > model.fixed_ms for r in rows)
        assert float(rows[-1]['expected_latency_ms']) == pytest.approx(d.history[-1]['expected_latency_ms'])
        assert d.history[-1]['predicted_latency_ms'] == pytest.approx(model.predict(derive_from_model(d.model)))
        saved = load_yaml(tmp_path / key / 'genotype.yaml')['meta']
        assert saved['predicted_latency_ms'] == pytest.approx(model.predict(cifar), abs=1e-4)
        assert saved['latency_target_ms'] == target
        log = (tmp_path / key / 'log.txt').read_text()
        assert 'E[latency]' in log
    free, tight = (results[k].history[-1] for k in ('free', 'tight'))
    assert tight['expected_latency_ms'] < free['expected_latency_ms'] - 0.1
    assert tight['expected_latency_ms'] < model.uniform_ms()


# --------------------------------------------------------------------------- config


def test_config_table_is_loaded_fitted_to_the_space_and_logged(tmp_path):
    """latency_table: the saved model with its columns in the space's op order; without a target it only
    measures; other strategies refuse the keys in one line."""
    m = tiny_space_model()
    order = [6, 0, 3, 1, 5, 2, 4]
    shuffled = LatencyModel.from_tables([SPACE_OPS[i] for i in order], 2,
                                        {t: v[:, order] for t, v in m.edge_ms.items()}, m.fixed_ms)
    shuffled.save(tmp_path / 'lat.json')
    lines = []
    cfg = resolve(SEARCH, None, {'space': 'bnas-tiny', 'latency_table': str(tmp_path / 'lat.json')})
    term = latency_term(cfg, log=lines.append)
    assert not term.active and term.model.ops == SPACE_OPS
    assert all(torch.equal(term.model.edge_ms[t], m.edge_ms[t]) for t in ('normal', 'reduce'))
    assert 'no target' in lines[0]
    cfg = resolve(SEARCH, None, {'space': 'bnas-tiny', 'latency_table': str(tmp_path / 'lat.json'),
                                 'latency_target_ms': 3.0, 'latency_weight': 0.5, 'latency_penalty': 'absolute',
                                 'latency_estimate': 'derived'})
    term = latency_term(cfg, log=lines.append)
    assert (term.active, term.target_ms, term.weight, term.penalty, term.estimate) == (True, 3.0, 0.5, 'absolute',
                                                                                       'derived')
    assert latency_term(resolve(SEARCH, None, {'space': 'bnas-tiny'})) is None
    with pytest.raises(ConfigError, match='4 nodes'):
        LatencyModel.from_tables(SPACE_OPS, 4, {t: np.zeros((14, 7)) for t in ('normal', 'reduce')}, 1.0).save(
            tmp_path / 'four.json')
        latency_term(resolve(SEARCH, None, {'space': 'bnas-tiny', 'latency_table': str(tmp_path / 'four.json')}))
    with pytest.raises(ConfigError, match='latency_target_ms and latency_table steer binary-darts'):
        check_strategy_options(resolve(SEARCH, None, {'strategy': 'darts', 'latency_target_ms': 2.0}))
    with pytest.raises(ConfigError, match='latency_target_ms must be > 0'):
        resolve(SEARCH, None, {'latency_target_ms': -1})


def test_nni_trial_metrics_carry_latency(tmp_path, monkeypatch):
    """The trial's intermediate results carry the epoch's expected and predicted latency, the final result the
    derived network's predicted latency; a search without a latency model reports neither."""
    from bnas_nni.search import reporter as reporter_module
    from bnas_nni.search.reporter import SearchTrialReporter

    class Channel:
        def __init__(self):
            self.sent = []

        def intermediate(self, metric):
            self.sent.append(('intermediate', dict(metric)))

        def final(self, metric):
            self.sent.append(('final', dict(metric)))

    monkeypatch.setattr(reporter_module, 'brief_train', lambda genotype, cfg, log=None: 55.0)
    g = Genotype(normal=(('bin_conv_3x3', 0), ('max_pool_3x3', 1), ('zeroise', 0), ('bin_conv_5x5', 2)),
                 reduce=(('max_pool_3x3', 0), ('bin_conv_3x3', 1), ('zeroise', 0), ('max_pool_3x3', 2)))
    for latency in (True, False):
        channel = Channel()
        rep = SearchTrialReporter(out_dir=tmp_path / str(latency), channel=channel)
        extra = {'expected_latency_ms': 3.25, 'predicted_latency_ms': 2.5} if latency else {}
        rep.epoch({'epoch': 0, 'val_acc': 40.0, 'entropy': 1.5, 'arch_ce': 2.0, **extra})
        rep.finish({'genotype': g, 'genotype_imagenet': g, 'supernet_val_acc': 40.0,
                    'predicted_latency_ms': 2.5 if latency else None}, cfg=None, log=lambda s: None)
        (_, inter), (_, final) = channel.sent
        if latency:
            assert inter['expected_latency_ms'] == 3.25 and inter['latency_ms'] == 2.5
            assert final['latency_ms'] == 2.5 and final['derived_acc'] == 55.0
        else:
            assert 'latency_ms' not in inter and 'expected_latency_ms' not in inter and 'latency_ms' not in final


def test_best_epoch_with_a_target_prefers_derived_networks_that_meet_it(tmp_path, fashion_halves):
    """select='best' with a target: an epoch whose derived network meets the target beats a more accurate one
    that does not; without a target, accuracy alone ranks (the paper's rule)."""
    model = tiny_space_model()
    zero = (('zeroise', 0), ('zeroise', 1)) * 2
    fast_ms = model.predict(Genotype(normal=zero, reduce=zero))
    kept = {}
    for key, target in (('target', fast_ms + 0.5), ('none', None)):
        d = _driver(tmp_path / key, fashion_halves, latency=LatencyTerm(model, target_ms=target))
        column = {'slow': SPACE_OPS.index('bin_conv_5x5'), 'fast': SPACE_OPS.index('zeroise')}
        for epoch, (speed, acc) in enumerate([('slow', 90.0), ('fast', 50.0), ('fast', 60.0), ('slow', 99.0)]):
            with torch.no_grad():
                for a in d.alphas:
                    a.zero_()
                    a[column[speed]] = 3.0
            record = d.module.record_epoch(epoch, acc)
            assert (record['predicted_latency_ms'] <= fast_ms + 0.5) == (speed == 'fast')
        kept[key] = d.module.best['epoch']
    assert kept == {'target': 2, 'none': 3}


def test_cli_search_with_a_table_and_target_reports_latency(tmp_path, capsys):
    """bnas-nni search with latency_table and latency_target_ms: the epoch line, metrics.csv columns, the final
    line and the saved genotype's meta carry the latency; a missing table is one line, exit 2, no run dir."""
    from bnas_nni.cli import main

    tiny_space_model().save(tmp_path / 'lat.json')
    common = ['search', '--config', 'experiments/search_quick_fashion.yaml', '--set', 'epochs=1',
              '--set', 'train_subset=128', '--set', 'progress=never', '--set', 'tensorboard=false']
    rc = main([*common, '--run-dir', str(tmp_path / 'run'), '--set', f'latency_table={tmp_path / "lat.json"}',
               '--set', 'latency_target_ms=4.0', '--set', 'save=lat_cell', '--set', f'out={tmp_path / "genotypes"}'])
    out = capsys.readouterr().out
    assert rc == 0
    assert 'E[latency]' in out and 'predicted latency of the derived network' in out and '(target 4 ms)' in out
    row = next(csv.DictReader(open(tmp_path / 'run' / 'metrics.csv')))
    assert float(row['expected_latency_ms']) > 2.0 and float(row['predicted_latency_ms']) >= 2.0
    meta = load_yaml(tmp_path / 'genotypes' / 'lat_cell.yaml')['meta']
    assert meta['predicted_latency_ms'] == pytest.approx(float(row['predicted_latency_ms']), abs=1e-3)
    rc = main([*common, '--run-dir', str(tmp_path / 'bad'), '--set', f'latency_table={tmp_path / "none.json"}'])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and 'none.json does not exist' in err[0]
    assert not (tmp_path / 'bad').exists()


def test_derived_estimate_has_the_derived_value_and_the_expectations_gradient():
    from bnas_nni.genotypes import derive_genotype

    m = tiny_space_model()
    gen = torch.Generator().manual_seed(7)
    alphas = {t: torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
              for t in ('normal', 'reduce')}
    expected_term = LatencyTerm(m, target_ms=1.0, weight=2.0, penalty='linear')
    derived_term = LatencyTerm(m, target_ms=1.0, weight=2.0, penalty='linear', estimate='derived')
    grads = {}
    for key, term in (('expected', expected_term), ('derived', derived_term)):
        expected = term.expected_ms(alphas)
        seen = term.penalised_ms(alphas, expected)
        want = m.predict(derive_genotype(alphas['normal'].detach(), alphas['reduce'].detach(), SPACE_OPS))
        assert float(seen) == pytest.approx(float(expected) if key == 'expected' else want, rel=1e-12)
        grads[key] = torch.autograd.grad(term(seen), list(alphas.values()))
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-15) for a, b in zip(grads['expected'], grads['derived']))
    with pytest.raises(ConfigError, match='latency_estimate'):
        LatencyTerm(m, target_ms=1.0, estimate='sampled')
