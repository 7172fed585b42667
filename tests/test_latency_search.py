"""Latency-aware search: the additive latency model (predict, expected_ms, files) and its use in BinaryDARTS."""
from __future__ import annotations

import json

import pytest
import torch

from bnas_nni.errors import ConfigError
from bnas_nni.genotypes import Genotype
from bnas_nni.latency import LatencyModel
from bnas_nni.latency.model import edge_nodes, num_edges

OPS = ('zeroise', 'max_pool_3x3', 'bin_conv_3x3')


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
