"""BNASSpace: the NNI model space, its labels, freezing, and equivalence with genotype-built networks."""
import warnings

import pytest
import torch

warnings.filterwarnings('ignore', message='.*is found to be not a nn.Module.*')

from nni.nas.space import model_context  # noqa: E402

from bnas_nni.errors import ConfigError  # noqa: E402
from bnas_nni.genotypes import Genotype, load_genotype  # noqa: E402
from bnas_nni.networks import BNASNetwork, build_model, count_parameters  # noqa: E402
from bnas_nni.ops import PRIMITIVES  # noqa: E402
from bnas_nni.space import BNASSpace, load_space_config  # noqa: E402


def _same_network(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(sa[k].shape == sb[k].shape for k in sa)
    assert [type(m).__name__ for m in a.modules()][1:] == [type(m).__name__ for m in b.modules()][1:]
    assert count_parameters(a) == count_parameters(b)


def test_paper_space_labels_and_candidates():
    space = BNASSpace.from_config('bnas')
    labels = space.simplify()
    # 4 nodes x 2 slots x (op, input) x 2 cell types
    assert len(labels) == 32
    assert set(labels['normal/op_2_0'].values) == set(PRIMITIVES)
    assert list(labels['reduce/input_5_1'].values) == [0, 1, 2, 3, 4]


def test_freeze_equals_genotype_build_cifar():
    genotype = load_genotype('latest_cell_zeroise')
    space = BNASSpace(init_channels=36, layers=20)
    frozen = space.freeze(genotype.to_arch_dict())
    reference = build_model('bnas-a')
    _same_network(frozen, reference)
    assert count_parameters(frozen) == 5_578_252
    frozen.load_state_dict(reference.state_dict())
    frozen.eval(), reference.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(frozen(x), reference(x))


def test_freeze_equals_genotype_build_imagenet():
    genotype = load_genotype('latest_cell')
    space = BNASSpace(dataset='imagenet', init_channels=8, layers=5, num_classes=7)
    frozen = space.freeze(genotype.to_arch_dict())
    reference = BNASNetwork(genotype, dataset='imagenet', init_channels=8, layers=5, num_classes=7)
    _same_network(frozen, reference)
    frozen.load_state_dict(reference.state_dict())
    frozen.eval(), reference.eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(frozen(x), reference(x))


def test_model_context_builds_fixed_network():
    arch = load_genotype('latest_cell_zeroise').to_arch_dict()
    with model_context(arch):
        net = BNASSpace(init_channels=4, layers=3, num_nodes=4)
    assert net.genotype == load_genotype('latest_cell_zeroise')


def test_random_samples_are_valid_and_run():
    space = BNASSpace.from_config('bnas-tiny')
    torch.manual_seed(0)
    for seed in range(3):
        memo = {}
        model = space.random(memo=memo, random_state=__import__('numpy').random.RandomState(seed))
        assert space.contains(memo)
        genotype = Genotype.from_arch_dict(memo)
        assert model.genotype == genotype
        out = model(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_freeze_after_one_shot_mutation():
    from nni.nas.strategy import DARTS

    space = BNASSpace.from_config('bnas-tiny')
    arch = {}
    space.random(memo=arch)
    DARTS().mutate_model(space)  # turns the space into a supernet in place
    assert 'DifferentiableMixedCell' in type(space.cells[0]).__name__
    frozen = space.freeze(arch)
    fresh = BNASSpace.from_config('bnas-tiny').freeze(arch)
    _same_network(frozen, fresh)


def test_supernet_weight_count_matches_official():
    from nni.nas.strategy import DARTS

    supernet = DARTS().mutate_model(BNASSpace.from_config('bnas'))
    weights = sum(p.numel() for n, p in supernet.named_parameters() if '_arch_alpha' not in n)
    assert weights == 15_456_032  # the official model_search.Network(16, 10, 8)


def test_op_subset_and_bad_configs(tmp_path):
    space = BNASSpace.from_config('bnas-tiny', ops=['zeroise', 'bin_conv_3x3'])
    assert space.simplify()['normal/op_2_0'].values == ['zeroise', 'bin_conv_3x3']
    with pytest.raises(ConfigError, match=r"unknown op 'bin_conv_7x7'.*allowed ops: zeroise, max_pool_3x3"):
        load_space_config('bnas-tiny', ops=['zeroise', 'bin_conv_7x7'])
    bad = tmp_path / 'bad.yaml'
    bad.write_text('dataset: cifar10\nops: [zeroise, sep_conv_3x3]\n')
    with pytest.raises(ConfigError, match=r"sep_conv_3x3.*bad.yaml"):
        load_space_config(str(bad))
    broken = tmp_path / 'broken.yaml'
    broken.write_text('dataset: cifar10\nops: [zeroise,\n  layers: 3\n')
    with pytest.raises(ConfigError, match=r'malformed YAML at .*broken.yaml:\d+'):
        load_space_config(str(broken))
    with pytest.raises(ConfigError, match='unknown keys'):
        load_space_config('bnas-tiny', widht=3)
    arch = load_genotype('latest_cell').to_arch_dict()
    with pytest.raises(ConfigError, match='outside this space'):
        BNASSpace(ops=['zeroise', 'max_pool_3x3'], init_channels=4, layers=3).freeze(arch)
