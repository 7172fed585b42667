"""Genotypes: YAML and NNI arch-dict round trips, the BNAS derivation rule, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import yaml

from bnas_nni.errors import ConfigError
from bnas_nni.genotypes import Genotype, derive_genotype, list_genotypes, load_genotype, save_genotype
from bnas_nni.ops import PRIMITIVES

OP = {name: i for i, name in enumerate(PRIMITIVES)}


def test_shipped_genotypes_match_the_official_release():
    assert {'latest_cell', 'latest_cell_zeroise'} <= set(list_genotypes())
    g = load_genotype('latest_cell_zeroise')  # bnas-original.md §3.5, 'none' -> zeroise
    assert g.normal == (('zeroise', 1), ('bin_dil_conv_3x3', 0), ('bin_conv_3x3', 1), ('zeroise', 2),
                        ('zeroise', 2), ('zeroise', 3), ('zeroise', 3), ('zeroise', 4))
    assert g.reduce == (('max_pool_3x3', 0), ('zeroise', 1), ('max_pool_3x3', 0), ('zeroise', 2),
                        ('zeroise', 3), ('zeroise', 2), ('zeroise', 3), ('zeroise', 4))
    assert g.normal_concat == g.reduce_concat == (2, 3, 4, 5) and g.name == 'latest_cell_zeroise'


@pytest.mark.parametrize('name', ['latest_cell', 'latest_cell_zeroise'])
def test_yaml_round_trip(name, tmp_path):
    g = load_genotype(name)
    path = save_genotype(g, tmp_path / 'sub' / 'copy.yaml', source='test', epoch=3)
    data = yaml.safe_load(path.read_text())
    assert data['meta'] == {'source': 'test', 'epoch': 3} and data['name'] == name
    back = load_genotype(path)
    assert back == g and back.name == name
    assert Genotype.from_dict(g.to_dict()) == g
    assert not list(tmp_path.glob('sub/.*.tmp'))  # atomic write leaves no temporary file


@pytest.mark.parametrize('name', ['latest_cell', 'latest_cell_zeroise'])
def test_arch_dict_round_trip(name):
    g = load_genotype(name)
    arch = g.to_arch_dict()
    assert len(arch) == 2 * 2 * len(g.normal)
    assert arch['normal/op_2_0'] == g.normal[0][0] and arch['normal/input_2_0'] == [g.normal[0][1]]
    assert arch['reduce/op_5_1'] == g.reduce[7][0] and arch['reduce/input_5_1'] == [g.reduce[7][1]]
    assert Genotype.from_arch_dict(arch) == g
    # a bare int input is accepted too (what a mutated sample may hold)
    flat = {k: (v[0] if isinstance(v, list) else v) for k, v in arch.items()}
    assert Genotype.from_arch_dict(flat) == g
    # custom labels
    arch2 = g.to_arch_dict(labels=('n', 'r'))
    assert 'n/op_3_1' in arch2 and Genotype.from_arch_dict(arch2, labels=('n', 'r')) == g


def test_arch_dict_errors():
    arch = load_genotype('latest_cell').to_arch_dict()
    del arch['reduce/input_4_1']
    with pytest.raises(ConfigError, match='reduce/input_4_1'):
        Genotype.from_arch_dict(arch)
    arch = load_genotype('latest_cell').to_arch_dict()
    arch['normal/input_3_0'] = [0, 1]
    with pytest.raises(ConfigError, match='one input'):
        Genotype.from_arch_dict(arch)


def _alphas():
    """Hand-made logits, 14 edges x 7 ops; every unset logit is 0, so a row's strength is its max logit."""
    a = np.zeros((14, len(PRIMITIVES)))
    # node 2 (rows 0, 1): Zeroise wins the edge from input 1
    a[0, OP['bin_conv_3x3']] = 4.0
    a[1, OP['zeroise']] = 3.0
    # node 3 (rows 2-4): Zeroise is the strongest edge overall
    a[2, OP['zeroise']] = 5.0
    a[3, OP['avg_pool_3x3']] = 4.0
    a[4, OP['bin_conv_5x5']] = 1.0
    # node 4 (rows 5-8): Zeroise wins both kept edges -> an all-zero node
    a[5, OP['bin_conv_3x3']] = 1.0
    a[6, OP['max_pool_3x3']] = 1.5
    a[7, OP['zeroise']] = 6.0
    a[8, OP['zeroise']] = 5.0
    # node 5 (rows 9-13)
    a[9, OP['max_pool_3x3']] = 2.5
    a[13, OP['bin_dil_conv_5x5']] = 3.0
    a[11, OP['bin_dil_conv_3x3']] = 2.0
    return a


EXPECTED = (('bin_conv_3x3', 0), ('zeroise', 1),
            ('zeroise', 0), ('avg_pool_3x3', 1),
            ('zeroise', 2), ('zeroise', 3),
            ('bin_dil_conv_5x5', 4), ('max_pool_3x3', 0))


def test_derivation_keeps_zeroise_in_ranking_and_choice():
    a = _alphas()
    g = derive_genotype(a, a.copy(), name='hand')
    assert g.normal == EXPECTED and g.reduce == EXPECTED and g.name == 'hand'
    # the DARTS rule (Zeroise excluded) would have kept bin_conv_5x5 from input 2 for node 3; BNAS does not
    assert ('bin_conv_5x5', 2) not in g.normal
    # derivation works on torch tensors too (the alphas of a model)
    torch = pytest.importorskip('torch')
    assert derive_genotype(torch.tensor(a), torch.tensor(a)) == g


def test_gamma_flips_zeroise_under_intended_rule_only():
    a = _alphas()
    r = a.copy()
    r[1, OP['zeroise']] = 2.0  # Zeroise beats bin_conv_3x3 by e^0.5 = 1.65x < gamma = 3
    r[1, OP['bin_conv_3x3']] = 1.5
    base = derive_genotype(a, r)
    assert base.reduce[1] == ('zeroise', 1)
    flipped = derive_genotype(a, r, gamma=3.0)
    assert ('bin_conv_3x3', 1) in flipped.reduce[:2]
    assert ('zeroise', 1) not in flipped.reduce[:2]
    # the released code divides row 0 instead: no functional change (node 0's pair may only reorder)
    official = derive_genotype(a, r, gamma=3.0, gamma_rule='official')
    for cell in ('normal', 'reduce'):
        b, o = base.cell(cell), official.cell(cell)
        assert set(b[:2]) == set(o[:2]) and b[2:] == o[2:]
    with pytest.raises(ConfigError, match='gamma_rule'):
        derive_genotype(a, r, gamma=3.0, gamma_rule='column')


def test_derivation_rejects_wrong_alpha_shape():
    with pytest.raises(ConfigError, match='does not fit'):
        derive_genotype(np.zeros((13, 7)), np.zeros((14, 7)))
    with pytest.raises(ConfigError, match='does not fit'):
        derive_genotype(np.zeros((14, 6)), np.zeros((14, 6)))


def test_unknown_op_names_the_op_and_the_allowed_list(tmp_path):
    text = tmp_path / 'bad.yaml'
    g = load_genotype('latest_cell').to_dict()
    g['normal'][3] = ['sep_conv_3x3', 1]
    del g['name']  # unnamed: the genotype is named after its file
    text.write_text(yaml.safe_dump(g))
    with pytest.raises(ConfigError) as e:
        load_genotype(text)
    msg = str(e.value)
    assert 'sep_conv_3x3' in msg and all(op in msg for op in PRIMITIVES) and '\n' not in msg
    assert 'bad' in msg  # names the genotype (file stem)


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / 'broken.yaml'
    path.write_text('name: broken\nnormal:\n  - [bin_conv_3x3, 1]\n  - [zeroise, 0\nreduce: []\n')
    with pytest.raises(ConfigError) as e:
        load_genotype(path)
    msg = str(e.value)
    assert str(path) in msg and '\n' not in msg
    line = int(msg.split(str(path) + ':')[1].split()[0].rstrip(':,;'))
    assert line in (4, 5)  # the unclosed bracket opens on line 4; the parser notices on line 5


def test_other_bad_genotypes():
    with pytest.raises(ConfigError, match='input'):
        Genotype(normal=(('bin_conv_3x3', 2), ('zeroise', 0)), reduce=(('zeroise', 0), ('zeroise', 1)))
    with pytest.raises(ConfigError, match='two'):
        Genotype(normal=(('bin_conv_3x3', 0),), reduce=(('zeroise', 0),))
    with pytest.raises(ConfigError, match='nope'):
        load_genotype('nope')
    with pytest.raises(ConfigError, match='entry'):
        Genotype.from_dict({'normal': [['zeroise']], 'reduce': []}, name='x')
